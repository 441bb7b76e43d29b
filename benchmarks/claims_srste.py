"""SR-STE (Zhou et al., ICLR 2021) on digits: STE against SR-STE at 2:4, 1:4 and 1:8 -- accuracy and
SAD (the mask flip rate) over training.

    python benchmarks/claims_srste.py [--seeds 3] [--patterns 2:4 1:4 1:8] [--lambdas 2e-4 2e-3] [--quick]

The SR-STE setting: every searchable layer of the digits CNN gets uniform weight N:M and the model
is trained from scratch, masked from the first step, over the task's whole schedule (40 epochs, SGD
lr 0.05, cosine). Estimators: ``ste`` (lambda_w = 0) and ``srste`` at each ``--lambdas`` value
(2e-4 is the paper's; the task's weight decay is already 5e-4 on every weight, so a 10x larger
lambda_w shows whether the term does anything at this scale). Every weight-mask update counts the
keep/prune decisions that flipped (``Recipe.sad_history``); the flip rate is flips per mask entry
and update, per epoch. The dense model of the same seed (pre-training) is the reference.

Writes ``docs/claims_srste.csv`` (one row per run), ``docs/claims_srste_sad.csv`` (flip rate per
epoch) and ``docs/claims_srste.png``.
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


def variants(lambdas: list[float]) -> dict[str, RecipeConfig]:
    found = {"ste": RecipeConfig(estimator="ste")}
    for value in lambdas:
        found[f"srste {value:g}"] = RecipeConfig(estimator="srste", srste_lambda=value)
    return found


def plot(runs: pd.DataFrame, sad: pd.DataFrame, patterns: list[str], path: Path) -> None:
    fig, axes = plt.subplots(2, len(patterns), figsize=(5 * len(patterns), 8), squeeze=False)
    names = list(dict.fromkeys(runs.estimator))
    for j, pattern in enumerate(patterns):
        ax = axes[0, j]
        for i, name in enumerate(names):
            curve = sad[(sad.pattern == pattern) & (sad.estimator == name)].groupby("epoch").flip_rate.mean()
            ax.plot(curve.index + 1, curve.to_numpy(), color=f"C{i}", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("mask flip rate per update (SAD / numel)")
        ax.set_title(f"weights {pattern}: mask flips during training")
        ax.grid(alpha=0.3)
        ax.legend()
        ax = axes[1, j]
        group = runs[runs.pattern == pattern]
        for i, name in enumerate(names):
            values = 100 * group[group.estimator == name].test_accuracy
            ax.bar(i, values.mean(), yerr=values.std() if len(values) > 1 else 0, color=f"C{i}", alpha=0.7, capsize=4)
            ax.scatter([i] * len(values), values, color="k", s=10, zorder=3)
        dense = 100 * runs.drop_duplicates("seed").dense_test_accuracy.mean()
        ax.axhline(dense, color="gray", ls="--", label=f"dense {dense:.2f}")
        ax.set_xticks(range(len(names)), names)
        ax.set_ylim(max(0, 100 * group.test_accuracy.min() - 3), 100)
        ax.set_ylabel("test accuracy [%]")
        ax.set_title(f"weights {pattern}: trained from scratch")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--patterns", nargs="+", default=["2:4", "1:4", "1:8"])
    parser.add_argument("--lambdas", nargs="+", type=float, default=[2e-4, 2e-3], help="SR-STE lambda_w values")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the task's 40)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="pre-training cache (default: nmsearch's)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2:4 only, 2 epochs")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.patterns, args.epochs = 1, ["2:4"], 2
    header("claims_srste", args.threads)
    start = time.perf_counter()
    task = get_task("digits")
    runs, curves = [], []
    for seed in range(args.seeds):
        trainer = Trainer(task, seed=seed, cache_dir=args.cache_dir, progress=False)
        dense = trainer.evaluate(trainer.pretrained(), "test").accuracy
        space = SearchSpace.from_model(trainer.fresh_model(), task.example_inputs(), targets=("weights",),
                                       ratios=args.patterns)  # fmt: skip
        for pattern in args.patterns:
            p = NMPattern.parse(pattern)
            scheme = Scheme.uniform(space, "weights", p.n, p.m)
            for name, recipe in variants(args.lambdas).items():
                result = train_sparse(trainer, scheme, recipe, epochs=args.epochs)
                sad = result.pop("sad_per_epoch")
                curves.append(sad.assign(seed=seed, pattern=pattern, estimator=name))
                runs.append({"seed": seed, "pattern": pattern, "estimator": name, "dense_test_accuracy": dense,
                             **result})  # fmt: skip
                print(f"  seed {seed} {pattern} {name:12s} test {result['test_accuracy']:.4f} "
                      f"flip rate {result['flip_rate']:.2e} ({result['train_s']:.1f} s)", flush=True)  # fmt: skip
    frame, sad = pd.DataFrame(runs), pd.concat(curves, ignore_index=True)
    suffix = "_quick" if args.quick else ""
    write_csv(frame, f"claims_srste{suffix}.csv", args.out)
    write_csv(sad, f"claims_srste_sad{suffix}.csv", args.out)
    plot(frame, sad, args.patterns, args.out / f"claims_srste{suffix}.png")
    print("\n## Per run\n")
    print(markdown(frame, ".4f"))
    final = sad[sad.epoch == sad.epoch.max()].groupby(["pattern", "estimator", "seed"]).flip_rate.mean()
    summary = frame.groupby(["pattern", "estimator"], sort=False).agg(
        test_mean=("test_accuracy", "mean"), test_std=("test_accuracy", "std"), flip_rate=("flip_rate", "mean"),
        flips=("flips", "mean"), train_s=("train_s", "median"),
    )  # fmt: skip
    summary["last_epoch_flip_rate"] = final.groupby(["pattern", "estimator"]).mean()
    print("\n## Mean over seeds (flip rate: over all of training)\n")
    print(markdown(summary.reset_index(), ".4g"))
    print(f"dense test accuracy, mean over seeds: {frame.drop_duplicates('seed').dense_test_accuracy.mean():.4f}")
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
