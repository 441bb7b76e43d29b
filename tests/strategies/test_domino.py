import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import strategies.base as base_module
import strategies.domino as domino_module
from evaluators import AccuracyEvaluator, CompositeEvaluator, CostEvaluator, HardwareCostModel, Trainer
from evaluators.fidelity import FidelityConfig, FidelityEvaluator
from experiments.tasks import get_task
from experiments.tasks.synthetic import SyntheticTask
from search_space import NMSearchError, Scheme, SearchSpace, weight_nm_mask
from strategies import DominoStrategy
from strategies.base import StrategyConfigError, load_checkpoint, save_checkpoint
from strategies.domino import (
    CHECKPOINT,
    NMSEARCH_V1,
    CostCurves,
    DominoError,
    DominoPlan,
    DominoState,
    UnreachableTargetError,
    _add_shrink_gradient,
    _check_reachable,
    _set_masks,
    _wrap,
    allot_densities,
    apply_votes,
    domino_space,
    erk_sparsities,
    force_to_target,
    group_thresholds,
    reference_alphas,
    shrink_alphas,
    vote_share,
    weight_groups,
)
from tests.strategies.toy import TinyEncoderTask

# synthetic: 8 steps per epoch; the reference shrink (0.1 every 5th step) is sized for ~30k steps
FAST = {"vote_interval": 4, "shrink_lambda": 2.0, "shrink_interval": 1}


@dataclass(frozen=True)
class NarrowHeadTask(SyntheticTask):
    """The synthetic data with a head of 12 input features: searchable at M=4, not at M=8 or 16."""

    name: ClassVar[str] = "synthetic_narrow_head"

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 12, 3, padding=1, bias=False),
            nn.BatchNorm2d(12),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(12, 4),
        )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def synthetic(cache_dir: Path) -> AccuracyEvaluator:
    return AccuracyEvaluator(Trainer(get_task("synthetic"), cache_dir=cache_dir, progress=False))


@pytest.fixture(scope="module")
def narrow(cache_dir: Path) -> AccuracyEvaluator:
    return AccuracyEvaluator(Trainer(NarrowHeadTask(), cache_dir=cache_dir, progress=False))


def hand_plan(per_n: list[list[float]], target_fraction: float, fixed: float = 0.0) -> DominoPlan:
    """A plan over layers "a", "b", ... with the given cost per N (1..M), no model needed."""
    costs = np.array(per_n, dtype=float)
    names = tuple("abcdefgh"[: len(costs)])
    curves = CostCurves(costs, fixed, fixed + float(costs[:, -1].sum()))
    return DominoPlan(
        m=costs.shape[1],
        target="macs",
        target_value=target_fraction,
        layers=names,
        ineligible={},
        curves=curves,
        target_fraction=target_fraction,
        allotted=costs[:, 0].copy(),
    )


def linear_plan(weights: list[int], m: int, target_fraction: float) -> DominoPlan:
    return hand_plan([[w * n / m for n in range(1, m + 1)] for w in weights], target_fraction)


# -- the pure pieces ---------------------------------------------------------------------------
def test_groups_run_along_input_channels_like_the_masks() -> None:
    weight = torch.randn(2, 16, 3, 3)
    groups = weight_groups(weight, 8)
    assert groups.shape == (2 * 3 * 3 * 2, 8)
    # group k is 8 consecutive input channels at a fixed (cout, r, s)
    assert torch.equal(groups[((1 * 3 + 2) * 3 + 0) * 2 + 1], weight[1, 8:16, 2, 0])
    kept = weight_groups(weight_nm_mask(weight, 2, 8).float(), 8)
    assert torch.equal(kept.sum(1), torch.full((36,), 2.0))
    top2 = groups.abs().topk(2, dim=1).indices
    assert torch.equal(kept.gather(1, top2), torch.ones(36, 2))


def test_threshold_is_the_mean_of_the_half_smallest_magnitudes() -> None:
    values = torch.arange(1.0, 17.0) * torch.tensor([1.0, -1.0]).repeat(8)
    row = values[torch.randperm(16)]
    assert group_thresholds(row.view(1, 16), 16).tolist() == [4.5]  # mean of 1..8
    assert group_thresholds(row.view(1, 16), 8).tolist() == pytest.approx(
        [row[:8].abs().sort().values[:4].mean().item(), row[8:].abs().sort().values[:4].mean().item()]
    )


