"""Search quality on the pre-trained MiniLM task over seeds: every strategy against uniform.

    python benchmarks/minilm_quality.py RUN_DIR [RUN_DIR ...] [--csv docs/results/minilm_quality.csv]
        [--reference COSINE LATENCY_MS]

Each ``RUN_DIR`` holds one seed's fronts: the ``minilm_front.csv`` of a ``benchmarks/minilm.py`` run
and/or the ``minilm_front_<strategy>.csv`` of ``benchmarks/minilm_trained.py`` runs (Gumbel,
DominoSearch), all scored by the same evaluator and cost, e.g.::

    for k in 0 1 2 3 4; do
      python benchmarks/minilm.py --no-methods --cost-batch 256 --ratios 2:4 --random 100 --seed $k --out runs/seed$k
      python benchmarks/minilm_trained.py gumbel --cost-batch 256 --ratios 2:4 --seed $k --out runs/seed$k --set ...
    done

Objectives: embedding cosine to the dense model (maximise) and modelled latency (minimise). Per run
and strategy -- ``optuna`` (every trial, the warm-start schemes included), ``optuna own`` (only the
trials TPE proposed: those whose point is not a warm-start scheme's), ``random`` (``--random``
schemes), ``allocation`` (the sensitivity allocations), ``uniform`` (dense and every uniform
scheme) and each trained strategy (``gumbel``, ``domino``: the kind of its rows) -- the
hypervolume against one reference point shared by every run and strategy (``--reference``, or the
worst cosine and latency over all points, pushed 10% of their range further), the front size, at
how many of 10 latency budgets, evenly spaced from uniform 2:4's latency up to (not including)
dense's, the strategy's best cosine within the budget beats uniform's, and the search's wall time
where the front file records it (``search_s``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from evaluators.pareto import hypervolume
from search_space.io import atomic_write_text

DIRECTIONS = ("maximize", "minimize")
BUDGETS = 10
FRONT = "minilm_front.csv"
FRONTS = "minilm_front*.csv"  # minilm.py's and minilm_trained.py's (minilm_front_<strategy>.csv)
KINDS = ("optuna", "random", "allocation", "uniform")  # minilm.py's, in its table's order


def read_run(run: Path) -> pd.DataFrame:
    """Every front file of one run directory, the uniform schemes once (each file scores them)."""
    front = pd.concat([pd.read_csv(path) for path in sorted(run.glob(FRONTS))], ignore_index=True)
    repeated = (front["kind"] == "uniform") & front["label"].duplicated()
    return front[~repeated]


def strategy_points(front: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The points each strategy produced in one run (``optuna own``: TPE's proposals, not the warm start)."""
    present = set(front["kind"])
    kinds = [*(k for k in KINDS if k in present), *(k for k in front["kind"].unique() if k not in KINDS)]
    points = {kind: front[front["kind"] == kind] for kind in kinds}
    if "optuna" in points:
        warm = front[front["kind"].isin(["uniform", "allocation"])]
        seen = set(zip(warm["cosine"].round(12), warm["latency_ms"].round(9), strict=True))
        optuna = points["optuna"]
        own = [
            (c, lat) not in seen
            for c, lat in zip(optuna["cosine"].round(12), optuna["latency_ms"].round(9), strict=True)
        ]
        points["optuna own"] = optuna[own]
    return points


def best_within(points: pd.DataFrame, budget: float) -> float:
    within = points.loc[points["latency_ms"] <= budget, "cosine"]
    return float(within.max()) if not within.empty else -np.inf


def shared_reference(fronts: Sequence[pd.DataFrame]) -> np.ndarray:
    """The worst cosine and latency over every point, pushed 10% of their range further."""
    every = pd.concat(fronts)
    worst = np.array([every["cosine"].min(), every["latency_ms"].max()])
    spread = np.array([every["cosine"].max(), every["latency_ms"].min()]) - worst
    return worst - 0.1 * spread  # past the worst cosine (lower) and the worst latency (higher)


def quality_table(fronts: dict[str, pd.DataFrame], reference: Sequence[float]) -> pd.DataFrame:
    """Per run and strategy: points, hypervolume against ``reference`` (cosine, latency), budgets
    beating uniform, best cosine at half of uniform 2:4's saving, and wall time (``search_s``).

    Args:
        fronts: Run name -> its points (:func:`read_run`), with the uniform ``dense`` and ``weights 2:4``.
        reference: The shared reference point.

    Returns:
        One row per run and strategy.
    """
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
                    "run": run,
                    "strategy": strategy,
                    "points": len(points),
                    "hypervolume": hypervolume(values, DIRECTIONS, reference) if len(points) else 0.0,
                    "budgets beating uniform": sum(best_within(points, b) > best_within(uniform, b) for b in budgets),
                    "best cosine at >= 50% of uniform 2:4's saving": best_within(points, (dense + sparse) / 2),
                    "search_s": points["search_s"].max() if "search_s" in points else np.nan,
                }
            )
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--csv", type=Path, help="write the per-run table here")
    parser.add_argument(
        "--reference", nargs=2, type=float, metavar=("COSINE", "LATENCY_MS"),
        help="the hypervolume's reference point (default: from the worst points of every run)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    missing = [str(run) for run in args.runs if not any(run.glob(FRONTS))]
    if missing:
        parser.error(
            f"no {FRONT} or minilm_front_<strategy>.csv in {', '.join(missing)}: run benchmarks/minilm.py "
            "or benchmarks/minilm_trained.py --out DIR first"
        )
    fronts = {run.name: read_run(run) for run in args.runs}
    if len(fronts) < len(args.runs):
        parser.error("two run directories have the same name: the table names each run by its folder")
    lacking = [run for run, front in fronts.items() if not {"dense", "weights 2:4"} <= set(front["label"])]
    if lacking:
        parser.error(f"run {lacking[0]} has no uniform 'dense' and 'weights 2:4' rows: the budgets need them")
    reference = np.array(args.reference) if args.reference else shared_reference(list(fronts.values()))
    table = quality_table(fronts, reference)
    print(f"reference point: cosine {reference[0]:.4f}, latency {reference[1]:.4f} ms")
    print(table.to_markdown(index=False, floatfmt=".4f"))
    summary = table.groupby("strategy", sort=False).agg(
        runs=("run", "count"),
        hv_mean=("hypervolume", "mean"),
        hv_std=("hypervolume", "std"),
        budgets_min=("budgets beating uniform", "min"),
        budgets_max=("budgets beating uniform", "max"),
        cosine_at_half_saving_mean=("best cosine at >= 50% of uniform 2:4's saving", "mean"),
        search_s_mean=("search_s", "mean"),
    )
    print(summary.to_markdown(floatfmt=".4f"))
    if args.csv:
        atomic_write_text(args.csv, table.to_csv(index=False))


if __name__ == "__main__":
    main()
