import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from search_space import (
    IneligibleLayerError,
    InvalidSparsityError,
    MaskState,
    NMSearchError,
    Recipe,
    RecipeConfig,
    RecipeConfigError,
    RowPattern,
    RowScores,
    Scheme,
    SearchSpace,
    pruned_rows,
    row_keep_mask,
    row_kept_fraction,
    row_masked_layers,
    row_ramp_sparsity,
    select_row_masks,
    sparsify,
)
from search_space.rows import candidate_seed, conv_output_size, pool_row_scores, random_row_scores

ROWS = ("weights", "rows")


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 4),
    )


# -- patterns and masks ------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, 1, 1.0, -0.1, 1.5, float("nan"), float("inf"), True, "x", None])
def test_row_sparsity_outside_0_1_is_one_clear_error(bad) -> None:
    with pytest.raises(InvalidSparsityError, match=r"strictly between 0 and 1|write it as") as info:
        RowPattern.parse(bad) if isinstance(bad, str) else RowPattern(bad)
    assert isinstance(info.value, NMSearchError) and "\n" not in str(info.value)


def test_row_pattern_parse_and_name() -> None:
    assert RowPattern.parse("r0.2") == RowPattern.parse("0.2") == RowPattern.parse(0.2) == RowPattern(0.2)
    assert str(RowPattern(0.25)) == "r0.25" and RowPattern(0.25).density == 0.75
    with pytest.raises(InvalidSparsityError):
        RowPattern.parse("r1.5")


def test_pruned_rows_rounds_and_keeps_one_row() -> None:
    assert pruned_rows(16, 0.1) == 2  # round(1.6)
    assert pruned_rows(1024, 0.3) == 307
    assert pruned_rows(1, 0.3) == 0 and pruned_rows(2, 0.9) == 1
    assert row_kept_fraction(16, 0.1) == 14 / 16
    assert row_kept_fraction(None, 0.2) == pytest.approx(0.8)
    with pytest.raises(InvalidSparsityError):
        pruned_rows(16, 1.0)


def test_mask_prunes_the_lowest_scores_ties_to_lowest_index() -> None:
    scores = torch.tensor([[0.5, 0.1, 0.1], [0.9, 0.1, 0.7]])
    keep = row_keep_mask(scores, 0.5)  # 3 of 6 pruned: the three 0.1s
    assert keep.tolist() == [[True, False, False], [True, False, True]]
    keep = row_keep_mask(scores, 0.34)  # 2 pruned: the first two 0.1s in index order
    assert keep.tolist() == [[True, False, False], [True, True, True]]


def test_masks_are_nested_across_sparsities() -> None:
    scores = pool_row_scores(random_row_scores((32, 32), seed=3), (16, 16))
    previous = torch.ones(16, 16, dtype=torch.bool)
    for sparsity in (0.05, 0.1, 0.2, 0.3, 0.5, 0.9):
        keep = row_keep_mask(scores, sparsity)
        assert int((~keep).sum()) == pruned_rows(256, sparsity)
        assert not (keep & ~previous).any()  # every row kept now was kept at the lower sparsity
        previous = keep


def test_pooled_scores_agree_across_resolutions() -> None:
    field = random_row_scores((32, 32), seed=0)
    assert torch.equal(field, random_row_scores((32, 32), seed=0))
    assert not torch.equal(field, random_row_scores((32, 32), seed=1))
    # An 8x8 layer sees the average of the 16x16 layer's scores over its region: the same field.
    torch.testing.assert_close(
        pool_row_scores(field, (8, 8)), pool_row_scores(pool_row_scores(field, (16, 16)), (8, 8))
    )
    # so the positions an 8x8 mask drops are regions the 16x16 scores rate low too
    low = ~row_keep_mask(pool_row_scores(field, (8, 8)), 0.3)
    fine = pool_row_scores(field, (16, 16)).unflatten(0, (8, 2)).unflatten(2, (8, 2)).mean((1, 3))
    assert fine[low].mean() < fine[~low].mean()


def test_conv_output_size_matches_torch() -> None:
    for conv in (nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, (3, 5), padding="same"), nn.Conv2d(4, 4, 3, dilation=2)):
        out = conv(torch.randn(1, 4, 13, 11))
        pad = conv._reversed_padding_repeated_twice
        assert conv_output_size((13, 11), conv.kernel_size, conv.stride, conv.dilation, pad) == out.shape[-2:]


