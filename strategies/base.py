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
import random
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
DUPLICATE_OF = "duplicate_of"
REQUIRED_COLUMNS = ("trial", "state", "feasible", "reason", "summary", "scheme")


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


class TrainLoss(Choice):
    """What a strategy that trains the model minimises (:meth:`evaluators.distill.TrainingSource.training`)."""

    auto = "auto"  # task with labels, else distill
    task = "task"  # the task's labelled loss (cross-entropy)
    distill = "distill"  # the frozen dense teacher's outputs on the same unlabeled batch


@dataclass
class StrategyBase:
    """Shared base of the strategy dataclasses: every field is checked against its annotation when
    the object is made (``int`` refuses ``2.5``, ``float`` takes ints, :class:`Choice` fields take
    their values as strings), so bad configuration fails in one line before any work. Ranges and
    cross-field rules stay in each strategy's own validation.

    Resume protocol: :meth:`state_dict` is the progress of the strategy's latest (or running) search
    in tensors and plain types, so ``save_checkpoint(path, strategy.state_dict())`` round-trips
    through :func:`load_checkpoint`; :meth:`load_state_dict` makes the next ``search()`` continue
    from such a state, giving the result an uninterrupted search would have given. Each strategy
    fills the progress its own way (:meth:`_record_progress`) and reads it back in ``search()``
    (:meth:`_take_resume`); strategies given a ``run_dir`` also checkpoint there on their own."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        label = getattr(self, "name", type(self).__name__)
        for f in dataclasses.fields(self):
            value = _checked(f"{label}.{f.name}", getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
        self._progress: dict[str, Any] = {}
        self._resume: dict[str, Any] | None = None

    def config_key(self) -> str:
        """The configuration as canonical JSON: a state only resumes the configuration it was made by."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)

    def state_dict(self) -> dict[str, Any]:
        """The resumable state of the latest search (empty ``progress`` before any).

        Returns:
            ``{"strategy": name, "config": config_key(), "progress": {...}}``: tensors and plain
            Python types only, loadable with ``torch.load(..., weights_only=True)``.
        """
        return {"strategy": self.name, "config": self.config_key(), "progress": dict(self._progress)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next ``search()`` continue from ``state`` (a :meth:`state_dict`).

        Args:
            state: a state made by a strategy of the same name and configuration.

        Raises:
            StrategyConfigError: ``state`` is not such a state.
        """
        if not isinstance(state, Mapping) or not isinstance(state.get("progress"), Mapping):
            raise StrategyConfigError(f"{self.name}: not a strategy state (no 'progress' mapping)")
        if state.get("strategy") != self.name:
            raise StrategyConfigError(f"{self.name}: the state is of strategy {state.get('strategy')!r}")
        if state.get("config") != self.config_key():
            raise StrategyConfigError(f"{self.name}: the state was made by another configuration of this strategy")
        self._progress = dict(state["progress"])
        self._resume = dict(state["progress"])

    def _record_progress(self, **progress: Any) -> None:
        """Replace the progress :meth:`state_dict` reports (tensors are copied: training moves them on)."""
        self._progress = _snapshot(progress)

    def _take_resume(self) -> dict[str, Any] | None:
        """The progress loaded by :meth:`load_state_dict`, once: a later search starts fresh."""
        resume, self._resume = self._resume, None
        return resume

    def _resume_from(self, path: Path) -> dict[str, Any] | None:
        """The progress to continue from: a loaded state if any, else the checkpoint at ``path`` when
        it is readable and of this configuration (otherwise one warning line and a fresh start)."""
        resume = self._take_resume()
        if resume is not None:
            return resume
        state = load_checkpoint(path)
        if state is None:
            return None
        try:
            self.load_state_dict(state)
        except StrategyConfigError as error:
            logger.warning("checkpoint '%s' cannot be resumed (%s); starting this run over", path, error)
            return None
        return self._take_resume()


def _snapshot(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_snapshot(v) for v in value)
    return value


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
    scheme: Scheme | None  # None: the worker died before the trial drew all its choices
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
    """Write a strategy checkpoint atomically (``torch.save`` to a temporary file renamed over ``path``),
    then remove the temporary files of earlier writes of ``path`` killed before their rename (kill -9).

    Args:
        path: the checkpoint file (one writer at a time: rank 0).
        state: tensors and plain Python types only (what :func:`load_checkpoint` accepts).

    Returns:
        The path written.
    """
    written = atomic_write(path, lambda handle: torch.save(dict(state), handle))
    for orphan in written.parent.glob(f".{written.name}.*.tmp"):
        orphan.unlink(missing_ok=True)
    return written


def rng_state() -> dict[str, Any]:
    """Every random state a training strategy draws from, for its checkpoint: Python, NumPy and
    torch on the CPU and on every CUDA device (Gumbel noise and dropout draw from the device's).

    Returns:
        The states, in types :func:`load_checkpoint` reads (``weights_only``).
    """
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any] | torch.Tensor) -> None:
    """Restore the random states :func:`rng_state` saved, so a resumed run draws what the
    uninterrupted one would have (the CUDA states only where CUDA is available).

    Args:
        state: What :func:`rng_state` returned, read back from a checkpoint; a bare tensor (the CPU
            state alone, in Gumbel checkpoints written before the CUDA states were saved) also works.
    """
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, gauss_value = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss_value))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
            summary=c.scheme.summary() if c.scheme is not None else "",
            scheme=json.dumps(c.scheme.choices, separators=(",", ":")) if c.scheme is not None else "",
        )
        rows.append(row)
    base = ["trial", "state", *(o.name for o in objectives)]
    tail = ["feasible", "duration_s", "reason", DUPLICATE_OF, "summary", "scheme"]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=[*base, *tail])
    frame = frame.sort_values("trial", kind="stable").reset_index(drop=True)
    frame[DUPLICATE_OF] = _first_trials(frame)
    middle = [c for c in frame.columns if c not in base and c not in tail]
    return frame[base + middle + tail]


def _first_trials(frame: pd.DataFrame) -> pd.Series:
    """For each completed row, the earlier completed trial with the same scheme (``<NA>`` if none):
    a scheme proposed again is one point, linked to its first trial, never a second front point."""
    completed = frame[frame["state"] == COMPLETE]
    first = completed.groupby("scheme", sort=False)["trial"].transform("min")
    linked = first.where(first != completed["trial"])
    return linked.reindex(frame.index).astype("Int64")


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
            {c.trial: c.scheme for c in candidates if c.scheme is not None},
            dict(metadata or {}),
            dict(tables or {}),
        )

    @property
    def completed(self) -> pd.DataFrame:
        return self.trials[(self.trials["state"] == COMPLETE) & self.trials["feasible"].astype(bool)]

    @property
    def front(self) -> pd.DataFrame:
        """Non-dominated completed, feasible candidates, one row per distinct scheme (its first
        trial; repeats carry ``duplicate_of``), best first objective first."""
        completed = self.completed
        if DUPLICATE_OF in completed.columns:
            completed = completed[completed[DUPLICATE_OF].isna()]
        return pareto_front(completed, self.objectives)

    def front_schemes(self) -> dict[int, Scheme]:
        return {int(t): self.schemes[int(t)] for t in self.front["trial"]}

    def knee(self) -> int:
        """Trial number of the front's knee (see :func:`evaluators.pareto.knee_index`)."""
        front = self.front
        return int(front.loc[knee_index(front, self.objectives), "trial"])

    def selection_objective(self, constraints: Sequence[str | Constraint] = ()) -> Objective:
        """What "best" means for :meth:`select` when no objective is named.

        A floor on a maximised objective (``accuracy>=0.97``: "at least this good") asks for the
        cheapest point that reaches it: the primary cost objective (the first minimised one).
        Otherwise (no constraint, or only cost bounds such as ``latency_ms<=0.5``) the first
        objective (accuracy) is maximised.
        """
        directions = {o.name: o.direction for o in self.objectives}
        parsed = [Constraint.parse(c) for c in constraints]
        floor = any(c.op == ">=" and directions.get(c.metric) == "maximize" for c in parsed)
        cost = next((o for o in self.objectives if o.direction == "minimize"), None)
        return cost if floor and cost is not None else self.objectives[0]

    def select(self, constraints: Sequence[str | Constraint] = (), objective: str | None = None) -> int:
        """Trial number of the best front point that satisfies every constraint.

        Args:
            constraints: Bounds such as ``"accuracy>=0.97"`` or ``"latency_ms<=0.5"``.
            objective: What "best" means among the points meeting them; default
                :meth:`selection_objective` (the cheapest by the primary cost objective under an
                accuracy floor, else the most accurate). Ties go to the better other objectives.

        Returns:
            The chosen trial number.

        Raises:
            NMSearchError: no point meets the constraints, a constraint names an unknown metric,
                or ``objective`` is not optimised by this result.
        """
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
        by = next((o for o in self.objectives if o.name == objective), None) if objective else None
        if objective and by is None:
            raise NMSearchError(
                f"unknown objective {objective!r}; optimised: {', '.join(o.name for o in self.objectives)}"
            )
        by = by or self.selection_objective(parsed)
        order = [by, *(o for o in self.objectives if o is not by)]
        candidates = front[ok].sort_values(
            [o.name for o in order], ascending=[o.direction == "minimize" for o in order], kind="stable"
        )
        return int(candidates["trial"].iloc[0])

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
        existing = run_dir / RESULT_FILE
        if existing.is_file():  # never overwrite another strategy's results
            try:
                other = json.loads(existing.read_text()).get("strategy")
            except (ValueError, UnicodeDecodeError, AttributeError):
                other = None
            if other is not None and other != self.strategy:
                raise ResultFileError(
                    f"'{run_dir}' holds results of strategy {other!r}; save the {self.strategy!r} results elsewhere"
                )
        front = self.front
        paths = {
            "trials": atomic_write_text(run_dir / "trials.csv", self.trials.to_csv(index=False)),
            "pareto": atomic_write_text(run_dir / "pareto.csv", front.to_csv(index=False)),
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
            # What load() checks, so a cut or swapped file is refused instead of read in part.
            "files": {
                "trials.csv": {"rows": len(self.trials), "columns": [str(c) for c in self.trials.columns]},
                "pareto.csv": {"rows": len(front)},
            },
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
        meta = _read_meta(meta_path)
        objectives = tuple(Objective(**o) for o in meta["objectives"])
        trials = _read_trials(trials_path, objectives, meta.get("files", {}).get("trials.csv"))
        fingerprint = meta.get("metadata", {}).get("fingerprint")
        try:
            schemes = {
                int(row.trial): Scheme.from_choices(json.loads(row.scheme), fingerprint=fingerprint)
                for row in trials.itertuples()
                if isinstance(row.scheme, str) and row.scheme  # "": the worker died before drawing it
            }
        except (ValueError, TypeError, AttributeError) as error:  # json and Scheme errors
            raise ResultFileError(f"'{trials_path}': a scheme column entry is not a scheme ({error})") from None
        for path in sorted((run_dir / "schemes").glob("trial_*.json")):
            schemes[int(path.stem.split("_")[1])] = Scheme.load(path)
        tables = {name: _read_csv(run_dir / f"{name}.csv") for name in meta.get("tables", [])}
        return cls(meta["strategy"], objectives, trials, schemes, meta.get("metadata", {}), tables)


class ResultFileError(NMSearchError):
    """A result file that is unreadable, cut short or does not match ``result.json``."""


_REWRITE = "re-run the search in that directory to rewrite it"


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResultFileError(f"'{path}' is not valid JSON (cut short or corrupt: {error}); {_REWRITE}") from None
    valid = (
        isinstance(meta, dict)
        and isinstance(meta.get("strategy"), str)
        and isinstance(meta.get("objectives"), list)
        and all(isinstance(o, dict) and {"name", "direction"} <= set(o) for o in meta["objectives"])
    )
    if not valid:
        raise ResultFileError(f"'{path}' is not an nmsearch result (needs strategy and objectives); {_REWRITE}")
    return meta


def _read_csv(path: Path, **kwargs: Any) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **kwargs)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ResultFileError(f"'{path}' cannot be read as CSV ({detail}); {_REWRITE}") from None


def _read_trials(path: Path, objectives: Sequence[Objective], recorded: Mapping[str, Any] | None) -> pd.DataFrame:
    """``trials.csv``, refused when it is cut short (rows or a partial last line) or its columns
    do not match what ``result.json`` recorded when it was written."""
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raise ResultFileError(f"'{path}' ends in the middle of a line: the file was cut short; {_REWRITE}")
    trials = _read_csv(path, dtype={"reason": str, "summary": str, "scheme": str, "state": str})
    missing = [c for c in (*REQUIRED_COLUMNS, *(o.name for o in objectives)) if c not in trials.columns]
    if missing:
        raise ResultFileError(f"'{path}' lacks the column {missing[0]!r}: not a trials file of this result; {_REWRITE}")
    if recorded is not None:
        if len(trials) != recorded.get("rows"):
            raise ResultFileError(
                f"'{path}' has {len(trials)} rows, {RESULT_FILE} recorded {recorded.get('rows')}: "
                f"the file is partial or was replaced; {_REWRITE}"
            )
        if list(trials.columns) != list(recorded.get("columns", trials.columns)):
            raise ResultFileError(f"'{path}' columns differ from those {RESULT_FILE} recorded; {_REWRITE}")
    if trials["trial"].isna().any() or trials["scheme"].isna().any() or trials["state"].isna().any():
        raise ResultFileError(f"'{path}' has rows without trial, state or scheme (cut short?); {_REWRITE}")
    trials["reason"] = trials["reason"].fillna("")
    if DUPLICATE_OF in trials.columns:
        trials[DUPLICATE_OF] = trials[DUPLICATE_OF].astype("Int64")
    return trials
