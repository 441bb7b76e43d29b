import json
import math
import os
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import strategies.gumbel as gumbel_module
from evaluators import AccuracyEvaluator, CompositeEvaluator, CostEvaluator, HardwareCostModel, Trainer, find_part
from evaluators.fidelity import FidelityConfig, FidelityEvaluator
from experiments.tasks import get_task
from search_space import NMSearchError, Option, RecipeConfig, RowPattern, SearchSpace, nm_mask, sparsify
from strategies import SearchResult
from strategies.base import load_checkpoint, save_checkpoint
from strategies.gumbel import GumbelLayer, GumbelStrategy, architecture_loss, build_supernet, temperature
from tests.strategies import gumbel_worker
from tests.strategies.faults import finish, lines, wait_for_lines
from tests.strategies.toy import TinyEncoderTask

pytestmark = pytest.mark.usefixtures("one_thread")


def test_temperature_schedules() -> None:
    assert temperature(0, 10, 5.0, 0.956, "exponential", 0.5) == 5.0
    assert temperature(3, 10, 5.0, 0.956, "exponential", 0.5) == pytest.approx(5.0 * 0.956**3)
    assert temperature(0, 10, 5.0, 0.956, "linear", 0.5) == 5.0
    assert temperature(9, 10, 5.0, 0.956, "linear", 0.5) == pytest.approx(0.5)
    assert temperature(3, 10, 5.0, 0.956, "linear", 0.5) == pytest.approx(5.0 - 4.5 * 3 / 9)


def test_architecture_loss_forms() -> None:
    ce, ratio = torch.tensor(0.5), torch.tensor(0.6, requires_grad=True)
    kwargs = {"alpha": 0.2, "beta": 0.6, "budget_weight": 10.0}

    def value(form: str, setting: float) -> float:
        return architecture_loss(ce, ratio, form, setting, **kwargs).item()

    assert value("additive", 2.0) == pytest.approx(0.5 + 1.2)
    assert value("fbnet", 0.0) == pytest.approx(0.5 * 0.2 * math.log(60) ** 0.6)
    assert value("budget", 0.7) == pytest.approx(0.5)  # under budget
    assert value("budget", 0.5) == pytest.approx(0.5 + 10 * 0.01)
    architecture_loss(ce, ratio, "additive", 2.0, **kwargs).backward()
    assert float(ratio.grad) == pytest.approx(2.0)


def _layer(module: nn.Module, options: list[str]) -> GumbelLayer:
    logits = torch.zeros(len(options), requires_grad=True)
    return GumbelLayer(sparsify(module, name="l"), [Option.parse(o) for o in options], logits)


@pytest.mark.parametrize("make,shape", [(lambda: nn.Conv2d(16, 8, 3, padding=1), (2, 16, 5, 5)),
                                        (lambda: nn.Linear(16, 8), (3, 16))])  # fmt: skip
def test_a_sampled_option_computes_exactly_that_option(make, shape, monkeypatch) -> None:
    options = ["dense", "w2:4", "w1:8", "a2:4", "w2:4+a2:4", "a1:8"]
    module = make()
    layer = _layer(module, options)
    x = torch.randn(shape)
    for index, name in enumerate(options):
        gates = torch.nn.functional.one_hot(torch.tensor(index), len(options)).float()
        monkeypatch.setattr(layer, "sample", lambda gates=gates: gates)
        option = Option.parse(name)
        expected = sparsify(module, option.weight, option.activation, name="l")
        expected.mask_state = expected.mask_state.__class__(estimator="ste")
        torch.testing.assert_close(layer(x), expected(x))


