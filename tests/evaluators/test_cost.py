import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from evaluators.base import MINIMIZE, Evaluator
from evaluators.cost import (
    COST_METRICS,
    PLANS,
    CostEvaluator,
    CostModelError,
    HardwareCostModel,
    Workload,
    compressed_fraction,
    dram_rereads,
    format_fraction,
    gemm_terms,
    plan_costs,
    roofline,
)
from evaluators.cost_report import plot_layer_breakdown, plot_roofline
from evaluators.hardware import DTYPE_BYTES, HardwareProfileError, available_profiles, load_profile
from experiments.models import resnet18
from search_space import LayerInfo, NMPattern, NMSearchError, Option, Scheme, SearchSpace

CPU = "cpu_x86_avx2"
# Profiles with sparse tensor cores (2:4 for fp16/bf16/int8, 1:2 for tf32): every shipped one but the
# hypothetical ideal_nm and the CPU, which has no sparse cores and only fp32.
GPUS = [name for name in available_profiles() if name not in ("ideal_nm", CPU)]


@pytest.fixture(scope="module")
def resnet_space() -> SearchSpace:
    return SearchSpace.from_model(resnet18(1000, "imagenet"), torch.randn(1, 3, 224, 224))


def linear_space(tokens: int, in_features: int, out_features: int, *, bias: bool = False, **kwargs) -> SearchSpace:
    """A one-layer space (layer ``"0"``) with ``tokens`` rows of input, built without a forward pass."""
    weight = in_features * out_features
    info = LayerInfo(
        name="0",
        kind="linear",
        module_type="Linear",
        weight_shape=(out_features, in_features),
        input_shape=(tokens, in_features),
        output_shape=(tokens, out_features),
        calls=1,
        tokens=tokens,
        reduction=in_features,
        outputs=out_features,
        groups=1,
        channels=in_features,
        params=weight + (out_features if bias else 0),
        macs=tokens * weight,
        input_numel=tokens * in_features,
        output_numel=tokens * out_features,
    )
    return SearchSpace([info], **kwargs)


def test_linear_space_helper_matches_discovery() -> None:
    model = nn.Sequential(nn.Linear(64, 32))
    assert SearchSpace.from_model(model, torch.randn(6, 64)).layers == linear_space(6, 64, 32, bias=True).layers


def layer(report, name: str = "0"):
    return report.layers.set_index("layer").loc[name]


def test_compressed_fraction() -> None:
    assert compressed_fraction(NMPattern(2, 4), 2) == 0.5625
    assert compressed_fraction(NMPattern(2, 4), 1) == 0.625
    assert compressed_fraction(NMPattern(1, 8), 2) == 0.125 * (1 + 3 / 16)
    assert compressed_fraction(NMPattern(1, 2), 4) == 0.5 * (1 + 1 / 32)
    assert compressed_fraction(NMPattern(7, 8), 2) == 1.0  # metadata outweighs the zeros: stored dense
    assert compressed_fraction(None, 2) == 1.0


def plan_weight_mb(model: HardwareCostModel, space: SearchSpace, option: str) -> np.ndarray:
    """Weight MB every plan of ``PLANS`` would read for the one layer of ``space`` with ``option``."""
    terms, _ = model.costs(space, [("0", Option.parse(option))])
    return plan_costs(terms, model.profile, model.spec)["weight_bytes"][0] / 1e6


@pytest.mark.parametrize(
    ("dtype", "fraction"), [("fp16", 0.5625), ("bf16", 0.5625), ("int8", 0.625), ("tf32", 0.53125)]
)
def test_sparse_format_bytes_per_dtype(dtype: str, fraction: float) -> None:
    """Values plus a 2-bit index per kept value: FP16/BF16 0.5625, INT8 0.625, TF32 (1:2) 0.53125."""
    hardware = NMPattern(1, 2) if dtype == "tf32" else NMPattern(2, 4)
    assert format_fraction(hardware, DTYPE_BYTES[dtype]) == fraction
    space = linear_space(16, 256, 128, ratios=("2:4", "1:2"))
    model = HardwareCostModel.from_profile("a100", dtype=dtype)
    dense_mb = 256 * 128 * DTYPE_BYTES[dtype] / 1e6
    weights = plan_weight_mb(model, space, f"w{hardware}")
    assert weights[PLANS.index("dense")] == pytest.approx(dense_mb, rel=1e-12)
    assert weights[PLANS.index("sparse weights")] == pytest.approx(fraction * dense_mb, rel=1e-12)


