"""N:M masks as pure torch functions (any device, any floating dtype).

Grouping always runs along the GEMM reduction dimension K:

* Linear weight ``(out, in)``: M consecutive ``in`` features.
* Conv weight ``(Cout, Cin/groups, kh, kw)``: M consecutive input channels at a fixed
  ``(cout, kh, kw)`` -- the NHWC / implicit-GEMM layout sparse tensor cores consume.
* Conv input ``(B, C, H, W)``: M consecutive channels of each pixel.
* Linear input ``(..., K)``: M consecutive entries of the last dimension.

Within a group the N largest scores survive; ties go to the lowest index, so masks are
deterministic and equal to a stable descending sort. NaN scores (a diverged model) give an
unspecified mask; trainers detect divergence from the loss instead of paying for a check here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from search_space.patterns import NMPattern, check_divisible
from search_space.row_extension import nm_mask_op

# On the CPU the one-pass C++ kernel (csrc/nm_mask.cpp, built with the row-skipping conv) ranks each
# group in registers with one parallel loop: one thread barrier per mask, so it keeps its speed on a
# busy machine (docs/results/masks.md). Where it is not built, and on other devices:
# kernel choice, measured with ``python benchmarks/masks.py --load`` (docs/results/masks.md):
# the pairwise rank launches about 3 * M(M-1)/2 small kernels, each a thread barrier that
# waits for a descheduled OpenMP thread on a busy machine, so it only pays for M <= 4 (6
# comparisons: 3-4x faster than argsort quiet or loaded). From M = 5 on, one stable sort of
# every group costs a constant three kernels (copy, sort, scatter) whatever the load.
# N = 1 needs no rank at all: one argmax (the first maximum) in four kernels, 3-5x faster than the
# sort at 1:8 and on par with the pairwise rank at 1:4 (docs/results/masks.md).
_PAIRWISE_MAX_M = 4
_FUSED_MAX_M = 64  # kMaxM of csrc/nm_mask.cpp: a group's scores live on the stack


def _pairwise_keep(groups: Tensor, n: int, m: int, dim: int, dtype: torch.dtype) -> Tensor:
    """Rank each entry by how many group members beat it (larger, or equal and earlier)."""
    cols = groups.unbind(dim)
    losses: list[Tensor | None] = [None] * m
    for i in range(m):
        for j in range(i + 1, m):
            i_wins = torch.ge(cols[i], cols[j])
            j_wins = torch.logical_not(i_wins)
            # bool -> uint8 views avoid a copy for each column's first comparison
            losses[j] = i_wins.view(torch.uint8) if losses[j] is None else losses[j].add_(i_wins)
            losses[i] = j_wins.view(torch.uint8) if losses[i] is None else losses[i].add_(j_wins)
    # Writing the comparison straight into e.g. float32 costs nothing extra and spares the
    # caller a slow bool -> float promotion in ``weight * mask`` on CPU.
    keep = torch.empty(groups.shape, dtype=dtype, device=groups.device)
    for i, lost in enumerate(losses):
        torch.lt(lost, n, out=keep.select(dim, i))
    return keep


def _sorted_keep(groups: Tensor, n: int, dim: int, dtype: torch.dtype) -> Tensor:
    """Keep the first ``n`` of a stable descending sort: equal scores stay in index order."""
    # Sorting a contiguous last dimension is several times faster than a strided one.
    order = groups.movedim(dim, -1).contiguous().argsort(dim=-1, descending=True, stable=True)
    keep = torch.zeros(groups.shape, dtype=dtype, device=groups.device)
    keep.movedim(dim, -1).scatter_(-1, order.narrow(-1, 0, n), 1)
    return keep


def _first_max_keep(groups: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """N = 1: keep each group's first maximum (``argmax`` returns the first one), as a stable sort would."""
    first = groups.movedim(dim, -1).contiguous().argmax(dim=-1, keepdim=True)
    keep = torch.zeros(groups.shape, dtype=dtype, device=groups.device)
    keep.movedim(dim, -1).scatter_(-1, first, 1)
    return keep


