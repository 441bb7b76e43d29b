"""Multi-objective black-box search with Optuna: one categorical parameter per searchable layer.

Storage-backed, so a search resumes by re-running it with the same study name, and several
worker processes (or machines sharing a storage) can run one study together.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from evaluators import Constraint, Evaluation, Evaluator, Objective, check_evaluator, evaluate_safely, select_objectives
from search_space import NMSearchError, SearchSpace
from strategies.base import Candidate, Choice, SearchResult, StrategyBase
from strategies.storage import (
    SearchToken,
    StorageError,
    TrialLease,
    claim_trial,
    fail_stale_trials,
    has_native_heartbeat,
    open_storage,
    public_url,
    resolve_storage,
    retry_trial,
)

SAMPLERS = ("tpe", "nsga2", "nsga3", "gp", "random")


class Sampler(Choice):
    """Optuna samplers by name (see :func:`make_sampler`)."""

    tpe = "tpe"
    nsga2 = "nsga2"
    nsga3 = "nsga3"
    gp = "gp"
    random = "random"

    @classmethod
    def invalid(cls, label: str, value: object) -> str:
        return f"unknown sampler {value!r}; choose one of {cls.values()}"


FAIL_REASON_ATTR = "fail_reason"
_WARM_START_ATTR = "nmsearch.warm_start_enqueued"
SKIPPED_ATTR = "nmsearch.skipped"
_SURPLUS = "not evaluated: the budget was already filled (by other workers)"
_YIELDED = "not evaluated: yields its budget slot to a queued (retried) trial"
_TIMED_OUT = "not evaluated: timeout_s ran out while it waited for its turn"
_POLL_S = 0.1


class _EvaluationFailed(Exception):
    """Raised inside the Optuna objective so the trial is recorded as failed (and caught)."""


def _is_queued(trial: FrozenTrial) -> bool:
    """Enqueued (the warm start) or a retry of an interrupted trial (Optuna's retry callback
    records ``failed_trial``), as opposed to a fresh draw of the sampler."""
    return bool(trial.system_attrs.get("fixed_params")) or "failed_trial" in trial.system_attrs


def _skip(trial: optuna.Trial, reason: str) -> NoReturn:
    """End a trial unevaluated (state PRUNED), the reason recorded."""
    trial.set_user_attr(SKIPPED_ATTR, reason)
    raise optuna.TrialPruned(reason)


def make_sampler(name: str, seed: int | None, population_size: int | None = None) -> optuna.samplers.BaseSampler:
    """An Optuna sampler by name: tpe (multivariate, constant liar for parallel workers),
    nsga2, nsga3, gp or random."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size or 50)
    if name == "nsga3":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            return optuna.samplers.NSGAIIISampler(seed=seed, population_size=population_size or 50)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise NMSearchError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in values.items()}


