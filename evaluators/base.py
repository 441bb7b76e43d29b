"""The evaluator protocol: a :class:`~search_space.Scheme` in, named objectives with directions out.

Every evaluator (accuracy, hardware cost, their composite) exposes ``objectives`` and
``evaluate(scheme) -> Evaluation``. A failed evaluation (diverged training, out of memory) is an
``Evaluation`` with ``failed=True`` and a reason, never an exception into the strategy.

User evaluators follow the same contract, checked by :func:`check_evaluator` when a search starts
(``objectives`` a non-empty tuple of :class:`Objective` with distinct names, ``evaluate`` a method)
and by :func:`evaluate_safely` on every call: an exception inside ``evaluate`` fails that one
candidate with the exception as its reason; breaking the contract (returning something other than
an :class:`Evaluation`, or no value for an objective) stops the search with an
:class:`EvaluatorError`, because every later call would break it too.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from search_space import NMSearchError, Scheme

MAXIMIZE = "maximize"
MINIMIZE = "minimize"


class EvaluatorError(NMSearchError):
    """An evaluator that breaks the :class:`Evaluator` contract."""


@dataclass(frozen=True)
class Objective:
    """A named quantity a strategy optimises, with its direction and display unit.

    Attributes:
        name: The metric's name, e.g. ``"accuracy"``, ``"latency_ms"``.
        direction: ``"maximize"`` or ``"minimize"``.
        unit: Display unit, e.g. ``"ms"`` (may be empty).

    Raises:
        NMSearchError: If ``direction`` is neither.
    """

    name: str
    direction: str
    unit: str = ""

    def __post_init__(self) -> None:
        if self.direction not in (MAXIMIZE, MINIMIZE):
            raise NMSearchError(f"objective {self.name!r}: direction must be 'maximize' or 'minimize'")

    @property
    def sign(self) -> float:
        """+1 to maximise, -1 to minimise: ``sign * value`` is always "larger is better"."""
        return 1.0 if self.direction == MAXIMIZE else -1.0

    @property
    def label(self) -> str:
        """The name with its unit, e.g. ``"latency_ms [ms]"``, for axes and tables."""
        return f"{self.name} [{self.unit}]" if self.unit else self.name


@dataclass(frozen=True)
class Evaluation:
    """Objective values of one scheme, plus extra measurements. Immutable.

    Attributes:
        values: Objective name to value (NaN for a failed evaluation).
        failed: Whether the evaluation failed (e.g. training diverged).
        reason: Why it failed, one line.
        info: Other measurements (``loss``, ``fidelity``, every cost metric, ...).
        duration_s: Wall time of the evaluation.
    """

    values: Mapping[str, float]
    failed: bool = False
    reason: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))
        object.__setattr__(self, "info", MappingProxyType(dict(self.info)))

    @classmethod
    def failure(cls, objectives: Sequence[Objective], reason: str, **kwargs: Any) -> Evaluation:
        """A failed evaluation: every objective NaN.

        Args:
            objectives: The evaluator's objectives.
            reason: Why it failed, one line.
            **kwargs: Other fields (``info``, ``duration_s``).

        Returns:
            The evaluation with ``failed=True``.
        """
        return cls({o.name: math.nan for o in objectives}, failed=True, reason=reason, **kwargs)


@runtime_checkable
class Evaluator(Protocol):
    """Maps a scheme to named objectives. Implementations are bound to one search space.

    Any object with these two members is an evaluator (nothing to inherit);
    ``isinstance(obj, Evaluator)`` checks for them.
    """

    @property
    def objectives(self) -> tuple[Objective, ...]:
        """The objectives ``evaluate`` reports, in order."""
        ...

    def evaluate(self, scheme: Scheme) -> Evaluation:
        """Score one scheme.

        Args:
            scheme: A scheme of the evaluator's search space.

        Returns:
            Its evaluation; a failure is an ``Evaluation`` with ``failed=True``, not an exception.
        """
        ...


def check_evaluator(evaluator: object) -> tuple[Objective, ...]:
    """Check the :class:`Evaluator` contract before a search starts.

    Args:
        evaluator: Any object meant to be an evaluator.

    Returns:
        Its objectives.

    Raises:
        EvaluatorError: one line naming what is wrong and how to fix it.
    """
    name = type(evaluator).__name__
    if not callable(getattr(evaluator, "evaluate", None)):
        raise EvaluatorError(
            f"{name} is not an evaluator: it has no evaluate(scheme) method returning evaluators.Evaluation"
        )
    try:
        objectives = evaluator.objectives  # type: ignore[attr-defined]
    except AttributeError:
        raise EvaluatorError(
            f"{name} has no .objectives: add e.g. objectives = (Objective('accuracy', 'maximize'),)"
        ) from None
    if not isinstance(objectives, tuple) or not objectives:
        raise EvaluatorError(
            f"{name}.objectives must be a non-empty tuple of evaluators.Objective, got {_describe(objectives)}; "
            "e.g. objectives = (Objective('accuracy', 'maximize'),)"
        )
    wrong = next((o for o in objectives if not isinstance(o, Objective)), None)
    if wrong is not None:
        raise EvaluatorError(
            f"{name}.objectives must hold evaluators.Objective, got {_describe(wrong)}; "
            f"write Objective({str(wrong)!r}, 'maximize') (or 'minimize')"
        )
    names = [o.name for o in objectives]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EvaluatorError(f"{name}.objectives names {duplicates[0]!r} twice: objective names must be distinct")
    return objectives


def evaluate_safely(evaluator: Evaluator, scheme: Scheme) -> Evaluation:
    """``evaluator.evaluate(scheme)``, with an exception turned into a failed evaluation.

    Args:
        evaluator: An evaluator that passed :func:`check_evaluator`.
        scheme: The candidate.

    Returns:
        The evaluation; a failed one (``reason`` = the exception's type and first line) when
        ``evaluate`` raised.

    Raises:
        EvaluatorError: ``evaluate`` returned something other than an :class:`Evaluation`, or a
            successful evaluation without a value for one of the evaluator's objectives.
    """
    start = time.perf_counter()
    try:
        evaluation = evaluator.evaluate(scheme)
    except EvaluatorError:
        raise
    except Exception as error:  # a user evaluator may raise anything: that candidate fails, the search goes on
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        reason = f"{type(evaluator).__name__}.evaluate raised {type(error).__name__}"
        reason += f": {detail}" if detail else ""
        return Evaluation.failure(evaluator.objectives, reason, duration_s=time.perf_counter() - start)
    if not isinstance(evaluation, Evaluation):
        raise EvaluatorError(
            f"{type(evaluator).__name__}.evaluate returned {_describe(evaluation)}, not an evaluators.Evaluation: "
            "return Evaluation({'accuracy': value, ...})"
        )
    missing = [o.name for o in evaluator.objectives if o.name not in evaluation.values]
    if missing and not evaluation.failed:
        raise EvaluatorError(
            f"{type(evaluator).__name__}.evaluate returned no value for objective {missing[0]!r} "
            f"(it returned: {', '.join(evaluation.values) or 'nothing'})"
        )
    return evaluation


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def objective_names(evaluator: Evaluator) -> list[str]:
    """The names of an evaluator's objectives, in order."""
    return [objective.name for objective in evaluator.objectives]


def select_objectives(evaluator: Evaluator, names: Sequence[str] | None) -> tuple[Objective, ...]:
    """Pick some of an evaluator's objectives.

    Args:
        evaluator: Any evaluator.
        names: Objective names, or ``None`` for all.

    Returns:
        The objectives named, in the order of ``names``.

    Raises:
        NMSearchError: If a name is not one of the evaluator's objectives.
    """
    if names is None:
        return evaluator.objectives
    by_name = {o.name: o for o in evaluator.objectives}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise NMSearchError(f"unknown objective {unknown[0]!r}; this evaluator provides: {', '.join(by_name)}")
    return tuple(by_name[n] for n in names)


_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Constraint:
    """A bound on a metric, e.g. ``latency_ms <= 0.5`` or ``accuracy >= 0.95``.

    Attributes:
        metric: The metric's name.
        op: ``"<="`` or ``">="``.
        bound: The bound.

    Raises:
        NMSearchError: If ``op`` is neither.
    """

    metric: str
    op: str
    bound: float

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise NMSearchError(f"constraint on {self.metric!r}: operator must be '<=' or '>=', got {self.op!r}")

    @classmethod
    def parse(cls, text: str | Constraint) -> Constraint:
        """Read a constraint from text.

        Args:
            text: ``"metric<=value"`` or ``"metric>=value"`` (spaces allowed), or a ``Constraint``.

        Returns:
            The constraint.

        Raises:
            NMSearchError: If the text is not of that form.
        """
        if isinstance(text, Constraint):
            return text
        match = _CONSTRAINT.match(str(text))
        if match is None:
            raise NMSearchError(f"invalid constraint {text!r}: write it as 'metric<=value' or 'metric>=value'")
        return cls(match.group(1), match.group(2), float(match.group(3)))

    def violation(self, values: Mapping[str, float]) -> float:
        """How far ``values`` break the bound (Optuna's convention).

        Args:
            values: Metric values, including this constraint's metric.

        Returns:
            <= 0 when satisfied, else by how much the bound is exceeded.

        Raises:
            NMSearchError: If the metric is not in ``values``.
        """
        if self.metric not in values:
            raise NMSearchError(f"constraint on {self.metric!r}, but the evaluator reports only: {', '.join(values)}")
        value = float(values[self.metric])
        return value - self.bound if self.op == "<=" else self.bound - value

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.bound:g}"
