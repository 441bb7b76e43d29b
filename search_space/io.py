"""Atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from search_space.patterns import NMSearchError

MIN_FREE_MB = 50.0  # below this a run's files (CSV, PNG, SQLite) may not fit


class OutputDirError(NMSearchError):
    """A folder that results or caches cannot be written to."""


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file so that readers see the old content or the new one, never half of either.

    ``write(file)`` fills a temporary file next to ``path``, which is fsynced and renamed over
    ``path``; on any error the temporary file is removed and ``path`` is untouched.

    Args:
        path: The file to write; missing parent folders are created.
        write: Called once with the temporary file, opened for binary writing.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OSError: If the folder or the file cannot be written (whatever ``write`` raises propagates too).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the mode open() would
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`).

    Args:
        path: The file to write.
        text: Its new content.

    Returns:
        ``path`` as a ``Path``.
    """
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def check_writable_dir(path: str | os.PathLike, what: str, fix: str, *, min_free_mb: float = MIN_FREE_MB) -> Path:
    """Prove that files can be created in ``path`` (or, if it does not exist yet, in its nearest
    existing parent, creating nothing), before any work that would write there.

    Args:
        path: The folder.
        what: What the folder is for, for the message (``"run directory"``).
        fix: How to point elsewhere, for the message (``"set hydra.run.dir=..."``).
        min_free_mb: Refuse when the file system has less free space than this.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputDirError: one line naming the folder, the reason and ``fix``.
    """
    folder = Path(path).expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(f"{what} '{folder}' cannot be created: '{existing}' is a file; {fix}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise OutputDirError(f"{what} '{folder}' is not writable: {os_error_reason(error)}; {fix}") from None
    free_mb = shutil.disk_usage(existing).free / 1e6
    if free_mb < min_free_mb:
        raise OutputDirError(
            f"{what} '{folder}' has only {free_mb:.1f} MB free (needs >= {min_free_mb:g} MB): free space; {fix}"
        )
    return folder


def os_error_reason(error: OSError) -> str:
    """A short, correct reason for a failed file operation (``"no space left on device"``)."""
    reasons = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOTDIR: "a path component is a file, not a folder",
        errno.EEXIST: "a file is in the way",
    }
    return reasons.get(error.errno, (error.strerror or type(error).__name__).lower())
