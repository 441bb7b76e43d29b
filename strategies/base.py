"""The strategy protocol and the result every strategy returns.

A strategy explores a :class:`~search_space.SearchSpace` by proposing schemes to an
:class:`~evaluators.Evaluator`; whatever it does inside, it returns a :class:`SearchResult` in
one format, so fronts of different strategies overlay in one plot.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch

from evaluators import AccuracyEvaluator, Constraint, Evaluation, Evaluator, Objective, find_part
from evaluators.pareto import hypervolume, knee_index, pareto_front
from search_space import NMSearchError, Scheme, SearchSpace, atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

COMPLETE, FAIL, RUNNING, WAITING = "COMPLETE", "FAIL", "RUNNING", "WAITING"
RESULT_FILE = "result.json"


@runtime_checkable
class Strategy(Protocol):
    """Explores a search space; configuration lives in the strategy object (a dataclass)."""

    name: str

    def search(
        self, space: SearchSpace, evaluator: Evaluator, *, run_dir: str | os.PathLike | None = None
    ) -> SearchResult: ...


class StrategyConfigError(NMSearchError):
    """A strategy field of the wrong type or outside its choices."""


class Choice(str, Enum):
    """A strategy's choice field: a ``str`` Enum whose member names equal their values, so Hydra /
    OmegaConf check a config value when composing and the old plain strings still work
    (``Sampler.tpe == "tpe"``)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    def __repr__(self) -> str:
        return repr(self.value)  # messages quote choices as the strings users write

    @classmethod
    def invalid(cls, label: str, value: Any) -> str:
        """The one-line message for a ``value`` that is not a choice (subclasses may word it)."""
        return f"{label} = {value!r} is not one of {cls.values()}"

    @classmethod
    def values(cls) -> str:
        """The choices, comma-separated."""
        return ", ".join(str(member.value) for member in cls)


@dataclass
class StrategyBase:
    """Shared base of the strategy dataclasses: every field is checked against its annotation when
    the object is made (``int`` refuses ``2.5``, ``float`` takes ints, :class:`Choice` fields take
    their values as strings), so bad configuration fails in one line before any work. Ranges and
    cross-field rules stay in each strategy's own validation."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        label = getattr(self, "name", type(self).__name__)
        for f in dataclasses.fields(self):
            value = _checked(f"{label}.{f.name}", getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)


def _checked(label: str, value: Any, annotation: Any) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        error: StrategyConfigError | None = None
        for option in options:
            try:
                return _checked(label, value, option)
            except StrategyConfigError as failure:
                error = error or failure
        raise error if error else StrategyConfigError(f"{label} may not be null")
    if origin in (list, tuple) and args:
        if not isinstance(value, list | tuple):
            raise StrategyConfigError(f"{label} must be a list, got {value!r}")
        item = args[0]
        return type(value)(_checked(f"{label}[{i}]", v, item) for i, v in enumerate(value))
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        if isinstance(value, annotation):
            return value
        try:
            return annotation(value)
        except ValueError:
            message = annotation.invalid(label, value) if issubclass(annotation, Choice) else f"{label} = {value!r}"
            raise StrategyConfigError(message) from None
    if annotation is bool:
        if not isinstance(value, bool):
            raise StrategyConfigError(f"{label} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise StrategyConfigError(f"{label} must be an integer, got {value!r}")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise StrategyConfigError(f"{label} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise StrategyConfigError(f"{label} must be a string, got {value!r}")
        return value
    return value  # nested configs (RecipeConfig) validate themselves


@dataclass(frozen=True)
class Candidate:
    """One evaluated (or attempted) scheme, as strategies report it."""

    trial: int
    scheme: Scheme
    evaluation: Evaluation | None
    state: str = COMPLETE
    duration_s: float = 0.0
    feasible: bool = True
    reason: str = ""


def accuracy_part(evaluator: Evaluator) -> AccuracyEvaluator:
    """The :class:`~evaluators.AccuracyEvaluator` inside ``evaluator``: training strategies take the
    task, pre-trained model and data from its trainer. Kept for compatibility; it is
    :func:`evaluators.find_part` with ``AccuracyEvaluator``."""
    return find_part(evaluator, AccuracyEvaluator, purpose="this strategy trains the model")


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write a strategy checkpoint atomically (``torch.save`` to a temporary file renamed over ``path``).

    Args:
        path: the checkpoint file.
        state: tensors and plain Python types only (what :func:`load_checkpoint` accepts).

    Returns:
        The path written.
    """
    return atomic_write(path, lambda handle: torch.save(dict(state), handle))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``: tensors and
    plain types only, so a crafted file in a shared run directory cannot execute code.

    Args:
        path: the checkpoint file.

    Returns:
        The state, or ``None`` when there is no file or it cannot be read (truncated, corrupt, or
        holding anything but tensors and plain types): the caller starts over, after one warning line.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        logger.warning("checkpoint '%s' cannot be read (%s); starting this run over", path, reason[:200])
        return None
    if not isinstance(state, dict):
        logger.warning("checkpoint '%s' does not hold a state dict; starting this run over", path)
        return None
    return state


