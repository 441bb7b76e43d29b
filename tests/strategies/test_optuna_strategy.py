import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from torch import nn

from evaluators import Constraint
from evaluators.pareto import pareto_front
from search_space import NMSearchError, Scheme, SearchSpace
from strategies import OptunaStrategy, RandomStrategy, SearchResult, StorageError, UniformStrategy
from strategies.base import load_checkpoint, save_checkpoint
from strategies.storage import LEASE_ATTR
from tests.strategies.toy import ToyEvaluator, toy_space, worker

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def space():
    return toy_space()


def test_search_warm_starts_resumes_and_records_schemes(space, tmp_path: Path) -> None:
    evaluator = ToyEvaluator(space)
    uniform = space.uniform_schemes()
    result = OptunaStrategy(n_trials=len(uniform) + 3).search(space, evaluator, run_dir=tmp_path)
    assert (tmp_path / "optuna.db").exists()
    assert (result.trials["state"] == "COMPLETE").sum() == len(uniform) + 3 == evaluator.calls
    first = {json.dumps(result.schemes[t].choices, sort_keys=True) for t in range(len(uniform))}
    assert first == {json.dumps(s.choices, sort_keys=True) for s in uniform.values()}  # warm start ran first
    assert list(result.trials.columns[:4]) == ["trial", "state", "accuracy", "latency_ms"]
    assert {"bytes_mb", "info.loss", "feasible", "duration_s", "scheme"} <= set(result.trials.columns)

    study = optuna.load_study(study_name="nmsearch", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    stored = Scheme.from_json(json.loads(study.trials[5].user_attrs["scheme"]))
    assert stored == result.schemes[5] and stored.fingerprint == space.fingerprint

    # same study, bigger budget: only the missing trials run; the warm start is not repeated
    again = ToyEvaluator(space)
    resumed = OptunaStrategy(n_trials=len(uniform) + 6).search(space, again, run_dir=tmp_path)
    assert again.calls == 3 and len(resumed.trials) == len(uniform) + 6
    done = ToyEvaluator(space)
    OptunaStrategy(n_trials=len(uniform) + 6).search(space, done, run_dir=tmp_path)
    assert done.calls == 0


def test_front_matches_optuna_best_trials_and_respects_constraints(space, tmp_path: Path) -> None:
    strategy = OptunaStrategy(n_trials=25, constraints=["latency_ms<=0.5"], sampler="nsga2", population_size=8)
    result = strategy.search(space, ToyEvaluator(space), run_dir=tmp_path)
    study = optuna.load_study(study_name="nmsearch", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert set(result.front["trial"]) == {t.number for t in study.best_trials}
    infeasible = result.trials[~result.trials["feasible"]]
    assert len(infeasible) > 0 and (infeasible["latency_ms"] > 0.5).all()
    assert len(result.front) > 1 and (result.front["latency_ms"] <= 0.5).all()
    assert result.metadata["constraints"] == ["latency_ms<=0.5"]


def test_failed_evaluations_are_failed_trials_not_crashes(space, tmp_path: Path) -> None:
    evaluator = ToyEvaluator(space, fail_when="a1:8")
    result = OptunaStrategy(n_trials=16).search(space, evaluator, run_dir=tmp_path)
    failed = result.trials[result.trials["state"] == "FAIL"]
    assert len(failed) >= 1 and (failed["reason"] == "diverged on a1:8").all()
    assert len(result.trials) == 16  # failed evaluations count against the budget
    assert not result.front["scheme"].str.contains("a1:8").any()


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "nsga3", "gp", "random"])
def test_every_sampler_runs(space, sampler: str) -> None:
    result = OptunaStrategy(n_trials=14, sampler=sampler, seed=1, warm_start=False, population_size=4).search(
        space, ToyEvaluator(space)
    )
    assert (result.trials["state"] == "COMPLETE").sum() == 14 and not result.front.empty


def test_seeded_search_is_reproducible(space) -> None:
    runs = [OptunaStrategy(n_trials=16, seed=3).search(space, ToyEvaluator(space)).trials["scheme"] for _ in range(2)]
    assert runs[0].tolist() == runs[1].tolist()


