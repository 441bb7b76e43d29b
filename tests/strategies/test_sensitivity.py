"""Per-layer sensitivity, the greedy allocation baseline and Optuna's warm start from it."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import pandas as pd
import pytest
import torch
from torch import nn

from evaluators import CompositeEvaluator, CostEvaluator, HardwareCostModel
from evaluators.fidelity import FidelityConfig, FidelityEvaluator
from search_space import NMSearchError, SearchSpace
from strategies import OptunaStrategy
from strategies.sensitivity import allocation_schemes, layer_sensitivity, plot_sensitivity


@pytest.fixture(scope="module")
def setup() -> tuple[SearchSpace, FidelityEvaluator, HardwareCostModel]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(384, 32)
    space = SearchSpace.from_model(model, x[:16], targets=["weights"], ratios=["2:4", "1:4"])
    evaluator = FidelityEvaluator(model, space, x[:256], [x[256:]], FidelityConfig(metric="cosine"))
    return space, evaluator, HardwareCostModel.from_profile("a100", batch_size=16)


def test_sensitivity_table(setup) -> None:
    space, evaluator, cost_model = setup
    table = layer_sensitivity(space, evaluator, cost_model=cost_model)
    assert list(table["layer"].unique()) == space.searchable
    assert set(table["option"]) == {"w2:4", "w1:4"}
    assert (table["latency_saving_ms"] >= 0).all()
    for name, rows in table.groupby("layer"):
        scores = rows.set_index("option")["score"]
        single = evaluator.evaluate(space.scheme({name: "w1:4"})).values["accuracy"]
        assert scores["w1:4"] == pytest.approx(single)
        assert scores["w1:4"] <= scores["w2:4"] + 1e-6  # sparser hurts more
    assert (table["damage"] == 1.0 - table["score"]).all()
    figure = plot_sensitivity(table)
    assert len(figure.axes[0].patches) == len(table)


def test_allocation_prefers_cheap_damage() -> None:
    space = SearchSpace.from_model(
        nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)), torch.randn(2, 8), targets=["weights"]
    )
    table = pd.DataFrame(
        {
            "layer": ["0", "1", "2", "0"],
            "option": ["w2:4", "w2:4", "w2:4", "w1:4"],
            "damage": [0.30, 0.01, 0.10, 0.50],
            "latency_saving_ms": [1.0, 1.0, 1.0, 1.5],
        }
    )
    steps = allocation_schemes(space, table)
    assert [s.choices for s in steps][:3] == [
        {"0": "dense", "1": "w2:4", "2": "dense"},
        {"0": "dense", "1": "w2:4", "2": "w2:4"},
        {"0": "w2:4", "1": "w2:4", "2": "w2:4"},
    ]
    assert steps[-1]["0"].name == "w1:4" and len(steps) == 4
    with pytest.raises(NMSearchError, match="latency_saving_ms"):
        allocation_schemes(space, table.assign(latency_saving_ms=float("nan")))


def test_allocations_warm_start_optuna(setup) -> None:
    space, evaluator, cost_model = setup
    table = layer_sensitivity(space, evaluator, ["w2:4"], cost_model=cost_model)
    allocations = allocation_schemes(space, table)
    composite = CompositeEvaluator(evaluator, CostEvaluator(space, cost_model, ["latency_ms"]))
    n_uniform = len(space.uniform_schemes())
    strategy = OptunaStrategy(
        n_trials=n_uniform + len(allocations), warm_start_schemes=[s.choices for s in allocations]
    )
    result = strategy.search(space, composite)
    tried = {tuple(sorted(scheme.choices.items())) for scheme in result.schemes.values()}
    assert all(tuple(sorted(s.choices.items())) in tried for s in allocations)
    with pytest.raises(NMSearchError, match="not available"):
        OptunaStrategy(n_trials=1, warm_start_schemes=[{"0": "w3:4"}]).search(space, composite)


def test_sensitivity_needs_an_offered_option(setup) -> None:
    space, evaluator, _ = setup
    with pytest.raises(NMSearchError, match="no searchable layer offers"):
        layer_sensitivity(space, evaluator, ["w1:8"])
    assert space.dense() == space.scheme({})
