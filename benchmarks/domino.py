"""DominoSearch on the digits task: its scheme against uniform N:M at the same weight sparsity.

    python benchmarks/domino.py [--seeds 5] [--m 16] [--sparsity 0.875] [--finetune-epochs 10]
                                [--gradient ste|masked] [--beta 0.5] [--shrink-lambda 1.0]
                                [--vote-interval 50] [--threads 1] [--csv out.csv]

Per seed (of pre-training, search and fine-tuning; the data split is the task's fixed one):

1. Dense pre-training into a fresh cache directory (not timed as part of the search).
2. ``DominoStrategy(m, target="params", target_value=sparsity)`` on the space of the task's model,
   scored ``oneshot``; the wall time of ``search`` is the search time.
3. The Domino scheme, uniform weight 1:8 and (for M=16) uniform 2:16 -- every searchable layer at
   87.5 % -- each fine-tuned once the same way (``finetune`` fidelity, SR-STE, ``--finetune-epochs``)
   and scored on the validation split (for choosing hyperparameters) and the test split (the report).

``--threads`` sets torch's intra-op threads (default 1): the model is tiny, and on a shared 2-core
machine two threads per process slow training down several times once other processes compete.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from evaluators import AccuracyConfig, AccuracyEvaluator, Trainer
from experiments.tasks import get_task
from search_space import RecipeConfig, Scheme
from strategies.domino import DominoStrategy, domino_space


def run_seed(cache_dir: Path, seed: int, args: argparse.Namespace) -> dict[str, object]:
    trainer = Trainer(get_task("digits"), seed=seed, cache_dir=cache_dir, progress=False)
    dense = trainer.pretrained()
    search_evaluator = AccuracyEvaluator(trainer)
    space = search_evaluator.space
    strategy = DominoStrategy(
        m=args.m,
        target="params",
        target_value=args.sparsity,
        seed=seed,
        gradient=args.gradient,
        beta=args.beta,
        shrink_lambda=args.shrink_lambda,
        vote_interval=args.vote_interval,
    )
    start = time.perf_counter()
    result = strategy.search(space, search_evaluator)
    search_s = time.perf_counter() - start
    domino = result.schemes[result.metadata["final_trial"]]

    config = AccuracyConfig("finetune", finetune_epochs=args.finetune_epochs, recipe=RecipeConfig(estimator="srste"))
    wide = AccuracyEvaluator(trainer, domino_space(space, args.m), config)  # holds every N:m
    uniform = AccuracyEvaluator(trainer, space, config)
    schemes = {"domino": (wide, domino), "uniform 1:8": (uniform, Scheme.uniform(space, "weights", 1, 8))}
    if args.m == 16:
        schemes["uniform 2:16"] = (wide, Scheme.uniform(wide.space, "weights", 2, 16))
    row: dict[str, object] = {
        "seed": str(seed),  # a label, not a number to format
        "domino scheme": " ".join(f"{n}:{m}" for n, m in domino.to_domino().values()),
        "sparsity": result.metadata["objective"],
        "search_s": search_s,
        "load": os.getloadavg()[0],  # 1-minute load average right after the search
        "epochs": result.metadata["epochs"],
        "forced": result.metadata["forced_decisions"],
        "dense val": trainer.evaluate(dense, "val").accuracy,
        "dense test": trainer.evaluate(dense, "test").accuracy,
    }
    for label, (evaluator, scheme) in schemes.items():
        model = evaluator.sparse_model(scheme)  # fine-tuned once, scored on both splits
        for split in ("val", "test"):
            row[f"{label} {split}"] = trainer.evaluate(model, split).accuracy
    for split in ("val", "test"):
        row[f"domino - uniform 1:8 {split} (points)"] = 100 * (row[f"domino {split}"] - row[f"uniform 1:8 {split}"])
    return row


def summary(frame: pd.DataFrame, column: str) -> str:
    values = frame[column]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"mean {values.mean():.4f}, std {spread:.4f}, min {values.min():.4f}, max {values.max():.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.875)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--gradient", choices=("ste", "masked"), default="ste")
    parser.add_argument("--beta", type=float, default=0.5, help="alpha: weight of the remaining budget vs cost share")
    parser.add_argument("--shrink-lambda", type=float, default=1.0)
    parser.add_argument("--vote-interval", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--csv", type=Path, help="write the per-seed table to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as cache:
        frame = pd.DataFrame([run_seed(Path(cache), seed, args) for seed in range(args.seeds)])
    print(f"load average at the end {os.getloadavg()}, benchmark wall time {time.perf_counter() - started:.0f} s\n")
    print(frame.to_markdown(index=False, floatfmt=".4f"))
    print()
    for column in [c for c in frame.columns if c.endswith(("val", "test", "(points)"))]:
        print(f"{column}: {summary(frame, column)}")
    print(f"search time: median {frame.search_s.median():.1f} s, max {frame.search_s.max():.1f} s")
    if args.csv:
        frame.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