def test_fp8_and_int8_share_the_one_byte_fraction() -> None:
    assert format_fraction(NMPattern(2, 4), DTYPE_BYTES["fp8"]) == format_fraction(NMPattern(2, 4), 1) == 0.625


def test_patterns_running_as_2_4_are_charged_2_4_bytes() -> None:
    """1:8, 1:4, 2:8 and 2:16 run in the 2:4 format: the sparse plan reads what 2:4 stores, not N/M."""
    space = linear_space(8192, 4096, 4096, tie_both=False, ratios=("2:4", "1:4", "1:8", "2:8", "2:16"))
    model = HardwareCostModel.from_profile("a100")
    reference = layer(model.evaluate(space, space.scheme({"0": "w2:4"})))
    assert reference["plan"] == "sparse weights"
    assert reference["weight_mb"] == pytest.approx(0.5625 * 4096 * 4096 * 2 / 1e6)
    for option in ("w1:4", "w1:8", "w2:8", "w2:16"):
        row = layer(model.evaluate(space, space.scheme({"0": option})))
        assert row["plan"] == "sparse weights"
        assert row["weight_mb"] == reference["weight_mb"] and row["latency_ms"] == reference["latency_ms"]
        assert row["bytes_mb"] == reference["bytes_mb"]
        assert row["params"] < reference["params"]  # the model is sparser, the format is not


def test_dense_plan_reads_dense_bytes() -> None:
    """An option on the dense plan (pattern the cores lack, or the sparse kernel loses) reads dense weights."""
    space = linear_space(1, 512, 512, tie_both=False, ratios=("2:4", "3:8", "1:8"))
    model = HardwareCostModel.from_profile("orin")
    dense = layer(model.evaluate(space, Scheme.dense(space)))
    for option in ("w3:8", "w2:4", "w1:8"):
        row = layer(model.evaluate(space, space.scheme({"0": option})))
        assert row["plan"] == "dense"  # batch 1: the sparse kernel's fixed cost loses
        assert row["weight_mb"] == dense["weight_mb"] and row["bytes_mb"] == dense["bytes_mb"]
        assert row["latency_ms"] == dense["latency_ms"]


@pytest.mark.parametrize("profile", GPUS)
@pytest.mark.parametrize("dtype", ["fp16", "int8", "tf32"])
def test_compute_bound_sparse_speedup_never_exceeds_2x_on_gpus(profile: str, dtype: str) -> None:
    space = linear_space(32768, 4096, 4096, tie_both=False, ratios=("2:4", "1:2", "1:4", "1:8", "2:16"))
    model = HardwareCostModel.from_profile(profile, dtype=dtype)
    dense = layer(model.evaluate(space, Scheme.dense(space)))
    assert dense["bound"] == "compute"
    accelerated = 0
    for option in space.options["0"]:
        row = layer(model.evaluate(space, space.scheme({"0": option})))
        assert dense["compute_ms"] / row["compute_ms"] <= 2.0
        assert row["speedup"] <= 2.0
        assert row["tensor_core_speedup"] <= 2.0
        accelerated += row["speedup"] > 1.2
    assert accelerated >= 5  # the cap is reached by real acceleration, not by never accelerating


