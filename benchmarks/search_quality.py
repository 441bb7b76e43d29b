"""Search quality and wall time of Optuna and the Gumbel supernet against uniform and random on digits.

    python benchmarks/search_quality.py [--seeds 0 1 2 3 4] [--trials 100] [--ratios 2:4 1:4 2:8 1:8 1:16]
                                        [--strategies optuna random uniform gumbel] [--gumbel-epochs 10]
                                        [--gumbel-lambdas 0 0.3 1 3] [--threads 1] [--csv docs/search_quality.csv]

The main job's setting: the digits task, ``oneshot`` accuracy (masked pre-trained model, BatchNorm
re-estimated, validation split) and the Jetson-AGX-Orin cost model at batch 1, objectives accuracy
(max), latency_ms and bytes_mb (min), over the space of ``--ratios`` (weights, activations, both).
Per seed: TPE (warm-started with the dense and uniform schemes, as in the main job) and random
sampling each run ``--trials`` trials in a fresh SQLite study; ``uniform`` scores every uniform
scheme; ``gumbel`` runs one supernet search per ``--gumbel-lambdas`` value (``bytes_mb`` cost, the
default estimator) and scores each argmax scheme. Every strategy's wall time is reported next to its
result (the cost it was given). The hypervolume of each front (3-D, and 2-D over accuracy and
bytes_mb) is computed against one reference point shared by every run of every strategy. The
pre-trained model is trained once before the timed searches (cached, as in a second run of the main job).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import torch

from evaluators import CompositeEvaluator
from evaluators.pareto import hypervolume, pareto_front, reference_point
from experiments.tasks import get_task
from search_space import SearchSpace
from strategies import GumbelStrategy, OptunaStrategy, RandomStrategy, SearchResult, UniformStrategy

OBJECTIVES = ("accuracy", "latency_ms", "bytes_mb")
STRATEGIES = ("optuna", "random", "uniform", "gumbel")


def make_strategy(name: str, seed: int, args: argparse.Namespace) -> object:
    common = {"n_trials": args.trials, "seed": seed, "objectives": list(OBJECTIVES)}
    if name == "optuna":
        return OptunaStrategy(**common)
    if name == "random":
        return RandomStrategy(**common)
    if name == "uniform":
        return UniformStrategy(seed=seed, objectives=list(OBJECTIVES))
    return GumbelStrategy(epochs=args.gumbel_epochs, lambdas=list(args.gumbel_lambdas), cost_metric="bytes_mb",
                          arch_lr=0.02, seed=seed)  # fmt: skip


def run(strategy: object, evaluator: CompositeEvaluator) -> tuple[SearchResult, float]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = strategy.search(evaluator.parts[0].space, evaluator, run_dir=Path(tmp))
        return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--ratios", nargs="+", default=None, help="N:M ratios of the space (default: the space's)")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--gumbel-epochs", type=int, default=10)
    parser.add_argument("--gumbel-lambdas", type=float, nargs="+", default=[0.0, 0.3, 1.0, 3.0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}", flush=True)

    task = get_task("digits")
    space = None
    if args.ratios:
        space = SearchSpace.from_model(task.build_model(), task.example_inputs(), ratios=args.ratios)
    evaluator = CompositeEvaluator.for_task(task, "orin", metrics=["latency_ms", "bytes_mb"], space=space)
    evaluator.parts[0].trainer.pretrained()  # cached before timing, like a second run of the main job
    runs = []
    for seed in args.seeds:
        for name in args.strategies:
            result, wall = run(make_strategy(name, seed, args), evaluator)
            runs.append({"strategy": name, "seed": seed, "wall_s": wall, "result": result})
            print(f"{name} seed {seed}: {wall:.1f} s, {len(result.front)} front points, load {os.getloadavg()[0]:.1f}",
                  flush=True)  # fmt: skip

    objectives = runs[0]["result"].objectives
    frames = [r["result"].trials[r["result"].trials["state"] == "COMPLETE"] for r in runs]
    reference = reference_point(frames, objectives)
    two_d = [o for o in objectives if o.name in ("accuracy", "bytes_mb")]
    reference_2d = [reference[objectives.index(o)] for o in two_d]
    rows = []
    for entry, frame in zip(runs, frames, strict=True):
        directions = [o.direction for o in objectives]
        front = pareto_front(frame, objectives)
        rows.append({
            "strategy": entry["strategy"],
            "seed": entry["seed"],
            "trials": len(frame),
            "wall_s": round(entry["wall_s"], 1),
            "front": len(front),
            "hv_3d": hypervolume(front[[o.name for o in objectives]].to_numpy(float), directions, reference),
            "hv_acc_bytes": hypervolume(
                front[[o.name for o in two_d]].to_numpy(float), [o.direction for o in two_d], reference_2d
            ),
        })  # fmt: skip
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False, floatfmt=".4g"))
    summary = []
    for name, group in table.groupby("strategy", sort=False):
        summary.append({
            "strategy": name,
            "wall_s median": statistics.median(group["wall_s"]),
            "hv_3d mean": group["hv_3d"].mean(),
            "hv_3d std": group["hv_3d"].std(),
            "hv_acc_bytes mean": group["hv_acc_bytes"].mean(),
            "hv_acc_bytes std": group["hv_acc_bytes"].std(),
        })  # fmt: skip
    print(pd.DataFrame(summary).to_markdown(index=False, floatfmt=".4g"))
    by_seed = table.pivot(index="seed", columns="strategy", values="hv_3d")
    for name in by_seed.columns:
        for baseline in ("uniform", "random"):
            if name != baseline and baseline in by_seed.columns:
                wins = by_seed[name] > by_seed[baseline]
                print(f"{name}'s 3-D hypervolume beats {baseline}'s on {int(wins.sum())} of {len(wins)} seeds")
    print(f"reference point {reference}; load average at the end {os.getloadavg()}")
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
