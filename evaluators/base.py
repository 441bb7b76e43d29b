"""The evaluator protocol: a :class:`~search_space.Scheme` in, named objectives with directions out.

Every evaluator (accuracy, hardware cost, their composite) exposes ``objectives`` and
``evaluate(scheme) -> Evaluation``. A failed evaluation (diverged training, out of memory) is an
``Evaluation`` with ``failed=True`` and a reason, never an exception into the strategy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from search_space import NMSearchError, Scheme

MAXIMIZE = "maximize"
MINIMIZE = "minimize"


@dataclass(frozen=True)
class Objective:
    """A named quantity a strategy optimises, with its direction and display unit."""

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
        return f"{self.name} [{self.unit}]" if self.unit else self.name


@dataclass(frozen=True)
class Evaluation:
    """Objective values of one scheme (``values``), plus extra measurements (``info``)."""

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
        return cls({o.name: math.nan for o in objectives}, failed=True, reason=reason, **kwargs)


@runtime_checkable
class Evaluator(Protocol):
    """Maps a scheme to named objectives. Implementations are bound to one search space."""

    @property
    def objectives(self) -> tuple[Objective, ...]: ...

    def evaluate(self, scheme: Scheme) -> Evaluation: ...


def objective_names(evaluator: Evaluator) -> list[str]:
    return [objective.name for objective in evaluator.objectives]


def select_objectives(evaluator: Evaluator, names: Sequence[str] | None) -> tuple[Objective, ...]:
    """The evaluator's objectives named in ``names`` (all when ``None``), in that order."""
    if names is None:
        return evaluator.objectives
    by_name = {o.name: o for o in evaluator.objectives}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise NMSearchError(f"unknown objective {unknown[0]!r}; this evaluator provides: {', '.join(by_name)}")
    return tuple(by_name[n] for n in names)