@pytest.mark.parametrize("profile", GPUS)
def test_sparse_speedup_grows_with_k_and_with_rows(profile: str) -> None:
    """Shape-aware: the halved K loop pays less at small K (fixed per-tile steps), and small-M GEMMs
    pay the sparse kernel's padding and fixed cost (published: 1.23-1.32x at K=768, 1.5-1.66x at
    K=3072, 0.11x at one row on A100)."""
    model = HardwareCostModel.from_profile(profile)

    def speedup(tokens: int, k: int, n: int) -> float:
        space = linear_space(tokens, k, n)
        dense = model.evaluate(space, Scheme.dense(space)).totals["latency_ms"]
        terms, _ = model.costs(space, [("0", Option.parse("w2:4"))])
        sparse = roofline(terms, model.profile, model.spec, np.array([PLANS.index("sparse weights")]))
        return dense / (sparse.latency_s[0] * 1e3)

    assert speedup(16384, 768, 4096) < speedup(16384, 3072, 4096) < 2.0
    assert speedup(1, 4096, 4096) < speedup(16384, 4096, 4096)
    if profile == "a100":  # where the one-row point was measured (bandwidth-starved GPUs differ)
        assert speedup(1, 4096, 4096) < 1.0 < speedup(16384, 4096, 4096)


def test_gpu_and_cpu_profiles_are_both_tested() -> None:
    assert len(GPUS) >= 7 and all({"fp16", "int8", "tf32"} <= set(load_profile(g).dtypes) for g in GPUS)
    assert CPU in available_profiles()


@pytest.mark.parametrize(("profile", "dtype"), [*((g, "fp16") for g in GPUS), (CPU, "fp32")])
def test_memory_bound_batch1_linear_gains_at_most_dense_over_compressed_bytes(profile: str, dtype: str) -> None:
    space = linear_space(1, 4096, 4096)
    model = HardwareCostModel.from_profile(profile, dtype=dtype)
    dense = layer(model.evaluate(space, Scheme.dense(space)))
    assert dense["bound"] == "memory"
    cap = 1 / compressed_fraction(NMPattern(2, 4), DTYPE_BYTES[dtype])  # 1 / 0.5625 in fp16
    for option in ("w2:4", "a2:4", "w2:4+a2:4"):
        row = layer(model.evaluate(space, space.scheme({"0": option})))
        assert row["speedup"] <= cap
    # Batch 1: the CPU has no sparse cores (finalized dense weights); on HBM GPUs the sparse kernel's
    # padding to 32 rows and fixed per-call cost outweigh the bytes it saves, so dense runs; only a
    # bandwidth-starved GPU (Orin) gains, and at most the bytes ratio.
    w24 = layer(model.evaluate(space, space.scheme({"0": "w2:4"})))
    if profile in (CPU, "a100", "h100_sxm", "h100_pcie", "h200"):
        assert w24["speedup"] == pytest.approx(1.0) and w24["plan"] == "dense"
        assert w24["weight_mb"] == dense["weight_mb"]
    if w24["plan"] == "sparse weights":
        assert w24["weight_mb"] == pytest.approx(0.5625 * dense["weight_mb"])
    if profile != CPU:
        sparse_plan = plan_weight_mb(model, space, "w2:4")[PLANS.index("sparse weights")]
        assert sparse_plan == pytest.approx(0.5625 * dense["weight_mb"])


def test_cpu_compute_bound_conv_gains_nothing_from_nm_but_from_rows() -> None:
    """No sparse tensor cores: N:M leaves a compute-bound GEMM's time alone, skipped rows shorten it."""
    model = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1))
    space = SearchSpace.from_model(model, torch.randn(1, 256, 16, 16), targets=("weights", "activations", "rows"))
    cost = HardwareCostModel.from_profile(CPU, dtype="fp32", batch_size=16)
    dense = layer(cost.evaluate(space, Scheme.dense(space)))
    assert dense["bound"] == "compute"
    for option in ("w2:4", "w1:8", "a2:4", "a1:8"):
        assert layer(cost.evaluate(space, space.scheme({"0": option})))["compute_ms"] == dense["compute_ms"]
    efficiency = cost.profile.efficiency
    for sparsity in (0.1, 0.2, 0.3):
        rows = layer(cost.evaluate(space, space.scheme({"0": f"r{sparsity}"})))
        kept = 1 - round(sparsity * 256) / 256
        # The row-skipping kernel: its own GEMM efficiency on the kept rows, plus gathering them.
        compute = dense["compute_ms"] * kept * efficiency.compute_dense / efficiency.rows
        assert rows["compute_ms"] == pytest.approx(compute, rel=1e-12)
        assert rows["latency_ms"] == pytest.approx(rows["compute_ms"] + rows["launch_ms"] + rows["gather_ms"], rel=1e-9)
        assert rows["speedup"] > 1


