"""Storages and dead workers: owner records, kill -9 and resume, many workers on Journal and PostgreSQL."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from strategies import OptunaStrategy, StorageError
from strategies.storage import (
    HOST_ENV,
    OWNER_ATTR,
    SearchToken,
    claim_trial,
    owner_is_gone,
    public_url,
)
from tests.strategies.faults import kill_and_resume, many_workers
from tests.strategies.toy import ToyEvaluator, toy_space

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


# -- workers killed mid-trial (tests/strategies/faults.py) ----------------------------------------


def _check(counts: dict, budget: int, killed: int, logs: str = "") -> None:
    """Exactly ``budget`` finished, none running, queued or lost; no scheme scored twice (a repeat
    reuses the earlier evaluation); each killed trial failed and re-enqueued once. On a loaded
    machine a live worker's heartbeat can come later than the grace period: its trial is then
    failed and re-enqueued too (more interrupted than killed), never lost or scored twice."""
    expected = {"finished": budget, "running": 0, "waiting": 0, "lost": 0, "failed": 0, "scored_twice": 0}
    assert {k: counts[k] for k in expected} == expected, f"{counts}\nworker logs:\n{logs[-3000:]}"
    assert counts["interrupted"] >= killed and counts["re_enqueued"] == counts["interrupted"], counts
    assert killed <= counts["restarted"] <= counts["interrupted"], counts  # begun again: the retries
    assert counts["evaluated"] + killed <= counts["started"] <= counts["evaluated"] + counts["interrupted"], counts


@pytest.mark.slow
def test_kill_9_at_three_points_and_resume_loses_and_repeats_nothing(space, tmp_path: Path) -> None:
    """The issue-17 case: restarts come within the heartbeat grace period (60 s), so only the
    owner record can tell that the killed trials are dead; the warm start is queued once."""
    storage, budget = f"sqlite:///{tmp_path / 'optuna.db'}", 60
    study, counts = kill_and_resume(storage, tmp_path, (5, 25, 45), budget)  # 5: inside the warm start
    _check(counts, budget, killed=3)
    warm = Counter(t.user_attrs.get("warm_start") for t in study.trials if t.state == TrialState.COMPLETE)
    assert {label: warm[label] for label in space.uniform_schemes()} == dict.fromkeys(space.uniform_schemes(), 1)
    # trials.csv has one row per stored trial, in the same state
    frame = pd.read_csv(tmp_path / "trials.csv")
    stored = {t.number: t.state.name for t in study.trials if t.state != TrialState.WAITING}
    assert dict(zip(frame["trial"], frame["state"], strict=True)) == stored


@pytest.mark.slow
@pytest.mark.parametrize("kill", [0, 2])
def test_four_workers_share_a_journal_file_budget(tmp_path: Path, kill: int) -> None:
    _, counts, logs = many_workers(f"journal:{tmp_path / 'study.journal'}", tmp_path, kill)
    _check(counts, 200, kill, logs)


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize("kill", [0, 2])
def test_four_workers_share_a_postgresql_study(postgres_url: str, tmp_path: Path, kill: int) -> None:
    _, counts, logs = many_workers(postgres_url, tmp_path, kill)
    _check(counts, 200, kill, logs)


@pytest.mark.postgres
def test_postgresql_bad_input_is_one_line_before_any_work(space, postgres_url: str, postgres) -> None:
    evaluator = ToyEvaluator(space)
    wrong = postgres_url.replace(f":{postgres['password']}@", ":wrong@")
    with pytest.raises(StorageError, match=r"cannot open Optuna storage 'postgresql://postgres@.*password") as info:
        OptunaStrategy(n_trials=2, storage=wrong).search(space, evaluator)
    assert "wrong" not in str(info.value) and "\n" not in str(info.value)
    closed = f"postgresql://postgres@127.0.0.1:{postgres['port'] + 1}/none"
    with pytest.raises(StorageError, match=r"cannot open Optuna storage 'postgresql://postgres@127.0.0.1") as info:
        OptunaStrategy(n_trials=2, storage=closed).search(space, evaluator)
    assert "\n" not in str(info.value)
    OptunaStrategy(n_trials=2, storage=postgres_url, warm_start=False).search(space, evaluator)
    calls = evaluator.calls
    with pytest.raises(
        StorageError,
        match=r"optimises accuracy \(maximize\), latency_ms \(minimize\), bytes_mb \(minimize\); "
        r"this search asks for accuracy \(maximize\), bytes_mb",
    ):
        OptunaStrategy(n_trials=4, storage=postgres_url, objectives=["accuracy", "bytes_mb"]).search(space, evaluator)
    assert evaluator.calls == calls
