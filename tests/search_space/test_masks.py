import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.ao.pruning import WeightNormSparsifier

from search_space import (
    IneligibleLayerError,
    activation_nm_mask,
    activation_weighted_scores,
    input_column_sq_sums,
    nm_mask,
    weight_column_norms,
    weight_nm_mask,
)
from search_space.masks import _first_max_keep, _pairwise_keep, _sorted_keep
from search_space.row_extension import nm_mask_op


def brute_force_mask(scores: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Python loop over every group: keep the n largest, ties to the lowest index."""
    moved = scores.movedim(dim, -1)
    flat = moved.reshape(-1, moved.shape[-1]).tolist()
    keep = []
    for row in flat:
        out = [False] * len(row)
        for start in range(0, len(row), m):
            group = row[start : start + m]
            order = sorted(range(m), key=lambda i: (-group[i], i))
            for i in order[:n]:
                out[start + i] = True
        keep.append(out)
    return torch.tensor(keep, dtype=torch.bool).reshape(moved.shape).movedim(-1, dim)


@st.composite
def mask_cases(draw: st.DrawFn) -> tuple[torch.Tensor, int, int, int]:
    m = draw(st.sampled_from([2, 3, 4, 5, 8, 16, 17, 24, 32]))
    n = draw(st.integers(1, m))
    ndim = draw(st.integers(1, 4))
    dim = draw(st.integers(0, ndim - 1))
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    shape[dim] = m * draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):  # many ties: small integers
        scores = torch.randint(0, 3, shape, generator=generator).float()
    else:
        scores = torch.randn(shape, generator=generator)
    return scores, n, m, dim


@settings(max_examples=300, deadline=None)
@given(mask_cases())
def test_nm_mask_matches_brute_force(case: tuple[torch.Tensor, int, int, int]) -> None:
    scores, n, m, dim = case
    mask = nm_mask(scores, n, m, dim)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    counts = mask.unflatten(dim, (-1, m)).sum(dim + 1)
    assert bool((counts == n).all()), "exactly N survivors in every group"
    assert torch.equal(mask, brute_force_mask(scores, n, m, dim))


def test_ties_keep_lowest_index() -> None:
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 0.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[True, True, False, False, False, True, True, False]]
    assert nm_mask(scores, 1, 4).tolist() == [[True, False, False, False, False, True, False, False]]
    zeros = torch.zeros(1, 32)
    assert nm_mask(zeros, 3, 32)[0, :3].all() and not nm_mask(zeros, 3, 32)[0, 3:].any()


def test_dense_pattern_and_output_dtype() -> None:
    scores = torch.randn(4, 8)
    assert nm_mask(scores, 8, 8).all()
    as_float = nm_mask(scores, 2, 4, dtype=torch.float32)
    assert as_float.dtype == torch.float32
    assert torch.equal(as_float.bool(), nm_mask(scores, 2, 4))
    assert torch.equal(nm_mask(scores, 1, 8, dtype=torch.float16).bool(), nm_mask(scores, 1, 8))


def test_nm_mask_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        nm_mask(torch.randn(3, 6), 2, 4)
    with pytest.raises(ValueError, match="1 <= N <= M"):
        nm_mask(torch.randn(3, 8), 5, 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_masks_work_in_every_float_dtype(dtype: torch.dtype) -> None:
    scores = torch.randint(-50, 50, (8, 32)).float()  # exactly representable in every dtype
    for n, m in [(2, 4), (1, 8), (3, 32)]:
        assert torch.equal(nm_mask(scores.to(dtype), n, m), nm_mask(scores, n, m))


def test_linear_2_4_equals_torch_ao_weight_norm_sparsifier() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, config=[{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    oracle = model[0].parametrizations.weight[0].mask.bool()
    weight = model[0].parametrizations.weight.original.detach()
    assert torch.equal(weight_nm_mask(weight, 2, 4), oracle)


def test_conv_groups_run_along_input_channels() -> None:
    weight = torch.randn(6, 8, 3, 3)
    mask = weight_nm_mask(weight, 2, 4)
    # every (cout, kh, kw) keeps exactly 2 of each 4 consecutive input channels ...
    assert bool((mask.view(6, 2, 4, 3, 3).sum(2) == 2).all())
    # ... the largest |w| among them: compare with the explicit NHWC permutation
    nhwc = weight.abs().permute(0, 2, 3, 1)
    expected = brute_force_mask(nhwc, 2, 4, dim=3).permute(0, 3, 1, 2)
    assert torch.equal(mask, expected)
    # the wrong layout (groups of 4 in the flattened NCHW weight) would pick other entries
    wrong = brute_force_mask(weight.abs().reshape(6, -1), 2, 4, dim=1).reshape(6, 8, 3, 3)
    assert not torch.equal(mask, wrong)


def test_grouped_depthwise_and_pointwise_convs() -> None:
    grouped = torch.nn.Conv2d(16, 8, 3, groups=2)  # 8 input channels per group
    mask = weight_nm_mask(grouped.weight, 1, 8, layer="grouped")
    assert mask.shape == grouped.weight.shape
    assert bool((mask.view(8, 1, 8, 3, 3).sum(2) == 1).all())
    pointwise = torch.nn.Conv2d(32, 16, 1)
    assert bool((weight_nm_mask(pointwise.weight, 2, 4).view(16, 8, 4).sum(2) == 2).all())
    depthwise = torch.nn.Conv2d(16, 16, 3, groups=16)
    with pytest.raises(IneligibleLayerError, match=r"'dw'.*input channels per group = 1"):
        weight_nm_mask(depthwise.weight, 2, 4, layer="dw")
    stem = torch.nn.Conv2d(3, 16, 3)
    with pytest.raises(IneligibleLayerError, match=r"input channels per group = 3 .* M=4; use M in \{3\}"):
        weight_nm_mask(stem.weight, 2, 4, layer="stem")


def test_activation_masks_conv_and_linear() -> None:
    x = torch.randn(2, 8, 5, 5)
    mask = activation_nm_mask(x, 2, 4, dim=1)
    assert bool((mask.view(2, 2, 4, 5, 5).sum(2) == 2).all())
    assert torch.equal(mask, brute_force_mask(x.abs(), 2, 4, dim=1))
    tokens = torch.randn(3, 7, 16)
    mask = activation_nm_mask(tokens, 1, 8)
    assert torch.equal(mask, brute_force_mask(tokens.abs(), 1, 8, dim=2))
    with pytest.raises(IneligibleLayerError, match="'fc'"):
        activation_nm_mask(torch.randn(2, 10), 2, 4, layer="fc")


def test_activation_scores_can_weigh_channels() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    scale = torch.tensor([10.0, 1.0, 1.0, 1.0])
    assert activation_nm_mask(x, 1, 4).tolist() == [[False, False, False, True]]
    assert activation_nm_mask(x, 1, 4, channel_scale=scale).tolist() == [[True, False, False, False]]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 3, "stride": 2, "padding": 2, "dilation": 2},
        {"kernel_size": (3, 1), "padding": (1, 0), "groups": 2},
        {"kernel_size": 1},
        {"kernel_size": 2, "padding": "same"},
    ],
)
def test_input_column_norms_equal_im2col(kwargs: dict) -> None:
    conv = torch.nn.Conv2d(8, 4, **kwargs)
    x = torch.randn(3, 8, 9, 7)
    pad = conv._reversed_padding_repeated_twice
    sums = input_column_sq_sums(x, conv.kernel_size, conv.stride, conv.dilation, pad)
    cols = F.unfold(F.pad(x, pad), conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    expected = cols.pow(2).sum(dim=(0, 2)).view(8, *conv.kernel_size)
    torch.testing.assert_close(sums, expected)
    # |w| * ||x_col|| maps each conv group's weight to its own input channels
    scores = activation_weighted_scores(conv.weight, sums.sqrt(), conv.groups)
    g = conv.groups
    per_group = expected.sqrt().view(g, 8 // g, *conv.kernel_size)
    for cout in range(4):
        group = cout // (4 // g)
        torch.testing.assert_close(scores[cout], conv.weight[cout].detach().abs() * per_group[group])


def test_linear_column_norms() -> None:
    x = torch.randn(4, 5, 12)
    torch.testing.assert_close(input_column_sq_sums(x), x.pow(2).sum(dim=(0, 1)))
    weight = torch.randn(6, 12)
    scores = activation_weighted_scores(weight, input_column_sq_sums(x).sqrt())
    torch.testing.assert_close(scores, weight.abs() * x.reshape(-1, 12).norm(dim=0))
    torch.testing.assert_close(weight_column_norms(weight), weight.norm(dim=0))


def test_weight_column_norms_grouped_conv() -> None:
    weight = torch.randn(6, 4, 3, 3)  # groups=2: 8 input channels
    norms = weight_column_norms(weight, groups=2)
    assert norms.shape == (8,)
    torch.testing.assert_close(norms[:4], weight[:3].pow(2).sum(dim=(0, 2, 3)).sqrt())
    torch.testing.assert_close(norms[4:], weight[3:].pow(2).sum(dim=(0, 2, 3)).sqrt())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masks_on_cuda() -> None:
    scores = torch.randn(64, 32, 3, 3)
    assert torch.equal(nm_mask(scores.cuda(), 2, 4, 1).cpu(), nm_mask(scores, 2, 4, 1))


def stable_sort_oracle(scores: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """numpy stable argsort of the negated scores per group: the first n positions survive."""
    groups = scores.movedim(dim, -1).double().numpy()
    groups = groups.reshape(*groups.shape[:-1], -1, m)
    order = np.argsort(-groups, axis=-1, kind="stable")[..., :n]
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return torch.from_numpy(keep.reshape(*keep.shape[:-2], -1)).movedim(-1, dim)


@st.composite
def kernel_cases(draw: st.DrawFn) -> tuple[torch.Tensor, int, int, int]:
    """Scores in every float dtype, heavy on ties: small integers, zeros of both signs, inf."""
    m = draw(st.integers(2, 20))
    n = draw(st.integers(1, m))
    ndim = draw(st.integers(1, 4))
    dim = draw(st.integers(0, ndim - 1))
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    shape[dim] = m * draw(st.integers(1, 4))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["randn", "few values", "zeros", "signed zeros and inf"]))
    if kind == "randn":
        scores = torch.randn(shape, generator=generator)
    elif kind == "few values":
        scores = torch.randint(0, 3, shape, generator=generator).float()
    elif kind == "zeros":
        scores = torch.zeros(shape)
    else:
        choices = torch.tensor([0.0, -0.0, 1.0, float("inf"), -float("inf")])
        scores = choices[torch.randint(0, 5, shape, generator=generator)]
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]))
    return scores.to(dtype), n, m, dim


@settings(max_examples=300, deadline=None)
@given(kernel_cases(), st.sampled_from([torch.bool, torch.float32, torch.float16]))
def test_both_mask_kernels_equal_stable_sort(case: tuple[torch.Tensor, int, int, int], out: torch.dtype) -> None:
    """Whatever M, the pairwise rank, the sort kernel, the one-pass C++ kernel (and for N = 1 the first
    maximum) give the stable-sort mask, so the measured switch between them (``_PAIRWISE_MAX_M``) can move without
    changing any mask."""
    scores, n, m, dim = case
    expected = stable_sort_oracle(scores, n, m, dim)
    groups = scores.unflatten(dim, (-1, m))
    kernels = [_pairwise_keep(groups, n, m, dim + 1, out), _sorted_keep(groups, n, dim + 1, out)]
    kernels += [_first_max_keep(groups, dim + 1, out)] if n == 1 else []
    for keep in kernels:
        assert keep.dtype == out
        assert torch.equal(keep.flatten(dim, dim + 1).bool(), expected)
    fused = nm_mask_op()  # the one-pass C++ kernel (CPU), when the extension is built
    if fused is not None and m <= 64:
        keep = torch.empty(scores.shape, dtype=out)
        fused(scores.contiguous(), keep, n, m, dim)
        assert torch.equal(keep.bool(), expected)
    if n < m:
        assert torch.equal(nm_mask(scores, n, m, dim), expected)