def test_ideal_nm_runs_every_pattern_at_m_over_n() -> None:
    space = linear_space(8192, 4096, 4096, ratios=("1:8", "3:8", "2:16"))
    model = HardwareCostModel.from_profile("ideal_nm")
    dense = layer(model.evaluate(space, Scheme.dense(space)))
    for option, factor in (("w1:8", 1 / 8), ("a1:8", 1 / 8), ("w3:8", 3 / 8), ("w2:16", 1 / 8)):
        row = layer(model.evaluate(space, space.scheme({"0": option})))
        assert row["compute_ms"] / dense["compute_ms"] == pytest.approx(factor, rel=1e-12)
        assert row["compress_ms"] == 0  # fused into the producer
    # One operand only: both at 1:8 computes at 1/8, not 1/64.
    both = layer(model.evaluate(space, space.scheme({"0": "w1:8+a1:8"})))
    assert both["compute_ms"] / dense["compute_ms"] == pytest.approx(1 / 8, rel=1e-12)


def test_resnet18_totals(resnet_space: SearchSpace) -> None:
    report = HardwareCostModel.from_profile("a100").evaluate(resnet_space, Scheme.dense(resnet_space))
    assert report.totals["macs"] == pytest.approx(1.82e9, rel=0.01)
    assert report.totals["params"] == pytest.approx(11.69e6, rel=0.01)
    assert report.totals == report.dense_totals
    assert report.layers["latency_share"].sum() == pytest.approx(1.0)
    assert report.totals["latency_ms"] == pytest.approx(report.layers["latency_ms"].sum())


def test_uniform_1_8_on_ideal_nm_cuts_eligible_layers_to_an_eighth(resnet_space: SearchSpace) -> None:
    report = HardwareCostModel.from_profile("ideal_nm").evaluate(
        resnet_space, Scheme.uniform(resnet_space, "weights", 1, 8)
    )
    rows = report.layers.set_index("layer")
    stem = rows.loc["conv1"]
    assert stem["option"] == "dense"
    assert stem["macs"] == stem["dense_macs"] and stem["latency_ms"] == stem["dense_latency_ms"]
    eligible = rows.drop(index="conv1")
    assert (eligible["option"] == "w1:8").all()
    np.testing.assert_allclose(eligible["macs"] / eligible["dense_macs"], 1 / 8, rtol=1e-12)
    dense = HardwareCostModel.from_profile("ideal_nm").evaluate(resnet_space, Scheme.dense(resnet_space))
    dense_rows = dense.layers.set_index("layer").drop(index="conv1")
    np.testing.assert_allclose(eligible["compute_ms"] / dense_rows["compute_ms"], 1 / 8, rtol=1e-12)
    # The stem's cost still counts in the totals.
    assert report.totals["macs"] == pytest.approx(stem["macs"] + eligible["macs"].sum())
    assert report.totals["macs"] > stem["macs"] > 0


def test_patterns_the_hardware_lacks_run_dense_on_dense_bytes() -> None:
    space = linear_space(8192, 4096, 4096, ratios=("3:8", "1:4"))
    model = HardwareCostModel.from_profile("a100")
    dense = layer(model.evaluate(space, Scheme.dense(space)))
    row = layer(model.evaluate(space, space.scheme({"0": "w3:8"})))
    assert (row["plan"], row["tensor_core_speedup"], row["compute_ms"]) == ("dense", 1.0, dense["compute_ms"])
    assert row["weight_mb"] == dense["weight_mb"] and row["latency_ms"] == dense["latency_ms"]
    # Only a profile that names a dense kernel reading 3:8 compressed charges compressed bytes.
    reader = model.profile.to_dict() | {"compressed_dense_kernels": ["3:8"]}
    compressed = layer(HardwareCostModel.from_profile(reader).evaluate(space, space.scheme({"0": "w3:8"})))
    assert compressed["plan"] == "dense"
    assert compressed["weight_mb"] == pytest.approx(dense["weight_mb"] * compressed_fraction(NMPattern(3, 8), 2))
    # TF32's sparse pattern is 1:2: 1:4 runs on it, 2:4 does not.
    tf32 = HardwareCostModel.from_profile("a100", dtype="tf32")
    assert layer(tf32.evaluate(space, space.scheme({"0": "w1:4"})))["tensor_core_speedup"] == 2.0
    space24 = linear_space(8192, 4096, 4096)
    assert layer(tf32.evaluate(space24, space24.scheme({"0": "w2:4"})))["plan"] == "dense"


