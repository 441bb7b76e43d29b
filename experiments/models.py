"""Reference models written here because torchvision cannot be installed beside our torch.

* ``resnet18(variant="imagenet")`` -- He et al. 2016, 7x7 stem and max-pool (1.82 GMACs at 224²).
* ``resnet18(variant="cifar")``    -- the common CIFAR adaptation: 3x3 stem, no max-pool.
* ``resnet20()``                   -- the CIFAR ResNet-20 of He et al. (3 stages of 16/32/64).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (a 1x1 conv-BN when the shape changes).

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first conv and of the shortcut.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.downsample(x))


class ResNet(nn.Module):
    """A ResNet of :class:`BasicBlock` stages.

    Args:
        blocks_per_stage: Blocks in each stage; every stage after the first halves the resolution.
        widths: Channels of each stage.
        num_classes: Outputs of the final linear layer.
        in_channels: Input channels.
        imagenet_stem: A 7x7 stride-2 conv and a max-pool (ImageNet) instead of one 3x3 conv (CIFAR).
    """

    def __init__(
        self,
        blocks_per_stage: list[int],
        widths: list[int],
        num_classes: int = 10,
        in_channels: int = 3,
        imagenet_stem: bool = False,
    ) -> None:
        super().__init__()
        if imagenet_stem:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        in_planes = widths[0]
        for i, (blocks, width) in enumerate(zip(blocks_per_stage, widths, strict=True)):
            layers = []
            for b in range(blocks):
                stride = 2 if (i > 0 and b == 0) else 1
                layers.append(BasicBlock(in_planes, width, stride))
                in_planes = width
            stages.append(nn.Sequential(*layers))
        self.layers = nn.ModuleList(stages)
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for stage in self.layers:
            x = stage(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet18(num_classes: int = 10, variant: str = "cifar", in_channels: int = 3) -> ResNet:
    """ResNet-18 (He et al., 2016): four stages of two blocks, 64 to 512 channels.

    Args:
        num_classes: Outputs of the classifier.
        variant: ``"cifar"`` (3x3 stem, for 32x32 inputs) or ``"imagenet"`` (7x7 stem and max-pool).
        in_channels: Input channels.

    Returns:
        The model, freshly initialised.

    Raises:
        ValueError: If ``variant`` is neither.
    """
    if variant not in ("cifar", "imagenet"):
        raise ValueError(f"resnet18 variant must be 'cifar' or 'imagenet', got {variant!r}")
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels, imagenet_stem=variant == "imagenet")


def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-20 for CIFAR (He et al., 2016): three stages of three blocks, 16 to 64 channels.

    Args:
        num_classes: Outputs of the classifier.
        in_channels: Input channels.

    Returns:
        The model, freshly initialised.
    """
    return ResNet([3, 3, 3], [16, 32, 64], num_classes, in_channels)