def test_bad_configuration_fails_before_any_work(space, tmp_path: Path) -> None:
    evaluator = ToyEvaluator(space)
    with pytest.raises(NMSearchError, match="unknown sampler 'cmaes'; choose one of tpe, nsga2, nsga3, gp, random"):
        OptunaStrategy(sampler="cmaes").search(space, evaluator, run_dir=tmp_path)
    with pytest.raises(NMSearchError, match="unknown objective 'energy_mj'"):
        OptunaStrategy(objectives=["accuracy", "energy_mj"]).search(space, evaluator, run_dir=tmp_path)
    with pytest.raises(NMSearchError, match="constraint params<=10 is on 'params'"):
        OptunaStrategy(constraints=["params<=10"]).search(space, evaluator, run_dir=tmp_path)
    with pytest.raises(NMSearchError, match="invalid constraint"):
        OptunaStrategy(constraints=["latency_ms < 1"]).search(space, evaluator, run_dir=tmp_path)
    with pytest.raises(NMSearchError, match="unbounded"):
        OptunaStrategy(n_trials=None).search(space, evaluator, run_dir=tmp_path)
    assert evaluator.calls == 0 and not (tmp_path / "optuna.db").exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StorageError, match="cannot open Optuna storage 'sqlite:///"):
        OptunaStrategy(storage=f"sqlite:///{blocker}/sub/x.db").search(space, evaluator)
    with pytest.raises(StorageError, match="cannot open Optuna storage 'postgresql://"):
        OptunaStrategy(storage="postgresql://nobody@127.0.0.1:1/none").search(space, evaluator)


def test_existing_study_with_other_objectives_is_refused(space, tmp_path: Path) -> None:
    OptunaStrategy(n_trials=2, warm_start=False).search(space, ToyEvaluator(space), run_dir=tmp_path)
    evaluator = ToyEvaluator(space)
    found = r"optimises accuracy \(maximize\), latency_ms \(minimize\), bytes_mb \(minimize\); "
    with pytest.raises(StorageError, match=found + r"this search asks for accuracy \(maximize\), bytes_mb"):
        OptunaStrategy(n_trials=4, objectives=["accuracy", "bytes_mb"]).search(space, evaluator, run_dir=tmp_path)
    assert evaluator.calls == 0
    wider = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))
    other = SearchSpace.from_model(wider, torch.randn(2, 16))
    with pytest.raises(StorageError, match="created for a model with fingerprint"):
        OptunaStrategy(n_trials=4).search(other, ToyEvaluator(other), run_dir=tmp_path)


def test_baselines(space, tmp_path: Path) -> None:
    uniform = UniformStrategy().search(space, ToyEvaluator(space), run_dir=tmp_path / "u")
    expected = space.uniform_schemes()
    assert len(uniform.trials) == len(expected)
    assert {json.dumps(s.choices, sort_keys=True) for s in uniform.schemes.values()} == {
        json.dumps(s.choices, sort_keys=True) for s in expected.values()
    }
    random = RandomStrategy(n_trials=10, seed=0).search(space, ToyEvaluator(space), run_dir=tmp_path / "r")
    assert len(random.trials) == 10 and random.strategy == "random" and uniform.strategy == "uniform"


def test_result_save_load_select_and_hypervolume(space, tmp_path: Path) -> None:
    strategy = OptunaStrategy(n_trials=20, objectives=["accuracy", "latency_ms"])
    result = strategy.search(space, ToyEvaluator(space), run_dir=tmp_path)
    paths = result.save(tmp_path)
    assert {p.name for p in paths.values()} == {"trials.csv", "pareto.csv", "result.json"}
    assert len(list((tmp_path / "schemes").glob("trial_*.json"))) == len(result.front)
    loaded = SearchResult.load(tmp_path)
    assert loaded.strategy == "optuna" and loaded.objectives == result.objectives
    assert loaded.front["trial"].tolist() == result.front["trial"].tolist()
    assert loaded.schemes == result.schemes
    knee = result.knee()
    assert knee in set(result.front["trial"])
    pick = result.select(["latency_ms<=0.5"])
    row = result.trials.set_index("trial").loc[pick]
    assert row["latency_ms"] <= 0.5
    assert row["accuracy"] == result.front[result.front["latency_ms"] <= 0.5]["accuracy"].max()
    assert (
        result.select(["accuracy>=0.9"], objective="latency_ms")
        == result.front[result.front["accuracy"] >= 0.9].sort_values("latency_ms")["trial"].iloc[0]
    )
    with pytest.raises(
        NMSearchError, match=r"no Pareto point satisfies latency_ms<=0\.001 .*best available: latency_ms="
    ):
        result.select(["latency_ms<=0.001"])
    reference = [0.0, float(result.trials["latency_ms"].max()) * 1.1]
    assert result.hypervolume(reference) > 0
    with pytest.raises(NMSearchError, match="holds no finished search"):
        SearchResult.load(tmp_path / "empty")


