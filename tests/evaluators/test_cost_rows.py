import numpy as np
import pytest
import torch
from torch import nn

from evaluators import CostEvaluator, HardwareCostModel
from evaluators.cost import Workload, gemm_terms
from evaluators.hardware import HardwareProfileError, available_profiles, load_profile
from search_space import DEFAULT_TARGETS, Option, RowPattern, Scheme, SearchSpace, pruned_rows

ROWS_TARGETS = (*DEFAULT_TARGETS, "rows")
CPU = "cpu_x86_avx2"


def conv_space(channels: int = 64, size: int = 32, batch: int = 1) -> SearchSpace:
    """A 3x3 conv (layer ``"0"``) on ``size``x``size`` inputs and a Linear (``"2"``)."""
    model = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.Flatten(), nn.LazyLinear(8))
    return SearchSpace.from_model(model, torch.randn(batch, channels, size, size), targets=ROWS_TARGETS)


def first_dtype(profile: str) -> str:
    return next(iter(load_profile(profile).dtypes))


def layer(report, name: str = "0"):
    return report.layers.set_index("layer").loc[name]


@pytest.mark.parametrize("profile", available_profiles())
def test_rows_cut_macs_and_activation_bytes_on_every_profile(profile: str) -> None:
    space = conv_space()
    kept = 1 - pruned_rows(32 * 32, 0.2) / (32 * 32)
    model = HardwareCostModel.from_profile(profile, dtype=first_dtype(profile))
    dense = layer(model.evaluate(space, Scheme.dense(space)))
    rows = layer(model.evaluate(space, space.scheme({"0": "r0.2"})))
    assert kept == pytest.approx(0.8, abs=1e-3)
    for column in ("macs", "activation_mb", "output_mb"):
        assert rows[column] == pytest.approx(dense[column] * kept, rel=1e-12)
    assert rows["weight_mb"] == dense["weight_mb"] and rows["plan"] == "dense"
    hardware = load_profile(profile)
    # The row-skipping kernel's GEMM runs at its own efficiency (the dense one unless the profile fits it).
    relative = hardware.efficiency.compute_dense / hardware.efficiency.rows
    if hardware.gemm.sms == 1:  # plain roofline: compute scales with the rows exactly
        assert rows["compute_ms"] == pytest.approx(dense["compute_ms"] * kept * relative, rel=1e-12)
    else:  # whole tiles and waves: never more than the dense GEMM, about the kept rows' share
        assert dense["compute_ms"] * kept * relative * 0.9 <= rows["compute_ms"] <= dense["compute_ms"] * relative
    gathered = kept * 32 * 32 * 64 * 9  # the kept rows' im2col values
    assert rows["gather_ms"] == pytest.approx(gathered * hardware.gemm.row_gather_ns_per_value * 1e-6, rel=1e-12)
    if relative == 1 and hardware.gemm.row_gather_ns_per_value == 0:  # the row kernel as fast as the dense one
        assert 1.0 <= rows["speedup"] <= 1 / kept + 1e-12
        assert rows["latency_ms"] <= dense["latency_ms"]


def test_cpu_row_kernel_costs_what_was_measured() -> None:
    """On this CPU's fitted profile skipping 20% of a 64-channel conv's rows is slower than dense
    (measured 0.76-0.96x fed NCHW: the im2col gather and the layout conversion are large next to 64
    output channels) and on a
    256-channel conv it is faster (measured 1.03-1.69x), as benchmarks/cost_vs_measured.py found."""
    model = HardwareCostModel.from_profile("cpu_x86_avx2", dtype="fp32")
    for channels, size, faster in ((64, 32, False), (256, 8, True)):
        space = conv_space(channels, size)
        dense = layer(model.evaluate(space, Scheme.dense(space)))
        rows = layer(model.evaluate(space, space.scheme({"0": "r0.2"})))
        assert bool(rows["latency_ms"] < dense["latency_ms"]) == faster, channels
        assert rows["gather_ms"] > 0


def test_compute_bound_rows_approach_one_over_kept() -> None:
    space = conv_space(256, 16)
    model = HardwareCostModel.from_profile("a100", dtype="fp16", batch_size=256)
    for sparsity in (0.1, 0.2, 0.3):
        row = layer(model.evaluate(space, space.scheme({"0": f"r{sparsity}"})))
        kept = 1 - pruned_rows(256, sparsity) / 256
        assert row["bound"] == "compute"
        assert row["speedup"] == pytest.approx(1 / kept, rel=0.02)  # launch overhead aside