def test_vote_share_counts_groups_with_fewer_than_n_entries_above_threshold() -> None:
    thresholds = torch.ones(4)
    weight = torch.zeros(4, 8)
    for group, above in enumerate([1, 2, 3, 4]):  # entries above the threshold, per group
        weight[group, :above] = -2.0
    assert vote_share(weight, thresholds, 2, 8) == 0.25
    assert vote_share(weight, thresholds, 4, 8) == 0.75
    assert vote_share(weight, thresholds, 5, 8) == 1.0
    assert vote_share(weight + 1.0 * (weight == 0), thresholds, 2, 8) == 0.25  # equal to it is not above


def test_a_vote_fires_at_75_percent_of_the_groups() -> None:
    state = DominoState(linear_plan([64, 64], 4, 0.25), beta=0.5, variant=NMSEARCH_V1)
    assert not apply_votes(state, [0.75, 0.7499], 0.75, step=10, epoch=0)
    assert state.n.tolist() == [3, 4]
    assert state.log()[["step", "layer", "n", "vote_share"]].values.tolist() == [[10, "a", 3, 0.75]]


def test_n_is_committed_only_at_powers_of_two() -> None:
    state = DominoState(linear_plan([160], 16, 1 / 16), beta=0.5, variant=NMSEARCH_V1)
    committed = []
    for step in range(15):
        state.decrement(0, step=step, epoch=0, share=1.0)
        committed.append(int(state.committed[0]))
    assert committed == [16] * 7 + [8] * 4 + [4] * 2 + [2, 1]
    log = state.log()
    assert log.loc[log.committed, "n"].tolist() == [8, 4, 2, 1]
    assert [c.tolist() for c in state.commits] == [[8], [4], [2], [1]]
    # the objective follows the committed N only: 10 kept weights of 160 at N=1
    assert log["total"].tolist()[:8] == [160.0] * 7 + [80.0]
    assert log["total"].iloc[-1] == 10.0


def test_alphas_mix_remaining_budget_and_cost_share() -> None:
    cost, allotted = np.array([6.0, 2.0, 2.0]), np.array([1.0, 1.0, 3.0])
    alphas = shrink_alphas(cost, allotted, np.array([True, True, True]), beta=0.5)
    # cost share (0.6, 0.2, 0.2); share of the cost above the allotment (5/6, 1/6, 0)
    assert alphas == pytest.approx(3 * (0.5 * np.array([5 / 6, 1 / 6, 0]) + 0.5 * np.array([0.6, 0.2, 0.2])))
    assert alphas.mean() == pytest.approx(1.0)
    assert shrink_alphas(cost, allotted, np.array([True, True, True]), beta=0.0) == pytest.approx([1.8, 0.6, 0.6])
    finished = shrink_alphas(cost, allotted, np.array([True, False, True]), beta=1.0)
    assert finished == pytest.approx([2.0, 0.0, 0.0])  # only layer 0 is above its allotment
    nobody_above = shrink_alphas(cost, cost, np.array([True, True, True]), beta=1.0)
    assert nobody_above == pytest.approx([1.8, 0.6, 0.6])  # falls back to the cost share


def test_every_decision_rebalances_all_layers() -> None:
    state = DominoState(linear_plan([80, 80], 8, 0.2), beta=0.5, variant=NMSEARCH_V1)
    assert state.alphas == pytest.approx([1.0, 1.0])
    for step in range(4):  # layer a: 8 -> 4, committed
        state.decrement(0, step=step, epoch=0, share=1.0)
    # a now holds 40 of 120 kept weights and 30 of the 100 above the N=1 allotment
    expected = 2 * (0.5 * np.array([30, 70]) / 100 + 0.5 * np.array([40, 80]) / 120)
    assert state.alphas == pytest.approx(expected)
    assert state.alphas[0] < 1.0 < state.alphas[1]


def test_erk_allotment_meets_the_budget_and_caps_densities() -> None:
    scores, costs = np.array([1.0, 2.0, 4.0]), np.array([100.0, 100.0, 100.0])
    densities = allot_densities(scores, costs, 150.0, 1 / 8)
    assert densities @ costs == pytest.approx(150.0)
    assert densities / scores == pytest.approx(np.full(3, densities[0]))  # proportional to the scores
    assert allot_densities(scores, costs, 250.0, 1 / 8) == pytest.approx([0.5, 1.0, 1.0])
    assert allot_densities(scores, costs, 37.5, 1 / 8) == pytest.approx([1 / 8] * 3)


