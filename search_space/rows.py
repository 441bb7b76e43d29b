"""Semi-structured activation sparsity (Grimaldi et al., ICCVW 2023): static masks over a conv's GEMM rows.

A conv is the GEMM ``Y[T x N] = X[T x K] W^T`` with one row of the im2col matrix ``X`` per output
position. A *row mask* drops the same output positions for every channel and batch item, so a
kernel skips whole GEMM rows: work and bytes shrink by ``1 - s`` on any hardware, no sparse
tensor cores needed. Skipped rows output zero (bias included).

* **scores**: a uniform random field drawn at the network input's resolution (from a seed) and
  pooled -- the mean ``|r|`` over each output position's region, an area-normalised L1 norm -- to
  every layer's output size, so the layers of one model skip the same image regions;
* **masks**: the ``round(s P)`` lowest-scoring of a layer's ``P`` positions are skipped (ties: lowest
  index first; at least one row is kept), so a mask at a lower sparsity keeps a superset of the
  rows kept at a higher one (nested);
* **selection** (:func:`select_row_masks`): ``k`` random fields; the one with the lowest loss on a
  batch is kept (frozen);
* **ramp**: a :class:`~search_space.Recipe` raises ``s`` polynomially from 0 to the target during
  training (:func:`~search_space.recipes.row_ramp_sparsity`);
* **inference**: the row-skipping kernel lives in :mod:`search_space.row_kernel`
  (:class:`~search_space.row_kernel.RowSkippingConv2d`, :func:`~search_space.row_kernel.skip_masked_rows`).

This module knows nothing of the sparse layer classes: a *row-masked layer* is any ``nn.Conv2d``
whose ``activation_pattern`` is a :class:`RowPattern` (``SparseConv2d`` is the one nmsearch makes).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from search_space.patterns import NMSearchError

DEFAULT_ROW_SPARSITIES = (0.1, 0.2, 0.3)
DEFAULT_ROW_CANDIDATES = 8

_ROW_NAME = re.compile(r"^\s*r?\s*(?P<s>[0-9.eE+-]+)\s*$")


class InvalidSparsityError(NMSearchError):
    """A row sparsity that is not a number in (0, 1)."""


@dataclass(frozen=True, order=True)
class RowPattern:
    """Skip the fraction ``sparsity`` of a conv's GEMM rows (output positions) with a static mask.

    Attributes:
        sparsity: Fraction of output positions skipped, strictly between 0 and 1.

    Raises:
        InvalidSparsityError: If ``sparsity`` is not a number in (0, 1).
    """

    sparsity: float

    def __post_init__(self) -> None:
        value = self.sparsity
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < 1:
            raise InvalidSparsityError(
                f"invalid row sparsity {value!r}: it must be a number strictly between 0 and 1, e.g. 0.2"
            )
        object.__setattr__(self, "sparsity", float(value))

    @classmethod
    def parse(cls, text: str | float | RowPattern) -> RowPattern:
        """Build a row pattern from text, a number or an existing pattern.

        Args:
            text: ``"r0.2"``, ``"0.2"``, ``0.2`` or a ``RowPattern`` (returned as is).

        Returns:
            The pattern.

        Raises:
            InvalidSparsityError: If the text is not of that form or the value is outside (0, 1).
        """
        if isinstance(text, RowPattern):
            return text
        if isinstance(text, numbers.Real) and not isinstance(text, bool):
            return cls(text)
        match = _ROW_NAME.match(str(text))
        try:
            value = float(match["s"]) if match else None
        except ValueError:
            value = None
        if value is None:
            raise InvalidSparsityError(f"invalid row sparsity {text!r}: write it as 'r0.2'")
        return cls(value)

    @property
    def is_dense(self) -> bool:
        """Always ``False``: a row pattern skips at least one row's worth of sparsity."""
        return False

    @property
    def density(self) -> float:
        """Fraction of rows kept (before rounding to whole rows)."""
        return 1.0 - self.sparsity

    def __str__(self) -> str:
        return f"r{self.sparsity!r}"


