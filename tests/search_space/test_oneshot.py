"""One-shot pruning: GEMM views, SparseGPT against brute force, methods, modes and bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from search_space import SearchSpace
from search_space.masks import nm_mask
from search_space.oneshot import (
    CalibrationError,
    OneShotPruner,
    gemm_inputs,
    gemm_weight,
    layer_error,
    oneshot_prune,
    sparsegpt_prune,
)


def _correlated(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=generator) / k**0.5
    return torch.randn(tokens, k, generator=generator) @ mixing + 0.05 * torch.randn(tokens, k, generator=generator)


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=2, padding_mode="reflect"),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 8),
    )


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_gemm_views_reproduce_the_convolution(groups: int) -> None:
    conv = nn.Conv2d(8, 6, (3, 2), stride=(2, 1), padding=(1, 1), dilation=(1, 2), groups=groups)
    x = torch.randn(2, 8, 7, 9)
    rows, weight = gemm_inputs(conv, x), gemm_weight(conv)
    out = conv(x) - conv.bias.view(1, -1, 1, 1)
    ho, wo = out.shape[2:]
    for g in range(groups):
        gemm = (rows[g] @ weight[g].T).view(2, ho, wo, -1).permute(0, 3, 1, 2)
        torch.testing.assert_close(gemm, out[:, g * 6 // groups : (g + 1) * 6 // groups], atol=1e-5, rtol=1e-4)
    # K runs (kh, kw, Cin/groups): a group of M is M consecutive input channels at one kernel offset
    per_group = 8 // groups
    assert torch.equal(weight[0, :, :per_group], conv.weight[: 6 // groups, :, 0, 0].detach())


def _brute_force_best(weight: torch.Tensor, x: torch.Tensor, n: int, m: int) -> float:
    """Lowest output error over every N:M mask of a one-row layer, each with least-squares kept weights."""
    k = weight.shape[1]
    per_group = list(itertools.combinations(range(m), n))
    reference = x @ weight.T
    best = float("inf")
    for choice in itertools.product(per_group, repeat=k // m):
        keep = [g * m + i for g, kept in enumerate(choice) for i in kept]
        solution = torch.linalg.lstsq(x[:, keep].double(), reference.double()).solution
        error = float((x[:, keep].double() @ solution - reference.double()).norm() / reference.norm())
        best = min(best, error)
    return best


def test_sparsegpt_beats_magnitude_and_approaches_brute_force() -> None:
    x = _correlated(256, 8)
    weight = torch.randn(1, 8, generator=torch.Generator().manual_seed(1))
    magnitude = weight * nm_mask(weight.abs(), 2, 4)
    reconstructed = sparsegpt_prune(weight, x.T @ x, len(x), 2, 4)
    assert int((reconstructed.view(1, 2, 4) != 0).sum(-1).max()) <= 2
    best = _brute_force_best(weight, x, 2, 4)
    sgpt, mag = layer_error(weight, reconstructed, x), layer_error(weight, magnitude, x)
    assert sgpt < mag
    assert best <= sgpt + 1e-6
    assert sgpt <= 1.5 * best + 0.02  # OBS is greedy, not optimal, but close on a small layer


def test_sparsegpt_lowers_layer_error_against_magnitude_on_a_wider_layer() -> None:
    x = _correlated(512, 64, seed=2)
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    for n, m in [(2, 4), (1, 4), (2, 8)]:
        reconstructed = sparsegpt_prune(weight, x.T @ x, len(x), n, m, blocksize=16)
        magnitude = weight * nm_mask(weight.abs(), n, m)
        assert int((reconstructed.view(32, -1, m) != 0).sum(-1).max()) <= n
        assert layer_error(weight, reconstructed, x) < layer_error(weight, magnitude, x)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("mode", ["sequential", "independent"])
def test_pruned_models_verify_and_keep_the_dense_model(method: str, mode: str) -> None:
    torch.manual_seed(0)
    model = _model()
    x = torch.randn(24, 8, 8, 8)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    space = SearchSpace.from_model(model, x[:2])
    scheme = space.scheme({"0": "w2:4", "2": "w1:4+a1:4", "6": "w2:8"})
    pruner = OneShotPruner(model, x, method, mode=mode)
    sparse = pruner.prune(scheme)
    scheme.verify(sparse)
    scheme.verify(scheme.finalize(sparse))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense_state.items())
    # the same scheme again comes from the cache and gives the same weights
    again = scheme.finalize(pruner.prune(scheme))
    if method != "magnitude":
        assert pruner.cache_info()["hits"] > 0
    for (_, a), (_, b) in zip(sparse.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b)


def test_sparsegpt_lowers_model_error_against_magnitude() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    x = _correlated(512, 32, seed=4)
    space = SearchSpace.from_model(model, x[:2])
    scheme = space.uniform("weights", 2, 4)
    with torch.no_grad():
        reference = model(x)
        errors = {
            method: float((oneshot_prune(model, scheme, x, method)(x) - reference).norm() / reference.norm())
            for method in ("magnitude", "wanda", "sparsegpt")
        }
    assert errors["sparsegpt"] < errors["wanda"] <= errors["magnitude"] + 1e-6


def test_sequential_calibrates_on_pruned_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    x = _correlated(256, 16, seed=5)
    space = SearchSpace.from_model(model, x[:2])
    scheme = space.uniform("weights", 1, 4)
    sequential = oneshot_prune(model, scheme, x, "sparsegpt", mode="sequential")
    independent = oneshot_prune(model, scheme, x, "sparsegpt", mode="independent")
    assert torch.equal(sequential[0].weight, independent[0].weight)  # the first layer sees the same inputs
    assert not torch.equal(sequential[2].weight, independent[2].weight)


def test_too_few_tokens_names_the_layer_and_minimum() -> None:
    model = nn.Sequential(nn.Linear(64, 8))
    space = SearchSpace.from_model(model, torch.randn(2, 64))
    scheme = space.uniform("weights", 2, 4)
    with pytest.raises(CalibrationError, match=r"layer '0': SparseGPT needs at least 64 calibration tokens.*got 10"):
        oneshot_prune(model, scheme, torch.randn(10, 64), "sparsegpt")
    oneshot_prune(model, scheme, torch.randn(10, 64), "wanda")  # norms need no minimum


def test_non_finite_inputs_and_singular_hessians() -> None:
    model = nn.Sequential(nn.Linear(8, 4))
    space = SearchSpace.from_model(model, torch.randn(2, 8))
    scheme = space.uniform("weights", 2, 4)
    bad = torch.randn(32, 8)
    bad[3, 2] = float("nan")
    with pytest.raises(CalibrationError, match="NaN or inf"):
        oneshot_prune(model, scheme, bad, "sparsegpt")
    # rank-one inputs: dampening makes H invertible, and an all-zero input column is handled
    x = torch.randn(32, 1) @ torch.randn(1, 8)
    x[:, 5] = 0
    pruned = sparsegpt_prune(model[0].weight, x.T @ x, 32, 2, 4)
    assert torch.isfinite(pruned).all() and (pruned[:, 5] == 0).all()
    with pytest.raises(CalibrationError, match="not positive definite"):
        sparsegpt_prune(model[0].weight, -torch.eye(8), 32, 2, 4, layer="0")


def test_bad_method_and_missing_calibration() -> None:
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="not one of magnitude, wanda, sparsegpt"):
        OneShotPruner(model, torch.randn(4, 8), "obs")
    with pytest.raises(ValueError, match="needs calibration inputs"):
        OneShotPruner(model, None, "wanda")