def test_one_gemm_per_active_activation_group_and_logits_outside_parameters(monkeypatch) -> None:
    options = ["dense", "w2:4", "w1:4", "w2:8", "a2:4", "w2:4+a2:4", "a1:4", "a2:8"]
    layer = _layer(nn.Conv2d(16, 8, 3), options)
    assert len(layer.groups) == 4  # dense, a2:4, a1:4, a2:8 activation choices
    assert all(p is not layer.logits for p in layer.parameters())
    calls = []
    original = GumbelLayer._gemm
    monkeypatch.setattr(GumbelLayer, "_gemm", lambda self, x, w: calls.append(1) or original(self, x, w))
    x = torch.randn(2, 16, 6, 6)
    layer(x)
    assert len(calls) == 1  # a weight step computes the sampled option alone
    calls.clear()
    gradients = []
    weight_gradient = GumbelLayer._weight_gradient
    monkeypatch.setattr(
        GumbelLayer, "_weight_gradient", lambda self, *a: gradients.append(1) or weight_gradient(self, *a)
    )
    layer.train_logits, layer.active_groups = True, None
    layer(x).sum().backward()
    # a logit step: all groups, never one per option (8); the unsampled groups (all gates 0) only
    # run the weight-gradient GEMM their gates need, in backward
    assert (len(calls), len(gradients)) == (1, 3)
    calls.clear()
    gradients.clear()
    layer.active_groups = 2
    layer(x).sum().backward()
    assert (len(calls), len(gradients)) == (1, 1)


@pytest.mark.parametrize("chosen", [1, 2])
def test_gradients_reach_every_logit_and_only_the_sampled_path_trains_the_weights(chosen, monkeypatch) -> None:
    options = ["dense", "w2:4", "a2:4", "w1:8+a1:8"]
    conv = nn.Conv2d(16, 8, 3)
    layer = _layer(conv, options)
    layer.active_groups, layer.train_logits = None, True

    def straight_through() -> torch.Tensor:  # hard one-hot forward, softmax gradient (as gumbel_softmax)
        soft = layer.logits.softmax(-1)
        hard = torch.nn.functional.one_hot(torch.tensor(chosen), len(options)).float()
        return hard + soft - soft.detach()

    monkeypatch.setattr(layer, "sample", straight_through)
    x = torch.randn(2, 16, 6, 6)
    layer(x).pow(2).sum().backward()
    assert (layer.logits.grad != 0).all()  # every option's logit learns, not only the sampled one
    reference = nn.Conv2d(16, 8, 3)
    reference.load_state_dict(conv.state_dict())
    option = Option.parse(options[chosen])
    sparse = sparsify(reference, option.weight, option.activation, name="r")
    sparse.mask_state = sparse.mask_state.__class__(estimator="ste")
    sparse(x).pow(2).sum().backward()
    torch.testing.assert_close(conv.weight.grad, reference.weight.grad)  # STE through the sampled option only
    torch.testing.assert_close(conv.bias.grad, reference.bias.grad)
    conv.zero_grad()
    layer.train_logits = False  # a weight step: the sampled option alone, the same weight gradient
    layer(x).pow(2).sum().backward()
    torch.testing.assert_close(conv.weight.grad, reference.weight.grad)
    torch.testing.assert_close(conv.bias.grad, reference.bias.grad)


