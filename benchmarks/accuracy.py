"""Accuracy evaluator on the digits task: pre-training, evaluation speed and 2:4 fine-tuning.

    python benchmarks/accuracy.py [--seeds 5] [--finetune-epochs 10] [--csv out.csv]

1. Dense pre-training per seed, into a fresh cache directory (so the time is the training
   time), and the dense validation and test accuracy; then the time to load the cached model.
2. Wall time of one ``oneshot`` evaluation and one 1-epoch ``finetune`` evaluation for every
   uniform scheme of the space (dense, weights / activations / both at 2:4, 1:4, 2:8, 1:8),
   seed 0, with their validation accuracy.
3. Uniform weight 2:4 with SR-STE fine-tuning (``finetune``, ``--finetune-epochs``) against
   the dense model of the same seed, on the test split: per seed, mean and spread.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from evaluators.accuracy import AccuracyConfig, AccuracyEvaluator
from evaluators.training import Trainer
from experiments.tasks import get_task
from search_space import RecipeConfig, Scheme


def pretraining(cache_dir: Path, seeds: list[int]) -> pd.DataFrame:
    task = get_task("digits")
    rows = []
    for seed in seeds:
        start = time.perf_counter()
        model = Trainer(task, seed=seed, cache_dir=cache_dir, progress=False).pretrained()
        train_s = time.perf_counter() - start
        cached = Trainer(task, seed=seed, cache_dir=cache_dir, progress=False)
        start = time.perf_counter()
        cached.pretrained()
        load_s = time.perf_counter() - start
        rows.append(
            {
                "seed": str(seed),  # a label, not a number to format
                "pretrain_s": train_s,
                "cached_load_s": load_s,
                "val_accuracy": cached.evaluate(model, "val").accuracy,
                "test_accuracy": cached.evaluate(model, "test").accuracy,
            }
        )
    return pd.DataFrame(rows)


def evaluation_speed(cache_dir: Path) -> pd.DataFrame:
    trainer = Trainer(get_task("digits"), seed=0, cache_dir=cache_dir, progress=False)
    evaluators = {
        fidelity: AccuracyEvaluator(trainer, config=AccuracyConfig(fidelity=fidelity, finetune_epochs=1))
        for fidelity in ("oneshot", "finetune")
    }
    rows = []
    for label, scheme in evaluators["oneshot"].space.uniform_schemes().items():
        row = {"scheme": label}
        for fidelity, evaluator in evaluators.items():
            start = time.perf_counter()
            result = evaluator.evaluate(scheme)
            row[f"{fidelity}_s"] = time.perf_counter() - start
            row[f"{fidelity}_val_accuracy"] = result.values["accuracy"]
        rows.append(row)
    return pd.DataFrame(rows)


def srste_2_4(cache_dir: Path, seeds: list[int], epochs: int) -> pd.DataFrame:
    config = AccuracyConfig(fidelity="finetune", finetune_epochs=epochs, recipe=RecipeConfig(estimator="srste"))
    rows = []
    for seed in seeds:
        trainer = Trainer(get_task("digits"), seed=seed, cache_dir=cache_dir, progress=False)
        evaluator = AccuracyEvaluator(trainer, config=config)
        dense = trainer.evaluate(trainer.pretrained(), "test").accuracy
        start = time.perf_counter()
        sparse = evaluator.evaluate_on(Scheme.uniform(evaluator.space, "weights", 2, 4), "test")
        rows.append(
            {
                "seed": str(seed),  # a label, not a number to format
                "dense_test": dense,
                "w2:4_srste_test": sparse.values["accuracy"],
                "difference_points": 100 * (sparse.values["accuracy"] - dense),
                "finetune_s": time.perf_counter() - start,
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--csv", type=Path, help="write the three tables, one after the other, to this file")
    args = parser.parse_args()
    seeds = list(range(args.seeds))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as cache:
        cache_dir = Path(cache)
        pre = pretraining(cache_dir, seeds)
        speed = evaluation_speed(cache_dir)
        finetune = srste_2_4(cache_dir, seeds, args.finetune_epochs)
    print("\n## Dense pre-training (digits)\n")
    print(pre.to_markdown(index=False, floatfmt=".4f"))
    print(
        f"\ntest accuracy mean {pre.test_accuracy.mean():.4f} (min {pre.test_accuracy.min():.4f}); "
        f"pre-training median {pre.pretrain_s.median():.1f} s (max {pre.pretrain_s.max():.1f} s)"
    )
    print("\n## One evaluation per uniform scheme, seed 0 (validation split)\n")
    print(speed.to_markdown(index=False, floatfmt=".3f"))
    print(
        f"\noneshot median {speed.oneshot_s.median():.3f} s (max {speed.oneshot_s.max():.3f} s); "
        f"1-epoch finetune median {speed.finetune_s.median():.3f} s (max {speed.finetune_s.max():.3f} s)"
    )
    print(f"\n## Uniform weight 2:4, SR-STE, {args.finetune_epochs} fine-tuning epochs (test split)\n")
    print(finetune.to_markdown(index=False, floatfmt=".4f"))
    difference = finetune.difference_points
    spread = statistics.stdev(difference) if len(difference) > 1 else 0.0
    print(
        f"\ndifference to dense: mean {difference.mean():+.2f} points, std {spread:.2f}, "
        f"min {difference.min():+.2f}, max {difference.max():+.2f} (one test image = {100 / 360:.2f} points)"
    )
    if args.csv:
        with open(args.csv, "w") as handle:
            for frame in (pre, speed, finetune):
                frame.to_csv(handle, index=False)
                handle.write("\n")


if __name__ == "__main__":
    main()