def test_search_stops_exactly_when_the_target_is_reached() -> None:
    state = DominoState(hand_plan([[50, 100], [50, 100]], 0.75), beta=0.5, variant=NMSEARCH_V1)
    assert apply_votes(state, [0.9, 1.0], 0.75, step=7, epoch=0)
    assert state.n.tolist() == [2, 1]  # the strongest vote went first and reached the target
    assert state.reached and len(state.decisions) == 1
    with pytest.raises(DominoError, match="already reached"):
        state.decrement(0, step=8, epoch=0, share=1.0)


def test_forced_decisions_go_to_the_layer_closest_to_voting_under_the_most_pressure() -> None:
    state = DominoState(hand_plan([[1, 2], [50, 100]], 0.6), beta=0.5, variant=NMSEARCH_V1)
    force_to_target(state, lambda: [0.9, 0.5], step=99, epoch=3)  # "a" votes more but holds 2% of the cost
    assert state.log()[["step", "layer", "n", "forced", "committed"]].values.tolist() == [[99, "b", 1, True, True]]
    assert state.reached


def test_shrink_gradient_is_alpha_times_the_kept_weights_only() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4))
    layers = _wrap(model, ["0", "2"], 4)
    _set_masks(layers, np.array([2, 3]), 4, "masked")
    model(torch.randn(3, 8)).sum().backward()  # the forward computes the current top-N masks
    first, second = layers
    data = [layer.weight.grad.clone() for layer in layers]
    _add_shrink_gradient(layers, np.array([-0.7, 0.0]), strength=0.1)  # alpha may be negative
    weight = first.weight.detach()
    kept = weight_nm_mask(weight, 2, 4)
    assert torch.equal(data[0] * ~kept, torch.zeros_like(weight))  # survivors only get gradient
    torch.testing.assert_close(first.weight.grad, data[0] - 0.07 * weight * kept)
    assert torch.equal(second.weight.grad, data[1])  # alpha 0: untouched


# -- the reference variant: its formulas ported by hand on fixed numbers -----------------------
def reference_plan(per_n: list[list[float]], target_fraction: float, erk: list[float], macs: list[float]) -> DominoPlan:
    plan = hand_plan(per_n, target_fraction)
    return dataclasses.replace(plan, erk_sparsity=np.array(erk), macs=np.array(macs), stop_tolerance=0.001)


def test_erk_sparsities_as_rigl_computes_them() -> None:
    shapes = [(8, 16, 3, 3), (16, 16, 3, 3), (10, 64)]  # sum/prod: 30/1152, 38/2304, 74/640
    # kept = sum(n - floor(0.75 n)) = 288 + 576 + 160; eps = kept / sum(raw n) = 1024 / (30 + 38 + 74)
    expected = [1 - 1024 / 142 * 30 / 1152, 1 - 1024 / 142 * 38 / 2304, 1 - 1024 / 142 * 74 / 640]
    assert erk_sparsities(shapes, 0.75) == pytest.approx(expected)
    # at 0.5 the linear layer would exceed density 1: it is made dense and eps solved over the others,
    # eps = (576 + 1152 - 320) / (30 + 38)
    assert erk_sparsities(shapes, 0.5) == pytest.approx([1 - 1408 / 68 * 30 / 1152, 1 - 1408 / 68 * 38 / 2304, 0.0])


def test_reference_alphas_mix_erk_gap_and_flops_share_and_can_be_negative() -> None:
    erk, macs = np.array([0.5, 0.8, 0.9]), np.array([100.0, 400.0, 200.0])
    # gaps 0.5, 0.3, 0.15 over 0.5; committed MACs 100, 200, 50 over 200
    alphas = reference_alphas(erk, macs, np.array([16, 8, 4]), 16)
    assert alphas == pytest.approx([0.5 * 1.0 + 0.5 * 0.5, 0.5 * 0.6 + 0.5 * 1.0, 0.5 * 0.3 + 0.5 * 0.25])
    # layer 2 at 1:16 is sparser than its ERK share: gap 0.9 - 0.9375 < 0
    alphas = reference_alphas(erk, macs, np.array([16, 16, 1]), 16, erk_weight=1.0)
    assert alphas == pytest.approx([0.5 / 0.8, 0.8 / 0.8, -0.0375 / 0.8])
    # every gap below 0.01: the ERK term is 0, only the FLOPs share remains
    done = reference_alphas(np.array([0.5, 0.5]), np.array([1.0, 3.0]), np.array([8, 8]), 16)
    assert done == pytest.approx([0.5 / 3, 0.5])