def _direct_step(layer: GumbelLayer, x: torch.Tensor) -> torch.Tensor:
    """A supernet forward written out directly (torch.multinomial, every computed group's GEMM, the control
    variate as an explicit zero-valued term): the reference for the fused forward's values and gradients."""
    logits = layer.logits if layer.train_logits else layer.logits.detach()
    if layer.estimator == "proxylessnas":
        p = logits.softmax(-1)
        gates = torch.nn.functional.one_hot(torch.multinomial(p.detach(), 1)[0], len(p)).to(p.dtype) + p - p.detach()
    else:
        soft = ((logits - torch.empty_like(logits).exponential_().log()) / layer.tau).softmax(-1)
        gates = torch.nn.functional.one_hot(soft.detach().argmax(), len(soft)).to(soft.dtype) + soft - soft.detach()
    chosen = int(gates.detach().argmax())
    first = next(g for g in layer.groups if chosen in g.members)
    computed = [(group, 1.0) for group in layer.groups]
    if layer.active_groups is not None and layer.active_groups < len(layer.groups):
        others = [g for g in layer.groups if g is not first]
        picks = torch.randperm(len(others))[: layer.active_groups - 1].tolist()
        computed = [(first, 1.0), *((others[i], len(others) / (layer.active_groups - 1)) for i in picks)]
    sparse, weight = layer.layer, layer.layer.weight
    out = None
    for group, scale in computed:
        member = gates[group.members] * scale
        masks = [torch.ones_like(weight) if w is None else nm_mask(weight.abs(), w.n, w.m, dim=1).float()
                 for w in group.weights]  # fmt: skip
        soft_mask = sum(g * m for g, m in zip(member, masks, strict=True))
        share = member.sum()
        effective = share * weight + weight.detach() * (soft_mask - share)
        mask = sparse.input_mask(x, group.activation) if group.activation else None
        rows = isinstance(group.activation, RowPattern)  # a mask of the output positions
        inputs = x * mask if mask is not None and not rows else x
        y = (
            sparse._conv_forward(inputs, effective, None)
            if isinstance(sparse, nn.Conv2d)
            else F.linear(inputs, effective)
        )
        if sparse.bias is not None:
            y = y + share * (sparse.bias.view(1, -1, 1, 1) if isinstance(sparse, nn.Conv2d) else sparse.bias)
        if rows and mask is not None:
            y = y * mask
        out = y if out is None else out + y
    if len(computed) < len(layer.groups):
        coefficients = torch.ones(len(layer.options))
        for group, scale in computed:
            coefficients[group.members] = 1.0 - scale
        out = out + ((gates - gates.detach()) * coefficients).sum() * out.detach()
    return out


@pytest.mark.parametrize("estimator", ["proxylessnas", "fbnet"])
@pytest.mark.parametrize("active", [2, None])
@pytest.mark.parametrize("train_weights", [False, True])
@pytest.mark.parametrize("make,shape", [(lambda: nn.Conv2d(16, 8, 3, padding=1, padding_mode="reflect"), (4, 16, 5, 5)),
                                        (lambda: nn.Conv2d(16, 8, 3, stride=2, bias=False), (4, 16, 7, 7)),
                                        (lambda: nn.Linear(16, 6), (3, 5, 16))])  # fmt: skip
def test_logit_step_equals_a_direct_computation(make, shape, estimator, active, train_weights) -> None:
    module = make()
    options = ["dense", "w2:4", "w1:8", "a2:4", "w2:4+a2:4", "a1:8", "w1:4+a1:4"]
    options += ["r0.3", "w2:4+r0.3"] if isinstance(module, nn.Conv2d) else []  # rows: computed in full
    torch.manual_seed(0)
    layer = _layer(module, options)
    layer.estimator, layer.active_groups, layer.train_logits, layer.tau = estimator, active, True, 0.7
    layer.layer.weight.requires_grad_(train_weights)
    with torch.no_grad():
        layer.logits.copy_(torch.randn(len(options)))
    params = [layer.logits] + ([layer.layer.weight] if train_weights else [])
    for seed in range(4):  # several draws: sampled groups, others, every step path
        results = []
        for forward in (layer, lambda x: _direct_step(layer, x)):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), requires_grad=True)
            torch.manual_seed(100 + seed)
            out = forward(x)
            probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
            loss = (out * probe + out.pow(2)).sum()
            results.append((out.detach(), *torch.autograd.grad(loss, [x, *params])))
        for fused, direct in zip(*results, strict=True):
            # float rounding only: sums in another order (the GEMMs' outputs and input gradients are equal)
            torch.testing.assert_close(fused, direct, rtol=1e-5, atol=1e-5 * float(direct.abs().max()))
        assert results[0][1].abs().sum() > 0  # the input gradient is exercised


def _logit_grads(layer: GumbelLayer, x: torch.Tensor, target: torch.Tensor, cost: torch.Tensor, seed: int):
    """The cross-entropy and the cost term's logit gradients for one draw (``seed``)."""
    torch.manual_seed(seed)
    ce = torch.nn.functional.cross_entropy(layer(x), target)
    (ce_grad,) = torch.autograd.grad(ce, layer.logits, retain_graph=True)
    (cost_grad,) = torch.autograd.grad(layer.cost_gates() @ cost, layer.logits)
    return ce_grad, cost_grad