def trials_frame(candidates: Iterable[Candidate], objectives: Sequence[Objective]) -> pd.DataFrame:
    """One row per candidate: trial, state, objectives, other metrics, feasibility, time, scheme."""
    rows = []
    for c in candidates:
        values = dict(c.evaluation.values) if c.evaluation is not None else {}
        row: dict[str, Any] = {"trial": c.trial, "state": c.state}
        for objective in objectives:
            row[objective.name] = values.pop(objective.name, np.nan)
        row.update(values)
        if c.evaluation is not None:
            row.update({f"info.{k}": v for k, v in c.evaluation.info.items() if _is_scalar(v)})
        reason = c.reason or (c.evaluation.reason if c.evaluation is not None else "")
        row.update(
            feasible=c.feasible,
            duration_s=c.duration_s,
            reason=reason,
            summary=c.scheme.summary(),
            scheme=json.dumps(c.scheme.choices, separators=(",", ":")),
        )
        rows.append(row)
    base = ["trial", "state", *(o.name for o in objectives)]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=[*base, "feasible", "duration_s", "reason", "summary", "scheme"])
    tail = ["feasible", "duration_s", "reason", "summary", "scheme"]
    middle = [c for c in frame.columns if c not in base and c not in tail]
    return frame[base + middle + tail].sort_values("trial", kind="stable").reset_index(drop=True)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, int | float | str | bool | np.number)


