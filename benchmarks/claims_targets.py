"""Akiva-Hochman et al. (ECCVW 2022) on digits: does searching weights and activations together beat
searching either alone?

    python benchmarks/claims_targets.py [--seeds 3] [--trials 60] [--batch-size 256] [--quick]

Three search spaces over the digits CNN (``SearchSpace.from_model(..., targets=...)``, the
equivalents of ``conf/space/weights.yaml``, ``activations.yaml`` and ``default.yaml``):
``weights`` only, ``activations`` only and ``weights+activations`` (weights, activations or both
per layer, ratios 2:4, 1:4, 2:8, 1:8). Per seed (of pre-training and of the sampler), hardware
profile (A100, Jetson AGX Orin, the hypothetical ``ideal_nm``) and cost metric (``latency_ms``,
``bytes_mb``; FP16, ``--batch-size`` images), each space gets the same budget: an
``OptunaStrategy`` (TPE, warm-started with the uniform schemes) of ``--trials`` evaluations with
objectives (accuracy, cost). Accuracy is the ``oneshot`` fidelity (pre-trained model masked,
BatchNorm re-estimated; validation split), shared between searches through a per-seed cache.

The two restricted spaces are small (5^4 = 625 schemes each), so for the first
``--exhaustive-seeds`` seeds they are also enumerated completely: their exact Pareto fronts are the
best any search restricted to them can do.

Hypervolumes use one reference point per (profile, metric) and seed, shared by the three spaces
(``evaluators.pareto.reference_point``: the worst value of each objective over all their
candidates, 10 % of the range further out, accuracy floored at ``--accuracy-floor``), and are
reported normalised by the box between the ideal point and the reference.

Writes ``docs/claims_targets.csv`` (every candidate), ``docs/claims_targets_hv.csv`` (hypervolumes)
and ``docs/claims_targets.png`` (fronts of the first seed).
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import optuna
import pandas as pd
from claims_common import DOCS, CachedAccuracy, describe, header, markdown, save_figure, write_csv

from evaluators import (
    AccuracyConfig,
    AccuracyEvaluator,
    CompositeEvaluator,
    CostEvaluator,
    HardwareCostModel,
    Objective,
    Trainer,
)
from evaluators.pareto import hypervolume, pareto_mask, plot_pareto, reference_point
from experiments.tasks import get_task
from search_space import SearchSpace
from strategies import OptunaStrategy

PROFILES = ("a100", "orin", "ideal_nm")
METRICS = ("latency_ms", "bytes_mb")
SPACES = {
    "weights": ("weights",),
    "activations": ("activations",),
    "weights+activations": ("weights", "activations", "both"),
}
ACCURACY = Objective("accuracy", "maximize")


def exhaustive(space: SearchSpace, accuracy: CachedAccuracy, cost_models: dict[str, HardwareCostModel]) -> pd.DataFrame:
    """Every scheme of ``space`` with its accuracy and every (profile, metric) cost."""
    names = space.searchable
    schemes = [space.scheme(dict(zip(names, combo, strict=True))) for combo in
               itertools.product(*(space.option_names(n) for n in names))]  # fmt: skip
    indices = space.encode_many(schemes)
    frame = pd.DataFrame({"scheme": [describe(s, space) for s in schemes],
                          "accuracy": [accuracy.evaluate(s).values["accuracy"] for s in schemes]})  # fmt: skip
    for profile, cost_model in cost_models.items():
        totals = cost_model.table(space).totals(indices)
        for metric in METRICS:
            frame[f"{profile}:{metric}"] = totals[metric]
    return frame


def run_seed(seed: int, args: argparse.Namespace, timings: dict[str, float]) -> tuple[pd.DataFrame, pd.DataFrame]:
    task = get_task("digits")
    trainer = Trainer(task, seed=seed, cache_dir=args.cache_dir, progress=False)
    start = time.perf_counter()
    trainer.pretrained()
    timings[f"seed {seed}: pre-training (or cache load)"] = time.perf_counter() - start
    model = trainer.fresh_model()
    spaces = {label: SearchSpace.from_model(model, task.example_inputs(), targets=targets)
              for label, targets in SPACES.items()}  # fmt: skip
    config = AccuracyConfig(args.fidelity, finetune_epochs=args.finetune_epochs)
    accuracy = CachedAccuracy(AccuracyEvaluator(trainer, spaces["weights+activations"], config))
    cost_models = {p: HardwareCostModel.from_profile(p, dtype="fp16", batch_size=args.batch_size) for p in PROFILES}

    full = pd.DataFrame()
    if seed < args.exhaustive_seeds:
        start = time.perf_counter()
        full = pd.concat(
            [
                exhaustive(spaces[label], accuracy, cost_models).assign(space=label)
                for label in ("weights", "activations")
            ],
            ignore_index=True,
        ).assign(seed=seed)
        timings[f"seed {seed}: enumerate the restricted spaces ({len(full)} schemes)"] = time.perf_counter() - start

    rows = []
    start = time.perf_counter()
    for profile, cost_model in cost_models.items():
        for metric in METRICS:
            for label, space in spaces.items():
                evaluator = CompositeEvaluator(accuracy, CostEvaluator(space, cost_model, metrics=(metric,)))
                strategy = OptunaStrategy(n_trials=args.trials, seed=seed, objectives=["accuracy", metric],
                                          study_name=f"{label}-{profile}-{metric}")  # fmt: skip
                result = strategy.search(space, evaluator)
                done = result.completed
                for row in done.itertuples():
                    scheme = result.schemes[int(row.trial)]
                    rows.append({"seed": seed, "profile": profile, "metric": metric, "space": label,
                                 "trial": int(row.trial), "accuracy": row.accuracy, "cost": getattr(row, metric),
                                 "scheme": describe(scheme, spaces["weights+activations"])})  # fmt: skip
    timings[f"seed {seed}: 18 searches x {args.trials} trials ({accuracy.misses} accuracy evaluations)"] = (
        time.perf_counter() - start
    )
    return pd.DataFrame(rows), full


def exact_groups(full: pd.DataFrame, seed: int) -> list[tuple[str, pd.DataFrame]]:
    """The enumerated restricted spaces of ``seed``, by space (none when not enumerated)."""
    if full.empty:
        return []
    return list(full[full.seed == seed].groupby("space", sort=False))


def hypervolumes(candidates: pd.DataFrame, full: pd.DataFrame, floor: float) -> pd.DataFrame:
    rows = []
    for (seed, profile, metric), group in candidates.groupby(["seed", "profile", "metric"], sort=False):
        cost = Objective("cost", "minimize")
        frames = {label: g[["accuracy", "cost"]] for label, g in group.groupby("space", sort=False)}
        for label, g in exact_groups(full, seed):
            frames[f"{label} (all schemes)"] = g[["accuracy", f"{profile}:{metric}"]].set_axis(
                ["accuracy", "cost"], axis=1
            )
        reference = reference_point(list(frames.values()), [ACCURACY, cost])
        reference[0] = max(reference[0], floor)
        pooled = pd.concat(frames.values(), ignore_index=True)
        ideal = (pooled.accuracy.max(), pooled.cost.min())
        box = (ideal[0] - reference[0]) * (reference[1] - ideal[1])
        row = {
            "seed": seed,
            "profile": profile,
            "metric": metric,
            "reference": f"({reference[0]:.3f}, {reference[1]:.5g})",
        }
        for label, frame in frames.items():
            volume = hypervolume(frame.to_numpy(dtype=float), ["maximize", "minimize"], reference)
            row[label] = volume / box if box > 0 else math.nan
        combined = group[group.space == "weights+activations"][["accuracy", "cost"]].to_numpy(dtype=float)
        restricted = pd.concat([f for k, f in frames.items() if k != "weights+activations"]).to_numpy(dtype=float)
        directions = ["maximize", "minimize"]
        union = hypervolume(restricted, directions, reference)
        joint = hypervolume(np.vstack([restricted, combined]), directions, reference)
        # what the combined search adds to the best of both restricted ones (exact fronts included)
        row["restricted union"] = union / box
        row["W+A gain over union"] = (joint - union) / box
        mask = pareto_mask(np.vstack([combined, restricted]), directions)
        on_front = np.unique(combined[mask[: len(combined)]], axis=0)
        row["W+A points beyond restricted"] = sum(
            not ((restricted[:, 0] >= p[0]) & (restricted[:, 1] <= p[1])).any() for p in on_front
        )
        rows.append(row)
    return pd.DataFrame(rows)


def plot(candidates: pd.DataFrame, full: pd.DataFrame, seed: int, batch_size: int, path: Path) -> None:
    fig, axes = plt.subplots(len(PROFILES), len(METRICS), figsize=(12, 4.0 * len(PROFILES)))
    units = {"latency_ms": "ms", "bytes_mb": "MB"}
    for i, profile in enumerate(PROFILES):
        for j, metric in enumerate(METRICS):
            ax = axes[i, j]
            group = candidates[
                (candidates.seed == seed) & (candidates.profile == profile) & (candidates.metric == metric)
            ]
            frames = {f"search: {label}": g for label, g in group.groupby("space", sort=False)}
            plot_pareto(frames, Objective("cost", "minimize", units[metric]), ACCURACY, ax=ax,
                        title=f"{profile}, {metric} (batch {batch_size})")  # fmt: skip
            for k, (label, g) in enumerate(exact_groups(full, seed)):
                pts = g[["accuracy", f"{profile}:{metric}"]].set_axis(["accuracy", "cost"], axis=1)
                front = pts[pareto_mask(pts.to_numpy(dtype=float), ["maximize", "minimize"])].sort_values("cost")
                ax.plot(front.cost, front.accuracy, drawstyle="steps-post", ls="--", color=f"C{k}", alpha=0.6,
                        label=f"exact: {label}")  # fmt: skip
            ax.set_xlabel(f"{metric} [{units[metric]}]")
            ax.set_ylim(bottom=max(0.0, group.accuracy.quantile(0.25) - 0.05))
            ax.legend(fontsize=7)
    fig.suptitle(f"digits, seed {seed}: Pareto fronts of weights-only, activations-only and combined N:M search")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=60, help="evaluations per search (equal for every space)")
    parser.add_argument("--exhaustive-seeds", type=int, default=1, help="enumerate the restricted spaces for these")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--fidelity", default="oneshot", choices=["oneshot", "finetune"])
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--accuracy-floor", type=float, default=0.5, help="hypervolume reference accuracy at least")
    parser.add_argument("--cache-dir", type=Path, default=None, help="pre-training cache (default: nmsearch's)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 8 trials, no enumeration")
    parser.add_argument("--analyse", action="store_true", help="only redo tables and figure from the CSVs in --out")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.trials, args.exhaustive_seeds = 1, 8, 0
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    header("claims_targets", args.threads)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    suffix = "_quick" if args.quick else ""
    if args.analyse:
        candidates = pd.read_csv(args.out / f"claims_targets{suffix}.csv")
        exact = args.out / f"claims_targets_exhaustive{suffix}.csv"
        full = pd.read_csv(exact) if exact.is_file() else pd.DataFrame()
    else:
        results = [run_seed(seed, args, timings) for seed in range(args.seeds)]
        candidates = pd.concat([r[0] for r in results], ignore_index=True)
        full = pd.concat([r[1] for r in results], ignore_index=True)
        write_csv(candidates, f"claims_targets{suffix}.csv", args.out)
        if not full.empty:
            write_csv(full, f"claims_targets_exhaustive{suffix}.csv", args.out)
    hv = hypervolumes(candidates, full, args.accuracy_floor)
    write_csv(hv, f"claims_targets_hv{suffix}.csv", args.out)
    plot(candidates, full, 0, args.batch_size, args.out / f"claims_targets{suffix}.png")

    print("\n## Normalised hypervolume per seed (higher is better)\n")
    print(markdown(hv, ".3f"))
    numeric = [c for c in hv.columns if c not in ("seed", "profile", "metric", "reference")]
    summary = hv.groupby(["profile", "metric"], sort=False)[numeric].agg(["mean", "std"])
    summary.columns = [f"{a} {b}" for a, b in summary.columns]
    print("\n## Mean and std over seeds\n")
    print(summary.reset_index().to_markdown(index=False, floatfmt=".3f"))
    front = candidates[candidates.seed == 0]
    best = []
    for (profile, metric, label), g in front.groupby(["profile", "metric", "space"], sort=False):
        pts = g[pareto_mask(g[["accuracy", "cost"]].to_numpy(dtype=float), ["maximize", "minimize"])]
        for row in pts.drop_duplicates(["accuracy", "cost"]).sort_values("cost").itertuples():
            best.append({"profile": profile, "metric": metric, "space": label, "accuracy": row.accuracy,
                         "cost": row.cost, "scheme": row.scheme})  # fmt: skip
    print("\n## Seed 0 fronts (searchable layers: features.1.0 features.3.0 classifier.1 classifier.3)\n")
    print(markdown(pd.DataFrame(best), ".5g"))
    for label, seconds in timings.items():
        print(f"{label}: {seconds:.1f} s")
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