def test_reference_vote_on_fixed_weights() -> None:
    # Four NHWC groups of 16 input channels at one output channel and kernel offsets (0,0)..(1,1).
    groups = torch.stack([
        torch.arange(1.0, 17.0),  # threshold mean(1..8) = 4.5: 12 entries above
        torch.tensor([1.0] * 8 + [10.0] * 8),  # threshold 1: 8 above
        torch.full((16,), 3.0),  # threshold 3: none strictly above
        -torch.arange(1.0, 17.0).flip(0),  # magnitudes 1..16 again, signs do not matter: 12 above
    ])  # fmt: skip
    weight = groups.reshape(1, 2, 2, 16).permute(0, 3, 1, 2)  # (Cout, Cin, kh, kw)
    thresholds = group_thresholds(weight, 16)
    assert thresholds.tolist() == [4.5, 1.0, 3.0, 4.5]
    # the reference: a group votes when fewer than N_intermediate of its entries exceed the threshold
    assert vote_share(weight, thresholds, 12, 16) == 2 / 4  # groups 2 and 3 (8 and 0 < 12)
    assert vote_share(weight, thresholds, 13, 16) == 1.0  # all four have fewer than 13
    state = DominoState(reference_plan([[w * n / 16 for n in range(1, 17)] for w in (64, 64)], 0.5,
                                       [0.5, 0.5], [64.0, 64.0]), beta=0.5)  # fmt: skip
    shares = [vote_share(weight, thresholds, int(n), 16) for n in state.n]
    assert not apply_votes(state, shares, 0.75, step=0, epoch=0)
    assert state.n.tolist() == [15, 15]  # both voted at 1.0 >= 0.75


def test_reference_state_rebalances_on_commits_only_and_votes_in_module_order() -> None:
    per_n = [[w * n / 8 for n in range(1, 9)] for w in (80, 160)]
    state = DominoState(reference_plan(per_n, 0.5, erk=[0.4, 0.6], macs=[100.0, 50.0]), beta=0.5)
    start = reference_alphas(np.array([0.4, 0.6]), np.array([100.0, 50.0]), np.array([8, 8]), 8)
    assert state.alphas == pytest.approx(start)
    assert not apply_votes(state, [0.8, 1.0], 0.75, step=0, epoch=0)  # 8 -> 7: no commit
    assert state.log()["layer"].tolist() == ["a", "b"]  # module order, not the strongest vote first
    assert state.alphas == pytest.approx(start)
    for step in (100, 200):  # 7 -> 6 -> 5
        apply_votes(state, [0.0, 1.0], 0.75, step=step, epoch=0)
    assert state.alphas == pytest.approx(start)
    apply_votes(state, [0.0, 1.0], 0.75, step=300, epoch=0)  # b: 5 -> 4, committed
    assert state.committed.tolist() == [8, 4]
    expected = reference_alphas(np.array([0.4, 0.6]), np.array([100.0, 50.0]), np.array([8, 4]), 8)
    assert state.alphas == pytest.approx(expected)


def test_reference_stops_at_target_minus_one_per_mille() -> None:
    per_n = [[w * n / 2 for n in (1, 2)] for w in (1000, 1000, 4)]
    # the target fraction 0.5001 is met within 0.001 by 1:2, 1:2 and 2:2 (1004 / 2004 = 0.50100)
    state = DominoState(reference_plan(per_n, 0.5001, [0.5] * 3, [1.0] * 3), beta=0.5)
    assert not apply_votes(state, [1.0, 0.0, 0.0], 0.75, step=0, epoch=0)
    assert apply_votes(state, [0.0, 1.0, 0.0], 0.75, step=100, epoch=0)
    assert state.n.tolist() == [1, 1, 2]
    strict = DominoState(dataclasses.replace(state.plan, stop_tolerance=0.0), beta=0.5)
    strict.decrement(0, step=0, epoch=0, share=1.0)
    assert not strict.decrement(1, step=0, epoch=0, share=1.0)


