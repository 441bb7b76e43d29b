"""Search quality on the pre-trained MiniLM task over seeds: Optuna, random, uniform and the sensitivity allocation.

    python benchmarks/minilm_quality.py RUN_DIR [RUN_DIR ...] [--csv docs/results/minilm_quality.csv]

Each ``RUN_DIR`` holds the ``minilm_front.csv`` of one ``benchmarks/minilm.py`` run (one seed), e.g.::

    for k in 0 1 2 3 4; do
      python benchmarks/minilm.py --no-methods --cost-batch 256 --ratios 2:4 --random 100 --seed $k --out runs/seed$k
    done

Objectives: embedding cosine to the dense model (maximise) and modelled latency (minimise). Per run
and strategy -- ``optuna`` (every trial, the warm-start schemes included), ``optuna own`` (only the
trials TPE proposed: those whose point is not a warm-start scheme's), ``random`` (``--random``
schemes), ``allocation`` (the sensitivity allocations) and ``uniform`` (dense and every uniform
scheme) -- the hypervolume against one reference point shared by every run and strategy (the
worst cosine and latency over all points, pushed 10% of their range further), the front size, and
at how many of 10 latency budgets, evenly spaced from uniform 2:4's latency up to (not including)
dense's, the strategy's best cosine within the budget beats uniform's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from evaluators.pareto import hypervolume

DIRECTIONS = ("maximize", "minimize")
BUDGETS = 10


def strategy_points(front: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The points each strategy produced in one run."""
    kinds = {kind: front[front["kind"] == kind] for kind in ("optuna", "random", "allocation", "uniform")}
    warm = pd.concat([kinds["uniform"], kinds["allocation"]])
    seen = set(zip(warm["cosine"].round(12), warm["latency_ms"].round(9), strict=True))
    optuna = kinds["optuna"]
    own = [
        (c, lat) not in seen for c, lat in zip(optuna["cosine"].round(12), optuna["latency_ms"].round(9), strict=True)
    ]
    return {**kinds, "optuna own": optuna[own]}


def best_within(points: pd.DataFrame, budget: float) -> float:
    within = points.loc[points["latency_ms"] <= budget, "cosine"]
    return float(within.max()) if not within.empty else -np.inf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--csv", type=Path, help="write the per-run table here")
    args = parser.parse_args()
    missing = [str(run) for run in args.runs if not (run / "minilm_front.csv").is_file()]
    if missing:
        parser.error(f"no minilm_front.csv in {', '.join(missing)}: run benchmarks/minilm.py --out DIR first")
    fronts = {run: pd.read_csv(run / "minilm_front.csv") for run in args.runs}
    every = pd.concat(fronts.values())
    worst = np.array([every["cosine"].min(), every["latency_ms"].max()])
    spread = np.array([every["cosine"].max(), every["latency_ms"].min()]) - worst
    reference = worst - 0.1 * spread  # past the worst cosine (lower) and the worst latency (higher)
    rows = []
    for run, front in fronts.items():
        uniform = front[front["kind"] == "uniform"]
        dense = float(uniform.loc[uniform["label"] == "dense", "latency_ms"].iloc[0])
        sparse = float(uniform.loc[uniform["label"] == "weights 2:4", "latency_ms"].iloc[0])
        budgets = np.linspace(sparse, dense, BUDGETS, endpoint=False)
        for strategy, points in strategy_points(front).items():
            values = points[["cosine", "latency_ms"]].to_numpy(dtype=float)
            rows.append(
                {
                    "run": run.name,
                    "strategy": strategy,
                    "points": len(points),
                    "hypervolume": hypervolume(values, DIRECTIONS, reference) if len(points) else 0.0,
                    "budgets beating uniform": sum(best_within(points, b) > best_within(uniform, b) for b in budgets),
                    "best cosine at >= 50% of uniform 2:4's saving": best_within(points, (dense + sparse) / 2),
                }
            )
    table = pd.DataFrame(rows)
    print(f"reference point: cosine {reference[0]:.4f}, latency {reference[1]:.4f} ms")
    print(table.to_markdown(index=False, floatfmt=".4f"))
    summary = table.groupby("strategy", sort=False).agg(
        runs=("run", "count"),
        hv_mean=("hypervolume", "mean"),
        hv_std=("hypervolume", "std"),
        budgets_min=("budgets beating uniform", "min"),
        budgets_max=("budgets beating uniform", "max"),
        cosine_at_half_saving_mean=("best cosine at >= 50% of uniform 2:4's saving", "mean"),
    )
    print(summary.to_markdown(floatfmt=".4f"))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
