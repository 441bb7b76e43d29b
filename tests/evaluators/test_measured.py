"""The measured cost source: table latencies where measured, the roofline elsewhere, listed; bad tables refused."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from evaluators import CostEvaluator, HardwareCostModel, build_cost_model
from evaluators.measured import (
    FORMAT,
    FORMAT_VERSION,
    REST,
    TABLE_COLUMNS,
    LatencyTable,
    MeasuredCostModel,
    MeasuredTableError,
)
from search_space import NMSearchError, Option, SearchSpace
from strategies.domino import _cost_model_curves


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 8))
    return SearchSpace.from_model(model, torch.randn(1, 8, 4, 4), ratios=("2:4", "1:4"), targets=("weights", "rows"))


def header(space: SearchSpace, **changes) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "device": "Test CPU, 1 threads",
        "device_type": "cpu",
        "torch": torch.__version__,
        "dtype": "fp32",
        "batch_size": 1,
        "fingerprint": space.fingerprint,
        "fallback": "cpu_x86_avx2",
        **changes,
    }


def entries(space: SearchSpace) -> list[tuple[str, str]]:
    return [(name, option.name) for name in space.layer_names for option in space.options[name]]


def make_table(space: SearchSpace, skip: int = 0, **changes) -> LatencyTable:
    """Entry i measured at (i + 1) ms; the last ``skip`` entries left out."""
    pairs = entries(space)
    pairs = pairs[: len(pairs) - skip]
    rows = pd.DataFrame(
        {
            "layer": [REST] + [layer for layer, _ in pairs],
            "option": ["dense"] + [option for _, option in pairs],
            "median_ms": [0.5] + [i + 1.0 for i in range(len(pairs))],
            "iqr_ms": 0.1,
            "min_ms": [0.4] + [i + 0.9 for i in range(len(pairs))],
            "runs": 10,
            "kernel": "dense",
        }
    )
    return LatencyTable(header(space, **changes), rows)


def test_every_measured_entry_is_the_tables_and_the_rest_is_the_roofline_listed(space: SearchSpace) -> None:
    table = make_table(space, skip=2)
    model = MeasuredCostModel.from_table(table)
    roofline = HardwareCostModel.from_profile("cpu_x86_avx2", dtype="fp32")
    measured = table.latencies
    costs = model.table(space)
    reference = roofline.table(space)
    for i, name in enumerate(space.layer_names):
        for j, option in enumerate(space.options[name]):
            expected = measured.get((name, option.name), reference.values[i, j, 0])
            assert costs.values[i, j, 0] == pytest.approx(expected)
            assert costs.values[i, j, 1:] == pytest.approx(reference.values[i, j, 1:])  # bytes, energy, ...: roofline
    coverage = model.coverage(space)
    missing = entries(space)[-2:]
    assert list(zip(coverage.fallback["layer"], coverage.fallback["option"], strict=True)) == missing
    assert set(coverage.fallback["source"]) == {"CPU-x86-AVX2-2core roofline"}
    assert f"{len(entries(space)) - 2} of {len(entries(space))}" in coverage.summary()
    assert f"{missing[0][0]} {missing[0][1]}" in coverage.summary()
    assert (coverage.frame["latency_ms"] > 0).all()  # never silently zero

    # The evaluator, the per-layer report, the vectorised totals and the expected cost agree.
    scheme = space.scheme(dict(missing[:1]))
    evaluation = CostEvaluator(space, model).evaluate(scheme)
    report = model.evaluate(space, scheme)
    assert evaluation.values["latency_ms"] == pytest.approx(report.totals["latency_ms"])
    assert list(report.layers["latency_source"]) == ["measured", "roofline"]
    probs = torch.from_numpy(space.option_valid_mask().astype(np.float64))
    probs = probs / probs.sum(dim=1, keepdim=True)
    expected = (costs.values[..., 0] * probs.numpy()).sum()
    assert float(costs.expected(probs)) == pytest.approx(expected)
    assert model.profile.name == "measured Test CPU, 1 threads + CPU-x86-AVX2-2core roofline"


def test_min_statistic_and_domino_cost_curves_use_the_table(space: SearchSpace) -> None:
    table = make_table(space)
    model = MeasuredCostModel.from_table(table, statistic="min")
    conv = space.layer_names[0]
    assert model.table(space).values[0, 0, 0] == pytest.approx(table.rows.set_index(["layer", "option"]).loc[
        (conv, "dense"), "min_ms"])  # fmt: skip
    # Domino's per-N curves at M = 4: w1:4, w2:4 and w4:4 (= dense) are measured, w3:4 is not in this table.
    model = MeasuredCostModel.from_table(table)
    curves = _cost_model_curves(space, [conv], 4, model, "latency_ms")
    measured = [table.latencies[(conv, option)] for option in ("w1:4", "w2:4", "dense")]
    assert curves.per_n[0, [0, 1, 3]] == pytest.approx(measured)
    roofline = HardwareCostModel.from_profile("cpu_x86_avx2", "fp32").costs(space, [(conv, Option.parse("w3:4"))])[1]
    assert curves.per_n[0, 2] == pytest.approx(roofline.latency_s[0] * 1e3)  # the fallback
    assert curves.dense_total == pytest.approx(sum(table.latencies[(name, "dense")] for name in space.layer_names))


def test_build_cost_model_reads_a_table_from_the_config_forms(space: SearchSpace, tmp_path: Path) -> None:
    path = make_table(space).write(tmp_path / "table.csv")
    for hardware in (f"measured:{path}", {"measured": str(path), "fallback": "cpu_x86_avx2", "device": "test"}):
        model = build_cost_model(hardware, cost=_cost("fp32", 1))
        assert isinstance(model, MeasuredCostModel) and model.measured.rest_ms == 0.5
    with pytest.raises(NMSearchError, match="unknown key 'profile'"):
        build_cost_model({"measured": str(path), "profile": "a100"}, cost=_cost("fp32", 1))
    read = LatencyTable.read(path)
    pd.testing.assert_frame_equal(read.rows, make_table(space).rows, check_dtype=False)


def _cost(dtype: str, batch: int):
    from evaluators import CostModelConfig

    return CostModelConfig(dtype, batch)


@pytest.mark.parametrize(
    ("hardware", "cost", "message"),
    [
        ({}, ("fp16", 1), "dtype 'fp32', the search uses 'fp16'"),
        ({}, ("fp32", 8), "batch size 1, the search uses 8"),
        ({"device": "A100"}, ("fp32", 1), "device 'Test CPU, 1 threads', the search uses 'A100'"),
        ({"fallback": "a100"}, ("fp32", 1), "fallback profile A100-SXM-80GB is an accelerator profile"),
    ],
)
def test_a_table_for_another_dtype_batch_or_device_is_one_line(
    space: SearchSpace, tmp_path: Path, hardware: dict, cost: tuple, message: str
) -> None:
    path = make_table(space).write(tmp_path / "table.csv")
    with pytest.raises(MeasuredTableError, match=message) as error:
        build_cost_model({"measured": str(path), **hardware}, cost=_cost(*cost))
    assert "\n" not in str(error.value)


def test_a_table_for_another_model_is_refused_when_costing(space: SearchSpace) -> None:
    model = MeasuredCostModel.from_table(make_table(space, fingerprint="0123abcd"))
    with pytest.raises(MeasuredTableError, match="model fingerprint '0123abcd', the search uses"):
        CostEvaluator(space, model)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda lines: ["layer,option", *lines[1:]], "line 1 is not the"),
        (lambda lines: ["# {not json", *lines[1:]], "line 1: corrupt JSON header"),
        (
            lambda lines: [lines[0].replace(f'"format_version": {FORMAT_VERSION}', '"format_version": 99'), *lines[1:]],
            "format version 99",
        ),
        (lambda lines: [lines[0], "layer,option,median_ms", *lines[2:]], "line 2: columns"),
        (lambda lines: [*lines[:4], lines[4].rsplit(",", 4)[0]], "line 5: empty field"),
        (lambda lines: [*lines[:3], lines[3].replace(",1,", ",-1,", 1), *lines[4:]], "line 4: needs 0 < min_ms"),
        (lambda lines: [*lines[:3], lines[3].replace(",1,", ",x,", 1), *lines[4:]], "line 4: .*must be numbers"),
        (lambda lines: [*lines, lines[3]], "appears twice"),
        (lambda lines: [*lines[:3], lines[3].replace("dense", "w3:2", 1), *lines[4:]], "line 4: option 'w3:2'"),
    ],
    ids=["no-header", "bad-json", "version", "columns", "partial-row", "negative", "text", "duplicate", "option"],
)
def test_a_corrupt_or_partial_table_is_refused_with_its_line(space: SearchSpace, tmp_path: Path, edit, message) -> None:
    path = make_table(space).write(tmp_path / "table.csv")
    lines = path.read_text().splitlines()
    assert lines[3].startswith(f"{space.layer_names[0]},dense,1,")
    path.write_text("\n".join(edit(lines)) + "\n")
    with pytest.raises(MeasuredTableError, match=message) as error:
        LatencyTable.read(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_missing_file_and_columns_of_a_written_table(space: SearchSpace, tmp_path: Path) -> None:
    with pytest.raises(MeasuredTableError, match="no such file"):
        MeasuredCostModel.from_table(tmp_path / "absent.csv")
    path = make_table(space).write(tmp_path / "t.csv")
    assert path.read_text().splitlines()[1] == ",".join(TABLE_COLUMNS)
    no_fallback = make_table(space, fallback=None)
    with pytest.raises(MeasuredTableError, match="names no fallback profile"):
        MeasuredCostModel.from_table(no_fallback)
