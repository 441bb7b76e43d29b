import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from search_space import (
    IneligibleLayerError,
    InvalidPatternError,
    MaskState,
    NMSearchError,
    SparseConv2d,
    SparseLinear,
    calibrate_input_norms,
    mask_flip_frame,
    set_submodule,
    sparse_layers,
    sparsify,
    weight_nm_mask,
)
from search_space.masks import activation_weighted_scores, input_column_sq_sums

CONV_CONFIGS = [
    {"in_channels": 8, "out_channels": 16, "kernel_size": 3},
    {"in_channels": 8, "out_channels": 16, "kernel_size": 3, "stride": 2, "padding": 1, "bias": False},
    {"in_channels": 8, "out_channels": 16, "kernel_size": 3, "padding": 2, "dilation": 2},
    {"in_channels": 16, "out_channels": 8, "kernel_size": 3, "padding": 1, "groups": 2},
    {"in_channels": 8, "out_channels": 8, "kernel_size": (2, 3), "padding": "same"},
    {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "padding": "valid"},
    {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "padding": 1, "padding_mode": "circular"},
    {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "padding": 1, "padding_mode": "replicate"},
    {"in_channels": 32, "out_channels": 16, "kernel_size": 1},
]


@pytest.mark.parametrize("config", CONV_CONFIGS)
def test_dense_wrapper_is_bit_exact_for_every_conv_argument(config: dict) -> None:
    conv = nn.Conv2d(**config)
    x = torch.randn(2, config["in_channels"], 9, 9)
    sparse = SparseConv2d.from_dense(conv, None, None, name="c")
    assert torch.equal(sparse(x), conv(x))
    assert [n for n, _ in sparse.named_parameters()] == [n for n, _ in conv.named_parameters()]
    assert all(a is b for a, b in zip(sparse.parameters(), conv.parameters(), strict=True))


@pytest.mark.parametrize("config", CONV_CONFIGS)
def test_sparse_conv_equals_masked_dense_conv(config: dict) -> None:
    conv = nn.Conv2d(**config)
    cin, groups = config["in_channels"], config.get("groups", 1)
    x = torch.randn(2, cin, 9, 9)
    sparse = sparsify(conv, "2:4", "1:4", name="c")
    w_mask = weight_nm_mask(conv.weight, 2, 4)
    x_mask = x.abs().unflatten(1, (-1, 4))
    x_mask = x_mask >= x_mask.topk(1, 2).values
    x_masked = x * x_mask.flatten(1, 2)
    expected = conv._conv_forward(x_masked, conv.weight * w_mask, conv.bias)
    torch.testing.assert_close(sparse(x), expected, rtol=0, atol=0)
    assert groups == sparse.groups


def test_linear_wrapper_2d_3d_and_subclasses() -> None:
    for linear in [nn.Linear(16, 8), nn.modules.linear.NonDynamicallyQuantizableLinear(16, 8, bias=False)]:
        x2, x3 = torch.randn(4, 16), torch.randn(2, 5, 16)
        dense = SparseLinear.from_dense(linear)
        assert torch.equal(dense(x2), linear(x2)) and torch.equal(dense(x3), linear(x3))
        sparse = sparsify(linear, "2:4", "2:8", name="fc")
        x_mask = x3.abs().unflatten(-1, (-1, 8))
        x_mask = x_mask >= x_mask.topk(2, -1).values[..., 1:2]
        expected = F.linear(x3 * x_mask.flatten(-2), linear.weight * weight_nm_mask(linear.weight, 2, 4), linear.bias)
        torch.testing.assert_close(sparse(x3), expected, rtol=0, atol=0)
        assert sparse(x3).shape == (2, 5, 8)