def test_two_workers_share_one_journal_file(space, tmp_path: Path) -> None:
    storage = f"journal:{tmp_path / 'study.log'}"

    def study() -> optuna.Study:
        return optuna.load_study(study_name="nmsearch", storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.log"))))  # fmt: skip

    workers = [worker(storage, 30, 0, sleep_s=0.05)]
    # Worker 1 starts once worker 0 has queued the warm start: on a fast machine a worker started
    # together with it could spend the whole 30-trial budget before the warm start is queued.
    deadline = time.monotonic() + 120
    while not (tmp_path / "study.log").exists() or not any(
        key.endswith("warm_start_enqueued") for key in _user_attrs(study)
    ):
        assert workers[0].poll() is None and time.monotonic() < deadline, "worker 0 never queued its warm start"
        time.sleep(0.1)
    workers.append(worker(storage, 30, 1, sleep_s=0.05))
    for w in workers:
        output, _ = w.communicate(timeout=180)
        assert w.returncode == 0, output.decode()[-2000:]
    study = study()
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))  # every trial recorded once
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 30  # the budget is shared: workers wait for a free slot
    warm = [t.user_attrs["warm_start"] for t in complete if "warm_start" in t.user_attrs]
    assert sorted(warm) == sorted(set(warm)) and len(warm) == len(space.uniform_schemes())
    evaluated = [t for t in complete if "duplicate_of" not in t.user_attrs["evaluation"]["info"]]
    assert evaluated and all(LEASE_ATTR in t.user_attrs for t in evaluated)  # repeats reuse, no lease


def _user_attrs(load: object) -> dict:
    try:
        return load().user_attrs
    except KeyError:  # the study is not created yet
        return {}


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_trials_of_a_killed_worker_are_retried_not_lost(space, tmp_path: Path, kind: str) -> None:
    storage = f"sqlite:///{tmp_path / 'x.db'}" if kind == "sqlite" else f"journal:{tmp_path / 'x.log'}"
    marker = tmp_path / "started"
    budget = len(space.uniform_schemes()) + 2  # covers the warm start queue, behind which the retry waits
    process = worker(storage, budget, 0, sleep_s=30.0, marker=marker)  # every evaluation takes 30 s
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), process.communicate()[0].decode()[-2000:]
    os.kill(process.pid, signal.SIGKILL)  # dies mid-trial: no chance to mark it failed
    process.wait()
    time.sleep(3.5)  # past the grace period
    evaluator = ToyEvaluator(space)
    result = OptunaStrategy(n_trials=budget, storage=storage, heartbeat_interval_s=1, grace_period_s=3).search(
        space, evaluator
    )
    states = result.trials["state"].tolist()
    assert states.count("COMPLETE") == budget and states.count("FAIL") == 1
    failed = result.trials[result.trials["state"] == "FAIL"].iloc[0]
    assert "interrupted" in failed["reason"]
    # the killed trial's scheme was evaluated again (the retry), exactly once
    complete = result.trials[result.trials["state"] == "COMPLETE"]
    assert (complete["scheme"] == failed["scheme"]).sum() == 1
    repeats = int(complete.filter(regex=r"^info\.duplicate_of$").notna().sum().sum())  # reused evaluations
    assert evaluator.calls == len(complete) - repeats  # a repeated scheme reuses its evaluation


# -- a dead worker's retry goes before fresh draws (issue 21) -------------------------------------
LAYER = ("2:4", "dense")


