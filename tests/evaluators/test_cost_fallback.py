"""CostEvaluator on schemes whose options are outside its space's table (e.g. DominoSearch's ``w4:16``)."""

import pytest
import torch
from torch import nn

from evaluators.cost import COST_METRICS, CostEvaluator, HardwareCostModel
from search_space import Scheme, SchemeMismatchError, SearchSpace


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 24))
    return SearchSpace.from_model(model, torch.randn(8, 32))


def wider(space: SearchSpace, ratios: list[str]) -> SearchSpace:
    return SearchSpace(
        space.layers, fingerprint=space.fingerprint, example_batch_size=space.example_batch_size, ratios=ratios
    )


@pytest.fixture(scope="module")
def cost_model() -> HardwareCostModel:
    return HardwareCostModel.from_profile("a100", batch_size=64)


def test_options_outside_the_table_are_costed_layer_by_layer(space, cost_model) -> None:
    evaluator = CostEvaluator(space, cost_model, metrics=COST_METRICS)
    wide = wider(space, ["2:4", "4:16", "1:16"])
    scheme = wide.scheme({"0": "w4:16", "2": "w1:16", "4": "w2:4"})  # w2:4 is in the table, the others not
    values = evaluator.evaluate(scheme).values
    assert values == pytest.approx(cost_model.evaluate(wide, scheme).totals)
    assert values["params"] == 32 * 64 * 4 / 16 + 64 + 64 * 16 / 16 + 16 + 16 * 24 / 2 + 24
    dense = evaluator.evaluate(wide.scheme({})).values
    # Tiny GEMMs: the sparse kernels lose, every layer runs dense and reads dense bytes.
    assert values["bytes_mb"] == pytest.approx(dense["bytes_mb"]) and values["macs"] < dense["macs"]


def test_schemes_inside_the_table_cost_the_same_either_way(space, cost_model) -> None:
    evaluator = CostEvaluator(space, cost_model, metrics=COST_METRICS)
    scheme = space.scheme({"0": "w2:8", "2": "a1:4", "4": "w2:4+a2:4"})
    assert evaluator.evaluate(scheme).values == pytest.approx(cost_model.evaluate(space, scheme).totals)


def test_a_scheme_that_does_not_fit_the_model_is_still_refused(space, cost_model) -> None:
    evaluator = CostEvaluator(space, cost_model)
    ineligible = Scheme.from_choices({"4": "w1:32"}, fingerprint=space.fingerprint)  # 16 input features
    with pytest.raises(SchemeMismatchError, match=r"option 'w1:32' is not available for layer '4' \(16 grouped"):
        evaluator.evaluate(ineligible)
    other = SearchSpace(space.layers, fingerprint="0" * 16, ratios=["1:16"])
    with pytest.raises(SchemeMismatchError, match="it was made for another model"):
        evaluator.evaluate(other.scheme({"0": "w1:16"}))