def test_reference_settings_and_penalty_schedule() -> None:
    strategy = DominoStrategy()
    assert strategy.variant == "reference"
    settings = {name: strategy.setting(name) for name in ("gradient", "vote_interval", "shrink_interval")}
    assert settings == {"gradient": "masked", "vote_interval": 100, "shrink_interval": 5}
    assert [strategy.shrink_strength(step) for step in (0, 29998, 29999, 39999, 79999)] == [
        0.1, 0.1, 0.2, 0.4, 6.4,
    ]  # fmt: skip
    v1 = DominoStrategy(variant="nmsearch_v1")
    assert (v1.setting("gradient"), v1.setting("vote_interval"), v1.shrink_strength(10**6)) == ("ste", 50, 1.0)
    assert DominoStrategy(vote_interval=7).setting("vote_interval") == 7


# -- planning and bad input --------------------------------------------------------------------
def test_unreachable_target_is_one_line_before_training(tmp_path: Path) -> None:
    evaluator = AccuracyEvaluator(Trainer(NarrowHeadTask(), cache_dir=tmp_path, progress=False))
    strategy = DominoStrategy(m=8, target="params", target_value=0.9)
    with pytest.raises(UnreachableTargetError) as error:
        strategy.search(evaluator.space, evaluator)
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, NMSearchError)
    weights = 16 * 12 * 9
    best = weights * 7 / 8 / (weights + 48)  # the 12-feature head stays dense
    assert f"at 1:8 on every eligible layer it is {best:.4f}" in message
    assert "1 searchable layer(s) stay dense" in message
    assert not list(tmp_path.rglob("*.pt"))  # nothing was trained


def test_a_target_the_dense_model_already_meets_is_refused() -> None:
    curves = CostCurves(np.array([[1.0, 2.0], [1.0, 1.5]]), 0.0, 4.0)  # at N=M: 3.5 of the dense 4
    with pytest.raises(DominoError, match=r"latency_ms 0.9 is already met with every layer at 2:2 \(0.8750"):
        _check_reachable(curves, 0.9, "latency_ms", 0.9, 2, {})
    _check_reachable(curves, 0.8, "latency_ms", 0.8, 2, {})  # reachable: 2 of 4 at N=1


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"target": "flops"}, "unknown target 'flops'"),
        ({"target_value": 1.2}, r"target_value for 'params' is a sparsity in \(0, 1\)"),
        ({"target": "macs", "target_value": 0.0}, "a fraction of the dense total"),
        ({"gradient": "srste"}, "gradient must be one of ste, masked"),
        ({"vote_interval": 0}, "vote_interval must be >= 1"),
        ({"variant": "paper"}, "variant = 'paper' is not one of reference, nmsearch_v1"),
        ({"stop_tolerance": -0.1}, r"stop_tolerance must be in \[0, 1\)"),
        ({"shrink_double_at": [0]}, "shrink_double_at lists step counts >= 1"),
        ({"m": 64}, "M must be at most 32"),
        ({"target": "latency_ms", "target_value": 0.5}, "needs a hardware cost model: set hardware="),
    ],
)
def test_bad_configuration(synthetic: AccuracyEvaluator, config: dict, message: str) -> None:
    with pytest.raises(NMSearchError, match=message):
        DominoStrategy(**config).plan(synthetic.space, synthetic)


def test_latency_the_layers_cannot_shed_is_unreachable(synthetic: AccuracyEvaluator) -> None:
    strategy = DominoStrategy(target="latency_ms", target_value=0.5, hardware="a100")
    with pytest.raises(UnreachableTargetError, match=r"latency_ms at 0.5 of the dense total is unreachable"):
        strategy.plan(synthetic.space)


