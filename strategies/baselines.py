"""Baselines as strategies, on the same storage-backed machinery as :class:`OptunaStrategy`
(so they resume, run in parallel and report results in the same format).

* ``uniform`` -- dense plus every eligible option applied to all layers (one trial each).
* ``random``  -- schemes drawn uniformly at random, one option per layer.

Their resume state is the Optuna study's (:meth:`OptunaStrategy.state_dict`): the trials they have
evaluated live in its storage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from evaluators import Evaluator
from search_space import SearchSpace
from strategies.base import SearchResult
from strategies.optuna_strategy import OptunaStrategy, Sampler


@dataclass
class UniformStrategy(OptunaStrategy):
    """Evaluates ``space.uniform_schemes()``: dense and each (target, ratio) on every eligible layer."""

    sampler: Sampler = Sampler.random
    warm_start: bool = True
    study_name: str = "uniform"
    name: str = "uniform"

    def search(
        self, space: SearchSpace, evaluator: Evaluator, *, run_dir: str | os.PathLike | None = None
    ) -> SearchResult:
        # Every trial is an enqueued uniform scheme: the budget is exactly their number.
        exact = replace(self, n_trials=len(space.uniform_schemes()), timeout_s=None)
        exact._resume = self._take_resume()
        try:
            return OptunaStrategy.search(exact, space, evaluator, run_dir=run_dir)
        finally:
            self._progress = exact._progress  # the progress is this strategy's (state_dict)


@dataclass
class RandomStrategy(OptunaStrategy):
    """Random schemes (Optuna's RandomSampler), no warm start: the reference a search must beat."""

    sampler: Sampler = Sampler.random
    warm_start: bool = False
    study_name: str = "random"
    name: str = "random"