def test_dynamic_activation_compression_costs_a_pass_unless_fused() -> None:
    space = linear_space(8192, 4096, 4096)
    scheme = space.scheme({"0": "a2:4"})
    a100 = HardwareCostModel.from_profile("a100")
    row = layer(a100.evaluate(space, scheme))
    assert row["plan"] == "sparse activations"
    input_mb = 8192 * 4096 * 2 / 1e6
    assert row["compress_mb"] == pytest.approx(input_mb * (1 + 0.5625))
    assert row["activation_mb"] == pytest.approx(input_mb * 0.5625)
    bandwidth = 2039e9 * 0.8
    assert row["compress_ms"] == pytest.approx(row["compress_mb"] * 1e6 / bandwidth * 1e3 + 5e-3)
    launch = (a100.profile.launch_overhead_us + a100.profile.gemm.sparse_overhead_us) * 1e-3
    assert row["latency_ms"] == pytest.approx(max(row["compute_ms"], row["memory_ms"]) + launch + row["compress_ms"])
    fused = a100.profile.to_dict() | {"fused_activation_compression": True}
    fused_row = layer(HardwareCostModel.from_profile(fused).evaluate(space, scheme))
    assert fused_row["compress_ms"] == fused_row["compress_mb"] == 0
    assert fused_row["latency_ms"] < row["latency_ms"]


def test_the_fastest_plan_is_taken_and_a_dynamic_mask_is_never_free() -> None:
    """A batch-1 layer: the activation mask is a pass of its own on every plan (not fused), so a2:4
    costs more than dense; the cheaper of mask + dense GEMM and compress + sparse GEMM is taken."""
    space = linear_space(1, 1024, 1024)
    model = HardwareCostModel.from_profile("h100_sxm")
    dense = layer(model.evaluate(space, Scheme.dense(space)))
    row = layer(model.evaluate(space, space.scheme({"0": "a2:4"})))
    terms, _ = model.costs(space, [("0", space.options["0"][space.options["0"].index(Option.parse("a2:4"))])])
    plans = plan_costs(terms, model.profile, model.spec)["latency_s"][0] * 1e3
    assert row["latency_ms"] == pytest.approx(plans.min()) and row["plan"] == PLANS[int(np.argmin(plans))]
    assert row["latency_ms"] > dense["latency_ms"]
    assert row["compress_mb"] > 0


def test_energy_params_and_macs_follow_their_formulas() -> None:
    tokens, k, n = 65536, 4096, 4096  # large enough for the sparse kernel to win
    space = linear_space(tokens, k, n, bias=True)
    model = HardwareCostModel.from_profile("a100", dtype="int8")
    report = model.evaluate(space, space.scheme({"0": "w1:8+a1:8"}))
    row = layer(report)
    macs = tokens * k * n
    assert row["plan"] in ("sparse weights", "sparse activations")  # one operand accelerated either way
    assert row["params"] == k * n / 8 + n
    assert row["macs"] == macs / 64
    speedup = row["tensor_core_speedup"]
    assert speedup == 2.0
    expected = (macs / speedup * 0.3 + row["bytes_mb"] * 1e6 * 31) * 1e-12 * 1e3
    assert row["energy_mj"] == pytest.approx(expected, rel=1e-12)
    assert report.totals["bytes_mb"] == pytest.approx(
        row["weight_mb"] + row["activation_mb"] + row["output_mb"] + row["compress_mb"]
    )


