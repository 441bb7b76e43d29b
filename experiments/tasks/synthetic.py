"""``synthetic``: a few hundred noisy 3x8x8 class prototypes and a tiny CNN, for fast tests only.

Every searchable layer has 16 input channels, so every default N:M ratio is eligible. Nothing
is downloaded and a full schedule takes about a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from evaluators.task import TensorTask, TrainingSchedule

SYNTHETIC_SCHEDULE = TrainingSchedule(epochs=4, batch_size=32, eval_batch_size=256, lr=0.2, finetune_lr=0.02)


class SyntheticCNN(nn.Module):
    """Two 3x3 conv-BN-ReLU layers, global average pooling and a linear classifier."""

    def __init__(self, in_channels: int = 3, width: int = 16, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class SyntheticTask(TensorTask):
    """Noisy class prototypes and a tiny CNN, for fast tests only.

    Inputs are ``prototype[label] + noise * N(0, 1)``, 3x8x8.

    Attributes:
        seed: Fixes the prototypes and the samples.
        schedule: 4 epochs by default.
        num_classes: Number of classes (prototypes).
        train_size: Training samples.
        eval_size: Samples of ``val`` and of ``test`` each.
        noise: Standard deviation of the noise.
        width: Channels of the two conv layers.
    """

    name: ClassVar[str] = "synthetic"
    seed: int = 0
    schedule: TrainingSchedule = SYNTHETIC_SCHEDULE
    num_classes: int = 4
    train_size: int = 256
    eval_size: int = 128
    noise: float = 1.0
    width: int = 16

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        prototypes = torch.randn(self.num_classes, 3, 8, 8, generator=generator)
        splits = {}
        for split, size in (("train", self.train_size), ("val", self.eval_size), ("test", self.eval_size)):
            labels = torch.arange(size) % self.num_classes
            noise = torch.randn(size, 3, 8, 8, generator=generator)
            splits[split] = (prototypes[labels] + self.noise * noise, labels)
        return splits

    def build_model(self) -> nn.Module:
        return SyntheticCNN(3, self.width, self.num_classes)
