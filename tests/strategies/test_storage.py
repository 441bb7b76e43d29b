"""Storages and dead workers: owner records, kill -9 and resume, many workers on Journal and PostgreSQL."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from experiments.status import load_study, progress
from strategies import OptunaStrategy, StorageError
from strategies.storage import (
    HOST_ENV,
    OWNER_ATTR,
    SearchToken,
    claim_trial,
    owner_is_gone,
    public_url,
)
from tests.strategies.toy import ToyEvaluator, toy_space, worker

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def space():
    return toy_space()


def _running_trial(study: optuna.Study) -> optuna.Trial:
    return study.ask()


def test_owner_record_tells_a_dead_local_worker_from_a_live_or_remote_one(monkeypatch) -> None:
    study = optuna.create_study()
    trial = _running_trial(study)
    get = study._storage.get_trial
    with SearchToken() as token:
        claim_trial(study, trial, token)
        assert not owner_is_gone(get(trial._trial_id))  # this process, search still running
    assert owner_is_gone(get(trial._trial_id))  # this process, but that search call returned

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    record = {**get(trial._trial_id).system_attrs[OWNER_ATTR], "pid": ended.pid, "token": "x"}
    study._storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, record)
    assert owner_is_gone(get(trial._trial_id))  # its process has exited
    monkeypatch.setenv(HOST_ENV, "another-machine")
    assert not owner_is_gone(get(trial._trial_id))  # other machines: only the heartbeat tells
    monkeypatch.delenv(HOST_ENV)

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        study._storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, {**record, "pid": live.pid, "start": ""})
        assert not owner_is_gone(get(trial._trial_id))
        # the pid now belongs to a process that started at another time: the owner is gone
        study._storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, {**record, "pid": live.pid, "start": "1"})
        assert owner_is_gone(get(trial._trial_id))
    finally:
        live.kill()
        live.wait()
    # a retry inherits the failed trial's attributes: the record names another trial, so not judged
    study._storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, {**record, "trial": trial.number + 7})
    assert not owner_is_gone(get(trial._trial_id))


def test_public_url_drops_the_password() -> None:
    assert public_url("postgresql://me:secret@db:5432/x") == "postgresql://me@db:5432/x"
    assert public_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert public_url(None) is None


# -- helpers for the worker tests ------------------------------------------------------------------


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.time() + timeout_s
    while len(_lines(path)) < count:
        if process.poll() is not None:
            raise AssertionError(f"worker ended early: {process.communicate()[0].decode()[-2000:]}")
        assert time.time() < deadline, f"no {count} evaluations in {timeout_s} s"
        time.sleep(0.005)


def _finish(processes: list[subprocess.Popen], timeout_s: float = 300.0) -> str:
    """Wait for the workers; their output (logs of trials failed for dead workers) on success."""
    outputs = []
    for process in processes:
        output, _ = process.communicate(timeout=timeout_s)
        assert process.returncode == 0, output.decode()[-3000:]
        outputs.append(output.decode())
    return "\n".join(outputs)


def _check_totals(study: optuna.Study, budget: int, markers: list[Path], killed: int) -> dict[str, int]:
    """Exactly ``budget`` finished trials, none running or lost, each scheme evaluated once (a
    repeat reuses the earlier evaluation) except the schemes of the ``killed`` trials, which were
    started twice (the kill, then the retry)."""
    counts = progress(study)
    assert (counts.finished, counts.running, counts.lost, counts.failed) == (budget, 0, 0, 0), counts
    assert counts.interrupted == counts.re_enqueued == killed, counts
    assert counts.waiting == 0, counts
    trials = study.get_trials(deepcopy=False)
    evaluated = [
        json.dumps(t.params, sort_keys=True)
        for t in trials
        if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs["evaluation"]["info"]
    ]
    assert len(evaluated) == len(set(evaluated)), "a scheme was scored twice without reuse"
    started = Counter(line for marker in markers for line in _lines(marker))
    interrupted = {
        str(dict(sorted(t.params.items(), key=lambda kv: int(kv[0])))) for t in trials if t.state == TrialState.FAIL
    }
    assert {s for s, n in started.items() if n > 1} <= interrupted
    assert sum(started.values()) == len(evaluated) + killed
    return {
        "launched": counts.launched,
        "finished": counts.finished,
        "failed": counts.interrupted,
        "re-enqueued": counts.re_enqueued,
        "lost": counts.lost,
    }


@pytest.mark.slow
def test_kill_9_at_three_points_and_resume_loses_and_repeats_nothing(space, tmp_path: Path) -> None:
    """The issue-17 case: restarts come within the heartbeat grace period (60 s here), so only the
    owner record can tell that the killed trials are dead; the warm start is queued once."""
    storage, marker, budget = f"sqlite:///{tmp_path / 'optuna.db'}", tmp_path / "started", 60
    for point in (5, 25, 45):  # evaluations started when the kill comes; 5 is inside the warm start
        process = worker(storage, budget, sleep_s=0.2, marker=marker, run_dir=tmp_path, grace_period_s=60)
        _wait_for_lines(marker, point, process)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    _finish([worker(storage, budget, sleep_s=0.2, marker=marker, run_dir=tmp_path, grace_period_s=60)])

    study = load_study(storage)
    _check_totals(study, budget, [marker], killed=3)
    warm = Counter(t.user_attrs.get("warm_start") for t in study.trials if t.state == TrialState.COMPLETE)
    assert {label: warm[label] for label in space.uniform_schemes()} == dict.fromkeys(space.uniform_schemes(), 1)
    # trials.csv has one row per stored trial, in the same state
    frame = pd.read_csv(tmp_path / "trials.csv")
    stored = {t.number: t.state.name for t in study.trials if t.state != TrialState.WAITING}
    assert dict(zip(frame["trial"], frame["state"], strict=True)) == stored


def _many_workers(storage: str, tmp_path: Path, kill: int) -> tuple[optuna.Study, dict[str, int]]:
    """4 workers, 200-trial budget; ``kill`` of them (pretending to run on other machines, so only
    the heartbeat can tell) are SIGKILLed mid-trial. The grace period is long (20 s) because
    heartbeats come late on a loaded 2-core machine."""
    budget, processes, markers = 200, [], []
    for index in range(4):
        doomed = index < kill
        markers.append(tmp_path / f"started_{index}")
        env = {HOST_ENV: f"remote-{index}"} if doomed else {}
        processes.append(
            worker(
                storage, budget, index, sleep_s=0.5 if doomed else 0.01, marker=markers[-1], env=env, grace_period_s=20
            )
        )
    for index in range(kill):
        _wait_for_lines(markers[index], 2, processes[index])
        os.kill(processes[index].pid, signal.SIGKILL)  # mid-evaluation: each sleeps 0.5 s in it
        processes[index].wait()
    logs = _finish(processes[kill:])
    study = load_study(storage)
    try:
        return study, _check_totals(study, budget, markers, killed=kill)
    except AssertionError as error:
        raise AssertionError(f"{error}\nworker logs:\n{logs[-3000:]}") from None


@pytest.mark.slow
@pytest.mark.parametrize("kill", [0, 2])
def test_four_workers_share_a_journal_file_budget(tmp_path: Path, kill: int) -> None:
    _many_workers(f"journal:{tmp_path / 'study.journal'}", tmp_path, kill)


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize("kill", [0, 2])
def test_four_workers_share_a_postgresql_study(postgres_url: str, tmp_path: Path, kill: int) -> None:
    _many_workers(postgres_url, tmp_path, kill)


@pytest.mark.postgres
def test_postgresql_bad_input_is_one_line_before_any_work(space, postgres_url: str, postgres_server) -> None:
    evaluator = ToyEvaluator(space)
    wrong = postgres_url.replace(f":{postgres_server['password']}@", ":wrong@")
    with pytest.raises(StorageError, match=r"cannot open Optuna storage 'postgresql://postgres@.*password") as info:
        OptunaStrategy(n_trials=2, storage=wrong).search(space, evaluator)
    assert "wrong" not in str(info.value) and "\n" not in str(info.value)
    closed = f"postgresql://postgres@127.0.0.1:{postgres_server['port'] + 1}/none"
    with pytest.raises(StorageError, match=r"cannot open Optuna storage 'postgresql://postgres@127.0.0.1") as info:
        OptunaStrategy(n_trials=2, storage=closed).search(space, evaluator)
    assert "\n" not in str(info.value)
    OptunaStrategy(n_trials=2, storage=postgres_url, warm_start=False).search(space, evaluator)
    calls = evaluator.calls
    with pytest.raises(StorageError, match=r"optimises accuracy \(maximize\), latency_ms \(minimize\); .*bytes_mb"):
        OptunaStrategy(n_trials=4, storage=postgres_url, objectives=["accuracy", "bytes_mb"]).search(space, evaluator)
    assert evaluator.calls == calls
