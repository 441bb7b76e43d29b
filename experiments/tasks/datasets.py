"""Data helpers for the built-in tasks: checksummed downloads, stratified splits, batch augmentation.

Downloads go to a temporary file next to the destination, are verified against their md5 and
only then renamed into place, so an interrupted or corrupt download never looks complete.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch import Tensor
from tqdm.auto import tqdm

from search_space import NMSearchError

_CHUNK = 1 << 20


class DatasetError(NMSearchError):
    """A data set that is missing, partial or corrupt."""


class ChecksumError(DatasetError):
    """A downloaded or cached file whose checksum is not the published one."""


def md5sum(path: str | os.PathLike) -> str:
    """The md5 hex digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, destination: str | os.PathLike, md5: str, *, progress: bool = True, timeout: float = 60) -> Path:
    """Fetch ``url`` to ``destination`` unless a file with ``md5`` is already there.

    The bytes go to a temporary file, renamed over ``destination`` only once their md5 matches.

    Args:
        url: ``http(s)://`` or ``file://`` URL.
        destination: Where the file is kept.
        md5: Its published md5 hex digest.
        progress: Show a tqdm bar.
        timeout: Seconds to wait for the server.

    Returns:
        ``destination`` as a ``Path``.

    Raises:
        ChecksumError: If the fetched bytes, or a file already at ``destination``, do not match
            ``md5`` (a fetched file is not kept).
        DatasetError: If the URL cannot be read.
    """
    target = Path(destination)
    if target.exists():
        found = md5sum(target)
        if found == md5:
            return target
        raise ChecksumError(
            f"{target} has md5 {found}, expected {md5}: the file is corrupt or partial; delete it to download again"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as handle:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress) as bar:
                while chunk := response.read(_CHUNK):
                    handle.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != md5:
            raise ChecksumError(
                f"download of {url} has md5 {digest.hexdigest()}, expected {md5}: "
                "the transfer was corrupt or the file changed upstream"
            )
        os.replace(partial, target)
    except (urllib.error.URLError, OSError) as error:
        raise DatasetError(f"cannot download {url}: {getattr(error, 'reason', error)}") from error
    finally:
        partial.unlink(missing_ok=True)
    return target


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A stratified train / val / test split.

    Args:
        labels: Class label per sample.
        val_fraction: Share of the samples in ``val``.
        test_fraction: Share in ``test``.
        seed: Fixes the split.

    Returns:
        Index arrays ``(train, val, test)``, each with the class proportions of ``labels``.

    Raises:
        DatasetError: If a fraction is not positive or they sum to 1 or more.
    """
    if val_fraction <= 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
        raise DatasetError(
            f"val_fraction = {val_fraction} and test_fraction = {test_fraction} must be > 0 and sum to < 1"
        )
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=test_fraction, stratify=labels, random_state=seed)
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), stratify=labels[rest], random_state=seed
    )
    return train, val, test


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels in x and y, filling with zeros
    (the same as a random crop of the zero-padded image)."""
    if max_shift <= 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4).permute(0, 2, 3, 1)
    dy = torch.randint(0, 2 * max_shift + 1, (batch, 1), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (batch, 1), generator=generator)
    rows = (dy + torch.arange(height)).to(images.device)
    cols = (dx + torch.arange(width)).to(images.device)
    sample = torch.arange(batch, device=images.device)[:, None, None]
    return padded[sample, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_hflip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(3), images)
