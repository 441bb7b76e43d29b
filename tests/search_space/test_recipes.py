import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from search_space import (
    NMPattern,
    Recipe,
    RecipeConfig,
    RecipeConfigError,
    mask_decay_beta,
    set_submodule,
    sparsify,
    structure_decay_stage,
    structure_decay_stages,
    weight_nm_mask,
)


def test_srste_with_a_decay_is_refused() -> None:
    for decay in ("mask", "structure"):
        with pytest.raises(RecipeConfigError, match=r"'srste' cannot be combined with decay = .*estimator=ste"):
            RecipeConfig(estimator="srste", decay=decay)
    with pytest.raises(RecipeConfigError, match="'fixed' cannot be combined"):
        RecipeConfig(estimator="fixed", decay="mask")
    RecipeConfig(estimator="ste", decay="mask")


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"estimator": "sr-ste"}, "recipe.estimator = 'sr-ste' is not one of ste, srste, fixed"),
        ({"decay": "cosine"}, "recipe.decay"),
        ({"estimator": "ste", "decay": "mask", "mask_decay_schedule": "step"}, "mask_decay_schedule"),
        ({"structure_decay_mode": "random"}, "structure_decay_mode"),
        ({"srste_lambda": -1.0}, "srste_lambda must be >= 0"),
        ({"warmup_steps": -5}, "warmup_steps"),
        ({"mask_decay_alpha": 0.0}, "mask_decay_alpha"),
        ({"structure_decay_max_scale": 6}, "power of two"),
    ],
)
def test_recipe_config_errors(kwargs: dict, fragment: str) -> None:
    with pytest.raises(RecipeConfigError, match=fragment):
        RecipeConfig(**kwargs)


def test_mask_decay_beta_linear_and_exponential() -> None:
    linear = RecipeConfig(estimator="ste", decay="mask", decay_steps=100)
    assert mask_decay_beta(-1, linear) == 1.0  # warm-up
    assert mask_decay_beta(0, linear) == 1.0
    assert mask_decay_beta(25, linear) == pytest.approx(0.75)
    assert mask_decay_beta(100, linear) == 0.0
    explicit = RecipeConfig(estimator="ste", decay="mask", mask_decay_alpha=0.02)
    assert mask_decay_beta(10, explicit) == pytest.approx(0.8)
    assert mask_decay_beta(60, explicit) == 0.0  # max(0, 1 - alpha t)
    exp = RecipeConfig(estimator="ste", decay="mask", decay_steps=100, mask_decay_schedule="exp")
    assert exp.alpha == pytest.approx(math.log(100) / 100)
    assert mask_decay_beta(50, exp) == pytest.approx(0.1)
    assert mask_decay_beta(99, exp) == pytest.approx(math.exp(-exp.alpha * 99))
    assert mask_decay_beta(100, exp) == 0.0  # binary fine-tune after the decay
    exp_alpha = RecipeConfig(estimator="ste", decay="mask", mask_decay_schedule="exp", mask_decay_alpha=0.1)
    assert mask_decay_beta(2000, exp_alpha) == pytest.approx(math.exp(-200))


def test_structure_decay_stages() -> None:
    assert structure_decay_stages(NMPattern(1, 8), 64) == [(7, 8), (4, 8), (2, 8), (1, 8)]
    assert structure_decay_stages(NMPattern(2, 4), 64) == [(3, 4), (2, 4)]
    assert structure_decay_stages(NMPattern(1, 16), 64) == [(15, 16), (8, 16), (4, 16), (2, 16), (1, 16)]
    assert structure_decay_stages(NMPattern(3, 4), 64) == [(3, 4)]
    assert structure_decay_stages(NMPattern(1, 8), 64, "geometric") == [(8, 64), (4, 32), (2, 16), (1, 8)]
    assert structure_decay_stages(NMPattern(1, 8), 16, "geometric") == [(2, 16), (1, 8)]
    assert structure_decay_stages(NMPattern(1, 8), 128, "geometric", max_scale=2) == [(2, 16), (1, 8)]
    stages = [(7, 8), (4, 8), (2, 8), (1, 8)]
    assert [structure_decay_stage(t, stages, 90) for t in (0, 29, 30, 59, 60, 89, 90, 1000)] == [
        (7, 8), (7, 8), (4, 8), (4, 8), (2, 8), (2, 8), (1, 8), (1, 8)
    ]  # fmt: skip


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    set_submodule(model, "0", sparsify(model[0], "1:8", "2:4", name="0"))
    set_submodule(model, "2", sparsify(model[2], "1:8", None, name="2"))
    return model