@pytest.mark.parametrize("estimator", ["fbnet", "proxylessnas"])
def test_loss_and_cost_gradients_keep_their_ratio_across_tau(estimator: str) -> None:
    torch.manual_seed(0)
    layer = _layer(nn.Linear(16, 4), ["dense", "w1:4"])
    layer.estimator, layer.train_logits = estimator, True
    with torch.no_grad():
        layer.logits.copy_(torch.tensor([0.3, -0.2]))
    x, target, cost = torch.randn(8, 16), torch.randint(0, 4, (8,)), torch.tensor([1.0, 0.4])
    ratios, mixed = [], []
    for tau in (5.0, 2.0, 0.5, 0.1):
        layer.tau = tau
        ce_grad, cost_grad = _logit_grads(layer, x, target, cost, seed=1)  # the same noise at every tau
        ratios.append(float(ce_grad.norm() / cost_grad.norm()))
        through_p = torch.autograd.grad(layer.logits.softmax(-1) @ cost, layer.logits)[0]
        mixed.append(float(ce_grad.norm() / through_p.norm()))  # the cost through p, the loss relaxed
    assert max(ratios) / min(ratios) == pytest.approx(1.0, abs=1e-4)
    if estimator == "fbnet":  # what a cost term outside the relaxation does: the ratio drifts with tau
        assert max(mixed) / min(mixed) > 2


def test_active_groups_logit_gradient_is_unbiased() -> None:
    torch.manual_seed(0)
    options = ["dense", "w2:4", "a2:4", "w2:4+a2:4", "a1:4", "w1:4+a1:4", "a2:8"]
    layer = _layer(nn.Linear(16, 6), options)  # 4 activation groups: dense, a2:4, a1:4, a2:8
    layer.train_logits = True
    with torch.no_grad():
        layer.logits.copy_(torch.randn(len(options)))
    x, target = torch.randn(8, 16), torch.randint(0, 6, (8,))
    noise = -torch.empty(len(options)).exponential_().log()  # one Gumbel sample, held fixed

    def fixed_sample() -> torch.Tensor:
        soft = (layer.logits + noise).softmax(-1)
        hard = torch.nn.functional.one_hot(soft.detach().argmax(), len(options)).float()
        return hard + soft - soft.detach()

    layer.sample = fixed_sample

    def grad(active: int | None) -> torch.Tensor:
        layer.active_groups = active
        (value,) = torch.autograd.grad(torch.nn.functional.cross_entropy(layer(x), target), layer.logits)
        return value

    exact = grad(None)
    draws = torch.stack([grad(2) for _ in range(600)])
    error = float((draws.mean(0) - exact).norm() / exact.norm())
    assert error < 0.05
    assert float((draws[0] - exact).norm() / exact.norm()) > 0.05  # one draw alone is not the exact gradient


def test_soft_sampling_depends_on_tau_and_hard_sampling_does_not() -> None:
    torch.manual_seed(0)
    layer = _layer(nn.Linear(16, 4), ["dense", "w2:4", "w1:4", "a2:4"])
    layer.estimator, layer.active_groups = "fbnet", None
    x = torch.randn(3, 16)

    def forward(sampling: str, tau: float) -> torch.Tensor:
        layer.sampling, layer.tau = sampling, tau
        torch.manual_seed(7)
        with torch.no_grad():
            return layer(x)

    hard = [forward("hard", tau) for tau in (5.0, 1.0, 0.1)]
    assert all(torch.equal(hard[0], other) for other in hard[1:])  # argmax(logits + g): tau plays no part
    soft = {tau: forward("soft", tau) for tau in (5.0, 1.0, 1e-3)}
    assert (soft[5.0] - soft[1.0]).abs().max() > 1e-2  # the mixture sharpens as tau falls
    torch.testing.assert_close(soft[1e-3], hard[0])  # and tends to the hard sample


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    # batch 8: 32 training batches per epoch, so 6 architecture steps per epoch
    trainer = Trainer(get_task("synthetic", schedule={"batch_size": 8}), cache_dir=cache, progress=False)
    accuracy = AccuracyEvaluator(trainer)
    cost = CostEvaluator(accuracy.space, HardwareCostModel.from_profile("a100"), metrics=("bytes_mb",))
    return accuracy.space, CompositeEvaluator(accuracy, cost)


