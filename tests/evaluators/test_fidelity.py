"""Fidelity metrics on known cases and the evaluator on a small model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from evaluators.fidelity import (
    FidelityConfig,
    FidelityEvaluator,
    cosine_similarity,
    default_outputs,
    fidelity_metrics,
    kl_divergence,
    neighbor_agreement,
    relative_error,
)
from search_space import NMSearchError, SearchSpace


def test_metrics_on_known_cases() -> None:
    x = torch.randn(20, 6)
    assert cosine_similarity(x, x) == pytest.approx(1.0)
    assert cosine_similarity(x, 3 * x) == pytest.approx(1.0)
    assert cosine_similarity(x, -x) == pytest.approx(-1.0)
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert cosine_similarity(a, b) == pytest.approx(0.0)
    assert kl_divergence(x, x) == pytest.approx(0.0, abs=1e-12)
    assert kl_divergence(x, x + 5.0) == pytest.approx(0.0, abs=1e-9)  # softmax is shift-invariant
    p, q = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.0, 0.0]])  # (1/4, 3/4) vs (1/2, 1/2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert kl_divergence(p, q) == pytest.approx(expected)
    assert relative_error(x, x) == 0.0
    assert relative_error(x, 1.5 * x) == pytest.approx(0.5)
    assert neighbor_agreement(x, x) == 1.0
    assert neighbor_agreement(x, 2 * x) == 1.0


def test_neighbor_agreement_counts_overlap() -> None:
    dense = torch.eye(12)[:, :12] + 0.01 * torch.arange(12.0).unsqueeze(1)
    shuffled = dense[torch.randperm(12)]
    value = neighbor_agreement(dense, shuffled, k=3)
    assert 0.0 <= value <= 1.0
    with pytest.raises(NMSearchError, match="more than 10 samples"):
        neighbor_agreement(torch.randn(5, 3), torch.randn(5, 3))
    assert "neighbors@10" in fidelity_metrics(torch.randn(11, 3), torch.randn(11, 3))
    assert "neighbors@10" not in fidelity_metrics(torch.randn(4, 3), torch.randn(4, 3))


def test_default_outputs_pick_the_tensor() -> None:
    class Embedder(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"token_embeddings": x, "sentence_embedding": x.mean(1)}

    x = torch.randn(2, 3, 4)
    assert torch.equal(default_outputs(Embedder(), x), x.mean(1))
    with pytest.raises(NMSearchError, match="pass outputs="):
        default_outputs(_Keys(), x)


class _Keys(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hidden": x}


def _classifier() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    return model, torch.randn(400, 32)


@pytest.mark.parametrize("metric", ["cosine", "kl", "relative_error"])
def test_evaluator_scores_dense_as_one_and_sparse_lower(metric: str) -> None:
    model, x = _classifier()
    space = SearchSpace.from_model(model, x[:2], targets=["weights"])
    evaluator = FidelityEvaluator(model, space, x[:256], [x[256:328], x[328:]], FidelityConfig(metric=metric))
    dense = evaluator.evaluate(space.dense())
    assert dense.values["accuracy"] == pytest.approx(1.0)
    sparse = evaluator.evaluate(space.uniform("weights", 1, 4))
    assert 0 < sparse.values["accuracy"] < 1.0
    assert {"cosine", "kl", "relative_error", "neighbors@10"} <= set(sparse.info)


def test_sparsegpt_scores_higher_than_magnitude() -> None:
    model, x = _classifier()
    space = SearchSpace.from_model(model, x[:2], targets=["weights"])
    scheme = space.uniform("weights", 2, 4)
    scores = {
        method: FidelityEvaluator(model, space, x[:256], [x[256:]], FidelityConfig(oneshot=method, metric="kl"))
        .evaluate(scheme)
        .values["accuracy"]
        for method in ("magnitude", "sparsegpt")
    }
    assert scores["sparsegpt"] > scores["magnitude"]


def test_config_and_input_errors() -> None:
    with pytest.raises(NMSearchError, match=r"evaluator\.oneshot = .obs."):
        FidelityConfig(oneshot="obs")
    with pytest.raises(NMSearchError, match=r"evaluator\.metric"):
        FidelityConfig(metric="accuracy")
    with pytest.raises(NMSearchError, match=r"evaluator\.calibration_mode"):
        FidelityConfig(calibration_mode="joint")
    model, x = _classifier()
    space = SearchSpace.from_model(model, x[:2])
    with pytest.raises(NMSearchError, match="at least one held-out batch"):
        FidelityEvaluator(model, space, x, [])