def test_batch_size_scales_activations_not_weights() -> None:
    space = linear_space(16, 256, 256)
    one = HardwareCostModel.from_profile("l4", batch_size=1).evaluate(space, Scheme.dense(space))
    eight = HardwareCostModel.from_profile("l4", batch_size=8).evaluate(space, Scheme.dense(space))
    assert eight.totals["macs"] == 8 * one.totals["macs"]
    assert eight.totals["params"] == one.totals["params"]
    assert layer(eight)["weight_mb"] == layer(one)["weight_mb"]
    assert layer(eight)["activation_mb"] == 8 * layer(one)["activation_mb"]


def test_forced_plan_needs_a_supported_pattern() -> None:
    spec = load_profile("a100").dtype("fp16")
    terms = gemm_terms([Workload.linear(8, 64, 64)], [Option(weight=NMPattern(3, 8))], spec, 2)
    with pytest.raises(CostModelError, match="forced plan"):
        roofline(terms, load_profile("a100"), spec, np.array([1]))


def test_table_totals_equal_evaluate_on_random_schemes(resnet_space: SearchSpace) -> None:
    for profile, dtype, batch in (("a100", "fp16", 1), ("ideal_nm", "int8", 32), ("orin", "tf32", 4)):
        model = HardwareCostModel.from_profile(profile, dtype=dtype, batch_size=batch)
        table = model.table(resnet_space)
        schemes = [Scheme.random(resnet_space, seed=seed) for seed in range(12)]
        totals = table.totals(resnet_space.encode_many(schemes))
        for i, scheme in enumerate(schemes):
            report = model.evaluate(resnet_space, scheme)
            for metric in COST_METRICS:
                assert totals[metric][i] == pytest.approx(report.totals[metric], rel=1e-12), (profile, metric)
    assert set(table.totals(resnet_space.encode_many(schemes[:2]), ["macs"])) == {"macs"}


def test_table_rejects_bad_indices(resnet_space: SearchSpace) -> None:
    table = HardwareCostModel.from_profile("a100").table(resnet_space)
    indices = resnet_space.encode_many([Scheme.dense(resnet_space)])
    bad = indices.copy()
    bad[0, 0] = 1  # the stem has only dense
    with pytest.raises(CostModelError, match="layer 'conv1' has 1 options, got index 1"):
        table.totals(bad)
    with pytest.raises(CostModelError, match="shaped"):
        table.totals(indices[:, :5])
    with pytest.raises(CostModelError, match="unknown cost metric 'flops'"):
        table.totals(indices, ["flops"])


def masked_softmax(logits: torch.Tensor, valid: np.ndarray) -> torch.Tensor:
    return torch.softmax(logits.masked_fill(~torch.from_numpy(valid), float("-inf")), dim=-1)


def test_expected_cost_is_the_table_value_for_one_hot_probabilities(resnet_space: SearchSpace) -> None:
    table = HardwareCostModel.from_profile("h100_sxm", batch_size=8).table(resnet_space)
    schemes = [Scheme.random(resnet_space, seed=seed) for seed in range(5)]
    indices = resnet_space.encode_many(schemes)
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(indices), resnet_space.max_options).double()
    for metric in COST_METRICS:
        expected = table.expected(one_hot, metric)
        assert expected.shape == (5,)
        np.testing.assert_allclose(expected.numpy(), table.totals(indices)[metric], rtol=1e-12)


def test_expected_cost_gradients(resnet_space: SearchSpace) -> None:
    table = HardwareCostModel.from_profile("a100").table(resnet_space)
    valid = resnet_space.option_valid_mask()
    logits = torch.randn(valid.shape, dtype=torch.float64, requires_grad=True)
    probs = masked_softmax(logits, valid)
    probs.retain_grad()
    table.expected(probs, "energy_mj").backward()
    # d E / d p(layer, option) is that option's cost; padded slots get no gradient into the logits.
    np.testing.assert_allclose(probs.grad.numpy(), table.values[..., COST_METRICS.index("energy_mj")], rtol=1e-12)
    assert torch.all(logits.grad[torch.from_numpy(~valid)] == 0)
    assert torch.autograd.gradcheck(
        lambda x: table.expected(masked_softmax(x, valid)), (logits.detach().requires_grad_(),), fast_mode=True
    )


