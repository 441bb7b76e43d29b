"""Several evaluators as one: accuracy and hardware cost scored together for a strategy.

Objectives are concatenated in order (names must be distinct), values merged, the evaluation
fails when any part fails (reasons joined), and durations are summed. Only the
:class:`~evaluators.base.Evaluator` protocol of the parts is used.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from evaluators.accuracy import AccuracyConfig, AccuracyEvaluator
from evaluators.base import Evaluation, Evaluator, EvaluatorError, Objective, check_evaluator
from evaluators.task import Task
from evaluators.training import Trainer

if TYPE_CHECKING:
    from evaluators.cost import HardwareCostModel
from search_space import NMSearchError, Scheme, SearchSpace

E = TypeVar("E")

# The one set of defaults for an assembled evaluator (the Hydra app's ``conf/config.yaml`` too).
DEFAULT_HARDWARE = "orin"
DEFAULT_COST_METRICS = ("latency_ms", "bytes_mb")
MEASURED_PREFIX = "measured:"  # hardware="measured:<table>": a device's measured latency table


def find_part(evaluator: Evaluator, kind: type[E], *, purpose: str = "") -> E:
    """The part of type ``kind`` inside ``evaluator`` (itself, or a part of a composite).

    Args:
        evaluator: an evaluator, composite or not.
        kind: the evaluator class wanted (e.g. :class:`AccuracyEvaluator`).
        purpose: why the caller needs it, for the error message (e.g. ``"this strategy trains the model"``).

    Returns:
        The first matching part.

    Raises:
        NMSearchError: no part is a ``kind``.
    """
    if isinstance(evaluator, kind):
        return evaluator
    for part in getattr(evaluator, "parts", ()):
        if isinstance(part, kind):
            return part
    why = f"{purpose}, so " if purpose else ""
    article = "an" if kind.__name__[0] in "AEIOU" else "a"
    raise NMSearchError(f"{why}its evaluator must include {article} {kind.__name__}; got {type(evaluator).__name__}")


def find_part_or_none(evaluator: Evaluator, kind: type[E]) -> E | None:
    """:func:`find_part`, or ``None`` when no part is a ``kind``."""
    try:
        return find_part(evaluator, kind)
    except NMSearchError:
        return None


@dataclass(frozen=True)
class CostModelConfig:
    """How the hardware cost model runs; also the Hydra schema of the ``evaluator.dtype`` and
    ``evaluator.batch_size`` keys.

    Attributes:
        dtype: operand type of the profile's kernels (``fp16``, ``int8``, ...).
        batch_size: the deployment batch the cost model assumes.
    """

    dtype: str = "fp16"
    batch_size: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise NMSearchError(f"evaluator.batch_size must be a positive integer, got {self.batch_size!r}")


def build_cost_model(
    hardware: str | Mapping[str, Any] = DEFAULT_HARDWARE, cost: CostModelConfig | None = None
) -> HardwareCostModel:
    """The hardware cost model of a profile, as :func:`build_evaluator` builds it.

    Args:
        hardware: a profile name of ``conf/hardware``, a profile mapping, ``"measured:<table>"`` or
            ``{"measured": <table>, "fallback": <profile>, "device": <name>, "statistic": "median"}``
            (:class:`~evaluators.measured.MeasuredCostModel`: the table's latencies, the fallback
            profile's roofline for entries it lacks).
        cost: dtype and deployment batch (default :class:`CostModelConfig`).

    Returns:
        The cost model.

    Raises:
        HardwareProfileError: an unknown or malformed profile.
        MeasuredTableError: an unreadable table, or one for another dtype, batch or device.
    """
    from evaluators.cost import HardwareCostModel
    from evaluators.measured import MeasuredCostModel

    cost = cost or CostModelConfig()
    if isinstance(hardware, str) and hardware.startswith(MEASURED_PREFIX):
        hardware = {"measured": hardware.removeprefix(MEASURED_PREFIX)}
    if isinstance(hardware, Mapping) and "measured" in hardware:
        unknown = sorted(set(hardware) - {"measured", "fallback", "device", "statistic"})
        if unknown:
            raise NMSearchError(
                f"hardware: unknown key {unknown[0]!r} for a measured table; "
                "keys: measured, fallback, device, statistic"
            )
        return MeasuredCostModel.from_table(
            hardware["measured"],
            hardware.get("fallback"),
            cost.dtype,
            cost.batch_size,
            hardware.get("device"),
            hardware.get("statistic") or "median",
        )
    return HardwareCostModel.from_profile(hardware, dtype=cost.dtype, batch_size=cost.batch_size)


def build_evaluator(
    trainer: Trainer,
    space: SearchSpace | None = None,
    *,
    accuracy: AccuracyConfig | None = None,
    cost: CostModelConfig | None = None,
    hardware: str | Mapping[str, Any] = DEFAULT_HARDWARE,
    metrics: Sequence[str] = DEFAULT_COST_METRICS,
) -> CompositeEvaluator:
    """The evaluator a search scores schemes with: accuracy plus the cost model's ``metrics``.

    The one place an evaluator is assembled (the Hydra app and :meth:`CompositeEvaluator.for_task`
    call it). The cost model is built first, so a bad profile fails before the model is touched.

    Args:
        trainer: the task's trainer (pre-trained model, data).
        space: the search space; discovered from the task's model when ``None``.
        accuracy: accuracy fidelity and recipe (default :class:`AccuracyConfig`).
        cost: cost-model dtype and batch (default :class:`CostModelConfig`).
        hardware: a profile name of ``conf/hardware``, a profile mapping or a measured table
            (see :func:`build_cost_model`).
        metrics: the cost metrics reported as objectives, after ``accuracy``.

    Returns:
        ``CompositeEvaluator(AccuracyEvaluator, CostEvaluator)`` over one search space.

    Raises:
        HardwareProfileError: an unknown or malformed profile.
        CostModelError: an unknown metric or dtype.
    """
    # Imported here so that this module depends on the cost model only when asked to build one.
    from evaluators.cost import CostEvaluator

    cost_model = build_cost_model(hardware, cost)
    accuracy_evaluator = AccuracyEvaluator(trainer, space, accuracy)
    return CompositeEvaluator(accuracy_evaluator, CostEvaluator(accuracy_evaluator.space, cost_model, tuple(metrics)))


class CompositeEvaluator:
    """Combines ``evaluators`` (any number, at least one) into one :class:`~evaluators.base.Evaluator`.

    ``info`` keys of later parts that an earlier part already used are stored as
    ``"<PartClass>.<key>"`` rather than overwriting.
    """

    def __init__(self, *evaluators: Evaluator) -> None:
        if not evaluators:
            raise NMSearchError("CompositeEvaluator needs at least one evaluator")
        for evaluator in evaluators:
            check_evaluator(evaluator)
        names = [objective.name for evaluator in evaluators for objective in evaluator.objectives]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise NMSearchError(f"objective {duplicates[0]!r} is reported by more than one evaluator")
        self.parts: tuple[Evaluator, ...] = evaluators
        self._objectives = tuple(objective for evaluator in evaluators for objective in evaluator.objectives)

    @property
    def objectives(self) -> tuple[Objective, ...]:
        return self._objectives

    def evaluate(self, scheme: Scheme) -> Evaluation:
        values: dict[str, float] = {}
        info: dict[str, object] = {}
        reasons: list[str] = []
        duration = 0.0
        for part in self.parts:
            result = part.evaluate(scheme)
            if not isinstance(result, Evaluation):
                raise EvaluatorError(
                    f"{type(part).__name__}.evaluate returned {type(result).__name__}, not an evaluators.Evaluation"
                )
            missing = [o.name for o in part.objectives if o.name not in result.values]
            if missing and not result.failed:
                raise EvaluatorError(f"{type(part).__name__} returned no value for objective {missing[0]!r}")
            values.update({o.name: result.values.get(o.name, math.nan) for o in part.objectives})
            for key, value in result.info.items():
                info[f"{type(part).__name__}.{key}" if key in info else key] = value
            if result.failed:
                reasons.append(result.reason or f"{type(part).__name__} failed")
            duration += result.duration_s
        return Evaluation(values, failed=bool(reasons), reason="; ".join(reasons), info=info, duration_s=duration)

    @classmethod
    def for_task(
        cls,
        task: Task,
        hardware: str | Mapping[str, Any] = DEFAULT_HARDWARE,
        *,
        accuracy: AccuracyConfig | None = None,
        metrics: Sequence[str] | None = None,
        dtype: str = "fp16",
        batch_size: int = 1,
        space: SearchSpace | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = False,
    ) -> CompositeEvaluator:
        """:func:`build_evaluator` for ``task`` (a trainer made here): accuracy plus the cost model's
        ``metrics`` (default ``latency_ms``, ``bytes_mb``) on the ``hardware`` profile (default ``orin``)."""
        trainer = Trainer(task, seed=seed, device=device, cache_dir=cache_dir, progress=progress)
        return build_evaluator(
            trainer,
            space,
            accuracy=accuracy,
            cost=CostModelConfig(dtype, batch_size),
            hardware=hardware,
            metrics=tuple(metrics or DEFAULT_COST_METRICS),
        )