# -- the row-masked layer ----------------------------------------------------------------------
def test_row_masked_conv_zeroes_the_same_positions_for_every_channel_and_image() -> None:
    conv = nn.Conv2d(8, 16, 3, padding=1)
    layer = sparsify(conv, activation="r0.3", name="c")
    x = torch.randn(4, 8, 10, 10)
    out = layer(x)
    keep = layer.input_mask(x)
    assert keep.shape == (10, 10) and keep.dtype == torch.bool
    assert int((~keep).sum()) == pruned_rows(100, 0.3) == 30
    torch.testing.assert_close(out, conv(x) * keep)  # bias included: skipped rows output zero
    assert (out[:, :, ~keep] == 0).all()
    assert layer.row_sparsity == 0.3 and "activation_rows=0.3" in repr(layer)


def test_row_masked_conv_backward_is_the_masked_dense_gradient() -> None:
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    layer = sparsify(conv, weight="2:4", activation=RowPattern(0.2), name="c")
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    layer(x).square().sum().backward()
    keep = layer.input_mask(x).float()
    weight = (conv.weight * layer.weight_mask()).detach().requires_grad_()
    bias = conv.bias.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    (F.conv2d(x_ref, weight, bias, 2, 1) * keep).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(conv.bias.grad, bias.grad)
    torch.testing.assert_close(conv.weight.grad, weight.grad)  # STE: the masked weight's gradient


def test_rows_on_linear_are_ineligible() -> None:
    with pytest.raises(IneligibleLayerError, match=r"layer 'fc': row masks .* Conv2d.* Linear layers are not eligible"):
        sparsify(nn.Linear(8, 8), activation="r0.2", name="fc")
    linear = sparsify(nn.Linear(8, 8), activation="2:4", name="fc")
    with pytest.raises(IneligibleLayerError, match="Linear layers are not eligible"):
        linear.input_mask(torch.randn(2, 8), RowPattern(0.2))


def test_explicit_row_pattern_for_supernets() -> None:
    layer = sparsify(nn.Conv2d(8, 8, 3, padding=1), name="c")  # no activation choice of its own
    x = torch.randn(1, 8, 8, 8)
    masks = {s: layer.input_mask(x, RowPattern(s)) for s in (0.1, 0.2, 0.3)}
    assert [int((~m).sum()) for m in masks.values()] == [6, 13, 19]
    assert not (masks[0.3] & ~masks[0.1]).any()  # nested
    assert torch.equal(layer(x), layer._dense_forward(x, layer.weight))  # its own forward stays dense


def test_masks_follow_the_shared_field_and_its_input_size() -> None:
    model = Scheme.uniform_rows(SearchSpace.from_model(small_cnn(), torch.randn(1, 3, 16, 16), targets=ROWS), 0.2)
    sparse = model.apply(small_cnn(), row_seed=5)
    layers = row_masked_layers(sparse)
    assert list(layers) == ["0", "3", "5"]
    shared = {id(layer.row_scores) for layer in layers.values()}
    assert len(shared) == 1 and layers["0"].row_scores.seed == 5
    x = torch.randn(2, 3, 16, 16)
    sparse(x)
    assert layers["0"].row_scores.input_size == (16, 16)  # taken from the first row-masked layer's input
    again = model.apply(small_cnn(), row_seed=5)
    again(x)
    other = model.apply(small_cnn(), row_seed=6)
    other(x)
    h = torch.randn(1, 16, 16, 16)
    assert torch.equal(layers["3"].input_mask(h), row_masked_layers(again)["3"].input_mask(h))
    assert not torch.equal(layers["3"].input_mask(h), row_masked_layers(other)["3"].input_mask(h))


# -- ramp --------------------------------------------------------------------------------------
def test_row_ramp_is_polynomial_between_10_and_90_percent() -> None:
    config = RecipeConfig(estimator="ste", total_steps=100)
    assert [row_ramp_sparsity(step, 0.4, config) for step in (0, 9)] == [0.0, 0.0]
    assert row_ramp_sparsity(10, 0.4, config) == 0.0
    assert row_ramp_sparsity(50, 0.4, config) == pytest.approx(0.4 * (1 - 0.5**2))
    assert row_ramp_sparsity(90, 0.4, config) == row_ramp_sparsity(500, 0.4, config) == 0.4
    values = [row_ramp_sparsity(step, 0.4, config) for step in range(100)]
    assert values == sorted(values)
    assert row_ramp_sparsity(0, 0.4, RecipeConfig()) == 0.4  # no total_steps: no ramp


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"total_steps": 0}, "total_steps"),
        ({"row_ramp_start": 0.5, "row_ramp_end": 0.4}, "row_ramp_start"),
        ({"row_ramp_end": 1.5}, "row_ramp_start"),
        ({"row_ramp_power": 0}, "row_ramp_power"),
    ],
)
def test_bad_ramp_configs_are_refused(fields: dict, fragment: str) -> None:
    with pytest.raises(RecipeConfigError, match=fragment):
        RecipeConfig(**fields)


