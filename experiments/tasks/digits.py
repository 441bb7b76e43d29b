"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), no download.

A fixed stratified 60/20/20 split and a small CNN whose searchable layers have channel counts
divisible by 16 (so every default ratio, 2:4 to 1:8, is eligible). Pixels are scaled to [0, 1]
(the first conv is followed by BatchNorm); training batches are shifted by up to one pixel,
filling with background.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from evaluators.task import TensorTask, TrainingSchedule
from experiments.tasks.datasets import random_shift, stratified_split

DIGITS_SCHEDULE = TrainingSchedule(
    epochs=40, batch_size=32, eval_batch_size=512, lr=0.05, weight_decay=5e-4, finetune_lr=0.01
)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """A 3x3 convolution (padding 1, no bias), BatchNorm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()
    )


class DigitsCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU layers (8x8 -> 4x4 -> 2x2) and a two-layer classifier."""

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 32), hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            conv_bn_relu(1, c1), conv_bn_relu(c1, c2), nn.MaxPool2d(2), conv_bn_relu(c2, c3), nn.MaxPool2d(2)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c3 * 4, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class DigitsTask(TensorTask):
    """scikit-learn's 8x8 digits with a small CNN (the default task; no download).

    Attributes:
        seed: Fixes the stratified split.
        schedule: 40 epochs, batch 32, lr 0.05 by default.
        val_fraction: Share of the images in ``val``.
        test_fraction: Share in ``test``.
        channels: Channels of the three conv layers.
        hidden: Width of the hidden linear layer.
        max_shift: Training augmentation: random shift in pixels.
    """

    name: ClassVar[str] = "digits"
    seed: int = 0
    schedule: TrainingSchedule = DIGITS_SCHEDULE
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    channels: tuple[int, int, int] = (16, 32, 32)
    hidden: int = 64
    max_shift: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))  # a YAML list compares equal to the default

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        train, val, test = stratified_split(digits.target, self.val_fraction, self.test_fraction, self.seed)
        return {
            name: (images[index], labels[index]) for name, index in (("train", train), ("val", val), ("test", test))
        }

    def build_model(self) -> nn.Module:
        return DigitsCNN(self.channels, self.hidden)

    def prepare(self, inputs: Tensor, augment: bool, generator: torch.Generator) -> Tensor:
        return random_shift(inputs, self.max_shift, generator) if augment else inputs
