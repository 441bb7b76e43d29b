"""nmsearch's CPU extension -- the fused row-skipping convolution and the one-pass N:M mask: compiled
on first use, cached, optional.

``search_space/csrc/row_conv.cpp`` (:func:`row_conv_op`) and ``search_space/csrc/nm_mask.cpp``
(:func:`nm_mask_op`) are compiled into one library with :func:`torch.utils.cpp_extension.load` the first
time a process needs either (about 20-40 s) into ``$NMSEARCH_CACHE_DIR/extensions/`` (default
``~/.cache/nmsearch/extensions/``), in a folder named after a hash of the source, the torch version
and the compiler flags; later processes only load the built library. Where it cannot be built (no
C++ compiler, no Python headers, another platform), one warning line is issued,
:class:`~search_space.row_kernel.RowSkippingConv2d` keeps its pure-PyTorch gather path and
:func:`~search_space.masks.nm_mask` its eager-torch kernels (same results, slower).

``NMSEARCH_ROW_EXTENSION``: ``0`` never builds nor uses the extension (the pure-PyTorch path);
``require`` turns a failed build into an error (CI); unset or anything else: use it when it builds.
``NMSEARCH_EXTENSION_DIR`` overrides the ``<cache>/extensions`` folder (the test suite pins it to
the real cache, so tests that point ``NMSEARCH_CACHE_DIR`` at a temporary folder do not rebuild).
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from search_space.patterns import NMSearchError

__all__ = [
    "EXTENSION_DIR_ENV",
    "ROW_CONV_BLOCK_N",
    "ROW_EXTENSION_ENV",
    "RowExtensionError",
    "extension_dir",
    "nm_mask_op",
    "pack_row_weight",
    "row_conv_op",
]

ROW_EXTENSION_ENV = "NMSEARCH_ROW_EXTENSION"
EXTENSION_DIR_ENV = "NMSEARCH_EXTENSION_DIR"
# Column-block width of the packed weight; must equal kBlockN in csrc/row_conv.cpp.
ROW_CONV_BLOCK_N = 64
_SOURCES = (Path(__file__).parent / "csrc" / "row_conv.cpp", Path(__file__).parent / "csrc" / "nm_mask.cpp")
# Portable flags only (no -march=native: the build may be shared between machines); the
# micro-kernel is oneDNN's, chosen at run time for this CPU. -fopenmp: at::parallel_for is inline.
_CFLAGS = ["-O3", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_state: dict[str, bool] = {}  # "built": whether this process has the library (decided once)


class RowExtensionError(NMSearchError):
    """The CPU extension could not be built while ``NMSEARCH_ROW_EXTENSION=require``."""


def extension_dir() -> Path:
    """Where these sources, torch version and flag set is built: ``<extensions>/cpu_kernels-<hash>``.

    ``<extensions>`` is ``$NMSEARCH_EXTENSION_DIR``, else ``$NMSEARCH_CACHE_DIR/extensions``, else
    ``~/.cache/nmsearch/extensions``.

    Returns:
        The build folder (not created).
    """
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in _SOURCES))
    digest.update(f"{torch.__version__}|{sys.version_info[:2]}|{_CFLAGS}|{_LDFLAGS}".encode())
    extensions = os.environ.get(EXTENSION_DIR_ENV)
    if not extensions:
        cache = os.environ.get("NMSEARCH_CACHE_DIR") or Path.home() / ".cache" / "nmsearch"
        extensions = Path(cache) / "extensions"
    return Path(extensions).expanduser() / f"cpu_kernels-{digest.hexdigest()[:16]}"


def row_conv_op() -> Callable[..., torch.Tensor] | None:
    """The fused kernel ``torch.ops.nmsearch_rows.row_conv``, built on the first call of a process.

    Returns:
        The op, or ``None`` when ``NMSEARCH_ROW_EXTENSION=0`` or it could not be built (after one
        warning line naming the cause); the answer is kept for the rest of the process.

    Raises:
        RowExtensionError: If the build fails while ``NMSEARCH_ROW_EXTENSION=require``.
    """
    return torch.ops.nmsearch_rows.row_conv if _available() else None


def nm_mask_op() -> Callable[..., None] | None:
    """The one-pass mask ``torch.ops.nmsearch_masks.nm_mask_out(scores, out, n, m, dim)``.

    It fills the contiguous CPU tensor ``out`` (any dtype) with the N:M mask of the contiguous CPU
    ``scores`` (a floating dtype) along ``dim``, ``m <= 64``, exactly as
    :func:`~search_space.masks.nm_mask` defines it.

    Returns:
        The op, or ``None`` when ``NMSEARCH_ROW_EXTENSION=0`` or the extension could not be built.

    Raises:
        RowExtensionError: If the build fails while ``NMSEARCH_ROW_EXTENSION=require``.
    """
    return torch.ops.nmsearch_masks.nm_mask_out if _available() else None


def _available() -> bool:
    """Whether the library is loaded in this process, building it on the first call."""
    mode = os.environ.get(ROW_EXTENSION_ENV, "")
    if mode == "0":
        return False
    if "built" not in _state:
        try:
            _build()
            _state["built"] = True
        except Exception as error:  # any build or load failure means: use the pure-PyTorch paths
            cause = " ".join(str(error).split())[-300:]
            if mode == "require":
                raise RowExtensionError(f"nmsearch's CPU extension did not build: {cause}") from error
            warnings.warn(
                f"nmsearch: the CPU extension (fused row-skipping conv, one-pass N:M masks) did not build, "
                f"using the slower pure-PyTorch kernels (set {ROW_EXTENSION_ENV}=0 to silence): {cause}",
                RuntimeWarning,
                stacklevel=3,
            )
            _state["built"] = False
    return _state["built"]


def _build() -> None:
    if hasattr(torch.ops.nmsearch_rows, "row_conv") and hasattr(torch.ops.nmsearch_masks, "nm_mask_out"):
        return  # already loaded in this process
    from torch.utils.cpp_extension import load  # imported lazily: it is slow to import

    directory = extension_dir()
    directory.mkdir(parents=True, exist_ok=True)
    load(
        name="nmsearch_cpu_kernels",
        sources=[str(source) for source in _SOURCES],
        extra_cflags=_CFLAGS,
        extra_ldflags=_LDFLAGS,
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )


def pack_row_weight(matrix: torch.Tensor) -> torch.Tensor:
    """The ``(K, Cout)`` GEMM weight in the fused kernel's layout.

    Args:
        matrix: ``(kh kw C, Cout)``: row ``(r, s, c)`` holds the weights of input channel ``c`` at
            kernel offset ``(r, s)``.

    Returns:
        A contiguous 1-D tensor: the column blocks ``matrix[:, j : j + 64]`` (the last one narrower),
        each row-major, one after the other.
    """
    blocks = matrix.split(ROW_CONV_BLOCK_N, dim=1)
    return torch.cat([block.contiguous().flatten() for block in blocks])
