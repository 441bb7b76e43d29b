"""Fault scenarios on shared Optuna storages (worker processes of tests/strategies/toy.py killed
with SIGKILL), for the storage tests and ``benchmarks/fault_tolerance.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from experiments.status import load_study, progress
from strategies.storage import HOST_ENV
from tests.strategies.toy import worker


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout_s: float = 300.0) -> None:
    """Wait until ``process`` has started ``count`` evaluations (lines in its marker file)."""
    deadline = time.time() + timeout_s
    while len(lines(path)) < count:
        if process.poll() is not None:
            raise AssertionError(f"worker ended early: {process.communicate()[0].decode()[-2000:]}")
        if time.time() > deadline:
            raise AssertionError(f"no {count} evaluations in {timeout_s} s")
        time.sleep(0.005)


def finish(processes: list[subprocess.Popen], timeout_s: float = 600.0) -> str:
    """Wait for the workers; their output (logs of trials failed for dead workers) on success."""
    outputs = []
    for process in processes:
        output, _ = process.communicate(timeout=timeout_s)
        if process.returncode != 0:
            raise AssertionError(output.decode()[-3000:])
        outputs.append(output.decode())
    return "\n".join(outputs)


def fault_counts(study: optuna.Study, markers: list[Path]) -> dict[str, Any]:
    """The study's :func:`~experiments.status.progress` counts, plus ``scored_twice`` (completed
    schemes evaluated more than once instead of reused), ``started`` (evaluations begun, from the
    markers) and ``restarted`` (schemes whose evaluation began more than once)."""
    trials = study.get_trials(deepcopy=False)
    evaluated = Counter(
        json.dumps(t.params, sort_keys=True)
        for t in trials
        if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs["evaluation"]["info"]
    )
    started = Counter(line for marker in markers for line in lines(marker))
    return {
        **asdict(progress(study)),
        "scored_twice": sum(n - 1 for n in evaluated.values()),
        "evaluated": sum(evaluated.values()),
        "started": sum(started.values()),
        "restarted": sum(n > 1 for n in started.values()),
    }


def kill_and_resume(
    storage: str, run_dir: Path, points: tuple[int, ...], budget: int, *, sleep_s: float = 0.1, grace_s: int = 60
) -> tuple[optuna.Study, dict[str, Any]]:
    """One worker, SIGKILLed when it has started ``points[i]`` evaluations, restarted at once (well
    within the heartbeat grace period) each time; the last run completes and saves the result.
    Each killed run hangs inside evaluation ``points[i]``, so the kill lands mid-evaluation
    however late it comes (a loaded machine can delay it past a short evaluation)."""
    marker = run_dir / "started"
    for point in points:
        process = worker(
            storage, budget, sleep_s=sleep_s, marker=marker, run_dir=run_dir, grace_period_s=grace_s, hang_at=point
        )
        wait_for_lines(marker, point, process)
        os.kill(process.pid, signal.SIGKILL)  # mid-evaluation: no chance to mark the trial failed
        process.wait()
    finish([worker(storage, budget, sleep_s=sleep_s, marker=marker, run_dir=run_dir, grace_period_s=grace_s)])
    study = load_study(storage)
    return study, fault_counts(study, [marker])


def many_workers(
    storage: str, tmp: Path, kill: int, *, budget: int = 200, workers: int = 4, grace_s: int = 20
) -> tuple[optuna.Study, dict[str, Any], str]:
    """``workers`` processes on one study with a shared ``budget``; ``kill`` of them (declared to
    run on other machines, so only the heartbeat can tell they died) are SIGKILLed inside their
    second evaluation (where they hang until killed)."""
    processes, markers = [], []
    for index in range(workers):
        doomed = index < kill
        markers.append(tmp / f"started_{index}")
        env = {HOST_ENV: f"remote-{index}"} if doomed else {}
        sleep_s = 0.5 if doomed else 0.01
        processes.append(
            worker(
                storage,
                budget,
                index,
                sleep_s=sleep_s,
                marker=markers[-1],
                env=env,
                grace_period_s=grace_s,
                hang_at=2 if doomed else None,
            )
        )
    for index in range(kill):
        wait_for_lines(markers[index], 2, processes[index])
        os.kill(processes[index].pid, signal.SIGKILL)
        processes[index].wait()
    logs = finish(processes[kill:])
    study = load_study(storage)
    return study, fault_counts(study, markers), logs
