"""The one-worker-per-GPU launcher, with the device list mocked on CPU."""

import json
from pathlib import Path

import pytest
import torch

from experiments.status import load_study, progress
from experiments.workers import devices_from_env, main, plan_workers, run_workers
from search_space import NMSearchError


def test_each_worker_is_pinned_to_its_device(tmp_path: Path) -> None:
    plans = plan_workers(
        ["0", "3"], tmp_path, ["task=synthetic"], per_device=2, module="tests.experiments.device_probe"
    )
    assert run_workers(plans) == [0, 0, 0, 0]
    seen = [json.loads((tmp_path / f"worker_{i}" / "probe.json").read_text()) for i in range(4)]
    assert [s["CUDA_VISIBLE_DEVICES"] for s in seen] == ["0", "0", "3", "3"]  # each sees only its GPU
    assert [s["LOCAL_RANK"] for s in seen] == ["0", "1", "2", "3"]
    assert [s["overrides"]["strategy.worker_index"] for s in seen] == ["0", "1", "2", "3"]
    assert {s["overrides"]["device"] for s in seen} == {"cuda:0"}
    assert {s["overrides"]["strategy.storage"] for s in seen} == {f"'journal:{tmp_path.resolve()}/optuna.journal'"}
    assert all(s["overrides"]["task"] == "synthetic" for s in seen)
    cpu = plan_workers(["cpu"], tmp_path, storage="postgresql://db/x?sslmode=disable")[0]
    assert cpu.env["CUDA_VISIBLE_DEVICES"] == "" and "device=cpu" in cpu.command
    assert "strategy.storage='postgresql://db/x?sslmode=disable'" in cpu.command


def test_devices_come_from_the_environment(monkeypatch) -> None:
    assert devices_from_env({"NMSEARCH_DEVICES": "2,5", "CUDA_VISIBLE_DEVICES": "0"}) == ["2", "5"]
    assert devices_from_env({"CUDA_VISIBLE_DEVICES": "1, 2"}) == ["1", "2"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices_from_env({}) == ["0", "1"]  # else every GPU torch sees
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert devices_from_env({}) == []


def test_bad_launches_are_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("NMSEARCH_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # a machine without a GPU
    assert main(["--run-dir", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == "nmsearch: no device to run workers on: no GPU is visible; pass --devices (e.g. cpu,cpu)\n"
    )
    assert main(["--run-dir", str(tmp_path), "--devices", "0", "--", "strategy.worker_index=3"]) == 2
    assert "strategy.worker_index=3: the launcher sets" in capsys.readouterr().err
    with pytest.raises(NMSearchError, match="--per-device must be >= 1"):
        plan_workers(["0"], tmp_path, per_device=0)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_two_cpu_workers_share_one_study(tmp_path: Path) -> None:
    overrides = ["task=synthetic", "strategy.n_trials=12", f"cache_dir={tmp_path / 'cache'}"]
    assert main(["--run-dir", str(tmp_path), "--devices", "cpu,cpu", "--", *overrides]) == 0
    counts = progress(load_study(f"journal:{tmp_path / 'optuna.journal'}"))
    assert (counts.finished, counts.running, counts.lost) == (12, 0, 0)
    assert all((tmp_path / f"worker_{i}" / "trials.csv").is_file() for i in range(2))
