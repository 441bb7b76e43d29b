"""``cifar10``: our reader of the standard CIFAR-10 python batches, with ResNet-20 or CIFAR ResNet-18.

``cifar-10-python.tar.gz`` (https://www.cs.toronto.edu/~kriz/) is downloaded into
``<cache>/datasets/cifar10`` when absent, checked against its published md5, and only the
expected batch files are extracted. The batches are pickles: they are read with an unpickler
that accepts nothing but the NumPy arrays, lists and dicts the format holds.

Splits: ``val_size`` training images, drawn stratified with a fixed seed, form ``val``; the
official test batch is ``test``. Training batches get the usual 4-pixel shift and horizontal flip.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from evaluators.task import TaskError, TensorTask, TrainingSchedule
from evaluators.training import default_cache_dir
from experiments.models import resnet18, resnet20
from experiments.tasks.datasets import DatasetError, download, random_hflip, random_shift
from search_space import atomic_write

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
MODELS = {"resnet20": resnet20, "resnet18": lambda num_classes: resnet18(num_classes, "cifar")}

CIFAR10_SCHEDULE = TrainingSchedule(
    epochs=200, batch_size=128, eval_batch_size=1000, lr=0.1, weight_decay=5e-4, finetune_lr=0.01
)

# What the batch pickles may reference (Python 2 cPickle of NumPy 1 arrays, or NumPy 2 re-pickles).
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 batch file with an unpickler that accepts only its arrays, lists and dicts.

    Args:
        path: A ``data_batch_N`` or ``test_batch`` file.

    Returns:
        Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)``.

    Raises:
        DatasetError: If the file is corrupt, partial or holds anything else.
    """
    try:
        batch = _BatchUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    except FileNotFoundError:
        raise DatasetError(f"CIFAR-10 batch {path} is missing; delete {path.parent} to extract it again") from None
    except Exception as error:  # truncated or foreign files fail in many ways inside pickle
        raise DatasetError(
            f"CIFAR-10 batch {path} is corrupt or partial ({type(error).__name__}: {error}); "
            f"delete {path.parent} to extract it again"
        ) from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DatasetError(
            f"CIFAR-10 batch {path} holds data {data.dtype}{list(data.shape)} and {len(labels)} labels, "
            "expected uint8 [N, 3072] and N labels; delete the folder to extract it again"
        )
    if len(labels) and not 0 <= labels.min() <= labels.max() <= 9:
        raise DatasetError(f"CIFAR-10 batch {path} has labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(folder: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read an extracted ``cifar-10-batches-py`` folder.

    Args:
        folder: The folder.

    Returns:
        ``{"train": (images, labels), "test": (images, labels)}``.

    Raises:
        DatasetError: If a batch file is corrupt or partial.
    """
    folder = Path(folder)
    train = [read_batch(folder / name) for name in TRAIN_BATCHES]
    return {
        "train": (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
        "test": read_batch(folder / TEST_BATCH),
    }


def _extract(archive: Path, root: Path) -> None:
    """Extract only the expected batch files (no other path in the archive is ever written)."""
    wanted = {f"{FOLDER}/{name}" for name in (*TRAIN_BATCHES, TEST_BATCH)}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {member.name: member for member in tar.getmembers() if member.name in wanted and member.isfile()}
            missing = sorted(wanted - members.keys())
            if missing:
                raise DatasetError(f"{archive} lacks {', '.join(missing)}: not the CIFAR-10 python archive")
            for name, member in members.items():
                payload = tar.extractfile(member).read()
                atomic_write(root / name, lambda handle, payload=payload: handle.write(payload))
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DatasetError(f"{archive} is not a readable .tar.gz ({error}); delete it to download again") from None


def ensure_cifar10(
    root: str | Path,
    *,
    download_missing: bool = True,
    url: str = CIFAR10_URL,
    md5: str = CIFAR10_MD5,
    progress: bool = True,
) -> Path:
    """The extracted batch folder under ``root``, downloading and extracting the archive when needed.

    Args:
        root: Where the archive and the extracted folder live.
        download_missing: Fetch the archive when it is not in ``root``.
        url: Where to fetch it.
        md5: Its published md5.
        progress: Show a download bar.

    Returns:
        The ``cifar-10-batches-py`` folder.

    Raises:
        DatasetError: If the data are missing and ``download_missing`` is false, or the URL fails.
        ChecksumError: If the archive's md5 is not the published one.
    """
    root = Path(root).expanduser()
    folder = root / FOLDER
    missing = [name for name in (*TRAIN_BATCHES, TEST_BATCH) if not (folder / name).is_file()]
    if not missing:
        return folder
    archive = root / ARCHIVE
    if not archive.exists() and not download_missing:
        raise DatasetError(
            f"CIFAR-10 is not in {root} (missing {', '.join(missing)}); "
            f"pass download=True or put {ARCHIVE} from {url} there"
        )
    download(url, archive, md5, progress=progress)  # verifies the md5 of an archive already there too
    _extract(archive, root)
    return folder


@dataclass(frozen=True)
class Cifar10Task(TensorTask):
    """CIFAR-10 with ResNet-20 or CIFAR ResNet-18; 5000 stratified training images form ``val``.

    ``data_dir``, ``download``, ``url`` and ``progress`` say where the data come from, not what
    they are, so they do not enter the pre-training cache key.

    Attributes:
        seed: Fixes the train / val draw.
        schedule: 200 epochs, batch 128, lr 0.1 by default.
        model: ``"resnet20"`` or ``"resnet18"`` (CIFAR variant).
        val_size: Training images held out as ``val``.
        md5: The archive's published md5.
        data_dir: Default ``<cache>/datasets/cifar10``.
        download: Fetch the archive when it is missing.
        url: Where to fetch it.
        progress: Show a download bar.

    Raises:
        TaskError: If ``model`` is unknown.
    """

    name: ClassVar[str] = "cifar10"
    seed: int = 0
    schedule: TrainingSchedule = CIFAR10_SCHEDULE
    model: str = "resnet20"
    val_size: int = 5000
    md5: str = CIFAR10_MD5
    data_dir: str | None = field(default=None, metadata={"cache_key": False})
    download: bool = field(default=True, metadata={"cache_key": False})
    url: str = field(default=CIFAR10_URL, metadata={"cache_key": False})
    progress: bool = field(default=True, metadata={"cache_key": False})

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise TaskError(f"cifar10 model {self.model!r} is not one of {', '.join(MODELS)}")

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        root = Path(self.data_dir) if self.data_dir else default_cache_dir() / "datasets" / "cifar10"
        folder = ensure_cifar10(
            root, download_missing=self.download, url=self.url, md5=self.md5, progress=self.progress
        )
        data = read_cifar10(folder)
        images, labels = data["train"]
        if not 0 < self.val_size < len(labels):
            raise DatasetError(f"cifar10 val_size = {self.val_size} must be between 1 and {len(labels) - 1}")
        train, val = train_test_split(
            np.arange(len(labels)), test_size=self.val_size, stratify=labels, random_state=self.seed
        )
        splits = {"train": (images[train], labels[train]), "val": (images[val], labels[val]), "test": data["test"]}
        return {name: (torch.from_numpy(x), torch.from_numpy(y)) for name, (x, y) in splits.items()}

    def build_model(self) -> nn.Module:
        return MODELS[self.model](10)

    def prepare(self, inputs: Tensor, augment: bool, generator: torch.Generator) -> Tensor:
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        std = torch.tensor(STD).view(1, 3, 1, 1)
        images = (inputs.float() / 255.0 - mean) / std
        if augment:
            images = random_hflip(random_shift(images, 4, generator), generator)
        return images
