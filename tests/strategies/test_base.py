import logging
import pickle
from pathlib import Path

import torch

from strategies.base import load_checkpoint, save_checkpoint

_EXECUTED: list[str] = []


def _payload(marker: str) -> None:
    _EXECUTED.append(marker)


class _Exploit:
    def __reduce__(self):
        return (_payload, ("ran",))


def test_checkpoint_round_trip_holds_tensors_and_plain_types(tmp_path: Path) -> None:
    state = {
        "epoch": 2,
        "model": {"w": torch.arange(4.0)},
        "rows": [{"loss": 0.5, "name": "a"}],
        "rng": torch.get_rng_state(),
    }
    path = save_checkpoint(tmp_path / "run.pt", state)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 2 and loaded["rows"] == state["rows"]
    torch.testing.assert_close(loaded["model"]["w"], state["model"]["w"])
    assert load_checkpoint(tmp_path / "missing.pt") is None


def test_truncated_checkpoint_is_one_warning_and_a_fresh_start(tmp_path: Path, caplog) -> None:
    path = save_checkpoint(tmp_path / "run.pt", {"model": {"w": torch.randn(64, 64)}, "epoch": 3})
    path.write_bytes(path.read_bytes()[:200])
    with caplog.at_level(logging.WARNING, logger="strategies.base"):
        assert load_checkpoint(path) is None
    assert len(caplog.records) == 1 and "cannot be read" in caplog.records[0].getMessage()
    assert "\n" not in caplog.records[0].getMessage()


def test_crafted_pickle_payload_is_not_executed(tmp_path: Path, caplog) -> None:
    path = tmp_path / "run.pt"
    with path.open("wb") as handle:
        pickle.dump({"epoch": _Exploit()}, handle)
    torch.save({"epoch": _Exploit()}, tmp_path / "zip.pt")
    with caplog.at_level(logging.WARNING, logger="strategies.base"):
        assert load_checkpoint(path) is None
        assert load_checkpoint(tmp_path / "zip.pt") is None
    assert _EXECUTED == []
    assert len(caplog.records) == 2