def test_recipe_ramps_the_layers_and_masks_stay_nested() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1))
    model[0] = sparsify(model[0], weight="2:4", activation="r0.3", name="0")
    recipe = Recipe(model, RecipeConfig(estimator="srste", total_steps=20, warmup_steps=1))
    x = torch.randn(1, 4, 12, 12)
    kept, sparsities = [], []
    for step in range(21):
        recipe.step(step)
        sparsities.append(model[0].row_sparsity)
        mask = model[0].input_mask(x)
        kept.append(torch.ones(12, 12, dtype=torch.bool) if mask is None else mask)
    assert model[0].input_mask(x) is not None and sparsities[-1] == 0.3
    assert sparsities[:3] == [0.0, 0.0, 0.0] and sparsities == sorted(sparsities)
    assert model[0].mask_state.row_sparsity == 0.3 and model[0].mask_state.estimator == "srste"
    for before, after in itertools.pairwise(kept):
        assert not (after & ~before).any()
    recipe.step(0)  # warm-up: rows dense too
    assert model[0].input_mask(x) is None


# -- candidate selection -----------------------------------------------------------------------
def test_select_row_masks_keeps_the_lowest_loss_candidate() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    space = SearchSpace.from_model(model, torch.randn(1, 3, 16, 16), targets=ROWS)
    sparse = Scheme.uniform_rows(space, 0.3).apply(model)
    sparse.train()
    layer = sparse[0]
    layer.mask_state = MaskState(row_sparsity=0.1)  # mid-ramp: selection still judges at 0.3
    inputs, targets = torch.randn(16, 3, 16, 16), torch.arange(16) % 4
    selection = select_row_masks(sparse, inputs, targets, candidates=5, seed=2)
    assert len(selection.losses) == 5 and selection.losses[selection.best] == min(selection.losses)
    assert len(set(selection.losses)) > 1  # the candidates differ
    assert selection.seed == candidate_seed(2, selection.best) == layer.row_scores.seed
    assert layer.row_scores.input_size == (16, 16)
    assert sparse.training and layer.mask_state == MaskState(row_sparsity=0.1)  # restored
    layer.mask_state = MaskState()
    sparse.eval()
    with torch.no_grad():
        assert float(F.cross_entropy(sparse(inputs), targets)) == pytest.approx(min(selection.losses))
    again = select_row_masks(sparse, inputs, targets, candidates=5, seed=2)
    assert again == selection


def test_select_row_masks_bad_input() -> None:
    with pytest.raises(NMSearchError, match="no row-masked layers"):
        select_row_masks(small_cnn(), torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))
    space = SearchSpace.from_model(small_cnn(), torch.randn(1, 3, 8, 8), targets=ROWS)
    sparse = Scheme.uniform_rows(space, 0.2).apply(small_cnn())
    with pytest.raises(NMSearchError, match="candidates must be a positive integer"):
        select_row_masks(sparse, torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), candidates=0)


def test_row_scores_fallback_and_cache() -> None:
    scores = RowScores(seed=1)
    first = scores.pooled((4, 4), (8, 8))
    assert scores.input_size == (8, 8) and scores.pooled((4, 4), (16, 16)) is first
    scores.seed = 2
    assert not torch.equal(scores.pooled((4, 4), (8, 8)), first)


def test_finalize_keeps_the_row_wrapper_and_verify_passes() -> None:
    model = small_cnn()
    space = SearchSpace.from_model(model, torch.randn(1, 3, 8, 8), targets=ROWS)
    scheme = space.scheme({"3": "w2:4+r0.2", "5": "r0.1"})
    sparse = scheme.apply(model)
    x = torch.randn(2, 3, 8, 8)
    expected = sparse(x)
    scores = sparse[3].row_scores
    scheme.finalize(sparse)
    assert sparse[3].weight_pattern is None and sparse[3].row_scores is scores
    torch.testing.assert_close(sparse(x), expected)
    report = scheme.verify(sparse)
    assert report["activations_ok"].all() and report.set_index("layer").loc["3", "activations"] == "r0.2"