@dataclass
class OptunaStrategy(StrategyBase):
    """Search with an Optuna sampler. Budget: ``n_trials`` finished evaluations and/or
    ``timeout_s`` of wall time (per call). ``constraints`` (``"latency_ms<=0.5"``) become
    ``trial.set_constraint`` values the samplers respect; ``warm_start`` enqueues the dense and
    every uniform scheme first, then ``warm_start_schemes`` (``{layer: option}`` dicts, e.g. the
    sensitivity allocations of :func:`strategies.sensitivity.allocation_schemes`).
    ``worker_index`` offsets the seed, so parallel workers differ;
    worker 0 alone enqueues the warm start. ``reuse_evaluations``: a scheme the study already
    completed (samplers do propose repeats) is not evaluated again; its trial records the same
    values with ``info.duplicate_of`` (evaluators are deterministic for a scheme)."""

    n_trials: int | None = 100
    timeout_s: float | None = None
    sampler: Sampler = Sampler.tpe
    seed: int | None = 0
    objectives: list[str] | None = None
    constraints: list[str] = field(default_factory=list)
    storage: str | None = None
    study_name: str = "nmsearch"
    warm_start: bool = True
    warm_start_schemes: list[dict[str, str]] = field(default_factory=list)
    worker_index: int = 0
    population_size: int | None = None
    heartbeat_interval_s: int = 10
    grace_period_s: int = 30
    max_retry: int = 3
    reuse_evaluations: bool = True
    show_progress_bar: bool = False
    name: str = field(default="optuna")

    def _objectives(self, evaluator: Evaluator) -> tuple[Objective, ...]:
        # None: every objective the evaluator reports, so none is dropped without being asked.
        if self.objectives is not None:
            return select_objectives(evaluator, list(self.objectives))
        return evaluator.objectives

    def _validate(self, evaluator: Evaluator) -> tuple[tuple[Objective, ...], list[Constraint]]:
        check_evaluator(evaluator)
        make_sampler(self.sampler, self.seed)  # unknown names fail here, before any work
        if self.n_trials is None and self.timeout_s is None:
            raise NMSearchError("set n_trials and/or timeout_s: an unbounded search never ends")
        if self.n_trials is not None and self.n_trials < 1:
            raise NMSearchError(f"n_trials must be >= 1, got {self.n_trials}")
        objectives = self._objectives(evaluator)
        constraints = [Constraint.parse(c) for c in self.constraints]
        metrics = [o.name for o in evaluator.objectives]
        for constraint in constraints:
            if constraint.metric not in metrics:
                raise NMSearchError(
                    f"constraint {constraint} is on {constraint.metric!r}, "
                    f"but the evaluator reports: {', '.join(metrics)}"
                )
        return objectives, constraints

    def _open_study(self, storage_url: str | None, objectives: Sequence[Objective], space: SearchSpace) -> optuna.Study:
        storage = open_storage(
            storage_url,
            heartbeat_interval_s=self.heartbeat_interval_s,
            grace_period_s=self.grace_period_s,
            max_retry=self.max_retry,
        )
        sampler = make_sampler(
            self.sampler, None if self.seed is None else self.seed + self.worker_index, self.population_size
        )
        directions = [o.direction for o in objectives]
        names = [o.name for o in objectives]
        study = optuna.create_study(
            storage=storage, sampler=sampler, study_name=self.study_name, directions=directions, load_if_exists=True
        )
        if study.metric_names is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                study.set_metric_names(names)
            study.set_user_attr("fingerprint", space.fingerprint)
        found = list(zip(study.metric_names or names, [d.name.lower() for d in study.directions], strict=False))
        wanted = list(zip(names, directions, strict=True))
        if found != wanted:
            raise StorageError(
                f"study {self.study_name!r} in {public_url(storage_url)} optimises "
                + ", ".join(f"{n} ({d})" for n, d in found)
                + f"; this search asks for {', '.join(f'{n} ({d})' for n, d in wanted)}: use another study_name"
            )
        fingerprint = study.user_attrs.get("fingerprint")
        if fingerprint and fingerprint != space.fingerprint:
            raise StorageError(
                f"study {self.study_name!r} was created for a model with fingerprint {fingerprint}, "
                f"this one is {space.fingerprint}: use another study_name"
            )
        return study

    def _enqueue_warm_start(self, study: optuna.Study, space: SearchSpace) -> None:
        """Enqueue the dense and uniform schemes (and ``warm_start_schemes``) once per study: the study
        records that it did (a resumed or second worker does not queue them again); schemes already
        queued, running, done or failed by the evaluator are skipped should an earlier run die half-way."""
        if study.user_attrs.get(_WARM_START_ATTR):
            return
        taken = set()
        for t in study.get_trials(deepcopy=False):
            if t.state in (TrialState.COMPLETE, TrialState.RUNNING) or t.user_attrs.get(FAIL_REASON_ATTR):
                taken.add(json.dumps(t.params, sort_keys=True))
            elif t.state == TrialState.WAITING:  # queued trials hold their parameters apart
                taken.add(json.dumps(t.system_attrs.get("fixed_params") or t.params, sort_keys=True))
        extra = {
            f"warm_start_schemes[{i}]": space.scheme(choices) for i, choices in enumerate(self.warm_start_schemes)
        }
        for label, scheme in {**space.uniform_schemes(), **extra}.items():
            params = {name: scheme[name].name for name in space.searchable}
            if json.dumps(params, sort_keys=True) not in taken:
                study.enqueue_trial(params, user_attrs={"warm_start": label})
        study.set_user_attr(_WARM_START_ATTR, time.strftime("%Y-%m-%dT%H:%M:%S"))

    def search(
        self, space: SearchSpace, evaluator: Evaluator, *, run_dir: str | os.PathLike | None = None
    ) -> SearchResult:
        objectives, constraints = self._validate(evaluator)
        if not space.searchable:
            raise NMSearchError("the search space has no layer with a choice: nothing to search")
        storage_url = resolve_storage(self.storage, Path(run_dir) if run_dir is not None else None)
        resume = self._take_resume()
        if resume is not None:
            self._check_resume(resume, storage_url)
        study = self._open_study(storage_url, objectives, space)
        finished = self._finished(study.get_trials(deepcopy=False))
        if resume is not None and finished < resume["finished"]:
            raise StorageError(
                f"study {self.study_name!r} in {storage_url} has {finished} finished trials, the state "
                f"recorded {resume['finished']}: it is not the storage the state was made with"
            )
        with SearchToken() as token:
            return self._search(study, space, evaluator, objectives, constraints, storage_url, token)

    def _search(
        self,
        study: optuna.Study,
        space: SearchSpace,
        evaluator: Evaluator,
        objectives: Sequence[Objective],
        constraints: Sequence[Constraint],
        storage_url: str | None,
        token: str,
    ) -> SearchResult:
        shared = storage_url is not None
        leases = shared and not has_native_heartbeat(study._storage)
        if shared:  # trials of dead runs come back before anything new starts
            fail_stale_trials(study, self.grace_period_s, self.max_retry, leases=leases)
        if self.warm_start and self.worker_index == 0:
            self._enqueue_warm_start(study, space)
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s

        current: list[optuna.Trial] = []  # the trial being run, for _taken_over
        dead_seen: dict[int, float] = {}  # see _due_retries

        def objective(trial: optuna.Trial) -> tuple[float, ...]:
            current[:] = [trial]
            try:
                return evaluate(trial)
            except (_EvaluationFailed, optuna.TrialPruned):
                raise
            except BaseException:  # the search stops here (Ctrl-C, a crash): queue this trial's retry
                retry_trial(study, trial, self.max_retry)
                raise

        def evaluate(trial: optuna.Trial) -> tuple[float, ...]:
            with TrialLease(trial, self.heartbeat_interval_s) if leases else nullcontext():
                if shared:
                    claim_trial(study, trial, token)
                frozen = study._storage.get_trial(trial._trial_id)
                queued = _is_queued(frozen)
                choices = {name: trial.suggest_categorical(name, space.option_names(name)) for name in space.searchable}
                scheme = space.scheme(choices, provenance={"strategy": self.name, "trial": trial.number})
                trial.set_user_attr("scheme", json.dumps(scheme.to_json()))
                earlier = self._wait_for_turn(study, trial, choices, queued, shared, leases, deadline, dead_seen)
                if earlier is not None:
                    number, stored = earlier
                    evaluation = Evaluation(stored.values, info={**stored.info, "duplicate_of": number})
                else:
                    evaluation = evaluate_safely(evaluator, scheme)
                return self._record(trial, evaluation, objectives, constraints)

        def stop_at_budget(study: optuna.Study, _: FrozenTrial) -> None:
            if self.n_trials is not None and self._finished(study.get_trials(deepcopy=False)) >= self.n_trials:
                study.stop()

        while self.n_trials is None or self._finished(study.get_trials(deepcopy=False)) < self.n_trials:
            try:
                study.optimize(
                    objective,
                    timeout=None if deadline is None else max(0.0, deadline - time.monotonic()),
                    callbacks=[stop_at_budget],
                    catch=(_EvaluationFailed,),
                    show_progress_bar=self.show_progress_bar,
                )
                break
            except ValueError as error:  # Optuna's "Cannot tell a FAIL trial": see _taken_over
                # our own errors (NMSearchError is a ValueError, e.g. a broken evaluator) stop the search
                if isinstance(error, NMSearchError) or not self._taken_over(study, current):
                    raise
        # The storage is the state: what the search continues from, and what a resume checks.
        finished = self._finished(study.get_trials(deepcopy=False))
        self._record_progress(
            storage=storage_url, study_name=self.study_name, fingerprint=space.fingerprint, finished=finished
        )
        return self.result(study, space, objectives, storage_url)

    def _check_resume(self, resume: dict[str, Any], storage_url: str | None) -> None:
        if resume.get("storage") is None:
            raise StorageError(
                f"{self.name}: the state is of an in-memory study, which ended with its process; "
                "resume a study kept in a storage (set storage, or pass run_dir)"
            )
        if resume["storage"] != storage_url or resume["study_name"] != self.study_name:
            raise StorageError(
                f"{self.name}: the state is of study {resume['study_name']!r} in {resume['storage']}, this search "
                f"opens {self.study_name!r} in {storage_url}: pass the same storage or run_dir"
            )

    @staticmethod
    def _taken_over(study: optuna.Study, current: list[optuna.Trial]) -> bool:
        """Whether this worker's trial was failed (and re-enqueued) by another worker while it ran,
        as happens when its heartbeats were late past the grace period: the retry redoes the
        trial, and this worker goes on with the next one."""
        return bool(current) and study._storage.get_trial(current[-1]._trial_id).state.is_finished()

    def _wait_for_turn(
        self,
        study: optuna.Study,
        trial: optuna.Trial,
        choices: dict[str, str],
        queued: bool,
        shared: bool,
        leases: bool,
        deadline: float | None,
        dead_seen: dict[int, float],
    ) -> tuple[int, Evaluation] | None:
        """Hold a trial whose scheme is drawn until it may be evaluated, so that workers sharing a
        study neither overrun the budget nor score one scheme twice. Trials only wait for trials
        with lower numbers (no deadlock): until each has drawn its scheme, one with the same scheme
        has finished (then its evaluation is reused), and until the budget has room. A trial of a
        dead worker stops counting once it is failed; its retry takes its place, ahead of fresh
        draws: a fresh draw leaves room for queued trials, for running queued trials with higher
        numbers (which wait for it) and for retries due but not yet queued (:meth:`_due_retries`);
        it yields when those fill the budget, and waits while only a due retry does. Returns
        ``(trial number, evaluation)`` to reuse, or ``None`` to evaluate; raises ``TrialPruned``
        when the budget is full, when a fresh draw yields, or at the deadline."""
        while True:
            trials = study.get_trials(deepcopy=False)
            ahead = [t for t in trials if t.state == TrialState.RUNNING and t.number < trial.number]
            finished = self._finished(trials)
            budget = self.n_trials
            if budget is not None and finished >= budget:
                _skip(trial, _SURPLUS)
            reserved = due = 0
            if budget is not None and not queued:
                due = self._due_retries(trials, dead_seen)
                reserved = due + sum(
                    t.state == TrialState.WAITING
                    or (t.state == TrialState.RUNNING and t.number > trial.number and _is_queued(t))
                    for t in trials
                )
                # Yield to queued or running retries (never wait for them: they wait for this
                # trial); only a retry that is not queued yet is waited for, briefly.
                if reserved > due and finished + len(ahead) + reserved >= budget:
                    _skip(trial, _YIELDED)
            blocked = (budget is not None and finished + len(ahead) + reserved >= budget) or any(
                set(t.params) != set(choices) or (self.reuse_evaluations and t.params == choices) for t in ahead
            )
            if not blocked:
                return self._earlier_evaluation(trials, choices) if self.reuse_evaluations else None
            if deadline is not None and time.monotonic() > deadline:
                _skip(trial, _TIMED_OUT)
            time.sleep(_POLL_S)
            if shared:
                fail_stale_trials(study, self.grace_period_s, self.max_retry, leases=leases)

    def _due_retries(self, trials: Sequence[FrozenTrial], dead_seen: dict[int, float]) -> int:
        """Trials failed for a dead worker (not by the evaluator) whose retry is due but not in the
        storage yet: the worker that failed one queues its retry right after (two writes), so a
        fresh draw may see the failure first. ``dead_seen`` records when this search first saw
        each; one still without a retry after ``grace_period_s`` no longer counts (its failing
        worker died between the two writes), so the search never waits for it for ever."""
        retried = {t.system_attrs["retry_history"][-1] for t in trials if t.system_attrs.get("retry_history")}
        now = time.monotonic()
        due = 0
        for t in trials:
            if (
                t.state != TrialState.FAIL
                or t.user_attrs.get(FAIL_REASON_ATTR)
                or t.number in retried
                or len(t.system_attrs.get("retry_history", [])) >= self.max_retry  # as the retry callback
            ):
                continue
            due += now - dead_seen.setdefault(t.number, now) <= self.grace_period_s
        return due

    @staticmethod
    def _record(
        trial: optuna.Trial, evaluation: Evaluation, objectives: Sequence[Objective], constraints: Sequence[Constraint]
    ) -> tuple[float, ...]:
        # One attribute write: every RDB write is a transaction of its own.
        trial.set_user_attr(
            "evaluation",
            {
                "metrics": _finite(dict(evaluation.values)),
                "info": _finite({k: v for k, v in evaluation.info.items() if isinstance(v, int | float | str)}),
                "duration_s": evaluation.duration_s,
            },
        )
        values = [evaluation.values.get(o.name, math.nan) for o in objectives]
        if evaluation.failed or not all(math.isfinite(v) for v in values):
            reason = evaluation.reason or "non-finite objective value"
            trial.set_user_attr(FAIL_REASON_ATTR, reason)
            raise _EvaluationFailed(reason)
        for constraint in constraints:
            trial.set_constraint(str(constraint), constraint.violation(evaluation.values))
        return tuple(values)

    @staticmethod
    def _earlier_evaluation(trials: Sequence[FrozenTrial], choices: dict[str, str]) -> tuple[int, Evaluation] | None:
        """The evaluation of a completed trial (of any run or worker) with the same choices."""
        for trial in trials:
            record = trial.user_attrs.get("evaluation") if trial.state == TrialState.COMPLETE else None
            if record and "duplicate_of" not in record["info"] and trial.params == choices:
                return trial.number, Evaluation(record["metrics"], info=record["info"], duration_s=record["duration_s"])
        return None

    @staticmethod
    def _finished(trials: Sequence[FrozenTrial]) -> int:
        """Evaluations that count against the budget: completed, or failed by the evaluator
        (not trials of workers that died; those are retried)."""
        return sum(t.state == TrialState.COMPLETE or bool(t.user_attrs.get(FAIL_REASON_ATTR)) for t in trials)

    def result(
        self, study: optuna.Study, space: SearchSpace, objectives: Sequence[Objective], storage_url: str | None
    ) -> SearchResult:
        """Every trial of the study but the queued ones as a :class:`SearchResult` (one row per
        trial in the storage, so ``trials.csv`` and the storage agree); a trial whose worker died
        before it drew all its choices has no scheme."""
        candidates = []
        for trial in study.get_trials(deepcopy=False):
            if trial.state == TrialState.WAITING:
                continue
            scheme = (
                space.scheme(trial.params, provenance={"strategy": self.name, "trial": trial.number})
                if set(trial.params) == set(space.searchable)
                else None
            )
            stored = trial.user_attrs.get("evaluation")
            evaluation = None
            if stored is not None:
                metrics = {k: math.nan if v is None else v for k, v in stored["metrics"].items()}
                evaluation = Evaluation(metrics, info=stored["info"], duration_s=stored["duration_s"])
            duration = (
                (trial.datetime_complete - trial.datetime_start).total_seconds()
                if trial.datetime_complete and trial.datetime_start
                else math.nan
            )
            reason = trial.user_attrs.get(FAIL_REASON_ATTR) or trial.user_attrs.get(SKIPPED_ATTR, "")
            if trial.state == TrialState.FAIL and not reason:
                reason = "interrupted: the worker stopped or died during this trial"
            candidates.append(
                Candidate(
                    trial=trial.number,
                    scheme=scheme,
                    evaluation=evaluation,
                    state=trial.state.name,
                    duration_s=duration,
                    feasible=all(v <= 0 for v in trial.constraints.values()),
                    reason=reason,
                )
            )
        metadata = {
            "sampler": self.sampler,
            "seed": self.seed,
            "study_name": self.study_name,
            "storage": public_url(storage_url),
            "constraints": [str(Constraint.parse(c)) for c in self.constraints],
            "fingerprint": space.fingerprint,
            "n_trials": self.n_trials,
            "timeout_s": self.timeout_s,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        return SearchResult.from_candidates(self.name, objectives, candidates, metadata)