def test_expected_cost_rejects_bad_probabilities(resnet_space: SearchSpace) -> None:
    table = HardwareCostModel.from_profile("a100").table(resnet_space)
    uniform = torch.full(resnet_space.option_valid_mask().shape, 1.0 / resnet_space.max_options)
    with pytest.raises(CostModelError, match="padded option slots"):
        table.expected(uniform)
    with pytest.raises(CostModelError, match="shaped"):
        table.expected(uniform[:, :3])


def test_cost_evaluator_follows_the_protocol(resnet_space: SearchSpace) -> None:
    model = HardwareCostModel.from_profile("a100")
    evaluator = CostEvaluator(resnet_space, model, metrics=("latency_ms", "bytes_mb", "params"))
    assert isinstance(evaluator, Evaluator)
    assert [o.name for o in evaluator.objectives] == ["latency_ms", "bytes_mb", "params"]
    assert all(o.direction == MINIMIZE for o in evaluator.objectives)
    assert evaluator.objectives[0].label == "latency_ms [ms]"
    scheme = Scheme.uniform(resnet_space, "both", 2, 4)
    evaluation = evaluator.evaluate(scheme)
    report = model.evaluate(resnet_space, scheme)
    assert not evaluation.failed
    assert set(evaluation.values) == {"latency_ms", "bytes_mb", "params"}
    for metric in COST_METRICS:
        value = evaluation.values.get(metric, evaluation.info.get(metric))
        assert value == pytest.approx(report.totals[metric], rel=1e-12)
    assert evaluation.info["hardware"] == "A100-SXM-80GB" and evaluation.info["batch_size"] == 1
    with pytest.raises(NMSearchError, match="unknown cost metric 'accuracy'"):
        CostEvaluator(resnet_space, model, metrics=("accuracy",))
    with pytest.raises(NMSearchError, match="at least one metric"):
        CostEvaluator(resnet_space, model, metrics=())


def test_bad_dtype_and_batch_size() -> None:
    with pytest.raises(HardwareProfileError, match=r"orin\.yaml' has no dtype 'fp8'; available: fp16, bf16"):
        HardwareCostModel.from_profile("orin", dtype="fp8")
    for batch in (0, 2.5, True):
        with pytest.raises(CostModelError, match="batch_size must be a positive integer"):
            HardwareCostModel.from_profile("a100", batch_size=batch)


def test_report_frame_and_figures(resnet_space: SearchSpace, tmp_path) -> None:
    report = HardwareCostModel.from_profile("a100", batch_size=64).evaluate(
        resnet_space, Scheme.random(resnet_space, seed=3)
    )
    frame = report.layers
    assert list(frame["layer"]) == resnet_space.layer_names
    assert set(frame["bound"]) <= {"compute", "memory"} and set(frame["bound"]) == {"compute", "memory"}
    assert set(frame["plan"]) <= {"dense", "sparse weights", "sparse activations"}
    assert math.isclose(report.speedup, report.dense_totals["latency_ms"] / report.totals["latency_ms"])
    for figure in (plot_layer_breakdown(report), plot_layer_breakdown(report, "bytes_mb"), plot_roofline(report)):
        assert isinstance(figure, Figure) and figure.axes
        figure.savefig(tmp_path / "figure.png", dpi=40)
    bars = plot_layer_breakdown(report).axes[0]
    heights = np.array([patch.get_height() for patch in bars.patches]).reshape(3, -1).sum(axis=0)
    np.testing.assert_allclose(heights, frame["latency_ms"], rtol=1e-9)
    with pytest.raises(CostModelError, match="latency_ms or bytes_mb"):
        plot_layer_breakdown(report, "params")


def test_dense_only_layers_count_and_unaffected_layers_match_dense(resnet_space: SearchSpace) -> None:
    model = HardwareCostModel.from_profile("rtx4090")
    one_layer = resnet_space.scheme({"layers.3.1.conv2": "w2:4"})
    report = model.evaluate(resnet_space, one_layer)
    rows = report.layers.set_index("layer")
    others = rows.drop(index="layers.3.1.conv2")
    assert (others["latency_ms"] == others["dense_latency_ms"]).all()
    assert report.totals["latency_ms"] == pytest.approx(
        report.dense_totals["latency_ms"]
        - rows.loc["layers.3.1.conv2", "dense_latency_ms"]
        + rows.loc["layers.3.1.conv2", "latency_ms"]
    )


