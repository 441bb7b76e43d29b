"""Search quality and wall time of OptunaStrategy against the random baseline on digits.

    python benchmarks/search_quality.py [--seeds 0 1 2 3 4] [--trials 100] [--csv docs/search_quality.csv]

The main job's setting: the digits task, ``oneshot`` accuracy (masked pre-trained model,
BatchNorm re-estimated, validation split) and the Jetson-AGX-Orin cost model at batch 1,
objectives accuracy (max), latency_ms and bytes_mb (min). Per seed, TPE (warm-started with the
dense and uniform schemes, as in the main job) and random sampling each run ``--trials`` trials
in a fresh SQLite study. The hypervolume of each front (3-D, and 2-D over accuracy and
bytes_mb) is computed against one reference point shared by every run. The pre-trained model is
trained once before the timed searches (it is cached, as in a second run of the main job).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd

from evaluators import CompositeEvaluator
from evaluators.pareto import hypervolume, pareto_front, reference_point
from experiments.tasks import get_task
from strategies import OptunaStrategy, RandomStrategy, SearchResult

OBJECTIVES = ("accuracy", "latency_ms", "bytes_mb")


def run(strategy: OptunaStrategy, evaluator: CompositeEvaluator) -> tuple[SearchResult, float]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = strategy.search(evaluator.parts[0].space, evaluator, run_dir=Path(tmp))
        return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    evaluator = CompositeEvaluator.for_task(get_task("digits"), "orin", metrics=["latency_ms", "bytes_mb"])
    evaluator.parts[0].trainer.pretrained()  # cached before timing, like a second run of the main job
    runs = []
    for seed in args.seeds:
        common = {"n_trials": args.trials, "seed": seed, "objectives": list(OBJECTIVES)}
        pair = (OptunaStrategy(**common), RandomStrategy(**common))
        for strategy in pair:
            result, wall = run(strategy, evaluator)
            runs.append({"strategy": strategy.name, "seed": seed, "wall_s": wall, "result": result})
            print(f"{strategy.name} seed {seed}: {wall:.1f} s, {len(result.front)} front points", flush=True)

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
            "evaluated": int(len(frame) - frame.filter(like="duplicate_of").notna().sum().sum()),
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
    wins = by_seed["optuna"] > by_seed["random"]
    print(f"optuna's 3-D hypervolume beats random's on {int(wins.sum())} of {len(wins)} seeds; reference {reference}")
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
