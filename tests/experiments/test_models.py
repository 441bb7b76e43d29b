import pytest
import torch

from experiments.models import resnet18, resnet20


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet18_imagenet_matches_the_reference_size() -> None:
    model = resnet18(1000, "imagenet")
    assert count(model) == 11_689_512  # torchvision's resnet18
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_cifar_models() -> None:
    assert resnet18(10, "cifar")(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    model = resnet20(10)
    assert 0.26e6 < count(model) < 0.28e6  # He et al.: 0.27M
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="variant"):
        resnet18(10, "tiny")
