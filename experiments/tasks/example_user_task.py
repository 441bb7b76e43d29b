"""An example of a task of your own: your model, your data, plain torch ``DataLoader`` s.

It implements the :class:`evaluators.task.Task` interface directly (no base class needed):
``name``, ``schedule``, ``build_model()``, ``loader(split, *, shuffle, augment, seed)``,
``example_inputs()`` and ``config()``. Point a Hydra config at it with ``_target_``
(``conf/task/example_user.yaml``) or construct it in Python.

The data are scikit-learn's bundled breast-cancer table (569 samples, 30 features, 2 classes),
standardised with training statistics. The first layer (30 inputs) is not divisible by 4 or 8,
so it stays dense; the two later layers are searchable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from sklearn.datasets import load_breast_cancer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from evaluators.task import TrainingSchedule, check_split
from experiments.tasks.datasets import stratified_split


@dataclass(frozen=True)
class BreastCancerTask:
    """A three-layer MLP on the breast-cancer table.

    Attributes:
        hidden: Width of the two hidden layers.
        seed: Fixes the stratified 60/20/20 split.
        schedule: How the MLP is trained.
    """

    name = "breast_cancer"  # a class attribute, not a dataclass field
    hidden: int = 64
    seed: int = 0
    schedule: TrainingSchedule = field(
        default_factory=lambda: TrainingSchedule(epochs=30, batch_size=32, lr=0.05, finetune_lr=0.01)
    )

    def build_model(self) -> nn.Module:
        """A fresh MLP: 30 features, two hidden layers, 2 classes."""
        return nn.Sequential(
            nn.Linear(30, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, 2),
        )

    @cached_property
    def datasets(self) -> dict[str, TensorDataset]:
        """The three splits, standardised with the training split's statistics (loaded on first use)."""
        table = load_breast_cancer()
        features = torch.tensor(table.data, dtype=torch.float32)
        labels = torch.tensor(table.target, dtype=torch.long)
        train, val, test = stratified_split(table.target, 0.2, 0.2, self.seed)
        mean, std = features[train].mean(0), features[train].std(0)
        features = (features - mean) / std
        return {
            name: TensorDataset(features[i], labels[i]) for name, i in (("train", train), ("val", val), ("test", test))
        }

    def loader(self, split: str, *, shuffle: bool = False, augment: bool = False, seed: int = 0) -> DataLoader:
        """A ``DataLoader`` over one split (see :meth:`evaluators.task.Task.loader`)."""
        # No augmentation for tabular data; ``seed`` fixes the shuffled order.
        check_split(split)
        return DataLoader(
            self.datasets[split],
            batch_size=self.schedule.batch_size if shuffle else self.schedule.eval_batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            generator=torch.Generator().manual_seed(seed),
        )

    def example_inputs(self) -> Tensor:
        """Two validation samples."""
        return self.datasets["val"].tensors[0][:2]

    def config(self) -> dict[str, Any]:
        """The class and every field: keys the pre-training cache."""
        return {"task": f"{__name__}.BreastCancerTask", **dataclasses.asdict(self)}
