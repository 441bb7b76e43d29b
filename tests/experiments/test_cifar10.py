"""The CIFAR-10 reader and downloader, against small archives in the real format built here."""

import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluators.task import TaskError
from experiments.tasks import ChecksumError, DatasetError, get_task
from experiments.tasks.cifar10 import ARCHIVE, FOLDER, TEST_BATCH, TRAIN_BATCHES, ensure_cifar10, read_batch

PER_BATCH = 20


def batch_bytes(seed: int, count: int = PER_BATCH) -> bytes:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
    labels = [int(i % 10) for i in range(count)]
    return pickle.dumps({b"batch_label": b"batch", b"labels": labels, b"data": data}, protocol=2)


def write_archive(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def archive(tmp_path):
    """A small cifar-10-python.tar.gz: five training batches and a test batch of 20 images each."""
    members = {name: batch_bytes(i) for i, name in enumerate((*TRAIN_BATCHES, TEST_BATCH))}
    members["batches.meta"] = pickle.dumps({b"label_names": [b"x"] * 10}, protocol=2)
    path = tmp_path / "served" / ARCHIVE
    path.parent.mkdir()
    return path, write_archive(path, members)


@pytest.fixture
def http_url(archive):
    path, _ = archive
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(path.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{ARCHIVE}"
    server.shutdown()
    server.server_close()


def task(data_dir, url, md5, **kwargs):
    return get_task("cifar10", data_dir=str(data_dir), url=url, md5=md5, val_size=20, progress=False, **kwargs)


def test_download_from_a_file_url_then_read_the_splits(archive, tmp_path) -> None:
    path, md5 = archive
    cifar = task(tmp_path / "data", path.as_uri(), md5)
    splits = cifar.splits
    assert {n: len(y) for n, (_, y) in splits.items()} == {"train": 80, "val": 20, "test": 20}
    assert splits["train"][0].shape == (80, 3, 32, 32) and splits["train"][0].dtype == torch.uint8
    assert torch.bincount(splits["val"][1]).tolist() == [2] * 10  # stratified
    expected = np.frombuffer(pickle.loads(batch_bytes(5), encoding="bytes")[b"data"].tobytes(), np.uint8)
    assert torch.equal(splits["test"][0].flatten(), torch.from_numpy(expected.copy()))
    assert (tmp_path / "data" / ARCHIVE).exists() and not (tmp_path / "data" / FOLDER / "batches.meta").exists()
    inputs = cifar.example_inputs()
    assert inputs.shape == (2, 3, 32, 32) and inputs.dtype == torch.float32 and inputs.abs().max() < 3
    images, _ = next(iter(cifar.loader("train", shuffle=True, augment=True, seed=0)))
    assert images.shape == (80, 3, 32, 32)
    # Extracted data are read again without touching the network.
    offline = task(tmp_path / "data", "http://127.0.0.1:9/unreachable", md5, download=False)
    assert torch.equal(offline.splits["test"][0], splits["test"][0])


def test_download_over_loopback_http(http_url, archive, tmp_path) -> None:
    _, md5 = archive
    cifar = task(tmp_path / "data", http_url, md5)
    assert len(cifar.splits["test"][1]) == PER_BATCH


def test_default_location_is_the_cache_directory(archive, tmp_path, monkeypatch) -> None:
    path, md5 = archive
    monkeypatch.setenv("NMSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    _ = get_task("cifar10", url=path.as_uri(), md5=md5, val_size=20, progress=False).splits
    assert (tmp_path / "cache" / "datasets" / "cifar10" / FOLDER / TEST_BATCH).is_file()


def test_checksum_mismatch_keeps_nothing(http_url, tmp_path) -> None:
    with pytest.raises(ChecksumError, match=r"md5 [0-9a-f]{32}, expected 0{32}"):
        _ = task(tmp_path / "data", http_url, "0" * 32).splits
    assert not list((tmp_path / "data").iterdir())


def test_partial_archive_in_the_data_directory(archive, tmp_path) -> None:
    path, md5 = archive
    data = tmp_path / "data"
    data.mkdir()
    (data / ARCHIVE).write_bytes(path.read_bytes()[:100])
    with pytest.raises(ChecksumError, match="is corrupt or partial; delete it to download again"):
        _ = task(data, path.as_uri(), md5).splits


def test_missing_data_without_download(tmp_path) -> None:
    missing = r"CIFAR-10 is not in .* \(missing data_batch_1, .*test_batch\); pass download=True"
    with pytest.raises(DatasetError, match=missing):
        _ = task(tmp_path, "file:///nowhere", "0" * 32, download=False).splits


def test_unreachable_url(tmp_path) -> None:
    with pytest.raises(DatasetError, match="cannot download file:///nowhere"):
        _ = task(tmp_path, "file:///nowhere/cifar.tar.gz", "0" * 32).splits


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign_object", "wrong_shape", "missing"])
def test_corrupt_or_partial_batch_files(archive, tmp_path, damage) -> None:
    path, md5 = archive
    folder = ensure_cifar10(tmp_path, url=path.as_uri(), md5=md5, progress=False)
    batch = folder / "data_batch_3"
    if damage == "truncated":
        batch.write_bytes(batch.read_bytes()[:500])
    elif damage == "garbage":
        batch.write_bytes(b"\x00" * 64)
    elif damage == "foreign_object":
        batch.write_bytes(pickle.dumps({b"data": print, b"labels": []}))
    elif damage == "wrong_shape":
        batch.write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, protocol=2))
    else:
        batch.unlink()
    with pytest.raises(DatasetError, match="data_batch_3") as error:
        read_batch(batch)
    assert "\n" not in str(error.value)
    if damage == "foreign_object":
        assert "unexpected object builtins.print" in str(error.value)


def test_missing_batch_is_extracted_again_from_the_archive(archive, tmp_path) -> None:
    path, md5 = archive
    folder = ensure_cifar10(tmp_path, url=path.as_uri(), md5=md5, progress=False)
    (folder / "data_batch_3").unlink()
    assert len(task(tmp_path, "file:///nowhere", md5, download=False).splits["train"][1]) == 80


def test_archive_without_the_batches(tmp_path) -> None:
    path = tmp_path / ARCHIVE
    md5 = write_archive(path, {"readme.txt": b"hello"})
    with pytest.raises(DatasetError, match="lacks cifar-10-batches-py/data_batch_1"):
        ensure_cifar10(tmp_path / "data", url=path.as_uri(), md5=md5, progress=False)


def test_batches_pickled_by_numpy_1_are_read(tmp_path) -> None:
    # The published files reference numpy.core.multiarray (NumPy 1); NumPy 2 writes numpy._core.
    payload = batch_bytes(0).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in payload
    (tmp_path / "batch").write_bytes(payload)
    images, labels = read_batch(tmp_path / "batch")
    assert images.shape == (PER_BATCH, 3, 32, 32) and labels.tolist() == [i % 10 for i in range(PER_BATCH)]


def test_models() -> None:
    assert get_task("cifar10").build_model()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in get_task("cifar10", model="resnet18").build_model().parameters()) > 11e6
    with pytest.raises(TaskError, match="cifar10 model 'vgg' is not one of resnet20, resnet18"):
        get_task("cifar10", model="vgg")
