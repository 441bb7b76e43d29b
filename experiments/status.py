"""Progress of a search while its workers run (or after): ``python -m experiments.status TARGET``.

``TARGET`` is a run directory (its ``optuna.db``, or the storage its ``result.json`` names), a
Journal file (``journal:PATH`` or ``*.log`` / ``*.journal``) or a storage URL
(``postgresql://...``, ``sqlite:///...``). Prints the trial counts across all workers and the
Pareto front so far; reads the storage only. ``--study NAME`` picks a study when the storage holds
several.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from evaluators import Objective
from evaluators.pareto import pareto_front
from experiments.errors import run_cli
from search_space import NMSearchError, Scheme
from strategies.base import RESULT_FILE
from strategies.optuna_strategy import FAIL_REASON_ATTR
from strategies.storage import journal_path, open_storage, public_url

__all__ = ["Progress", "front_so_far", "load_study", "main", "progress", "resolve_target"]


@dataclass(frozen=True)
class Progress:
    """Trial counts of a study, over all its workers.

    ``launched``: trials that started (every trial but the queued ones); ``finished``: completed
    evaluations; ``failed``: evaluations the evaluator failed; ``interrupted``: trials whose
    worker stopped or died mid-trial; ``re_enqueued``: interrupted trials queued again;
    ``lost``: interrupted trials whose scheme was not evaluated after all (by a retry, or by
    another trial of the same scheme) and whose retry is not queued or running; ``skipped``:
    trials ended unevaluated (the budget was full, or the slot went to a retry); ``running`` and
    ``waiting`` (queued) right now.
    """

    launched: int
    finished: int
    failed: int
    interrupted: int
    re_enqueued: int
    lost: int
    skipped: int
    running: int
    waiting: int


def _retries_of(trials: Sequence[FrozenTrial]) -> dict[int, list[FrozenTrial]]:
    """For each trial number, the trials created as its retries (directly or down a chain)."""
    retries: dict[int, list[FrozenTrial]] = {}
    for trial in trials:
        for number in trial.system_attrs.get("retry_history", []):
            retries.setdefault(number, []).append(trial)
    return retries


def progress(study: optuna.Study) -> Progress:
    """Count the study's trials (see :class:`Progress`).

    Args:
        study: a study written by :class:`~strategies.OptunaStrategy` workers.

    Returns:
        The counts.
    """
    trials = study.get_trials(deepcopy=False)
    state = {t.number: t.state for t in trials}

    def done(t: FrozenTrial) -> bool:
        return t.state == TrialState.COMPLETE or bool(t.user_attrs.get(FAIL_REASON_ATTR))

    finished_params = {json.dumps(t.params, sort_keys=True) for t in trials if done(t) and t.params}
    retries = _retries_of(trials)
    interrupted = [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get(FAIL_REASON_ATTR)]
    lost = 0
    for trial in interrupted:
        later = retries.get(trial.number, [])
        recovered = any(done(r) for r in later) or (
            bool(trial.params) and json.dumps(trial.params, sort_keys=True) in finished_params
        )
        pending = any(state[r.number] in (TrialState.WAITING, TrialState.RUNNING) for r in later)
        lost += not (recovered or pending)
    return Progress(
        launched=sum(t.state != TrialState.WAITING for t in trials),
        finished=sum(t.state == TrialState.COMPLETE for t in trials),
        failed=sum(t.state == TrialState.FAIL and bool(t.user_attrs.get(FAIL_REASON_ATTR)) for t in trials),
        interrupted=len(interrupted),
        re_enqueued=sum(t.number in retries for t in interrupted),
        lost=lost,
        skipped=sum(t.state == TrialState.PRUNED for t in trials),
        running=sum(t.state == TrialState.RUNNING for t in trials),
        waiting=sum(t.state == TrialState.WAITING for t in trials),
    )


def front_so_far(study: optuna.Study) -> pd.DataFrame:
    """The Pareto front of the study's completed, feasible trials, one row per distinct scheme
    (repeats reuse their first trial's evaluation), with the layer summary of each.

    Args:
        study: a study whose metric names are set (every nmsearch study has them).

    Returns:
        Columns ``trial``, one per objective, ``summary``; best first objective first.
    """
    names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
    objectives = [Objective(n, d.name.lower()) for n, d in zip(names, study.directions, strict=True)]
    rows, seen = [], set()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        key = json.dumps(trial.params, sort_keys=True)
        if key in seen or any(v > 0 for v in trial.constraints.values()):
            continue
        seen.add(key)
        stored = trial.user_attrs.get("scheme")
        summary = Scheme.from_json(json.loads(stored)).summary() if stored else ""
        rows.append({"trial": trial.number, **dict(zip(names, trial.values, strict=True)), "summary": summary})
    frame = pd.DataFrame(rows, columns=["trial", *names, "summary"])
    return pareto_front(frame, objectives) if not frame.empty else frame


def resolve_target(target: str) -> str:
    """The storage URL behind ``target`` (see the module docstring); raises when there is none.

    Args:
        target: a run directory, a Journal file or a storage URL.

    Returns:
        A storage URL or ``journal:PATH``.

    Raises:
        NMSearchError: a directory or file that holds no study.
    """
    if "://" in target:
        if target.startswith("sqlite:///") and not Path(target[len("sqlite:///") :]).is_file():
            raise NMSearchError(f"no SQLite file at {target!r}; point to an existing optuna.db")
        return target
    journal = journal_path(target)
    if journal is not None:
        if not journal.is_file():
            raise NMSearchError(f"no Journal file at '{journal}'")
        return f"journal:{journal}"
    path = Path(target)
    if (path / "optuna.db").is_file():
        return f"sqlite:///{(path / 'optuna.db').resolve()}"
    if (path / RESULT_FILE).is_file():
        try:
            storage = json.loads((path / RESULT_FILE).read_text()).get("metadata", {}).get("storage")
        except (ValueError, AttributeError):
            raise NMSearchError(f"'{path / RESULT_FILE}' is not valid JSON (an unfinished write?)") from None
        if storage:
            return str(storage)
    raise NMSearchError(
        f"'{target}' is neither a run directory with an Optuna study nor a storage; "
        "pass a run directory, journal:PATH or a storage URL (postgresql://...)"
    )


def load_study(url: str, study_name: str | None = None) -> optuna.Study:
    """Open the study ``study_name`` (or the storage's only study) at ``url``.

    Args:
        url: a storage URL or ``journal:PATH``.
        study_name: the study; may be omitted when the storage holds exactly one.

    Returns:
        The study (read it, do not optimise it: no sampler is set up).

    Raises:
        NMSearchError: the storage cannot be opened or holds no such study.
    """
    storage = open_storage(url)
    names = [s.study_name for s in storage.get_all_studies()]
    where = public_url(url)
    if study_name is None:
        if len(names) != 1:
            raise NMSearchError(
                f"{where} holds {len(names)} studies ({', '.join(names)}); pick one with --study NAME"
                if names
                else f"{where} holds no study yet; start a search on it first"
            )
        study_name = names[0]
    if study_name not in names:
        raise NMSearchError(f"no study {study_name!r} in {where}; it holds: {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=study_name, storage=storage)


def report(study: optuna.Study, url: str) -> str:
    """The text ``main`` prints: counts, then the front so far."""
    counts = progress(study)
    front = front_so_far(study)
    lines = [
        f"study {study.study_name!r} in {public_url(url)}",
        "  ".join(f"{k.replace('_', '-')}: {v}" for k, v in asdict(counts).items()),
        f"Pareto front so far ({len(front)} points, "
        + ", ".join(f"{n} {d.name.lower()}" for n, d in zip(study.metric_names or [], study.directions, strict=False))
        + "):",
        front.to_markdown(index=False, floatfmt=".4g") if not front.empty else "(no completed trial yet)",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``status TARGET [--study NAME]``: print a study's progress; 0 on success, 2 on bad input.

    Args:
        argv: the command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(prog="nmsearch status", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="run directory, journal:PATH or storage URL")
    parser.add_argument("--study", default=None, help="study name (default: the storage's only study)")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def body() -> None:
        url = resolve_target(args.target)
        print(report(load_study(url, args.study), url))

    return run_cli("nmsearch", body)


if __name__ == "__main__":
    sys.exit(main())
