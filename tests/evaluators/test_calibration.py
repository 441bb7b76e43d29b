import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from evaluators.calibration import (
    LATENCY_COLUMNS,
    CalibrationError,
    calibrate,
    decision_accuracy,
    main,
    predict_latency_ms,
)
from evaluators.hardware import Efficiency, load_profile

ROOT = Path(__file__).resolve().parents[2]
TRUE_FACTORS = {"compute_dense": 0.6, "compute_sparse": 0.42, "memory": 0.65, "launch_overhead_us": 9.0}


def shapes_frame() -> pd.DataFrame:
    """What benchmarks/gpu_latency.py writes: every shape dense and with 2:4 weights (plus 2:4 activations)."""
    rows = [
        ("synthetic", dtype, tokens, k, n, option, 1.0)
        for dtype in ("fp16", "int8")
        for tokens in (1, 16, 128, 1024, 8192)
        for k, n in ((1024, 1024), (4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (2048, 512))
        for option in ("dense", "w2:4", "a2:4")
    ]
    return pd.DataFrame(rows, columns=list(LATENCY_COLUMNS))


def synthetic_latencies(noise: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """Latencies of a known A100 profile (other factors than the shipped ones) times log-normal noise."""
    truth = load_profile("a100").with_efficiency(
        Efficiency(TRUE_FACTORS["compute_dense"], TRUE_FACTORS["compute_sparse"], TRUE_FACTORS["memory"]),
        TRUE_FACTORS["launch_overhead_us"],
    )
    frame = shapes_frame()
    clean = predict_latency_ms(truth, frame)
    return frame.assign(latency_ms=clean * np.exp(np.random.default_rng(seed).normal(0, noise, len(frame))))


def test_calibration_recovers_the_factors_from_a_csv(tmp_path) -> None:
    path = tmp_path / "latency.csv"
    synthetic_latencies().to_csv(path, index=False)
    result = calibrate("a100", path)
    assert result.initial.efficiency == load_profile("a100").efficiency  # started elsewhere
    for name, value in TRUE_FACTORS.items():
        assert result.factors[name] == pytest.approx(value, rel=0.05), name
    assert result.rmse_log_train == pytest.approx(0.05, rel=0.3)  # the noise level, nothing systematic left
    assert result.kendall_tau > 0.95
    assert result.decision_accuracy >= 0.9
    assert result.kendall_tau >= result.kendall_tau_initial
    split = result.predictions["split"]
    assert 0.15 < (split == "test").mean() < 0.35
    # Whole shapes are held out, so every held-out shape has its dense and sparse rows.
    test_rows = result.predictions[split == "test"]
    assert (test_rows.groupby(["dtype", "tokens", "in_features", "out_features"]).size() == 3).all()
    assert "Kendall tau" in result.summary() and "decision accuracy" in result.summary()


def test_noise_free_calibration_is_exact() -> None:
    result = calibrate("a100", synthetic_latencies(noise=0.0))
    for name, value in TRUE_FACTORS.items():
        assert result.factors[name] == pytest.approx(value, rel=1e-4), name
    assert result.decision_accuracy == 1.0
    np.testing.assert_allclose(result.predictions["predicted_ms"], result.predictions["latency_ms"], rtol=1e-4)


def test_calibrated_profile_saves_and_loads(tmp_path) -> None:
    result = calibrate("a100", synthetic_latencies())
    result.profile.save(tmp_path / "calibrated.yaml")
    loaded = load_profile(tmp_path / "calibrated.yaml")
    assert loaded == result.profile
    assert loaded.launch_overhead_us == pytest.approx(TRUE_FACTORS["launch_overhead_us"], rel=0.05)
    assert "fitted to" in loaded.source


def test_decision_accuracy_counts_each_shape_and_sparse_option() -> None:
    frame = pd.DataFrame(
        [
            ("gpu", "fp16", 1, 64, 64, "dense", 1.0),
            ("gpu", "fp16", 1, 64, 64, "w2:4", 2.0),  # sparse slower
            ("gpu", "fp16", 8, 64, 64, "dense", 2.0),
            ("gpu", "fp16", 8, 64, 64, "w2:4", 1.0),  # sparse faster
        ],
        columns=list(LATENCY_COLUMNS),
    )
    assert decision_accuracy(frame, np.array([1.0, 2.0, 2.0, 1.0])) == 1.0
    assert decision_accuracy(frame, np.array([1.0, 0.5, 2.0, 1.0])) == 0.5
    assert np.isnan(decision_accuracy(frame[frame["option"] == "dense"], np.ones(2)))


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda f: f.drop(columns="latency_ms"), "missing column 'latency_ms'"),
        (lambda f: f.drop(columns="option"), "missing column 'option'"),
        (lambda f: f.assign(latency_ms=-1.0), "row 0: latency_ms must be a positive number"),
        (lambda f: f.assign(tokens="many"), "row 0: tokens must be a positive number"),
        (lambda f: f.assign(dtype="fp64"), "row 0: unknown dtype 'fp64'"),
        (lambda f: f.assign(option="w2-4"), "row 0: unknown option 'w2-4'"),
        (lambda f: f.assign(option="w2:4+a2:4"), "row 0: option 'w2:4+a2:4' makes both operands sparse"),
        (lambda f: f.assign(option="w3:8"), "row 0: option 'w3:8' does not run on A100-SXM-80GB's fp16"),
        (lambda f: f.iloc[:0], "no rows"),
        (lambda f: f.iloc[:3], "at least 2 distinct shapes"),
    ],
)
def test_bad_latency_tables_are_refused(edit, fragment: str) -> None:
    with pytest.raises(CalibrationError) as info:
        calibrate("a100", edit(shapes_frame()))
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_device_column_is_only_a_label() -> None:
    result = calibrate("a100", synthetic_latencies().drop(columns="device"))
    assert result.factors["memory"] == pytest.approx(TRUE_FACTORS["memory"], rel=0.05)


def test_bad_holdout() -> None:
    with pytest.raises(CalibrationError, match="holdout"):
        calibrate("a100", shapes_frame(), holdout=1.0)


def test_cli_writes_the_calibrated_profile(tmp_path, capsys) -> None:
    csv = tmp_path / "latency.csv"
    synthetic_latencies().to_csv(csv, index=False)
    out = tmp_path / "a100_calibrated.yaml"
    assert main([str(csv), "--profile", "a100", "--out", str(out)]) == 0
    assert "Kendall tau" in capsys.readouterr().out
    assert load_profile(out).efficiency.memory == pytest.approx(TRUE_FACTORS["memory"], rel=0.05)
    assert main([str(csv), "--profile", "a1000"]) == 2
    assert "unknown hardware profile 'a1000'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit on machines without CUDA")
def test_gpu_latency_benchmark_exits_clearly_without_cuda(tmp_path, capsys) -> None:
    script = runpy.run_path(str(ROOT / "benchmarks" / "gpu_latency.py"))  # not as __main__: nothing runs yet
    out = tmp_path / "latency.csv"
    assert script["main"](["--out", str(out)]) == 1  # the script exits with main()'s status
    error = capsys.readouterr().err
    assert "no CUDA device" in error and "compute capability >= 8.0" in error
    assert not out.exists()