def _study_with_a_dead_trial(
    tmp_path: Path, user_attrs: dict | None = None, system_attrs: dict | None = None
) -> tuple[optuna.Study, optuna.Trial, optuna.Trial]:
    """A 2-trial budget with one trial finished; trial 1 of a worker that died, just failed (its
    retry not queued yet); trial 2, a fresh draw of a live worker, was waiting behind it."""
    tmp_path.mkdir(exist_ok=True)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'x.db'}")
    distributions = {"layer": optuna.distributions.CategoricalDistribution(LAYER)}
    study.add_trial(optuna.create_trial(params={"layer": "dense"}, distributions=distributions, value=1.0))
    dead, fresh = study.ask(), study.ask()
    for trial in (dead, fresh):
        trial.suggest_categorical("layer", LAYER)
    for key, value in (user_attrs or {}).items():
        dead.set_user_attr(key, value)
    for key, value in (system_attrs or {}).items():
        study._storage.set_trial_system_attr(dead._trial_id, key, value)
    study._storage.set_trial_state_values(dead._trial_id, optuna.trial.TrialState.FAIL)
    return study, dead, fresh


def _turn(strategy: OptunaStrategy, study: optuna.Study, trial: optuna.Trial, dead_seen: dict, wait_s: float = 0.3):
    queued = "failed_trial" in study._storage.get_trial(trial._trial_id).system_attrs
    deadline = time.monotonic() + wait_s
    return strategy._wait_for_turn(study, trial, dict(trial.params), queued, False, False, deadline, dead_seen)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_dead_workers_retry_takes_the_last_slot_before_a_fresh_draw(tmp_path: Path) -> None:
    study, dead, fresh = _study_with_a_dead_trial(tmp_path)
    strategy, seen = OptunaStrategy(n_trials=2, max_retry=3, grace_period_s=60), {}
    # failed, retry not queued yet: the fresh draw waits for it (here until its deadline)
    with pytest.raises(optuna.TrialPruned, match="timeout_s ran out while it waited"):
        _turn(strategy, study, fresh, seen)
    retry_callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
    retry_callback(study, study._storage.get_trial(dead._trial_id))
    with pytest.raises(optuna.TrialPruned, match="yields its budget slot"):  # queued: yield to it
        _turn(strategy, study, fresh, seen)
    retry = study.ask()  # another worker takes the retry; its number is higher than the fresh draw's
    assert retry.params == dead.params and retry.number > fresh.number
    with pytest.raises(optuna.TrialPruned, match="yields its budget slot"):  # running: still yield
        _turn(strategy, study, fresh, seen)
    study.tell(fresh, state=optuna.trial.TrialState.PRUNED)
    assert _turn(strategy, study, retry, seen) is None  # the retry is evaluated: nothing is lost


def test_a_fresh_draw_does_not_wait_for_a_retry_that_will_not_come(tmp_path: Path) -> None:
    study, dead, fresh = _study_with_a_dead_trial(tmp_path)
    strategy = OptunaStrategy(n_trials=2, max_retry=3, grace_period_s=60)
    # its failing worker died before queueing the retry: reserved for grace_period_s only
    assert _turn(strategy, study, fresh, {dead.number: time.monotonic() - 61}) is None
    # retries used up (as the retry callback counts them): no retry comes
    study, dead, fresh = _study_with_a_dead_trial(tmp_path / "used_up", system_attrs={"retry_history": [7, 8, 9]})
    assert _turn(strategy, study, fresh, {}) is None
    # failed by the evaluator: it counts against the budget (one slot left of 3) and is not retried
    study, dead, fresh = _study_with_a_dead_trial(tmp_path / "evaluator", user_attrs={"fail_reason": "broken"})
    assert _turn(OptunaStrategy(n_trials=3, max_retry=3, grace_period_s=60), study, fresh, {}) is None


def test_pareto_front_of_result_uses_completed_feasible_rows(space) -> None:
    result = OptunaStrategy(n_trials=15).search(space, ToyEvaluator(space))
    front = pareto_front(result.completed, result.objectives)
    assert front["trial"].tolist() == result.front["trial"].tolist()
    assert np.isfinite(result.front[["accuracy", "latency_ms"]].to_numpy()).all()
    assert Constraint.parse("accuracy>=0.5").violation({"accuracy": 0.6}) < 0