# -- masks (pure functions) --------------------------------------------------------------------
def pruned_rows(positions: int, sparsity: float) -> int:
    """How many rows a mask at ``sparsity`` skips.

    Args:
        positions: The layer's output positions P.
        sparsity: In [0, 1).

    Returns:
        ``round(s P)``, at most ``P - 1`` (at least one row is kept).

    Raises:
        InvalidSparsityError: If ``sparsity`` is outside [0, 1).
    """
    if not 0 <= sparsity < 1:
        raise InvalidSparsityError(f"invalid row sparsity {sparsity!r}: it must be in [0, 1)")
    return min(positions - 1, math.floor(sparsity * positions + 0.5))


def row_kept_fraction(positions: int | None, sparsity: float) -> float:
    """Fraction of GEMM rows a mask keeps, after rounding to whole rows.

    Args:
        positions: The layer's output positions, or ``None`` when unknown.
        sparsity: In [0, 1).

    Returns:
        ``1 - pruned_rows(P, s) / P``; ``1 - s`` without ``positions``.
    """
    if not positions:
        return 1.0 - sparsity
    return 1.0 - pruned_rows(positions, sparsity) / positions


def random_row_scores(input_size: tuple[int, int], seed: int) -> Tensor:
    """A uniform random field at the network input's resolution, reproducible from ``seed``.

    Args:
        input_size: ``(H, W)`` of the network input.
        seed: The field's seed.

    Returns:
        An ``(H, W)`` tensor of values in [0, 1).
    """
    return torch.rand(tuple(input_size), generator=torch.Generator().manual_seed(int(seed)))


def pool_row_scores(scores: Tensor, output_size: tuple[int, int]) -> Tensor:
    """Pool a score field to a layer's output resolution.

    Args:
        scores: An ``(H, W)`` field.
        output_size: ``(Ho, Wo)`` of the layer.

    Returns:
        ``(Ho, Wo)``: mean ``|score|`` over the region of the input each output position covers
        (adaptive average pooling).
    """
    return F.adaptive_avg_pool2d(scores.abs()[None, None], tuple(output_size))[0, 0]


def row_keep_mask(scores: Tensor, sparsity: float) -> Tensor:
    """The kept positions of a row mask.

    Args:
        scores: Scores per output position, any shape.
        sparsity: In [0, 1).

    Returns:
        A ``bool`` mask of the shape of ``scores``: the :func:`pruned_rows` lowest scores are
        ``False`` (ties: lowest index first).
    """
    flat = scores.flatten()
    keep = torch.ones(flat.shape, dtype=torch.bool, device=scores.device)
    pruned = pruned_rows(flat.numel(), sparsity)
    if pruned:
        keep[torch.argsort(flat, stable=True)[:pruned]] = False
    return keep.view(scores.shape)


