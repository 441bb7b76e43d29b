"""A Gumbel search with the ``finetune`` fidelity, run alone or as one rank of ``torchrun``
(``python -m tests.evaluators.ddp_job OUT``): each rank writes into ``OUT/rank<RANK>``, so the
test can tell that only rank 0 wrote. The model has no BatchNorm (its statistics are per rank)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

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
)
from experiments.tasks.synthetic import SyntheticTask
from search_space import RecipeConfig, SearchSpace
from strategies import GumbelStrategy


@dataclass(frozen=True)
class PlainSyntheticTask(SyntheticTask):
    """The synthetic task with a BatchNorm-free model."""

    name: ClassVar[str] = "synthetic-plain"

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
        )  # fmt: skip


def main(out: Path) -> None:
    distributed.init_from_env("cpu")
    run_dir = out / f"rank{os.environ.get('RANK', '0')}"
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
    main(Path(sys.argv[1]))
