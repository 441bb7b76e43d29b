"""A Gumbel search of the synthetic task in a subprocess, with test-only stall points, for the
kill -9 tests in tests/strategies/test_gumbel.py (the kill and wait helpers are in faults.py)."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import torch

import strategies.base as base_module
import strategies.gumbel as gumbel_module
from tests.strategies.toy import ROOT

STALL_S = 120.0  # far longer than the test waits: the process is killed inside the stall


def start(run_dir: Path, cache: Path, marker: Path, *, stall_epoch: int = 0, stall_save: int = 0) -> subprocess.Popen:
    """A worker on ``run_dir``; it stalls at its ``stall_epoch``-th ``train_one_epoch`` call or half
    way through writing its ``stall_save``-th checkpoint (counted in this process; 0: never)."""
    command = [
        sys.executable, "-m", "tests.strategies.gumbel_worker", str(run_dir), str(cache), str(marker),
        "--stall-epoch", str(stall_epoch), "--stall-save", str(stall_save),
    ]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def strategy() -> gumbel_module.GumbelStrategy:
    return gumbel_module.GumbelStrategy(
        epochs=4, lambdas=(1.0,), arch_lr=0.1, cost_metric="bytes_mb", warmup_fraction=0.25, samples=2
    )


def main(argv: list[str] | None = None) -> None:
    """Search (with the marker lines ``train N`` and ``save N`` as those calls start) and save the result."""
    from evaluators import AccuracyEvaluator, CompositeEvaluator, CostEvaluator, HardwareCostModel, Trainer
    from experiments.tasks import get_task

    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("cache", type=Path)
    parser.add_argument("marker", type=Path)
    parser.add_argument("--stall-epoch", type=int, default=0)
    parser.add_argument("--stall-save", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    counts = {"train": 0, "save": 0}

    def mark(kind: str) -> int:
        counts[kind] += 1
        with open(args.marker, "a") as handle:
            handle.write(f"{kind} {counts[kind]}\n")
        return counts[kind]

    train, write = gumbel_module.train_one_epoch, base_module.atomic_write

    def train_one_epoch(*a: Any, **k: Any) -> Any:
        if mark("train") == args.stall_epoch:
            time.sleep(STALL_S)
        return train(*a, **k)

    def atomic_write(path: Path, fill: Any) -> Path:
        number = mark("save")

        def half_then_stall(handle: IO[bytes]) -> None:
            buffer = io.BytesIO()
            fill(buffer)
            data = buffer.getvalue()
            handle.write(data[: len(data) // 2])
            if number == args.stall_save:
                handle.flush()
                time.sleep(STALL_S)
            handle.write(data[len(data) // 2 :])

        return write(path, half_then_stall)

    gumbel_module.train_one_epoch, base_module.atomic_write = train_one_epoch, atomic_write
    trainer = Trainer(get_task("synthetic", schedule={"batch_size": 8}), cache_dir=args.cache, progress=False)
    accuracy = AccuracyEvaluator(trainer)
    cost = CostEvaluator(accuracy.space, HardwareCostModel.from_profile("a100"), metrics=("bytes_mb",))
    result = strategy().search(accuracy.space, CompositeEvaluator(accuracy, cost), run_dir=args.run_dir)
    result.save(args.run_dir)


if __name__ == "__main__":
    main()