def conv_output_size(
    input_size: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    padding: tuple[int, int, int, int] | list[int],
) -> tuple[int, int]:
    """Output size of a conv.

    Args:
        input_size: ``(H, W)`` of its input.
        kernel_size: ``(kh, kw)``.
        stride: ``(sh, sw)``.
        dilation: ``(dh, dw)``.
        padding: In ``F.pad`` order: ``(left, right, top, bottom)``.

    Returns:
        ``(Ho, Wo)``.
    """
    left, right, top, bottom = padding
    sizes = []
    for size, pad, k, s, d in zip(input_size, (top + bottom, left + right), kernel_size, stride, dilation, strict=True):
        sizes.append((size + pad - d * (k - 1) - 1) // s + 1)
    return sizes[0], sizes[1]


class RowScores:
    """The random score field the row masks of one model are cut from, shared by its layers.

    Set it with :func:`share_row_scores` or :func:`select_row_masks`. Pooled fields are cached per
    ``(seed, input size, output size)``.

    Args:
        seed: Picks the field.
        input_size: The network input's ``(H, W)``; when ``None``, the input size of the first
            row-masked layer to run is taken (the network input when the stem is in the space).
    """

    def __init__(self, seed: int = 0, input_size: tuple[int, int] | None = None) -> None:
        self.seed = int(seed)
        self.input_size = tuple(input_size) if input_size is not None else None
        self._pooled: dict[tuple, Tensor] = {}

    def pooled(self, output_size: tuple[int, int], layer_input_size: tuple[int, int]) -> Tensor:
        """The field pooled to a layer's output resolution.

        Args:
            output_size: ``(Ho, Wo)`` of the layer.
            layer_input_size: The layer's input ``(H, W)``; sets the field's input size when unset.

        Returns:
            ``(Ho, Wo)`` scores (cached).
        """
        if self.input_size is None:
            self.input_size = tuple(layer_input_size)
        key = (self.seed, self.input_size, tuple(output_size))
        if key not in self._pooled:
            if len(self._pooled) > 256:  # candidate selection walks through many seeds
                self._pooled.clear()
            self._pooled[key] = pool_row_scores(random_row_scores(self.input_size, self.seed), output_size)
        return self._pooled[key]

    def __repr__(self) -> str:
        return f"RowScores(seed={self.seed}, input_size={self.input_size})"


# -- model-level helpers -----------------------------------------------------------------------
def row_masked_layers(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Find the row-masked convs of a model.

    Args:
        model: Any module.

    Returns:
        ``{qualified name: conv}`` for every conv with a row pattern.
    """
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and isinstance(getattr(module, "activation_pattern", None), RowPattern)
    }


def share_row_scores(model: nn.Module, seed: int = 0, input_size: tuple[int, int] | None = None) -> RowScores:
    """Give every sparse conv of a model one :class:`RowScores`, so their row masks agree.

    Args:
        model: A model with sparse convs.
        seed: Picks the field.
        input_size: The network input's ``(H, W)``; ``None`` takes the first row-masked layer's input.

    Returns:
        The shared field.
    """
    scores = RowScores(seed, input_size)
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and hasattr(module, "row_scores"):
            module.row_scores = scores
    return scores


def candidate_seed(seed: int, index: int) -> int:
    """The field seed of candidate ``index`` of a selection started from ``seed``.

    Args:
        seed: The selection's seed.
        index: The candidate's index.

    Returns:
        A seed that does not collide across selection seeds.
    """
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


@dataclass(frozen=True)
class RowMaskSelection:
    """Outcome of :func:`select_row_masks`.

    Attributes:
        losses: Every candidate field's loss on the batch.
        best: Index of the kept candidate.
        seed: The kept field's seed (now shared by the model's row-masked layers).
    """

    losses: tuple[float, ...]
    best: int
    seed: int


@torch.no_grad()
def select_row_masks(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    candidates: int = DEFAULT_ROW_CANDIDATES,
    seed: int = 0,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> RowMaskSelection:
    """Keep the best of several random row masks on one batch.

    Draws ``candidates`` random score fields at the resolution of ``inputs``, scores each by the
    loss of ``model`` (eval mode, rows at their target sparsity) on ``(inputs, targets)``, and keeps
    the lowest. Every row-masked layer of ``model`` ends up sharing the chosen field; the model's
    mode and mask states are restored.

    Args:
        model: A model with row-masked layers (e.g. ``scheme.apply(model)``).
        inputs: A batch of network inputs.
        targets: Their targets.
        candidates: How many fields to compare (>= 1).
        seed: Seeds the candidates.
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar; default cross-entropy.

    Returns:
        Every candidate's loss, the best index and its seed.

    Raises:
        NMSearchError: If the model has no row-masked layer or ``candidates`` is not a positive integer.
    """
    layers = row_masked_layers(model)
    if not layers:
        raise NMSearchError("select_row_masks: the model has no row-masked layers (apply a scheme with rows first)")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise NMSearchError(f"select_row_masks: candidates must be a positive integer, got {candidates!r}")
    scores = share_row_scores(model, seed, tuple(inputs.shape[-2:]))
    states = {name: layer.mask_state for name, layer in layers.items()}
    was_training = model.training
    model.eval()
    losses = []
    try:
        for layer in layers.values():  # judge the masks at their final sparsity, whatever the ramp says
            layer.mask_state = _at_target(layer.mask_state)
        for index in range(candidates):
            scores.seed = candidate_seed(seed, index)
            losses.append(float(loss_fn(model(inputs), targets)))
    finally:
        for name, layer in layers.items():
            layer.mask_state = states[name]
        model.train(was_training)
    best = min(range(candidates), key=lambda i: (not math.isfinite(losses[i]), losses[i]))
    scores.seed = candidate_seed(seed, best)
    return RowMaskSelection(tuple(losses), best, scores.seed)


def _at_target(state: Any) -> Any:
    return replace(state, enabled=True, row_sparsity=None)