def test_state_dict_round_trips_between_dense_and_sparse() -> None:
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    dense_state = copy.deepcopy(model.state_dict())
    set_submodule(model, "0", sparsify(model[0], "2:4", "2:4", name="0"))
    set_submodule(model, "3", sparsify(model[3], "1:8", None, name="3"))
    assert list(model.state_dict()) == list(dense_state)
    model.load_state_dict(dense_state)  # a dense checkpoint loads into the sparse model
    fresh = nn.Sequential(nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    fresh.load_state_dict(model.state_dict())  # and back
    assert [name for name, _ in sparse_layers(model)] == ["0", "3"]


def test_to_dense_restores_original_type_and_parameters() -> None:
    linear = nn.modules.linear.NonDynamicallyQuantizableLinear(16, 8)
    sparse = sparsify(linear, "2:4", None, name="out_proj")
    dense = sparse.to_dense()
    assert type(dense) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert dense.weight is linear.weight and dense.bias is linear.bias
    assert not hasattr(dense, "weight_pattern") and "fixed_weight_mask" not in dense._buffers
    x = torch.randn(3, 16)
    assert torch.equal(dense(x), linear(x))


def test_with_patterns_rewraps_same_parameters() -> None:
    conv = nn.Conv2d(8, 8, 3)
    sparse = sparsify(conv, "2:4", None, name="c")
    other = sparse.with_patterns(None, "1:8")
    assert other.weight is conv.weight and other.weight_pattern is None and str(other.activation_pattern) == "1:8"


def test_bad_input_leaves_module_untouched() -> None:
    stem = nn.Conv2d(3, 16, 3)
    before = copy.deepcopy(stem.state_dict())
    with pytest.raises(IneligibleLayerError, match=r"layer 'stem': input channels per group = 3 .*M=4"):
        sparsify(stem, "2:4", None, name="stem")
    with pytest.raises(IneligibleLayerError, match="'stem'"):
        sparsify(stem, None, "1:8", name="stem")
    with pytest.raises(InvalidPatternError):
        sparsify(stem, "4:2", None, name="stem")
    assert type(stem) is nn.Conv2d and not hasattr(stem, "weight_pattern")
    assert all(torch.equal(before[k], v) for k, v in stem.state_dict().items())
    with pytest.raises(IneligibleLayerError, match=r"in_features = 10 .* \{2, 5, 10\}"):
        sparsify(nn.Linear(10, 4), "2:4", name="head")
    with pytest.raises(NMSearchError, match="only Conv2d and Linear"):
        sparsify(nn.Conv1d(8, 8, 3), "2:4", name="conv1d")
    with pytest.raises(NMSearchError, match="already sparse"):
        sparsify(sparsify(nn.Linear(8, 8), "2:4"), "2:4")
    with pytest.raises(NMSearchError, match="weight_score"):
        sparsify(nn.Linear(8, 8), "2:4", weight_score="gradient")


def test_subclass_with_own_forward_is_refused() -> None:
    class ScaledLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    with pytest.raises(NMSearchError, match="overrides forward"):
        sparsify(ScaledLinear(8, 8), "2:4", name="scaled")


def _saved_tensors(fn):
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(16, 16, 3, padding=1), lambda: nn.Linear(16, 16)])
def test_backward_keeps_no_float_copy_of_the_masked_input(make) -> None:
    layer = sparsify(make(), "2:4", "2:4", name="c")
    shape = (2, 16, 8, 8) if isinstance(layer, SparseConv2d) else (2, 5, 16)
    x = torch.randn(shape, requires_grad=True)
    out, saved = _saved_tensors(lambda: layer(x))
    same_shape = [t for t in saved if t.shape == x.shape]
    assert [t.dtype for t in same_shape] == [torch.bool]  # only the mask; the masked input is rebuilt
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    mask = same_shape[0]
    reference = layer.to_dense()
    x_ref = x.detach().clone().requires_grad_()
    weight = (layer.weight * weight_nm_mask(layer.weight, 2, 4)).detach().requires_grad_()
    masked = x_ref * mask
    expected = (
        F.conv2d(masked, weight, reference.bias, padding=1)
        if isinstance(layer, SparseConv2d)
        else F.linear(masked, weight, reference.bias)
    )
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, weight.grad)