def _train(model: nn.Module, recipe: Recipe, steps: int, lr: float = 0.05) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        recipe.step(step)
        x = torch.randn(32, 16, generator=generator)
        y = x[:, :4].argmax(1)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_warmup_is_dense_then_masks_apply() -> None:
    model = _model()
    recipe = Recipe(model, RecipeConfig(estimator="ste", warmup_steps=3))
    dense = nn.Sequential(model[0].to_dense(), nn.ReLU(), model[2].to_dense())
    x = torch.randn(4, 16)
    recipe.step(2)
    assert recipe.phase(2) == "warmup"
    assert torch.equal(model(x), dense(x))
    recipe.step(3)
    assert recipe.phase(3) == "sparse"
    assert not torch.equal(model(x), dense(x))
    assert model[0].weight_mask().view(32, 2, 8).sum(-1).eq(1).all()


def test_mask_decay_recipe_drives_beta() -> None:
    model = _model()
    recipe = Recipe(model, RecipeConfig(estimator="ste", decay="mask", warmup_steps=10, decay_steps=40))
    recipe.step(20)
    assert recipe.phase(20) == "decay"
    assert model[0].mask_state.decay_beta == pytest.approx(0.75)
    layer = model[2]
    mask = weight_nm_mask(layer.weight, 1, 8)
    h = torch.randn(3, 32)
    torch.testing.assert_close(layer(h), F.linear(h, layer.weight * (mask + 0.75 * ~mask), layer.bias))
    recipe.step(50)
    assert recipe.phase(50) == "sparse" and model[0].mask_state.decay_beta == 0.0


def test_structure_decay_recipe_shrinks_n() -> None:
    model = _model()
    recipe = Recipe(model, RecipeConfig(estimator="ste", decay="structure", decay_steps=30))
    seen = []
    for step in (0, 10, 20, 30):
        recipe.step(step)
        mask = model[2].weight_mask()
        seen.append(int(mask.view(4, 4, 8).sum(-1).unique().item()))
    assert seen == [7, 4, 2, 1]


def test_geometric_structure_decay_keeps_density() -> None:
    model = _model()
    recipe = Recipe(model, RecipeConfig(estimator="ste", decay="structure", structure_decay_mode="geometric"))
    recipe.step(0)
    layer = model[2]  # in_features 32: the largest stage that fits is 4:32
    assert layer.weight_nm == (4, 32)
    assert layer.weight_mask().view(4, 1, 32).sum(-1).eq(4).all()


def test_fixed_recipe_prunes_once_and_keeps_the_mask() -> None:
    model = _model()
    recipe = Recipe(model, RecipeConfig(estimator="fixed"))
    _train(model, recipe, 1)
    mask = model[0].fixed_weight_mask.clone()
    _train(model, recipe, 5, lr=0.5)
    assert torch.equal(model[0].fixed_weight_mask, mask)
    assert torch.equal(model[0].weight.detach() != 0, mask.bool())  # pruned weights stay exactly zero
    assert recipe.sad_frame()["flips"].sum() == 0


def test_sad_history_and_srste_flip_less_than_ste() -> None:
    rates = {}
    for estimator, lam in (("ste", 0.0), ("srste", 0.05)):
        torch.manual_seed(0)
        model = _model()
        recipe = Recipe(model, RecipeConfig(estimator=estimator, srste_lambda=lam))
        _train(model, recipe, 60, lr=0.2)
        history = recipe.sad_history()
        assert list(history.columns) == ["step", "layer", "updates", "flips", "flip_rate"]
        assert set(history["layer"]) == {"0", "2"}
        assert (history["flip_rate"] <= 1).all()
        totals = recipe.sad_frame().set_index("layer")
        assert totals.loc["0", "flips"] == history.loc[history.layer == "0", "flips"].sum()
        rates[estimator] = history["flips"].sum()
    assert rates["srste"] < rates["ste"]


def test_srste_pulls_pruned_weights_to_zero() -> None:
    norms = {}
    for estimator in ("ste", "srste"):
        torch.manual_seed(0)
        model = _model()
        recipe = Recipe(model, RecipeConfig(estimator=estimator, srste_lambda=0.5))
        _train(model, recipe, 40)
        layer = model[2]
        pruned = layer.weight.detach() * ~layer.weight_mask()
        norms[estimator] = pruned.norm().item()
    assert norms["srste"] < 0.5 * norms["ste"]
