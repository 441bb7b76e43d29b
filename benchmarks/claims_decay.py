"""Decay recipes (Kao et al. 2022; Bambhaniya et al. 2024) on digits: STE against pruning mask decay
and sparse structure decay at high sparsity, 1:8 and 1:16.

    python benchmarks/claims_decay.py [--seeds 5] [--patterns 1:8 1:16] [--quick]

Uniform weight N:M on every searchable layer, trained from scratch over the task's whole schedule
(40 epochs of 33 steps = 1320 steps, SGD lr 0.05, cosine) and over a short one (10 epochs, the same
cosine compressed), where the sparse model has not converged yet. Recipes:

* ``ste``: masked from the first step, dense gradient;
* ``srste``: the same with SR-STE (lambda_w = 2e-4), for reference;
* ``mask decay``: dense warm-up for ``--warmup`` (10 %) of the steps, then ``W * (E + beta (1 - E))`` with
  beta falling linearly from 1 to 0 over ``--decay`` (50 %) of the steps, then the binary mask (STE);
* ``structure decay``: the same warm-up, then N shrinking over equal frames of the decay phase
  (1:8: 7:8 -> 4:8 -> 2:8 -> 1:8; 1:16: 15:16 -> 8:16 -> 4:16 -> 2:16 -> 1:16), then the target.

1:16 needs M = 16 to divide a layer's input channels: the digits CNN's searchable layers have 16, 32,
128 and 64 (all eligible); the first conv (1 input channel) stays dense in every run.

Writes ``docs/claims_decay.csv``, ``docs/claims_decay_sad.csv`` and ``docs/claims_decay.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from claims_common import DOCS, header, markdown, save_figure, train_sparse, write_csv

from evaluators import Trainer
from experiments.tasks import get_task
from search_space import NMPattern, RecipeConfig, Scheme, SearchSpace

RECIPES = ("ste", "srste", "mask decay", "structure decay")


def recipes(total_steps: int, warmup: float, decay: float) -> dict[str, RecipeConfig]:
    warmup_steps, decay_steps = round(warmup * total_steps), round(decay * total_steps)
    return {
        "ste": RecipeConfig(estimator="ste"),
        "srste": RecipeConfig(estimator="srste"),
        "mask decay": RecipeConfig(estimator="ste", decay="mask", warmup_steps=warmup_steps, decay_steps=decay_steps),
        "structure decay": RecipeConfig(
            estimator="ste", decay="structure", warmup_steps=warmup_steps, decay_steps=decay_steps
        ),
    }


def eligibility(space: SearchSpace, patterns: list[str]) -> pd.DataFrame:
    rows = []
    for info in space.layers:
        row = {"layer": info.name, "input channels": info.channels, "searchable": info.name in space.searchable}
        for pattern in patterns:
            m = NMPattern.parse(pattern).m
            row[f"eligible at M={m}"] = info.channels % m == 0 and info.name in space.searchable
        rows.append(row)
    return pd.DataFrame(rows)


def plot(runs: pd.DataFrame, patterns: list[str], path: Path) -> None:
    schedules = list(dict.fromkeys(runs.epochs))
    fig, axes = plt.subplots(
        len(schedules), len(patterns), figsize=(5.5 * len(patterns), 4.2 * len(schedules)), squeeze=False
    )
    names = [r for r in RECIPES if r in set(runs.recipe)]
    dense = 100 * runs.drop_duplicates("seed").dense_test_accuracy.mean()
    for row, epochs in zip(axes, schedules, strict=True):
        for ax, pattern in zip(row, patterns, strict=True):
            group = runs[(runs.pattern == pattern) & (runs.epochs == epochs)]
            for i, name in enumerate(names):
                values = 100 * group[group.recipe == name].test_accuracy
                spread = values.std() if len(values) > 1 else 0
                ax.bar(i, values.mean(), yerr=spread, color=f"C{i}", alpha=0.7, capsize=4)
                ax.scatter([i] * len(values), values, color="k", s=10, zorder=3)
            ax.axhline(dense, color="gray", ls="--", label=f"dense (40 epochs) {dense:.2f}")
            ax.set_xticks(range(len(names)), names, rotation=15)
            ax.set_ylim(max(0, 100 * group.test_accuracy.min() - 3), 100)
            ax.set_ylabel("test accuracy [%]")
            ax.set_title(f"weights {pattern}, trained from scratch for {epochs} epochs")
            ax.grid(axis="y", alpha=0.3)
            ax.legend()
    fig.suptitle("digits: STE vs decay recipes at high N:M sparsity (mean, std and seeds)")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--patterns", nargs="+", default=["1:8", "1:16"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--warmup", type=float, default=0.1, help="dense warm-up, fraction of the training steps")
    parser.add_argument("--decay", type=float, default=0.5, help="decay phase, fraction of the training steps")
    parser.add_argument(
        "--epochs", type=int, nargs="+", default=[40, 10], help="training lengths (the task's 40, and a short one)"
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="pre-training cache (default: nmsearch's)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 epochs")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs = 1, [2]
    header("claims_decay", args.threads)
    start = time.perf_counter()
    task = get_task("digits")
    steps_per_epoch = len(task.loader("train", shuffle=True, augment=True))
    schedules = {}
    for epochs in args.epochs:
        chosen = recipes(epochs * steps_per_epoch, args.warmup, args.decay)
        schedules[epochs] = {k: v for k, v in chosen.items() if k in args.recipes}
        phases = [
            f"{k}: warm-up {v.warmup_steps}, decay {v.decay_steps}" for k, v in chosen.items() if v.decay != "none"
        ]
        print(f"{epochs} epochs = {epochs * steps_per_epoch} training steps; " + "; ".join(phases))
    runs, curves = [], []
    for seed in range(args.seeds):
        trainer = Trainer(task, seed=seed, cache_dir=args.cache_dir, progress=False)
        dense = trainer.evaluate(trainer.pretrained(), "test").accuracy
        space = SearchSpace.from_model(
            trainer.fresh_model(), task.example_inputs(), targets=("weights",), ratios=args.patterns
        )
        if seed == 0:
            print("\n" + markdown(eligibility(space, args.patterns)) + "\n")
        for epochs, chosen in schedules.items():
            for pattern in args.patterns:
                p = NMPattern.parse(pattern)
                scheme = Scheme.uniform(space, "weights", p.n, p.m)
                sparse_layers = [n for n, o in scheme.layers if o.weight is not None]
                for name, recipe in chosen.items():
                    result = train_sparse(trainer, scheme, recipe, epochs=epochs)
                    sad = result.pop("sad_per_epoch")
                    keys = {"seed": seed, "epochs": epochs, "pattern": pattern, "recipe": name}
                    curves.append(sad.assign(**keys))
                    runs.append({**keys, "dense_test_accuracy": dense, "sparse_layers": len(sparse_layers), **result})
                    print(
                        f"  seed {seed} {epochs:2d} epochs {pattern:4s} {name:16s} test {result['test_accuracy']:.4f} "
                        f"({len(sparse_layers)} sparse layers, {result['train_s']:.1f} s)",
                        flush=True,
                    )
    frame, sad = pd.DataFrame(runs), pd.concat(curves, ignore_index=True)
    suffix = "_quick" if args.quick else ""
    write_csv(frame, f"claims_decay{suffix}.csv", args.out)
    write_csv(sad, f"claims_decay_sad{suffix}.csv", args.out)
    plot(frame, args.patterns, args.out / f"claims_decay{suffix}.png")
    print("\n## Per run\n")
    print(markdown(frame, ".4f"))
    keys = ["epochs", "pattern", "recipe"]
    summary = frame.groupby(keys, sort=False).agg(
        test_mean=("test_accuracy", "mean"),
        test_std=("test_accuracy", "std"),
        test_min=("test_accuracy", "min"),
        train_loss=("train_loss", "mean"),
        train_s=("train_s", "median"),
    )
    print("\n## Mean over seeds\n")
    print(markdown(summary.reset_index(), ".4f"))
    ste = frame[frame.recipe == "ste"].set_index(["epochs", "pattern", "seed"]).test_accuracy
    others = frame[frame.recipe != "ste"]
    base = ste.loc[list(zip(others.epochs, others.pattern, others.seed, strict=True))].to_numpy()
    paired = others.assign(delta_points=100 * (others.test_accuracy.to_numpy() - base))
    print("\n## Difference to STE (points, paired by seed)\n")
    table = paired.groupby(keys, sort=False).delta_points.agg(["mean", "std", "min", "max"])
    print(markdown(table.reset_index(), ".2f"))
    print(f"dense test accuracy, mean over seeds: {frame.drop_duplicates('seed').dense_test_accuracy.mean():.4f}")
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
