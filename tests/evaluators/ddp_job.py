"""A Gumbel search with the ``finetune`` fidelity, run alone or as one rank of ``torchrun``
(``python -m tests.evaluators.ddp_job OUT``) in ``OUT/run``. Every file the library writes (the
pre-training cache, the supernet checkpoints) is logged with the writing rank in
``OUT/writes.log``, so the test can tell that only rank 0 wrote. The model has no BatchNorm (its
statistics are per rank)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from evaluators import (
    AccuracyConfig,
    AccuracyEvaluator,
    CompositeEvaluator,
    CostEvaluator,
    HardwareCostModel,
    Trainer,
    distributed,
    training,
)
from experiments.tasks.synthetic import SyntheticTask
from search_space import RecipeConfig, SearchSpace
from strategies import GumbelStrategy, gumbel


@dataclass(frozen=True)
class PlainSyntheticTask(SyntheticTask):
    """The synthetic task with a BatchNorm-free model."""

    name: ClassVar[str] = "synthetic-plain"

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
        )  # fmt: skip


def _logged(write: Callable[..., Any], log: Path) -> Callable[..., Any]:
    def wrapper(path: Any, *args: Any, **kwargs: Any) -> Any:
        with open(log, "a") as handle:  # O_APPEND: whole lines from both ranks
            handle.write(f"{os.environ.get('RANK', '0')} {Path(path).name}\n")
        return write(path, *args, **kwargs)

    return wrapper


def main(out: Path) -> None:
    log = out / "writes.log"
    gumbel.save_checkpoint = _logged(gumbel.save_checkpoint, log)
    training.atomic_write = _logged(training.atomic_write, log)
    training.atomic_write_text = _logged(training.atomic_write_text, log)
    distributed.init_from_env("cpu")
    run_dir = out / "run"
    task = PlainSyntheticTask()
    trainer = Trainer(task, seed=0, device="cpu", cache_dir=out / "cache", progress=False)
    space = SearchSpace.from_model(trainer.fresh_model(), task.example_inputs())
    accuracy = AccuracyEvaluator(
        trainer, space, AccuracyConfig(fidelity="finetune", finetune_epochs=1, recipe=RecipeConfig(estimator="ste"))
    )
    evaluator = CompositeEvaluator(accuracy, CostEvaluator(space, HardwareCostModel.from_profile("orin")))
    strategy = GumbelStrategy(epochs=3, warmup_fraction=0.0, lambdas=[0.5], samples=1, seed=0)
    result = strategy.search(space, evaluator, run_dir=run_dir)
    if distributed.is_main():
        result.save(run_dir)
    distributed.shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    main(Path(sys.argv[1]))
