"""Per-trial overhead of OptunaStrategy (everything except the evaluator) on a ResNet-18 space.

    python benchmarks/optuna_overhead.py [--trials 100] [--sampler tpe]

The evaluator returns instantly (its values come from a fixed random table), so the wall time
per trial is the strategy's own cost: sampling 20 categorical parameters, building and
validating the scheme, storing params, attributes and values. SQLite in a temporary directory
(the default storage, WAL mode) is compared with in-memory storage, and both with plain Optuna
on the same storage and sampler suggesting the same 20 categorical parameters: the floor that
Optuna's storage and sampler set before nmsearch does anything.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import torch

from evaluators import Evaluation, Objective
from experiments.models import resnet18
from search_space import Scheme, SearchSpace
from strategies import OptunaStrategy, make_sampler, open_storage
from strategies.storage import resolve_storage


class InstantEvaluator:
    """Accuracy and latency looked up from a random per-(layer, option) table: no real work."""

    objectives = (Objective("accuracy", "maximize"), Objective("latency_ms", "minimize", "ms"))

    def __init__(self, space: SearchSpace, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.space = space
        self.accuracy = rng.random((len(space.layers), space.max_options)) * 0.01
        self.latency = rng.random((len(space.layers), space.max_options))

    def evaluate(self, scheme: Scheme) -> Evaluation:
        index = self.space.encode(scheme)
        rows = np.arange(len(index))
        return Evaluation(
            {
                "accuracy": 1 - float(self.accuracy[rows, index].sum()),
                "latency_ms": float(self.latency[rows, index].sum()),
            }
        )


def plain_optuna_ms(space: SearchSpace, sampler: str, run_dir: str | None, trials: int) -> float:
    """Wall ms per trial of Optuna alone: suggest one categorical per layer, return two numbers."""
    study = optuna.create_study(
        storage=open_storage(resolve_storage(None, Path(run_dir) if run_dir else None)),
        sampler=make_sampler(sampler, 0),
        directions=["maximize", "minimize"],
    )
    names = {name: space.option_names(name) for name in space.searchable}

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        choices = [trial.suggest_categorical(name, options) for name, options in names.items()]
        return float(choices.count("dense")), float(len(choices))

    start = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    return (time.perf_counter() - start) * 1e3 / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--sampler", default="tpe")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace.from_model(resnet18(1000, "imagenet"), torch.randn(1, 3, 224, 224))
    rows = []
    for storage in ("sqlite", "memory"):
        with tempfile.TemporaryDirectory() as tmp:
            strategy = OptunaStrategy(n_trials=args.trials, sampler=args.sampler, seed=0)
            start = time.perf_counter()
            result = strategy.search(space, InstantEvaluator(space), run_dir=tmp if storage == "sqlite" else None)
            total = time.perf_counter() - start
            durations = result.trials["duration_s"].to_numpy() * 1e3
            plain = plain_optuna_ms(space, args.sampler, tmp if storage == "sqlite" else None, args.trials)
        rows.append(
            {"storage": storage, "sampler": args.sampler, "trials": len(result.trials),
             "nmsearch_wall_ms_per_trial": total * 1e3 / len(result.trials),
             "nmsearch_trial_ms_median": float(np.median(durations)),
             "plain_optuna_ms_per_trial": plain}
        )  # fmt: skip
    print(f"ResNet-18 space: {len(space.searchable)} searchable layers, {space.max_options} options each")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".1f"))


if __name__ == "__main__":
    main()