def nm_mask(scores: Tensor, n: int, m: int, dim: int = -1, *, dtype: torch.dtype = torch.bool) -> Tensor:
    """Mask keeping the ``n`` largest of every ``m`` consecutive ``scores`` along ``dim``.

    Ties go to the lowest index. Any ``m`` works here (structure decay uses e.g. 8:64);
    user-facing patterns are capped by :class:`NMPattern`.

    Args:
        scores: Scores of any shape, device and floating dtype (not differentiated).
        n: Entries kept per group.
        m: Group size; ``scores.shape[dim]`` must be divisible by it.
        dim: The dimension groups run along.
        dtype: ``bool`` by default; another dtype returns the mask as 0/1 values of that type.

    Returns:
        A mask of the shape of ``scores``; all true when ``n == m``.

    Raises:
        ValueError: If not ``1 <= n <= m`` or ``scores.shape[dim]`` is not divisible by ``m``.
    """
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n <= m):
        raise ValueError(f"invalid N:M {n!r}:{m!r}: need integers with 1 <= N <= M")
    dim = dim % scores.dim()
    size = scores.shape[dim]
    if size % m:
        raise ValueError(f"dimension {dim} of size {size} is not divisible by M={m}")
    if n == m:
        return torch.ones_like(scores, dtype=dtype)
    scores = scores.detach()
    if scores.device.type == "cpu" and scores.is_floating_point() and m <= _FUSED_MAX_M:
        op = nm_mask_op()
        if op is not None:
            keep = torch.empty(scores.shape, dtype=dtype)
            op(scores.contiguous(), keep, n, m, dim)
            return keep
    groups = scores.unflatten(dim, (size // m, m))
    if n == 1:
        keep = _first_max_keep(groups, dim + 1, dtype)
    elif m <= _PAIRWISE_MAX_M:
        keep = _pairwise_keep(groups, n, m, dim + 1, dtype)
    else:
        keep = _sorted_keep(groups, n, dim + 1, dtype)
    return keep.flatten(dim, dim + 1)


def weight_nm_mask(
    weight: Tensor,
    n: int,
    m: int,
    scores: Tensor | None = None,
    *,
    layer: str = "<weight>",
) -> Tensor:
    """N:M mask of a Linear ``(out, in)`` or Conv ``(Cout, Cin/groups, *kernel)`` weight.

    Groups run along dimension 1 (input features / input channels of the group), so a conv
    group is M consecutive input channels at a fixed output channel and kernel offset.

    Args:
        weight: The weight, at least 2-D.
        n: Entries kept per group.
        m: Group size.
        scores: Scores of the weight's shape; default ``|weight|``
            (e.g. :func:`activation_weighted_scores` for Wanda-style scores).
        layer: The layer's name, for error messages.

    Returns:
        A ``bool`` mask of the weight's shape.

    Raises:
        InvalidPatternError: If ``n:m`` is not a valid pattern.
        IneligibleLayerError: If dimension 1 is not divisible by ``m``.
        ValueError: If the weight has fewer than 2 dimensions or ``scores`` has another shape.
    """
    if weight.dim() < 2:
        raise ValueError(f"layer '{layer}': a weight needs at least 2 dimensions, got {weight.dim()}")
    what = "in_features" if weight.dim() == 2 else "input channels per group"
    check_divisible(weight.shape[1], NMPattern(n, m).m, layer=layer, what=what)
    if scores is None:
        scores = weight.detach().abs()
    elif scores.shape != weight.shape:
        raise ValueError(f"layer '{layer}': scores shape {tuple(scores.shape)} != weight shape {tuple(weight.shape)}")
    return nm_mask(scores, n, m, dim=1)


def activation_nm_mask(
    x: Tensor,
    n: int,
    m: int,
    dim: int = -1,
    channel_scale: Tensor | None = None,
    *,
    layer: str = "<input>",
) -> Tensor:
    """Dynamic N:M mask of an input: conv ``(B, C, H, W)`` with ``dim=1``, linear ``(..., K)``.

    Args:
        x: The input activation.
        n: Entries kept per group.
        m: Group size.
        dim: The channel / feature dimension groups run along (``1`` for a conv input).
        channel_scale: Optional ``(C,)`` factor per channel: the score becomes
            ``|x| * channel_scale`` (e.g. :func:`weight_column_norms`, to keep the entries that
            matter most to the output); default score ``|x|``.
        layer: The layer's name, for error messages.

    Returns:
        A ``bool`` mask of the shape of ``x``.

    Raises:
        InvalidPatternError: If ``n:m`` is not a valid pattern.
        IneligibleLayerError: If ``x.shape[dim]`` is not divisible by ``m``.
    """
    dim = dim % x.dim()
    check_divisible(x.shape[dim], NMPattern(n, m).m, layer=layer, what="input channels")
    scores = x.detach().abs()
    if channel_scale is not None:
        shape = [1] * x.dim()
        shape[dim] = -1
        scores = scores * channel_scale.view(shape)
    return nm_mask(scores, n, m, dim=dim)


def weight_column_norms(weight: Tensor, groups: int = 1) -> Tensor:
    """L2 norm of the weight column each input channel / feature multiplies.

    Args:
        weight: A Linear ``(out, in)`` or Conv ``(Cout, Cin/groups, kh, kw)`` weight.
        groups: The conv's ``groups``.

    Returns:
        Shape ``(C_in,)``: for input channel ``c``, the norm over every weight entry it multiplies.
    """
    w = weight.detach()
    if w.dim() == 2:
        return w.norm(dim=0)
    cout, cpg = w.shape[:2]
    sq = w.reshape(groups, cout // groups, cpg, -1).pow(2).sum(dim=(1, 3))
    return sq.reshape(groups * cpg).sqrt()


def input_column_sq_sums(
    x: Tensor,
    kernel_size: tuple[int, int] | None = None,
    stride: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    pad: tuple[int, ...] = (0, 0, 0, 0),
    pad_mode: str = "constant",
) -> Tensor:
    """Sum of squares of each GEMM column of X over a batch, without materialising im2col.

    Args:
        x: A Linear input ``(..., K)`` or a Conv2d input ``(B, C, H, W)``.
        kernel_size: ``None`` for a Linear, else the conv's ``(kh, kw)``.
        stride: The conv's stride.
        dilation: The conv's dilation.
        pad: Padding in ``F.pad`` order (a conv's ``_reversed_padding_repeated_twice``).
        pad_mode: ``F.pad`` mode (``"constant"`` for zero padding).

    Returns:
        ``(K,)`` for a Linear; ``(C, kh, kw)`` for a Conv2d, one entry per im2col column
        ``(c, r, s)``, summed over the positions kernel offset ``(r, s)`` reads.
    """
    x = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    if kernel_size is None:
        return x.pow(2).reshape(-1, x.shape[-1]).sum(0)
    sq = torch.nn.functional.pad(x, list(pad), mode=pad_mode).pow(2)
    kh, kw = kernel_size
    h_out = (sq.shape[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (sq.shape[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = sq.new_empty(sq.shape[1], kh, kw)
    for r in range(kh):
        for s in range(kw):
            top, left = r * dilation[0], s * dilation[1]
            window = sq[
                :,
                :,
                top : top + stride[0] * (h_out - 1) + 1 : stride[0],
                left : left + stride[1] * (w_out - 1) + 1 : stride[1],
            ]
            out[:, r, s] = window.sum(dim=(0, 2, 3))
    return out


def activation_weighted_scores(weight: Tensor, input_col_norms: Tensor, groups: int = 1) -> Tensor:
    """Weight scores ``|w| * ||x_col||`` (Wanda-style) from calibration column norms.

    Args:
        weight: A Linear or Conv2d weight.
        input_col_norms: ``(K,)`` for a Linear or ``(C_in, kh, kw)`` for a Conv2d: the square
            root of :func:`input_column_sq_sums` over calibration batches.
        groups: The conv's ``groups``.

    Returns:
        Scores of the weight's shape, for :func:`weight_nm_mask`.
    """
    w = weight.detach().abs()
    norms = input_col_norms.to(w.dtype)
    if w.dim() == 2:
        return w * norms.view(1, -1)
    cout, cpg = w.shape[:2]
    per_group = norms.reshape(groups, cpg, *norms.shape[1:])
    expanded = per_group.repeat_interleave(cout // groups, dim=0)
    return w * expanded