def test_rows_combine_with_weight_nm() -> None:
    space = conv_space(256, 16)
    model = HardwareCostModel.from_profile("a100", dtype="fp16", batch_size=256)
    weights = layer(model.evaluate(space, space.scheme({"0": "w2:4"})))
    both = layer(model.evaluate(space, space.scheme({"0": "w2:4+r0.2"})))
    kept = 1 - pruned_rows(256, 0.2) / 256
    assert both["plan"] == weights["plan"] == "sparse weights"
    # Whole tiles and waves: the kept fraction of the 2:4 GEMM, up to quantisation.
    assert both["compute_ms"] == pytest.approx(weights["compute_ms"] * kept, rel=0.02)
    assert both["weight_mb"] == weights["weight_mb"]  # 2:4 compressed, rows do not touch weights
    assert both["macs"] == pytest.approx(weights["macs"] * kept, rel=1e-12)


def test_cpu_profile_has_no_sparse_cores_but_rows_speed_it_up() -> None:
    profile = load_profile(CPU)
    spec = profile.dtype("fp32")
    assert set(profile.dtypes) == {"fp32"} and spec.sparse_patterns == () and spec.sparse_tflops is None
    assert spec.dense_tflops > 0 and profile.memory_bandwidth_gbs > 0
    with pytest.raises(HardwareProfileError, match="has no dtype 'fp16'; available: fp32"):
        HardwareCostModel.from_profile(CPU)
    space = conv_space(256, 16)
    model = HardwareCostModel.from_profile(CPU, dtype="fp32", batch_size=16)
    dense = layer(model.evaluate(space, Scheme.dense(space)))
    assert dense["bound"] == "compute"
    for option in ("w2:4", "a2:4", "w2:4+a2:4"):
        row = layer(model.evaluate(space, space.scheme({"0": option})))
        assert row["compute_ms"] == dense["compute_ms"] and row["tensor_core_speedup"] == 1.0
    weights = layer(model.evaluate(space, space.scheme({"0": "w2:4"})))
    assert weights["weight_mb"] == dense["weight_mb"]  # finalized dense weights on a dense kernel
    activations = layer(model.evaluate(space, space.scheme({"0": "a2:4"})))
    assert activations["activation_mb"] == dense["activation_mb"]  # read dense: nothing accelerates them
    assert activations["latency_ms"] > dense["latency_ms"]  # and the mask is a pass of its own
    rows = layer(model.evaluate(space, space.scheme({"0": "r0.2"})))
    assert rows["speedup"] > 1.2


def test_rows_without_a_position_count_use_one_minus_s() -> None:
    spec = load_profile("a100").dtype("fp16")
    workload = Workload.linear(64, 256, 256)
    terms = gemm_terms([workload, workload], [Option(), Option(activation=RowPattern(0.25))], spec, 2)
    np.testing.assert_allclose(terms.macs[1], terms.macs[0] * 0.75)
    np.testing.assert_allclose(terms.input_bytes[1], terms.input_bytes[0] * 0.75)
    assert not terms.activation_sparse[1] and terms.speedup[1, 2] == 1.0
    assert Workload.of_layer(conv_space().info("0")).positions == 32 * 32
    assert Workload.of_layer(conv_space().info("2")).positions is None


def test_table_and_evaluator_agree_on_rows_schemes() -> None:
    space = conv_space(batch=2)
    model = HardwareCostModel.from_profile("l4", dtype="fp16", batch_size=4)
    table = model.table(space)
    schemes = [space.scheme({"0": option}) for option in ("r0.1", "w2:4+r0.3", "a2:4", "dense")]
    totals = table.totals(space.encode_many(schemes))
    evaluator = CostEvaluator(space, model, metrics=("latency_ms", "bytes_mb"))
    for index, scheme in enumerate(schemes):
        report = model.evaluate(space, scheme)
        for metric, value in report.totals.items():
            assert totals[metric][index] == pytest.approx(value, rel=1e-12)
        assert evaluator.evaluate(scheme).values["latency_ms"] == pytest.approx(report.totals["latency_ms"])
    assert totals["latency_ms"][0] < totals["latency_ms"][3]
    probs = torch.zeros(table.valid.shape, dtype=torch.float64)
    probs[:, 0] = 1.0
    rows_index = space.option_names("0").index("r0.2")
    probs[0] = 0.0
    probs[0, rows_index] = 1.0
    expected = table.expected(probs, "macs")
    assert float(expected) == pytest.approx(model.evaluate(space, space.scheme({"0": "r0.2"})).totals["macs"])


def test_nm_patterns_are_unchanged_by_the_rows_support() -> None:
    space = conv_space()
    model = HardwareCostModel.from_profile("a100")
    row = layer(model.evaluate(space, space.scheme({"0": "a2:4"})))
    dense = layer(model.evaluate(space, Scheme.dense(space)))
    assert row["macs"] == pytest.approx(dense["macs"] / 2) and row["output_mb"] == dense["output_mb"]