class _InterruptOnce(ToyEvaluator):
    def evaluate(self, scheme: Scheme):
        if self.calls == 2:
            self.calls += 1
            raise KeyboardInterrupt
        return super().evaluate(scheme)


def test_interrupted_warm_start_trial_is_redone_on_resume(space, tmp_path: Path) -> None:
    budget = len(space.uniform_schemes())
    with pytest.raises(KeyboardInterrupt):
        OptunaStrategy(n_trials=budget).search(space, _InterruptOnce(space), run_dir=tmp_path)
    evaluator = ToyEvaluator(space)
    result = OptunaStrategy(n_trials=budget).search(space, evaluator, run_dir=tmp_path)
    assert evaluator.calls == budget - 2  # two finished before the interrupt
    complete = result.trials[result.trials["state"] == "COMPLETE"]
    uniform = {json.dumps(s.choices, separators=(",", ":")) for s in space.uniform_schemes().values()}
    assert set(complete["scheme"]) == uniform and len(complete) == budget  # each exactly once
    assert result.trials[result.trials["state"] == "FAIL"]["reason"].str.contains("interrupted").all()


def test_a_repeated_scheme_reuses_the_earlier_evaluation(tmp_path: Path) -> None:
    space = SearchSpace.from_model(nn.Sequential(nn.Linear(8, 8)), torch.randn(2, 8), ratios=["2:4"])
    evaluator = ToyEvaluator(space)  # one layer: dense, w2:4, a2:4, w2:4+a2:4 — repeats are certain
    result = OptunaStrategy(n_trials=12, sampler="random", warm_start=False).search(space, evaluator, run_dir=tmp_path)
    assert len(result.trials) == 12 and evaluator.calls == result.trials["scheme"].nunique() <= 4
    repeats = result.trials[result.trials["info.duplicate_of"].notna()]
    assert len(repeats) == 12 - evaluator.calls
    for _, row in repeats.iterrows():
        first = result.trials.set_index("trial").loc[int(row["info.duplicate_of"])]
        assert first["scheme"] == row["scheme"] and first["accuracy"] == row["accuracy"]
    again = ToyEvaluator(space)  # resuming: the stored evaluations are reused too
    OptunaStrategy(n_trials=16, sampler="random", warm_start=False).search(space, again, run_dir=tmp_path)
    assert again.calls == 0
    fresh = ToyEvaluator(space)
    OptunaStrategy(n_trials=6, sampler="random", warm_start=False, reuse_evaluations=False).search(space, fresh)
    assert fresh.calls == 6


def test_state_dict_records_the_study_and_a_resume_checks_it(space, tmp_path: Path) -> None:
    first = OptunaStrategy(n_trials=6)
    before = first.search(space, ToyEvaluator(space), run_dir=tmp_path / "a")
    state = load_checkpoint(save_checkpoint(tmp_path / "state.pt", first.state_dict()))
    assert state is not None and state["progress"] == {
        "storage": f"sqlite:///{tmp_path / 'a' / 'optuna.db'}",
        "study_name": "nmsearch",
        "fingerprint": space.fingerprint,
        "finished": 6,
    }
    again, evaluator = OptunaStrategy(n_trials=6), ToyEvaluator(space)
    again.load_state_dict(state)
    after = again.search(space, evaluator, run_dir=tmp_path / "a")
    assert evaluator.calls == 0 and after.trials["scheme"].tolist() == before.trials["scheme"].tolist()
    elsewhere = OptunaStrategy(n_trials=6)
    elsewhere.load_state_dict(state)
    with pytest.raises(StorageError, match="pass the same storage or run_dir"):
        elsewhere.search(space, ToyEvaluator(space), run_dir=tmp_path / "b")
    in_memory = OptunaStrategy(n_trials=6)
    in_memory.search(space, ToyEvaluator(space))
    resumed = OptunaStrategy(n_trials=6)
    resumed.load_state_dict(in_memory.state_dict())
    with pytest.raises(StorageError, match="in-memory study"):
        resumed.search(space, ToyEvaluator(space))