def test_search_sweeps_lambda_and_returns_scored_schemes(synthetic, tmp_path: Path) -> None:
    space, evaluator = synthetic
    strategy = GumbelStrategy(epochs=4, lambdas=(0.0, 5.0), arch_lr=0.1, cost_metric="bytes_mb", samples=2)
    result = strategy.search(space, evaluator, run_dir=tmp_path)
    assert set(result.trials["info.setting"]) == {0.0, 5.0}
    assert set(result.trials["info.pick"]) >= {"argmax"}
    assert {"accuracy", "bytes_mb"} <= set(result.trials.columns)
    log = result.tables["gumbel_log"]
    assert list(log.groupby("setting").size()) == [4, 4]
    assert log.loc[log.epoch == 0, "arch_loss"].isna().all()  # warm-up epoch trains weights only
    assert log["tau"].iloc[1] == pytest.approx(5.0 * 0.956)
    final = log[log.epoch == 3].set_index("setting")["expected_cost_ratio"]
    assert final[5.0] < final[0.0] - 0.05  # a cost weight pulls the architecture to cheaper options
    probs = result.tables["gumbel_probs"]
    assert probs.groupby(["setting", "epoch", "layer"])["probability"].sum().round(6).eq(1.0).all()
    result.save(tmp_path / "out")
    assert SearchResult.load(tmp_path / "out").tables["gumbel_log"].shape == log.shape


def test_fbnet_soft_mixture_search_runs_and_prices_the_relaxed_sample(synthetic) -> None:
    space, evaluator = synthetic
    # ideal_nm: every pattern saves bytes, so cost pressure must lower the expected cost (on a100 the
    # synthetic task's tiny GEMMs run dense whatever the pattern, and no option is cheaper than dense)
    accuracy = find_part(evaluator, AccuracyEvaluator)
    cost = CostEvaluator(space, HardwareCostModel.from_profile("ideal_nm"), metrics=("bytes_mb",))
    evaluator = CompositeEvaluator(accuracy, cost)
    strategy = GumbelStrategy(epochs=2, lambdas=(5.0,), arch_lr=0.1, cost_metric="bytes_mb", warmup_fraction=0.0,
                              estimator="fbnet", sampling="soft", active_groups=None, tau_start=1.0)  # fmt: skip
    result = strategy.search(space, evaluator)
    log = result.tables["gumbel_log"]
    assert log["arch_loss"].notna().all() and log["expected_cost_ratio"].iloc[-1] < 1.0
    assert result.metadata["config"]["estimator"] == "fbnet"


