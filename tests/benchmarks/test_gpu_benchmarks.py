"""benchmarks/gpu_latency.py and gpu_overhead.py: shapes, the device-to-profile map, no CUDA, bad
input; on a CUDA sm80+ machine, rows the calibration reads."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from evaluators.calibration import read_measurements
from tests.benchmarks import benchmark_modules


@pytest.fixture(scope="module")
def modules():
    return benchmark_modules("gpu_latency", "gpu_overhead")


def test_default_shapes_parse_and_bad_shapes_are_refused(modules) -> None:
    gpu_latency, _ = modules
    shapes = [gpu_latency.parse_shape(s) for s in gpu_latency.DEFAULT_SHAPES]
    assert len(shapes) == len(set(shapes)) == 47 and (1, 4096, 4096) in shapes and (32768, 1536, 384) in shapes
    for bad in ("4096x4096", "0x8x8", "axbxc"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"MxNxK|positive"):
            gpu_latency.parse_shape(bad)


def test_device_names_map_to_profiles(modules) -> None:
    gpu_latency, _ = modules
    assert gpu_latency.profile_for_device("NVIDIA H200") == "h200"
    assert gpu_latency.profile_for_device("NVIDIA H100 PCIe") == "h100_pcie"
    assert gpu_latency.profile_for_device("NVIDIA H100 80GB HBM3") == "h100_sxm"
    assert gpu_latency.profile_for_device("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_latency.profile_for_device("Tesla T4") is None


def test_bad_hardware_is_one_line_before_any_timing(modules, tmp_path: Path, capsys) -> None:
    gpu_latency, _ = modules
    assert gpu_latency.main(["--out", str(tmp_path / "p.csv"), "--hardware", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err and not (tmp_path / "p.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_without_cuda_both_say_why_and_write_nothing(modules, tmp_path: Path, capsys) -> None:
    gpu_latency, gpu_overhead = modules
    assert gpu_latency.main(["--out", str(tmp_path / "p.csv")]) == 0
    assert "skipped: no CUDA device" in capsys.readouterr().out and not (tmp_path / "p.csv").exists()
    assert gpu_overhead.main([]) == 0
    assert "skipped: no CUDA device" in capsys.readouterr().out


def test_on_a_gpu_the_rows_join_the_calibration_data(modules, tmp_path: Path, capsys) -> None:
    gpu_latency, gpu_overhead = modules
    if gpu_latency.cuda_problem():
        pytest.skip(gpu_latency.cuda_problem())
    out = tmp_path / "p.csv"
    assert gpu_latency.main(["--out", str(out), "--shapes", "256x1024x1024", "--repeats", "3", "--inner", "2"]) == 0
    rows = read_measurements(out)
    assert (rows["source"] == "measured here").all() and len(rows) >= 1
    graph = tmp_path / "graph.csv"
    args = ["--out", str(graph), "--shapes", "256x1024x1024", "--repeats", "3", "--inner", "2", "--graph"]
    assert gpu_latency.main(args) == 0
    assert read_measurements(graph)["library"].str.contains("CUDA-graph replay").all()
    assert gpu_overhead.main(["--shapes", "256x1024x1024"]) == 0
    assert "256x1024x1024 2:4:" in capsys.readouterr().out