def test_cost_model_curves_come_from_the_hardware_model(synthetic: AccuracyEvaluator) -> None:
    space = synthetic.space
    # On the A100 the synthetic model's tiny GEMMs run dense whatever N (the 2:4 kernel loses), so
    # they read dense bytes: a bytes target is out of reach, and says so.
    with pytest.raises(UnreachableTargetError, match=r"bytes_mb at 0\.9 of the dense total is unreachable"):
        DominoStrategy(m=8, target="bytes_mb", target_value=0.9, hardware="a100", batch_size=4).plan(space)
    # The hypothetical any-N:M accelerator runs every N at M/N: the curves follow its model.
    plan = DominoStrategy(m=8, target="bytes_mb", target_value=0.9, hardware="ideal_nm", batch_size=4).plan(space)
    cost_model = HardwareCostModel.from_profile("ideal_nm", batch_size=4)
    wide = domino_space(space, 8)
    for n in (1, 2, 5):
        report = cost_model.evaluate(wide, Scheme.uniform(wide, "weights", n, 8))
        per_layer = report.layers.set_index("layer")["bytes_mb"]
        assert plan.curves.per_n[:, n - 1] == pytest.approx(per_layer[list(plan.layers)].to_numpy())
        assert plan.curves.total(np.full(len(plan.layers), n)) == pytest.approx(report.totals["bytes_mb"])
    assert plan.curves.dense_total == pytest.approx(report.dense_totals["bytes_mb"])
    assert plan.allotted == pytest.approx(plan.curves.per_n[:, 0])  # remaining = what N=1 would still save
    assert plan.hardware == "ideal-NM"


# -- end to end --------------------------------------------------------------------------------
def test_search_on_synthetic_writes_scheme_and_decision_log(synthetic: AccuracyEvaluator, tmp_path: Path) -> None:
    space = synthetic.space
    result = DominoStrategy(m=8, target="params", target_value=0.5, **FAST).search(space, synthetic, run_dir=tmp_path)
    assert result.strategy == "domino" and result.trials["state"].tolist() == ["COMPLETE"]
    assert 0 < result.trials["accuracy"].iloc[0] <= 1
    scheme = result.schemes[result.metadata["final_trial"]]
    assert scheme.fingerprint == space.fingerprint
    assert scheme["features.0"].target == "dense"  # not searchable: stays dense
    domino = scheme.to_domino()
    assert domino == result.metadata["domino"] and set(domino) <= set(space.searchable)  # N=M is dense: unlisted
    assert all(m == 8 and n & (n - 1) == 0 for n, m in domino.values())

    weights = {name: np.prod(space.info(name).weight_shape) for name in space.searchable}
    kept = sum(weights[name] * domino.get(name, [8, 8])[0] / 8 for name in weights)
    sparsity = 1 - kept / sum(weights.values())
    assert result.metadata["objective"] == pytest.approx(sparsity) and sparsity >= 0.5

    log = result.tables["domino_log"]
    assert list(log.columns[:4]) == ["step", "epoch", "layer", "n"]
    assert log["committed"].iloc[-1] and log["objective"].iloc[-1] == pytest.approx(sparsity)
    assert (log["objective"].iloc[:-1] < 0.5).all()  # no decision after the target was reached
    assert log["step"].iloc[-1] == result.metadata["steps"] and not log["forced"].any()
    # reference: the first vote is at step 0 (after its backward pass), each vote in module order
    assert log["step"].iloc[0] == 0 and result.metadata["variant"] == "reference"
    order = {name: index for index, name in enumerate(space.searchable)}
    assert all(group["layer"].map(order).is_monotonic_increasing for _, group in log.groupby("step"))
    for _, decisions in log.groupby("layer"):
        assert (decisions["n"].diff().dropna() == -1).all()  # one step of N per decision

    assert not (tmp_path / "trials.csv").exists()  # result files are the entry point's to write
    result.save(tmp_path)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "domino_log.csv"), log, check_dtype=False)
    saved = Scheme.load(tmp_path / "domino_scheme.json")
    assert saved == scheme and saved.metrics["domino_params"] == pytest.approx(sparsity)
    assert json.loads((tmp_path / "domino.json").read_text()) == domino
    assert Scheme.from_domino(domino) == Scheme.from_choices({n: o for n, o in scheme if o.weight})