@dataclass
class SearchResult:
    """What a search produced: every candidate (``trials``), its schemes, and the Pareto front.

    The front is taken over completed, feasible candidates in the ``objectives`` the strategy
    optimised; the trials frame also carries every other metric the evaluator reported.
    """

    strategy: str
    objectives: tuple[Objective, ...]
    trials: pd.DataFrame
    schemes: dict[int, Scheme]
    metadata: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # strategy logs, saved as NAME.csv

    @classmethod
    def from_candidates(
        cls,
        strategy: str,
        objectives: Sequence[Objective],
        candidates: Sequence[Candidate],
        metadata: Mapping[str, Any] | None = None,
        tables: Mapping[str, pd.DataFrame] | None = None,
    ) -> SearchResult:
        return cls(
            strategy,
            tuple(objectives),
            trials_frame(candidates, objectives),
            {c.trial: c.scheme for c in candidates},
            dict(metadata or {}),
            dict(tables or {}),
        )

    @property
    def completed(self) -> pd.DataFrame:
        return self.trials[(self.trials["state"] == COMPLETE) & self.trials["feasible"].astype(bool)]

    @property
    def front(self) -> pd.DataFrame:
        """Non-dominated completed, feasible candidates, best first objective first."""
        return pareto_front(self.completed, self.objectives)

    def front_schemes(self) -> dict[int, Scheme]:
        return {int(t): self.schemes[int(t)] for t in self.front["trial"]}

    def knee(self) -> int:
        """Trial number of the front's knee (see :func:`evaluators.pareto.knee_index`)."""
        front = self.front
        return int(front.loc[knee_index(front, self.objectives), "trial"])

    def select(self, constraints: Sequence[str | Constraint] = (), objective: str | None = None) -> int:
        """Trial number of the best front point (by ``objective``, default the first) that
        satisfies every constraint; raises when none does."""
        front = self.front
        if front.empty:
            raise NMSearchError(f"{self.strategy}: no completed feasible candidate to select from")
        parsed = [Constraint.parse(c) for c in constraints]
        ok = np.ones(len(front), dtype=bool)
        for constraint in parsed:
            if constraint.metric not in front.columns:
                raise NMSearchError(
                    f"constraint on {constraint.metric!r}, but the results have: "
                    f"{', '.join(c for c in front.columns if c not in ('trial', 'state', 'scheme', 'summary'))}"
                )
            ok &= np.array([constraint.violation(row) <= 0 for row in front.to_dict("records")])
        if not ok.any():
            best = {c.metric: front[c.metric].min() if c.op == "<=" else front[c.metric].max() for c in parsed}
            raise NMSearchError(
                f"no Pareto point satisfies {' and '.join(map(str, parsed))} (best available: "
                + ", ".join(f"{k}={v:.4g}" for k, v in best.items())
                + ")"
            )
        by = next((o for o in self.objectives if o.name == objective), None) if objective else self.objectives[0]
        if by is None:
            raise NMSearchError(
                f"unknown objective {objective!r}; optimised: {', '.join(o.name for o in self.objectives)}"
            )
        candidates = front[ok]
        index = candidates[by.name].idxmax() if by.direction == "maximize" else candidates[by.name].idxmin()
        return int(candidates.loc[index, "trial"])

    def hypervolume(self, reference: Sequence[float]) -> float:
        front = self.front
        return hypervolume(
            front[[o.name for o in self.objectives]].to_numpy(dtype=float),
            [o.direction for o in self.objectives],
            reference,
        )

    # -- files -----------------------------------------------------------------------------
    def save(self, run_dir: str | os.PathLike) -> dict[str, Path]:
        """Write ``trials.csv``, ``pareto.csv``, ``schemes/trial_NNNN.json`` (one per Pareto point),
        one ``NAME.csv`` per strategy log in ``tables`` and ``result.json`` (strategy, objectives,
        metadata) into ``run_dir``, each atomically."""
        run_dir = Path(run_dir)
        paths = {
            "trials": atomic_write_text(run_dir / "trials.csv", self.trials.to_csv(index=False)),
            "pareto": atomic_write_text(run_dir / "pareto.csv", self.front.to_csv(index=False)),
        }
        for trial, scheme in self.front_schemes().items():
            scheme.save(run_dir / "schemes" / f"trial_{trial:04d}.json")
        for name, table in self.tables.items():
            paths[name] = atomic_write_text(run_dir / f"{name}.csv", table.to_csv(index=False))
        meta = {
            "strategy": self.strategy,
            "objectives": [{"name": o.name, "direction": o.direction, "unit": o.unit} for o in self.objectives],
            "metadata": self.metadata,
            "tables": sorted(self.tables),
        }
        paths["result"] = atomic_write_text(run_dir / RESULT_FILE, json.dumps(meta, indent=2, default=str) + "\n")
        return paths

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> SearchResult:
        """Read a result written by :meth:`save` (schemes of non-Pareto trials come from the
        ``scheme`` column and carry the fingerprint recorded in the metadata)."""
        run_dir = Path(run_dir)
        meta_path, trials_path = run_dir / RESULT_FILE, run_dir / "trials.csv"
        if not meta_path.is_file() or not trials_path.is_file():
            raise NMSearchError(
                f"'{run_dir}' holds no finished search (missing {RESULT_FILE} or trials.csv); "
                "point to a run directory written by a completed search"
            )
        meta = json.loads(meta_path.read_text())
        objectives = tuple(Objective(**o) for o in meta["objectives"])
        trials = pd.read_csv(trials_path, dtype={"reason": str, "summary": str, "scheme": str, "state": str})
        trials["reason"] = trials["reason"].fillna("")
        fingerprint = meta.get("metadata", {}).get("fingerprint")
        schemes = {
            int(row.trial): Scheme.from_choices(json.loads(row.scheme), fingerprint=fingerprint)
            for row in trials.itertuples()
        }
        for path in sorted((run_dir / "schemes").glob("trial_*.json")):
            schemes[int(path.stem.split("_")[1])] = Scheme.load(path)
        tables = {name: pd.read_csv(run_dir / f"{name}.csv") for name in meta.get("tables", [])}
        return cls(meta["strategy"], objectives, trials, schemes, meta.get("metadata", {}), tables)