def test_interrupted_search_resumes_from_its_last_epoch(synthetic, tmp_path: Path, monkeypatch) -> None:
    space, evaluator = synthetic
    strategy = GumbelStrategy(epochs=3, lambdas=(1.0,), arch_lr=0.1, cost_metric="bytes_mb", warmup_fraction=0.0)
    clean = strategy.search(space, evaluator).tables["gumbel_probs"]

    original, calls = gumbel_module.train_one_epoch, []

    def crash_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # epochs 0 and 1 (weights + logits) finished and checkpointed
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(gumbel_module, "train_one_epoch", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        strategy.search(space, evaluator, run_dir=tmp_path)
    monkeypatch.setattr(gumbel_module, "train_one_epoch", original)
    calls.clear()
    counting = []
    monkeypatch.setattr(gumbel_module, "train_one_epoch", lambda *a, **k: counting.append(1) or original(*a, **k))
    resumed = strategy.search(space, evaluator, run_dir=tmp_path).tables["gumbel_probs"]
    assert len(counting) == 2  # only epoch 2 ran again
    torch.testing.assert_close(
        torch.tensor(resumed["probability"].to_numpy()), torch.tensor(clean["probability"].to_numpy())
    )


def test_bad_input_fails_before_training(synthetic) -> None:
    space, evaluator = synthetic
    with pytest.raises(NMSearchError, match="lambdas must be >= 0"):
        GumbelStrategy(lambdas=(1.0, -0.5)).search(space, evaluator)
    with pytest.raises(NMSearchError, match=r"budget 0\.05 of dense bytes_mb is below what the space can reach"):
        GumbelStrategy(loss="budget", budgets=(0.05,), cost_metric="bytes_mb").search(space, evaluator)
    with pytest.raises(NMSearchError, match="needs budgets"):
        GumbelStrategy(loss="budget").search(space, evaluator)
    with pytest.raises(NMSearchError, match="estimator ste or srste and no decay"):
        GumbelStrategy(recipe=RecipeConfig(estimator="ste", decay="mask")).search(space, evaluator)
    with pytest.raises(NMSearchError, match=r"gumbel\.loss"):
        GumbelStrategy(loss="proxyless").search(space, evaluator)
    with pytest.raises(NMSearchError, match=r"estimator = 'darts' is not one of proxylessnas, fbnet"):
        GumbelStrategy(estimator="darts").search(space, evaluator)
    with pytest.raises(NMSearchError, match="set estimator=fbnet"):
        GumbelStrategy(sampling="soft", active_groups=None).search(space, evaluator)
    with pytest.raises(NMSearchError, match="set active_groups=null"):
        GumbelStrategy(sampling="soft", estimator="fbnet").search(space, evaluator)
    with pytest.raises(NMSearchError, match="active_groups must be >= 2 or null"):
        GumbelStrategy(active_groups=1).search(space, evaluator)
    dense_only = SearchSpace.from_model(get_task("synthetic").build_model(), get_task("synthetic").example_inputs(),
                                        exclude=["Conv2d", "Linear"])  # fmt: skip
    with pytest.raises(NMSearchError, match="no layer with a choice"):
        GumbelStrategy().search(dense_only, evaluator)
    with pytest.raises(NMSearchError, match="must include an AccuracyEvaluator"):
        GumbelStrategy().search(space, evaluator.parts[1])


def test_supernet_replaces_only_searchable_layers(synthetic) -> None:
    space, _ = synthetic
    model = get_task("synthetic").build_model()
    logits = {n: torch.zeros(len(space.options[n]), requires_grad=True) for n in space.searchable}
    layers = build_supernet(model, space, logits)
    assert set(layers) == set(space.searchable)
    assert not any(any(p is logit for logit in logits.values()) for p in model.parameters())
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_row_options_mask_output_positions_like_the_row_masked_layer(monkeypatch) -> None:
    options = ["dense", "r0.3", "w2:4+r0.3", "a2:4"]
    module = nn.Conv2d(16, 8, 3, padding=1)
    layer = _layer(module, options)
    x = torch.randn(2, 16, 6, 6)
    for index, name in enumerate(options):
        gates = torch.nn.functional.one_hot(torch.tensor(index), len(options)).float()
        monkeypatch.setattr(layer, "sample", lambda gates=gates: gates)
        option = Option.parse(name)
        expected = sparsify(module, option.weight, option.activation, name="l")
        expected.row_scores = layer.layer.row_scores
        expected.mask_state = expected.mask_state.__class__(estimator="ste")
        out = layer(x)
        torch.testing.assert_close(out, expected(x))
        if option.rows:  # 30% of the 36 output positions are zero in every channel, bias included
            assert int((out == 0).all(dim=(0, 1)).sum()) == round(0.3 * 36)


def test_search_over_a_space_with_row_options(synthetic, tmp_path: Path) -> None:
    _, evaluator = synthetic
    trainer = evaluator.parts[0].trainer
    rows_space = SearchSpace.from_model(
        trainer.fresh_model(), trainer.task.example_inputs(), targets=("weights", "rows"), ratios=["2:4"]
    )
    accuracy = AccuracyEvaluator(trainer, rows_space)
    cost = CostEvaluator(rows_space, HardwareCostModel.from_profile("orin", batch_size=1), metrics=("latency_ms",))
    strategy = GumbelStrategy(epochs=2, lambdas=(1.0,), arch_lr=0.1, cost_metric="latency_ms")
    result = strategy.search(rows_space, CompositeEvaluator(accuracy, cost), run_dir=tmp_path)
    assert result.trials["state"].eq("COMPLETE").all()
    probs = result.tables["gumbel_probs"]
    assert probs["option"].str.contains("r0.").any()


# -- kill -9 (tests/strategies/gumbel_worker.py, helpers in tests/strategies/faults.py) ------------
@pytest.mark.slow
def test_kill_9_mid_epoch_and_mid_checkpoint_write_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    cache, marker = tmp_path / "cache", tmp_path / "started"
    finish([gumbel_worker.start(tmp_path / "clean", cache, tmp_path / "clean-marker")])
    run = tmp_path / "run"
    checkpoint = run / "gumbel" / next((tmp_path / "clean" / "gumbel").glob("run-*.pt")).name

    def kill_at(line: str, process: subprocess.Popen) -> None:
        """SIGKILL ``process`` once it has marked ``line`` (where it stalls), then start a new marker."""
        while line not in lines(marker):
            wait_for_lines(marker, len(lines(marker)) + 1, process)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        marker.write_text("")

    # 1: epoch 1's weights trained, its logits epoch begun (epoch 0 checkpointed)
    kill_at("train 3", gumbel_worker.start(run, cache, marker, stall_epoch=3))
    assert load_checkpoint(checkpoint)["epoch"] == 0
    # 2: resumed at epoch 1, killed half way through writing epoch 2's checkpoint
    kill_at("save 2", gumbel_worker.start(run, cache, marker, stall_save=2))
    assert len(list(checkpoint.parent.glob("*.tmp"))) == 1  # the half-written file, never renamed
    state = load_checkpoint(checkpoint)  # the complete epoch-1 file, not the half-written one
    assert state is not None and state["epoch"] == 1
    assert [row["epoch"] for row in state["rows"]] == [0, 1]
    assert not (run / "result.json").exists()
    # 3: resumed at epoch 2, runs to the end
    finish([gumbel_worker.start(run, cache, marker)])
    assert lines(marker) == ["train 1", "train 2", "save 1", "train 3", "train 4", "save 2"]  # epochs 2 and 3 only

    clean, resumed = SearchResult.load(tmp_path / "clean"), SearchResult.load(run)
    assert list(resumed.tables["gumbel_log"]["epoch"]) == [0, 1, 2, 3]  # no epoch lost or logged twice
    for name in ("gumbel_log", "gumbel_probs"):
        pd.testing.assert_frame_equal(resumed.tables[name], clean.tables[name], check_exact=False, rtol=1e-5)
    assert list(resumed.trials["scheme"]) == list(clean.trials["scheme"])
    assert set(resumed.trials["state"]) == {"COMPLETE"}
    meta = json.loads((run / "result.json").read_text())
    assert meta["files"]["trials.csv"]["rows"] == len(pd.read_csv(run / "trials.csv")) == len(clean.trials)
    torch.testing.assert_close(load_checkpoint(checkpoint)["logits"],
                               load_checkpoint(tmp_path / "clean" / "gumbel" / checkpoint.name)["logits"])  # fmt: skip
    leftovers = sorted(p.name for p in run.rglob("*.tmp"))
    assert leftovers == [], f"temporary files left by the killed writes: {leftovers}"


def test_state_dict_round_trips_through_a_checkpoint_and_resumes(synthetic, tmp_path: Path, monkeypatch) -> None:
    space, evaluator = synthetic
    config = {"epochs": 2, "lambdas": (1.0,), "arch_lr": 0.1, "cost_metric": "bytes_mb", "warmup_fraction": 0.0}
    first = GumbelStrategy(**config)
    clean = first.search(space, evaluator)  # no run_dir: the state lives in the strategy only
    state = load_checkpoint(save_checkpoint(tmp_path / "state.pt", first.state_dict()))
    assert state is not None and [run["epoch"] for run in state["progress"]["runs"].values()] == [1]

    again, calls = GumbelStrategy(**config), []
    again.load_state_dict(state)
    original = gumbel_module.train_one_epoch
    monkeypatch.setattr(gumbel_module, "train_one_epoch", lambda *a, **k: calls.append(1) or original(*a, **k))
    resumed = again.search(space, evaluator)
    assert calls == []  # both epochs were in the state
    assert resumed.trials["scheme"].tolist() == clean.trials["scheme"].tolist()
    assert resumed.tables["gumbel_probs"].equals(clean.tables["gumbel_probs"])


# -- the distillation loss (train_loss=distill): a label-free pre-trained model ------------------
@pytest.fixture(scope="module")
def tiny_encoder():
    pytest.importorskip("transformers")
    task = TinyEncoderTask()
    model = task.build_model()
    space = SearchSpace.from_model(model, task.example_inputs(), targets=["weights"], ratios=["2:4", "1:4"])
    config = FidelityConfig(oneshot="magnitude", metric="cosine")
    fidelity = FidelityEvaluator.for_task(task, space, config, model=model)
    cost = CostEvaluator(space, HardwareCostModel.from_profile("a100"), metrics=("bytes_mb",))
    return space, CompositeEvaluator(fidelity, cost)


def test_distillation_trains_a_label_free_supernet_and_its_loss_falls(tiny_encoder) -> None:
    space, evaluator = tiny_encoder
    strategy = GumbelStrategy(epochs=4, lambdas=(0.0,), warmup_fraction=0.0, arch_lr=0.05, weight_lr=3e-3,
                              cost_metric="bytes_mb")  # fmt: skip  # train_loss=auto: no labels, so distill
    result = strategy.search(space, evaluator)
    assert result.metadata["train_loss"] == "distill"
    log = result.tables["gumbel_log"]
    assert (log["weight_loss"] > 0).all() and (log["arch_loss"] > 0).all()
    assert log["weight_loss"].iloc[-1] < 0.7 * log["weight_loss"].iloc[0]  # the students learn the teacher
    assert log["weight_accuracy"].isna().all()  # no labels, no accuracy
    scheme = result.schemes[0]
    space.check(scheme)
    assert -1.0 <= result.trials.loc[0, "accuracy"] <= 1.0 and result.trials.loc[0, "state"] == "COMPLETE"


def test_the_labelled_loss_on_a_label_free_task_is_refused_before_training(tiny_encoder, monkeypatch) -> None:
    space, evaluator = tiny_encoder
    monkeypatch.setattr(gumbel_module, "build_supernet", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(NMSearchError, match=r"^train_loss = 'task' trains on labels, but task 'tiny_encoder' has none"):
        GumbelStrategy(epochs=1, train_loss="task").search(space, evaluator)
    with pytest.raises(NMSearchError, match=r"distill_temperature must be > 0"):
        GumbelStrategy(epochs=1, distill_temperature=0.0).search(space, evaluator)


def test_distillation_on_a_labelled_task_uses_kl_to_the_dense_logits(synthetic) -> None:
    space, evaluator = synthetic
    strategy = GumbelStrategy(epochs=2, lambdas=(1.0,), cost_metric="bytes_mb", train_loss="distill",
                              distill_temperature=2.0)  # fmt: skip
    result = strategy.search(space, evaluator)
    assert result.metadata["train_loss"] == "distill"
    log = result.tables["gumbel_log"]
    assert (log["weight_loss"] > 0).all() and log["weight_accuracy"].isna().all()
    space.check(result.schemes[0])
