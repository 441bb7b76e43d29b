"""``python -m experiments.profile``: every (layer, option) timed as deployed, resumable, additivity, bad input."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from evaluators.measured import REST, LatencyTable, MeasuredCostModel, MeasuredTableError
from experiments import profile
from experiments.profile import ProfileSettings, additivity, additivity_schemes, main, profile_model
from search_space import NMSearchError, SearchSpace

FAST = ProfileSettings(min_run_time=0.001, warmup=1, device="cpu")  # the CPU tables of this file, on any machine


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, torch.Tensor, SearchSpace]:
    model, x = Tiny().eval(), torch.randn(2, 8, 4, 4)
    space = SearchSpace.from_model(model, x, ratios=("2:4",), targets=("weights", "activations", "rows"))
    return model, x, space


def entries(space: SearchSpace) -> set[tuple[str, str]]:
    return {(name, option.name) for name in space.layer_names for option in space.options[name]}


def test_every_entry_is_timed_as_deployed_with_its_header(tiny, tmp_path: Path) -> None:
    model, x, space = tiny
    log: list[str] = []
    table = profile_model(model, x, space, tmp_path / "t.csv", FAST, label="tiny", log=log.append)
    assert set(zip(table.rows["layer"], table.rows["option"], strict=True)) == entries(space) | {(REST, "dense")}
    assert len(log) == len(table.rows)
    kernels = dict(zip(zip(table.rows["layer"], table.rows["option"], strict=True), table.rows["kernel"], strict=True))
    assert kernels[("conv", "dense")] == "dense"
    assert kernels[("conv", "w2:4")] == "finalized weights, dense GEMM"
    assert kernels[("fc", "a2:4")] == "activation mask + dense GEMM"
    assert kernels[("conv", "r0.2")] == "row-skipping conv"
    assert (table.rows["median_ms"] >= table.rows["min_ms"]).all() and (table.rows["runs"] >= 10).all()
    header = table.header
    assert header["complete"] and header["fingerprint"] == space.fingerprint and header["model"] == "tiny"
    assert (header["device_type"], header["dtype"], header["batch_size"]) == ("cpu", "fp32", 1)
    assert header["torch"] == torch.__version__ and len(header["load_average"]) == 3
    assert header["fallback"] == "cpu_x86_avx2" and header["entries"] == len(table.rows)
    # The search reads it back: every entry measured, none from the roofline.
    assert MeasuredCostModel.from_table(tmp_path / "t.csv").coverage(space).fallback.empty
    assert table.predict(space.dense()) == pytest.approx(
        sum(table.latencies[(name, "dense")] for name in [REST, *space.layer_names])
    )


def test_an_interrupted_profile_resumes_with_only_the_missing_entries(tiny, tmp_path: Path) -> None:
    model, x, space = tiny
    path = tmp_path / "t.csv"
    full = profile_model(model, x, space, path, FAST)
    kept = full.rows.iloc[: len(full.rows) // 2]
    LatencyTable(dict(full.header) | {"complete": False}, kept).write(path)
    log: list[str] = []
    resumed = profile_model(model, x, space, path, FAST, log=log.append)
    timed = {tuple(line.split()[:2]) for line in log}
    assert timed == set(zip(full.rows["layer"], full.rows["option"], strict=True)) - set(
        zip(kept["layer"], kept["option"], strict=True)
    )
    assert resumed.header["complete"] and len(resumed.rows) == len(full.rows)
    assert resumed.rows.iloc[: len(kept)]["median_ms"].tolist() == pytest.approx(kept["median_ms"].tolist())

    with pytest.raises(MeasuredTableError, match="batch size 1, the search uses 4"):
        profile_model(model, x, space, path, ProfileSettings(batch_size=4, min_run_time=0.001, device="cpu"))


@pytest.mark.filterwarnings("ignore:additivity")  # the first, real check may exceed 20% on a loaded machine
def test_additivity_reports_the_error_and_warns_above_20_percent(tiny, tmp_path: Path, monkeypatch) -> None:
    model, x, space = tiny
    table = profile_model(model, x, space, tmp_path / "t.csv", FAST)
    schemes = additivity_schemes(space, random=1)
    assert list(schemes) == ["dense", "uniform w2:4", "random 0"]
    frame = additivity(table, model, x, schemes, FAST)
    assert list(frame["scheme"]) == list(schemes) and (frame["measured_ms"] > 0).all()
    assert frame["error"].tolist() == pytest.approx((frame["predicted_ms"] / frame["measured_ms"] - 1).tolist())
    # A scheme measured at twice the table's prediction: -50%, a warning.
    predicted = table.predict(schemes["dense"])
    monkeypatch.setattr(profile, "measure_scheme", lambda *args: (2 * predicted, 0.0, 2 * predicted))
    with pytest.warns(UserWarning, match="dense: the table predicts .* \\(-50%\\)"):
        frame = additivity(table, model, x, {"dense": schemes["dense"]}, FAST)
    assert frame["error"].iloc[0] == pytest.approx(-0.5)


def test_bad_settings_fail_before_timing(tiny, tmp_path: Path) -> None:
    model, x, space = tiny
    with pytest.raises(NMSearchError, match="cannot time dtype 'int8'"):
        ProfileSettings(dtype="int8")
    with pytest.raises(NMSearchError, match="fp16"):
        profile_model(model, x, space, tmp_path / "t.csv", ProfileSettings(dtype="fp16", device="cpu"))
    assert not (tmp_path / "t.csv").exists()


def test_cli_profiles_a_task_and_refuses_bad_input_in_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "synthetic.csv"
    args = ["--out", str(out), "--min-run-time", "0.001", "--warmup", "1", "--random", "1", "space=weights"]
    args.append("device=cpu")
    assert main([*args, "task=synthetic", "evaluator.dtype=fp32", "evaluator.batch_size=2"]) == 0
    printed = capsys.readouterr().out
    assert "additivity" in printed and "uniform" in printed
    header = json.loads(out.read_text().splitlines()[0][2:])
    assert header["batch_size"] == 2 and header["model"] == "SyntheticTask" and len(header["additivity"]) == 3
    for bad, message in [
        (["task=synthetic", "evaluator.dtype=int8"], "cannot time dtype 'int8'"),
        (["task=synthetic"], "fp16"),  # the CPU profile has no fp16 kernels
        (["task=synthetic", "evaluator.dtype=fp32", "evaluator.batch_size=3"], "batch size 2, the search uses 3"),
        (["task=nope"], "nope"),
    ]:
        assert main([*args, *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cpu_clock_tables_record_it_and_do_not_mix_with_wall_clock(tiny, tmp_path: Path) -> None:
    model, x, space = tiny
    cpu = ProfileSettings(min_run_time=0.001, warmup=1, clock="cpu", device="cpu")
    table = profile_model(model, x, space, tmp_path / "t.csv", cpu)
    assert table.header["clock"] == "cpu" and (table.rows["min_ms"] > 0).all()
    with pytest.raises(MeasuredTableError, match="measured with clock 'cpu', this run has 'wall'"):
        profile_model(model, x, space, tmp_path / "t.csv", FAST)
    torch.set_num_threads(2)
    with pytest.raises(NMSearchError, match="clock 'cpu' needs one torch thread"):
        profile_model(model, x, space, tmp_path / "other.csv", cpu)
    with pytest.raises(NMSearchError, match="clock must be one of wall, cpu"):
        ProfileSettings(clock="gpu")


@pytest.mark.slow
def test_a_search_runs_on_the_measured_table(tmp_path: Path, capsys) -> None:
    from hydra import compose, initialize_config_dir

    from experiments.search import run

    table = tmp_path / "synthetic.csv"
    args = ["--out", str(table), "--min-run-time", "0.001", "--warmup", "1", "--no-additivity", "device=cpu"]
    assert main([*args, "task=synthetic", "evaluator.dtype=fp32"]) == 0
    overrides = [
        "task=synthetic",
        "strategy=uniform",
        "evaluator.dtype=fp32",
        "device=cpu",
        "hardware=measured",
        f"hardware.measured={table}",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    with initialize_config_dir(str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    capsys.readouterr()
    result = run(cfg, tmp_path / "run")
    assert "measured latency: 27 of 27 (layer, option) entries from the table" in capsys.readouterr().out
    measured = MeasuredCostModel.from_table(table)
    trials = result.trials.set_index("trial")
    for trial, scheme in result.schemes.items():
        expected = sum(measured.measured.latencies[(name, option.name)] for name, option in scheme)
        assert trials.loc[trial, "latency_ms"] == pytest.approx(expected)