def row_order(profile: str, **gemm) -> "HardwareCostModel":
    base = load_profile(profile)
    return HardwareCostModel(replace(base, gemm=replace(base.gemm, sparse_row_order=True, **gemm)), dtype="bf16")


def test_row_order_sparse_kernels_reread_operands_past_the_cache() -> None:
    """A sparse kernel in plain row order (torch's CUTLASS) streams, per wave, the weight panels of
    the output tiles it covers: on a 66-SM GPU with 48 MB of L2, a 8192 x 10240 -> 8192 GEMM runs
    63 waves of 64 output tiles x 2 row tiles, reading the (compressed) weights 63 times."""
    model = row_order("rtx4070tis")
    space = linear_space(8192, 10240, 8192)
    terms, _ = model.costs(space, [("0", Option.parse("w2:4"))])
    inputs, weights = dram_rereads(terms, model.profile)
    assert (inputs[:, 0], weights[:, 0]) == (1.0, 1.0)  # dense libraries rasterise for reuse
    assert weights[0, 1] == pytest.approx(63 * 64 * 128 / 8192)
    assert inputs[0, 1] == pytest.approx(63 * 2 * 128 / 8192)
    shipped = HardwareCostModel.from_profile("rtx4070tis", dtype="bf16")
    assert np.all(np.concatenate(dram_rereads(terms, shipped.profile)) == 1.0)  # cuSPARSELt: once
    big_cache = row_order("rtx4070tis", l2_mb=1e4)
    assert np.all(np.concatenate(dram_rereads(terms, big_cache.profile)) == 1.0)  # fits: read once
    cpu = load_profile(CPU)
    cpu_row = replace(cpu, gemm=replace(cpu.gemm, sparse_row_order=True, l2_mb=1.0))
    assert np.all(np.concatenate(dram_rereads(terms, cpu_row)) == 1.0)  # the plain roofline has no waves
    # Time counts the re-reads; bytes and energy still count each tensor once.
    sparse = PLANS.index("sparse weights")
    with_rereads = plan_costs(terms, model.profile, model.spec)
    without = plan_costs(terms, shipped.profile, shipped.spec)
    assert with_rereads["memory_s"][0, sparse] > 10 * without["memory_s"][0, sparse]
    assert with_rereads["weight_bytes"][0, sparse] == without["weight_bytes"][0, sparse]
    assert with_rereads["energy_j"][0, sparse] == without["energy_j"][0, sparse]


def test_row_order_speedup_drops_once_the_wave_spans_the_output_width() -> None:
    """Published RTX 4070 Ti SUPER, CUTLASS, k = 10240 (pytorch/ao#174): 1.85-1.96x up to m = n = 6144,
    1.64x at 7168, 1.38-1.45x from 8192. Once one wave of 66 tiles covers about one row of output
    tiles, each wave re-reads a full row of weight panels and the sparse kernel becomes bandwidth-bound."""
    model = row_order("rtx4070tis")

    def speedup(size: int) -> float:
        space = linear_space(size, 10240, size)
        dense = model.evaluate(space, Scheme.dense(space)).totals["latency_ms"]
        terms, _ = model.costs(space, [("0", Option.parse("w2:4"))])
        sparse = roofline(terms, model.profile, model.spec, np.array([PLANS.index("sparse weights")]))
        return dense / (sparse.latency_s[0] * 1e3)

    small, middle, large = speedup(4096), speedup(7168), speedup(12288)
    assert small > middle > large
    assert small > 1.7 and large < 1.5
    # The A100 shapes of the published points fit its 40 MB L2: the term leaves them alone.
    a100 = row_order("a100")
    terms, _ = a100.costs(linear_space(49152, 3072, 768), [("0", Option.parse("w2:4"))])
    assert np.all(np.concatenate(dram_rereads(terms, a100.profile)) < 1.2)
