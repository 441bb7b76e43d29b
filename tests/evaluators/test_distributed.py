"""Data-parallel training under torchrun: 2 CPU processes (gloo) against one process."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from evaluators import distributed
from search_space import NMSearchError

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args], cwd)


def test_shards_and_sums_without_a_process_group() -> None:
    batches = [(torch.arange(10.0).view(5, 2), torch.arange(5))]
    assert [(len(t), total) for _, t, total in distributed.shard(batches)] == [(5, 5)]
    assert distributed.sum_across(1.5, 2) == [1.5, 2] and distributed.is_main() and distributed.world_size() == 1
    distributed.check_same_config({"a": 1})  # a single process always agrees with itself
    assert distributed.init_from_env("cpu") == "cpu"  # WORLD_SIZE unset: nothing to join


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_and_only_rank_0_writes(tmp_path: Path) -> None:
    single = _run(["-m", "tests.evaluators.ddp_job", str(tmp_path / "single")], ROOT)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _torchrun("-m", "tests.evaluators.ddp_job", str(tmp_path / "ddp"), cwd=ROOT)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    one, two = tmp_path / "single" / "run", tmp_path / "ddp" / "run"
    writes = (tmp_path / "ddp" / "writes.log").read_text().splitlines()
    assert writes and {w.split()[0] for w in writes} == {"0"}  # rank 1 wrote nothing
    assert sorted(writes) == sorted((tmp_path / "single" / "writes.log").read_text().splitlines())  # each once
    assert len(list((two / "gumbel").glob("*.pt"))) == 1
    for name in ("gumbel_log.csv", "gumbel_probs.csv", "trials.csv"):
        a, b = pd.read_csv(one / name), pd.read_csv(two / name)
        assert list(a.columns) == list(b.columns) and len(a) == len(b), name
        numeric = [c for c in a.columns if pd.api.types.is_float_dtype(a[c]) and c != "duration_s"]
        pd.testing.assert_frame_equal(a[numeric], b[numeric], rtol=1e-4, atol=1e-5, obj=name)
        text = [c for c in a.columns if a[c].dtype == object]
        pd.testing.assert_frame_equal(a[text], b[text], obj=name)

    # the same job again resumes on both ranks from rank 0's last checkpoint: no epoch is retrained
    again = _torchrun("-m", "tests.evaluators.ddp_job", str(tmp_path / "ddp"), cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "ddp" / "writes.log").read_text().splitlines() == writes  # nothing trained or written
    pd.testing.assert_frame_equal(pd.read_csv(two / "gumbel_log.csv"), pd.read_csv(one / "gumbel_log.csv"), rtol=1e-4)


@pytest.mark.slow
def test_ranks_that_disagree_on_the_config_stop_before_any_work(tmp_path: Path) -> None:
    done = _torchrun(
        "-m", "experiments.search", "task=synthetic", "strategy=gumbel", "seed=${oc.env:RANK}", "device=cpu",
        f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("nmsearch:")]
    assert lines and "torchrun ranks disagree on the config: rank(s) 1 differ from rank 0" in lines[0]
    ours = done.stderr.split("torch/distributed/elastic", 1)[0]  # after it: torchrun's own failure report
    assert "Traceback" not in ours and ours.count("nmsearch:") == 2  # one line from each rank
    assert not (tmp_path / "cache").exists()  # nothing was trained


def test_strategies_that_cannot_run_data_parallel_are_refused(monkeypatch) -> None:
    from experiments import search

    monkeypatch.setattr(search.distributed, "init_from_env", lambda device: device)
    monkeypatch.setattr(search.distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(search.distributed, "check_same_config", lambda config: None)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["task=synthetic", "strategy=optuna"])
    with pytest.raises(NMSearchError, match="strategy 'optuna' does not run under torchrun"):
        search.run(cfg, Path("unused"))