def test_layers_m_does_not_divide_stay_dense_and_are_reported(
    narrow: AccuracyEvaluator, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    def counted(weight: torch.Tensor, m: int) -> torch.Tensor:
        calls.append(weight.shape)
        return group_thresholds(weight, m)

    monkeypatch.setattr(domino_module, "group_thresholds", counted)
    result = DominoStrategy(m=8, target="params", target_value=0.5, **FAST).search(narrow.space, narrow)
    assert len(calls) == 1 and result.metadata["steps"] > 4  # set once, from the dense weights of layer "3"
    assert "leaves layer '8' dense: 12 grouped input channels are not divisible by M=8" in caplog.text
    assert result.metadata["ineligible_layers"] == {"8": "12 grouped input channels are not divisible by M=8"}
    scheme = result.schemes[result.metadata["final_trial"]]
    assert scheme["8"].target == "dense" and scheme["3"].weight.m == 8
    assert "8" not in set(result.tables["domino_log"]["layer"])


def test_out_of_epochs_forces_the_remaining_decisions(synthetic: AccuracyEvaluator) -> None:
    strategy = DominoStrategy(m=8, target="params", target_value=0.8, max_epochs=1, **(FAST | {"shrink_lambda": 0.0}))
    result = strategy.search(synthetic.space, synthetic)
    log = result.tables["domino_log"]
    assert log["forced"].any() and result.metadata["forced_decisions"] == int(log["forced"].sum())
    assert log.loc[log.forced, "committed"].all()  # forced decisions jump to the next power of two
    assert result.metadata["objective"] >= 0.8 and result.metadata["epochs"] == 1


def test_cost_model_target_through_a_composite_evaluator(cache_dir: Path) -> None:
    # ideal_nm: on the shipped GPUs the synthetic model's tiny GEMMs run dense (no bytes to save).
    evaluator = CompositeEvaluator.for_task(get_task("synthetic"), "ideal_nm", batch_size=4, cache_dir=cache_dir)
    accuracy, cost = evaluator.parts
    probe = DominoStrategy(m=8, target="bytes_mb", target_value=0.99).plan(accuracy.space, evaluator)
    best = probe.curves.fraction(np.ones(len(probe.layers), dtype=np.int64))
    target = (best + 1) / 2
    strategy = DominoStrategy(m=8, target="bytes_mb", target_value=target, score_intermediate=True, **FAST)
    result = strategy.search(accuracy.space, evaluator)
    assert result.metadata["hardware"] == "ideal-NM" == result.schemes[0].hardware
    trials = result.trials
    assert len(trials) == len(result.tables["domino_log"].query("committed"))  # every commit is scored
    assert (trials["state"] == "COMPLETE").all() and trials["accuracy"].notna().all()
    dense_bytes = cost.evaluate(Scheme.dense(accuracy.space)).values["bytes_mb"]
    fractions = trials["bytes_mb"] / dense_bytes
    assert fractions.iloc[-1] <= target + 1e-9 and (fractions.iloc[:-1] > target).all()
    assert result.metadata["fraction"] == pytest.approx(fractions.iloc[-1])


class _Interrupted(Exception):
    """Stands for a killed process: raised right after the k-th checkpoint is on disk."""


@pytest.mark.parametrize("variant", ["reference", "nmsearch_v1"])
def test_an_interrupted_search_resumed_from_its_checkpoint_equals_an_uninterrupted_one(
    synthetic: AccuracyEvaluator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    variant: str,
) -> None:
    config = {"m": 8, "target": "params", "target_value": 0.5, "variant": variant, "gradient": "ste", **FAST}
    whole = DominoStrategy(**config).search(synthetic.space, synthetic, run_dir=tmp_path / "whole")
    votes = len(whole.tables["domino_log"]["step"].unique())
    assert votes >= 3  # so the interruption falls between decisions

    saved = []

    def save_then_die(path: Path, state: dict) -> Path:
        written = base_module.save_checkpoint(path, state)
        saved.append(state["progress"]["step"])
        if len(saved) == 2:
            raise _Interrupted
        return written

    monkeypatch.setattr(domino_module, "save_checkpoint", save_then_die)
    with pytest.raises(_Interrupted):
        DominoStrategy(**config).search(synthetic.space, synthetic, run_dir=tmp_path / "cut")
    monkeypatch.undo()
    checkpoint = load_checkpoint(tmp_path / "cut" / CHECKPOINT)
    assert checkpoint is not None and checkpoint["progress"]["step"] == saved[-1] > 1

    with caplog.at_level("INFO", logger="strategies.domino"):
        resumed = DominoStrategy(**config).search(synthetic.space, synthetic, run_dir=tmp_path / "cut")
    assert f"DominoSearch resumes at step {saved[-1]}" in caplog.text  # not a fresh start
    pd.testing.assert_frame_equal(resumed.tables["domino_log"], whole.tables["domino_log"])
    assert resumed.metadata["domino"] == whole.metadata["domino"]
    assert resumed.metadata["steps"] == whole.metadata["steps"]
    pd.testing.assert_frame_equal(resumed.trials, whole.trials.assign(duration_s=resumed.trials["duration_s"]))


def test_state_dict_round_trips_and_resumes_without_a_run_dir(synthetic: AccuracyEvaluator, tmp_path: Path) -> None:
    config = {"m": 8, "target": "params", "target_value": 0.5, **FAST}
    whole = DominoStrategy(**config).search(synthetic.space, synthetic)
    first = DominoStrategy(**config)
    first.search(synthetic.space, synthetic, run_dir=tmp_path)
    state = first.state_dict()
    assert state["progress"]["step"] > 0 and state["strategy"] == "domino"
    loaded = load_checkpoint(save_checkpoint(tmp_path / "state.pt", state))
    assert loaded is not None and loaded["progress"]["domino"] == state["progress"]["domino"]
    again = DominoStrategy(**config)
    again.load_state_dict(loaded)  # the last vote's state: resuming it redoes only the end of the run
    pd.testing.assert_frame_equal(
        again.search(synthetic.space, synthetic).tables["domino_log"], whole.tables["domino_log"]
    )
    with pytest.raises(StrategyConfigError, match="another configuration"):
        DominoStrategy(**(config | {"seed": 1})).load_state_dict(loaded)


def test_a_corrupt_checkpoint_restarts_with_one_warning(
    synthetic: AccuracyEvaluator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    config = {"m": 8, "target": "params", "target_value": 0.5, **FAST}
    result = DominoStrategy(**config).search(synthetic.space, synthetic, run_dir=tmp_path)
    warnings = [r for r in caplog.records if "checkpoint" in r.getMessage() and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "starting this run over" in warnings[0].getMessage()
    assert result.tables["domino_log"]["step"].iloc[0] == 0  # from the start
    assert load_checkpoint(tmp_path / CHECKPOINT) is not None  # and checkpointing again


# -- the distillation loss (train_loss=distill): a label-free pre-trained model ------------------
@pytest.fixture(scope="module")
def tiny_encoder() -> tuple[SearchSpace, CompositeEvaluator]:
    pytest.importorskip("transformers")
    task = TinyEncoderTask(train_batches=8)
    model = task.build_model()
    space = SearchSpace.from_model(model, task.example_inputs(), targets=["weights"], ratios=["2:4"])
    config = FidelityConfig(oneshot="magnitude", metric="cosine")
    fidelity = FidelityEvaluator.for_task(task, space, config, model=model)
    return space, CompositeEvaluator(fidelity, CostEvaluator(space, HardwareCostModel.from_profile("a100")))


def test_distillation_runs_domino_on_a_label_free_model(tiny_encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    space, evaluator = tiny_encoder
    losses = []
    real = domino_module.train_one_epoch

    def recorded(*args, **kwargs):
        stats = real(*args, **kwargs)
        losses.append(stats.loss)
        return stats

    monkeypatch.setattr(domino_module, "train_one_epoch", recorded)
    strategy = DominoStrategy(m=8, target="params", target_value=0.5, lr=0.05, max_epochs=3, **FAST)
    result = strategy.search(space, evaluator)  # train_loss=auto: no labels, so distill
    assert result.metadata["train_loss"] == "distill" and losses and all(loss > 0 for loss in losses)
    scheme = result.schemes[result.metadata["final_trial"]]
    domino_space(space, 8).check(scheme)
    assert result.metadata["objective"] >= 0.5
    assert result.trials["state"].tolist() == ["COMPLETE"] and 0 < result.trials["accuracy"].iloc[0] <= 1
    with pytest.raises(NMSearchError, match=r"^train_loss = 'task' trains on labels, but task 'tiny_encoder' has none"):
        DominoStrategy(m=8, target="params", target_value=0.5, train_loss="task").search(space, evaluator)


def test_distillation_on_a_labelled_task(synthetic: AccuracyEvaluator) -> None:
    strategy = DominoStrategy(m=8, target="params", target_value=0.5, train_loss="distill", **FAST)
    result = strategy.search(synthetic.space, synthetic)
    assert result.metadata["train_loss"] == "distill" and result.metadata["objective"] >= 0.5
    assert result.trials["state"].tolist() == ["COMPLETE"]