def test_sparse_layer_gradcheck() -> None:
    layer = sparsify(nn.Conv2d(8, 4, 3, padding=1, stride=2), "2:4", "1:4", name="c").double()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    # masks are piecewise constant: gradcheck away from ties holds for input and weight
    assert torch.autograd.gradcheck(lambda inp, w: layer._conv_forward(inp * layer.input_mask(inp), w, None),
                                    (x, layer.weight.detach().clone().requires_grad_()))  # fmt: skip
    assert torch.autograd.gradcheck(layer, (x,))


def test_in_place_change_of_input_before_backward_is_detected() -> None:
    layer = sparsify(nn.Linear(8, 4), None, "2:4", name="fc")
    x = torch.randn(3, 8, requires_grad=True)
    h = x * 1.0
    out = layer(h)
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_composes_with_activation_checkpointing() -> None:
    from torch.utils.checkpoint import checkpoint

    block = nn.Sequential(nn.ReLU(), sparsify(nn.Conv2d(8, 8, 3, padding=1), "2:4", "2:4", name="c"))
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    block(x).sum().backward()
    torch.testing.assert_close(x.grad, grad)


def _linear_grads(state: MaskState, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    layer = sparsify(nn.Linear(8, 3, bias=False), "2:4", None, name="fc")
    with torch.no_grad():
        layer.weight.copy_(weight)
    layer.mask_state = state
    layer(x).pow(2).sum().backward()
    return layer.weight.grad


def test_estimator_gradients() -> None:
    weight, x = torch.randn(3, 8), torch.randn(5, 8)
    mask = weight_nm_mask(weight, 2, 4)
    masked = (weight * mask).requires_grad_()
    (x @ masked.T).pow(2).sum().backward()
    dense_grad = masked.grad  # dL/dW~
    torch.testing.assert_close(_linear_grads(MaskState(estimator="ste"), weight, x), dense_grad)
    srste = _linear_grads(MaskState(estimator="srste", srste_lambda=0.5), weight, x)
    torch.testing.assert_close(srste, dense_grad + 0.5 * (~mask) * weight)
    fixed = _linear_grads(MaskState(estimator="fixed"), weight, x)
    torch.testing.assert_close(fixed, dense_grad * mask)


def test_srste_keeps_tiny_bf16_gradients_of_kept_weights_exact() -> None:
    # At loss scale 1e-7 the data gradient (~1e-7) is far below lambda * W (~1e-4): in bf16,
    # ``g + lambda W - lambda W E`` rounds g away; ``g + lambda W (1 - E)`` leaves it untouched.
    torch.manual_seed(0)
    weight = (torch.rand(16, 64) + 0.5).to(torch.bfloat16)
    x = torch.rand(4, 64).to(torch.bfloat16)
    mask = weight_nm_mask(weight, 2, 4).bool()
    lam = 2e-4

    def grads(state: MaskState) -> torch.Tensor:
        layer = sparsify(nn.Linear(64, 16, bias=False), "2:4", None, name="fc").to(torch.bfloat16)
        with torch.no_grad():
            layer.weight.copy_(weight)
        layer.mask_state = state
        (1e-7 * layer(x).sum()).backward()
        return layer.weight.grad

    data = grads(MaskState(estimator="ste"))  # g = dL/dW~, the same for every estimator
    srste = grads(MaskState(estimator="srste", srste_lambda=lam))
    kept_error = ((srste - data)[mask].float().abs() / data[mask].float().abs()).max()
    assert kept_error == 0.0
    torch.testing.assert_close(srste[~mask], (data + lam * weight)[~mask])
    rounded = data + lam * weight - lam * (weight * mask)  # the old formula, for contrast
    assert ((rounded - data)[mask].float().abs() / data[mask].float().abs()).max() > 0.5


def test_mask_decay_forward_lets_pruned_weights_through_scaled() -> None:
    layer = sparsify(nn.Linear(8, 4, bias=False), "1:4", None, name="fc")
    mask = weight_nm_mask(layer.weight, 1, 4)
    layer.mask_state = MaskState(decay_beta=0.25)
    x = torch.randn(2, 8)
    expected = x @ (layer.weight * (mask + 0.25 * ~mask)).T
    torch.testing.assert_close(layer(x), expected)
    x.requires_grad_()
    layer(x).sum().backward()  # STE: dense gradient
    torch.testing.assert_close(layer.weight.grad, x.detach().sum(0).expand(4, 8))
    with pytest.raises(NMSearchError, match="SR-STE"):
        MaskState(estimator="srste", decay_beta=0.5)


def test_weight_mask_cached_until_weights_change_and_flips_counted() -> None:
    layer = sparsify(nn.Linear(8, 4), "2:4", None, name="fc")
    first = layer.weight_mask()
    assert layer.weight_mask() is first  # reused while the weight is unchanged
    with torch.no_grad():
        layer.weight[0, :4] = torch.tensor([4.0, 3.0, 2.0, 1.0])
        layer.weight[0, 4:] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    second = layer.weight_mask()
    assert second is not first
    with torch.no_grad():
        layer.weight[0, :4] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # flips 4 entries of group 0
    third = layer.weight_mask()
    assert int((third != second).sum()) == 4
    frame = mask_flip_frame(nn.Sequential(layer))
    assert frame.loc[0, "updates"] == 2
    assert frame.loc[0, "flips"] == int((second != first).sum()) + 4


def test_optimizer_step_invalidates_mask_cache() -> None:
    layer = sparsify(nn.Linear(8, 4), "2:4", None, name="fc")
    optimizer = torch.optim.SGD(layer.parameters(), lr=10.0)
    before = layer.weight_mask()
    layer(torch.randn(4, 8)).pow(2).sum().backward()
    optimizer.step()
    assert layer.weight_mask() is not before


def test_disabled_state_runs_dense() -> None:
    conv = nn.Conv2d(8, 8, 3)
    sparse = sparsify(conv, "1:4", "1:4", name="c")
    sparse.mask_state = MaskState(enabled=False)
    x = torch.randn(1, 8, 5, 5)
    assert torch.equal(sparse(x), conv(x))


def test_activation_weighted_weight_scores_need_and_use_calibration() -> None:
    model = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1))
    layer = sparsify(model[0], "1:4", None, name="0", weight_score="activation")
    set_submodule(model, "0", layer)
    with pytest.raises(NMSearchError, match="calibrate_input_norms"):
        layer(torch.randn(1, 8, 4, 4))
    batches = [torch.randn(2, 8, 6, 6) * torch.tensor([100.0] + [1.0] * 7).view(1, 8, 1, 1) for _ in range(2)]
    calibrate_input_norms(model, batches)
    expected_sq = sum(input_column_sq_sums(b, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)) for b in batches)
    torch.testing.assert_close(layer.input_sq_sum, expected_sq)
    scores = activation_weighted_scores(layer.weight, expected_sq.sqrt())
    assert torch.equal(layer.weight_mask().bool(), weight_nm_mask(layer.weight, 1, 4, scores))
    # channel 0 carries 100x larger inputs, so it wins most groups where |w| alone would not
    magnitude = weight_nm_mask(layer.weight, 1, 4)
    assert layer.weight_mask()[:, 0].sum() > magnitude[:, 0].sum()


def test_deepcopy_dtype_and_train_eval() -> None:
    model = nn.Sequential(sparsify(nn.Linear(8, 8), "2:4", "2:4", name="fc"))
    clone = copy.deepcopy(model).double()
    x = torch.randn(3, 8)
    torch.testing.assert_close(clone(x.double()).float(), model(x))
    assert clone[0].weight is not model[0].weight
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (3, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse_layers_on_cuda() -> None:
    conv = sparsify(nn.Conv2d(16, 16, 3), "2:4", "2:4", name="c")
    x = torch.randn(2, 16, 8, 8)
    expected = conv(x)
    torch.testing.assert_close(conv.cuda()(x.cuda()).cpu(), expected)
