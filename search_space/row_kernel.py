"""The row-skipping inference kernel: a row-masked conv computing only its kept GEMM rows.

The row-mask policy (patterns, scores, selection) is :mod:`search_space.rows`; this module only
executes a mask that policy chose. :class:`RowSkippingConv2d` computes the kept rows with the fused
C++ kernel of :mod:`search_space.row_extension` (fp32 CPU inputs of ungrouped convs, when it
builds), else by gathering the kept im2col rows from a channels-last copy of the input, one GEMM
per conv group and a scatter; :func:`skip_masked_rows` swaps it in for every row-masked conv of a
model. Its ``auto`` path times the row-skipping kernel against the dense conv with
:class:`torch.utils.benchmark.Timer` (which synchronises CUDA, so on a GPU it compares kernel times,
not launch times).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import benchmark

from search_space.patterns import NMSearchError
from search_space.row_extension import pack_row_weight, row_conv_op
from search_space.rows import RowPattern, RowScores, conv_output_size, row_keep_mask, row_masked_layers

__all__ = [
    "ROW_KERNELS",
    "ROW_PATHS",
    "RowSkippingConv2d",
    "RowsFastPathError",
    "row_gather_indices",
    "skip_masked_rows",
]

# How RowSkippingConv2d computes: skip the rows, run the dense conv and zero them, or time both
# on the first input of each shape and keep the faster.
ROW_PATHS = ("rows", "dense", "auto")
# The kernels behind them: the fused C++ one, the pure-PyTorch gather one, the masked dense conv.
ROW_KERNELS = ("fused", "gather", "dense")
_AUTO_ROUNDS = 5


class RowsFastPathError(NMSearchError):
    """A convolution or call the row-skipping inference kernel does not support."""


def _seconds(run: Callable[[], Tensor], clock: Callable[[], float] = time.perf_counter) -> float:
    """Shortest of ``_AUTO_ROUNDS`` timed calls of ``run`` after a warm-up call (CUDA synchronised).

    The minimum, not the median: other jobs on a shared machine only ever add time to a call.
    """
    run()
    timer = benchmark.Timer(stmt="run()", globals={"run": run}, timer=clock, num_threads=torch.get_num_threads())
    return min(timer.timeit(1).mean for _ in range(_AUTO_ROUNDS))


# -- inference: skip the masked rows -----------------------------------------------------------
@dataclass
class _ShapeState:
    """Indices and work buffers for one input shape."""

    key: tuple
    output_size: tuple[int, int]
    scatter: Tensor  # (rows,) kept rows of the (batch * Ho * Wo, Cout) output
    keep: Tensor  # (Ho, Wo) in the input's dtype: 1 kept, 0 skipped (the masked dense path)
    kernel: str  # the ROW_KERNELS entry in use: "fused", "gather" (the row-skipping ones) or "dense"
    # The fused kernel: its op, skipped output rows (batch * Ho * Wo - rows,) and arguments
    fused: Callable[..., Tensor] | None = None
    skipped: Tensor | None = None
    geometry: list[int] | None = None  # (kh, kw, sh, sw, dh, dw, top, left)
    weight: Tensor | None = None  # (Cout, C/g, kh, kw) channels-last, for the masked dense conv
    # The gather kernel's indices and buffers:
    gather: Tensor | None = None  # (rows * taps,) rows of the padded channels-last input
    # (batch * Ho * Wo,) row of ``results`` each output row copies: ``rows`` (zero) if skipped
    source: Tensor | None = None
    padded: Tensor | None = None  # (B, Hp, Wp, C), zero border
    columns: Tensor | None = None  # (rows * taps, C): the kept im2col rows
    products: Tensor | None = None  # (groups, rows, Cout / groups), grouped convs only
    results: Tensor | None = None  # grouped convs: (rows + 1, Cout), the GEMMs' rows and a last row of zeros
    # Views made once, so a call runs few ops (their dispatch costs count on small layers):
    interior: Tensor | None = None  # padded[:, top : top + H, left : left + W]
    kept_results: Tensor | None = None  # results[:rows], grouped convs
    # groups == 1: the im2col rows and one more row of zeros, as (rows + 1, kh kw C): the GEMM's
    # last output row is zero (bias aside), the one skipped positions copy
    gemm_columns: Tensor | None = None
    gemm_matrix: Tensor | None = None  # matrix[0], groups == 1
    gemm_bias: Tensor | None = None  # bias[0], groups == 1


def row_gather_indices(
    keep: Tensor,
    batch: int,
    padded_size: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """Flat indices of the kept im2col rows.

    Args:
        keep: ``(Ho, Wo)`` bool mask of kept output positions.
        batch: Batch size B.
        padded_size: ``(Hp, Wp)`` of the zero-padded input.
        kernel_size: ``(kh, kw)``.
        stride: ``(sh, sw)``.
        dilation: ``(dh, dw)``.

    Returns:
        ``(gather, scatter)``. ``gather``: for every kept output position (batch-major) and kernel
        offset ``(r, s)`` (row-major), the row of the padded channels-last input ``(B * Hp * Wp, C)``
        it reads. ``scatter``: the row of the channels-last output ``(B * Ho * Wo, Cout)`` each kept
        position writes.
    """
    out_h, out_w = keep.shape
    padded_h, padded_w = padded_size
    kept = torch.nonzero(keep.flatten()).flatten()
    ho, wo = kept // out_w, kept % out_w
    r = torch.arange(kernel_size[0]) * dilation[0]
    s = torch.arange(kernel_size[1]) * dilation[1]
    rows = (ho * stride[0])[:, None, None] + r[None, :, None]
    cols = (wo * stride[1])[:, None, None] + s[None, None, :]
    within = (rows * padded_w + cols).flatten()  # (kept * taps,)
    images = torch.arange(batch)[:, None]
    gather = (images * (padded_h * padded_w) + within[None, :]).flatten()
    scatter = (images * (out_h * out_w) + kept[None, :]).flatten()
    return gather, scatter


class RowSkippingConv2d(nn.Module):
    """Inference-only conv computing only the kept GEMM rows of a row-masked conv.

    For fp32 CPU inputs of an ungrouped conv it runs the fused C++ kernel
    (:mod:`search_space.row_extension`): per tile of kept output positions, im2col rows built in a
    thread-local buffer straight from the channels-last input, a GEMM against the packed weight with
    oneDNN's micro-kernel, results written into the channels-last output (:attr:`kernel_in_use`
    ``"fused"``). Where that kernel is unavailable (no compiler, other dtypes or devices, grouped
    convs) the ``"gather"`` kernel runs instead; per call: copy the input into a zero-bordered
    channels-last buffer, gather the kept im2col rows (``kh kw`` channel vectors each) with one
    ``index_select``, multiply by the precomputed
    ``(kh kw C/g, Cout/g)`` weight matrix (one ``mm``; one ``bmm`` over the groups of a grouped
    conv), add the bias, and scatter the rows into a channels-last output (one ``index_select``
    reading each output row from the GEMM's rows or, for skipped rows, a zero row).
    Indices and buffers are built once per input shape.
    Its outputs equal the row-masked layer's (weights as that layer used them when converted).

    ``path="dense"`` runs the dense conv and zeroes the skipped rows instead (the reference, no work
    saved); ``"auto"`` times both on the first input of each shape and keeps the faster
    (:attr:`path_in_use`): on layers too small or too memory-bound to gain from skipping rows.
    Usually built by :meth:`from_layer` or :func:`skip_masked_rows`.

    Args:
        weight: ``(Cout, C/g, kh, kw)`` weight, as the row-masked layer uses it.
        bias: ``(Cout,)`` or ``None``.
        stride: ``(sh, sw)``.
        padding: In ``F.pad`` order ``(left, right, top, bottom)``.
        dilation: ``(dh, dw)``.
        groups: Conv groups.
        row_scores: The model's shared score field.
        sparsity: Fraction of output positions skipped.
        name: The layer's name, for messages.
        path: ``"rows"``, ``"dense"`` or ``"auto"``.

    Raises:
        RowsFastPathError: If ``path`` is unknown.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        *,
        stride: tuple[int, int],
        padding: tuple[int, int, int, int],
        dilation: tuple[int, int],
        groups: int,
        row_scores: RowScores,
        sparsity: float,
        name: str = "",
        path: str = "rows",
    ) -> None:
        super().__init__()
        if path not in ROW_PATHS:
            raise RowsFastPathError(f"layer '{name or '<conv>'}': path must be one of {ROW_PATHS}, got {path!r}")
        self.path = path
        cout, cin_per_group, kh, kw = weight.shape
        self.layer_name = name or "<conv>"
        self.kernel_size, self.stride, self.dilation = (kh, kw), tuple(stride), tuple(dilation)
        self.padding, self.groups = tuple(padding), groups
        self.in_channels, self.out_channels = cin_per_group * groups, cout
        self.row_scores, self.sparsity = row_scores, float(sparsity)
        # (Cout, Cg, kh, kw) -> per group (kh, kw, Cg) x (Cout / g): the gathered columns' order.
        grouped = weight.detach().reshape(groups, cout // groups, cin_per_group, kh, kw)
        matrix = grouped.permute(0, 3, 4, 2, 1).reshape(groups, kh * kw * cin_per_group, cout // groups)
        self.register_buffer("matrix", matrix.contiguous())
        grouped_bias = None if bias is None else bias.detach().reshape(groups, 1, cout // groups).clone()
        self.register_buffer("bias", grouped_bias)
        # The fused kernel's weight layout (not saved: it is rebuilt from ``matrix``).
        packed = pack_row_weight(matrix[0]) if groups == 1 else None
        self.register_buffer("packed", packed, persistent=False)
        self._plan: _ShapeState | None = None

    @property
    def path_in_use(self) -> str | None:
        """``"rows"`` or ``"dense"``: how the last input shape is computed (``None`` before the first call)."""
        return None if self._plan is None else ("dense" if self._plan.kernel == "dense" else "rows")

    @property
    def kernel_in_use(self) -> str | None:
        """The :data:`ROW_KERNELS` entry computing the last input shape (``None`` before the first call)."""
        return None if self._plan is None else self._plan.kernel

    def dense_weight(self) -> Tensor:
        """The ``(Cout, C/g, kh, kw)`` weight the GEMM matrix was built from."""
        groups, _, cout_per_group = self.matrix.shape
        kh, kw = self.kernel_size
        grouped = self.matrix.reshape(groups, kh, kw, self.in_channels // groups, cout_per_group)
        return grouped.permute(0, 4, 3, 1, 2).reshape(self.out_channels, -1, kh, kw)

    @classmethod
    def from_layer(cls, layer: nn.Conv2d, name: str = "", *, path: str = "rows") -> RowSkippingConv2d:
        """Convert a row-masked conv, with the weights as it uses them now.

        Args:
            layer: A ``SparseConv2d`` with a :class:`~search_space.rows.RowPattern`.
            name: The layer's name, for messages.
            path: ``"rows"``, ``"dense"`` or ``"auto"``.

        Returns:
            The inference kernel; its outputs equal the layer's.

        Raises:
            RowsFastPathError: If the layer has no row mask or pads other than with zeros.
        """
        name = name or getattr(layer, "layer_name", "") or type(layer).__name__
        if not isinstance(getattr(layer, "activation_pattern", None), RowPattern):
            raise RowsFastPathError(f"layer '{name}' has no row mask: only row-masked Conv2d layers skip rows")
        if layer.padding_mode != "zeros":
            raise RowsFastPathError(
                f"layer '{name}': the row-skipping kernel supports padding_mode='zeros' only, "
                f"got {layer.padding_mode!r}; keep this layer on the masked dense path"
            )
        with torch.no_grad():
            weight = layer.sparse_weight() if hasattr(layer, "sparse_weight") else layer.weight
        return cls(
            weight,
            layer.bias,
            stride=layer.stride,
            padding=tuple(layer._reversed_padding_repeated_twice),
            dilation=layer.dilation,
            groups=layer.groups,
            row_scores=layer.row_scores,
            sparsity=layer.row_sparsity,
            name=name,
            path=path,
        )

    def keep_mask(self, input_size: tuple[int, int]) -> Tensor:
        """The kept output positions for an input size.

        Args:
            input_size: ``(H, W)`` of the input.

        Returns:
            The ``(Ho, Wo)`` bool mask.
        """
        output_size = conv_output_size(input_size, self.kernel_size, self.stride, self.dilation, self.padding)
        return row_keep_mask(self.row_scores.pooled(output_size, input_size), self.sparsity)

    def _plan_for(self, x: Tensor) -> _ShapeState:
        batch, _, height, width = x.shape

        def key() -> tuple:
            return (tuple(x.shape), x.dtype, x.device, self.row_scores.seed, self.row_scores.input_size)

        if self._plan is not None and self._plan.key == key():
            return self._plan
        keep = self.keep_mask((height, width))
        left, right, top, bottom = self.padding
        padded_size = (height + top + bottom, width + left + right)
        gather, scatter = row_gather_indices(keep, batch, padded_size, self.kernel_size, self.stride, self.dilation)
        fused = (
            self.path != "dense"
            and self.packed is not None
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and row_conv_op() is not None
        )
        options = {"dtype": x.dtype, "device": x.device}
        self._plan = plan = _ShapeState(
            key=key(),  # after keep_mask(): it may have set the field's input size
            output_size=tuple(keep.shape),
            scatter=scatter.to(x.device),
            keep=keep.to(**options),
            kernel="dense" if self.path == "dense" else ("fused" if fused else "gather"),
            weight=None if self.path == "rows" else self.dense_weight().contiguous(memory_format=torch.channels_last),
        )
        if fused:
            kept = torch.zeros(batch * keep.numel(), dtype=torch.bool)
            kept[scatter] = True
            plan.fused, plan.skipped = row_conv_op(), torch.nonzero(~kept).flatten()
            plan.geometry = [*self.kernel_size, *self.stride, *self.dilation, top, left]
        elif plan.kernel == "gather":
            self._plan_gather(plan, gather, batch, padded_size, (height, width), options)
        if self.path == "auto":
            plan.kernel = "dense" if self._dense_is_faster(x, plan) else plan.kernel
        return plan

    def _plan_gather(
        self,
        plan: _ShapeState,
        gather: Tensor,
        batch: int,
        padded_size: tuple[int, int],
        input_size: tuple[int, int],
        options: dict,
    ) -> None:
        """The gather kernel's indices, buffers and views."""
        groups, _, cout_per_group = self.matrix.shape
        rows, taps = plan.scatter.numel(), self.kernel_size[0] * self.kernel_size[1]
        source = torch.full((batch * plan.keep.numel(),), rows, dtype=torch.long)
        source[plan.scatter.cpu()] = torch.arange(rows)
        plan.gather, plan.source = gather.to(options["device"]), source.to(options["device"])
        plan.padded = torch.zeros(batch, *padded_size, self.in_channels, **options)
        plan.columns = torch.zeros(gather.numel() + (taps if groups == 1 else 0), self.in_channels, **options)
        plan.products = torch.empty(groups, rows, cout_per_group, **options) if groups > 1 else None
        plan.results = torch.zeros(rows + 1 if groups > 1 else 0, self.out_channels, **options)
        left, _, top, _ = self.padding
        plan.interior = plan.padded[:, top : top + input_size[0], left : left + input_size[1]]
        plan.kept_results = plan.results[:rows]
        if groups == 1:
            plan.gemm_columns = plan.columns.view(rows + 1, -1)
            plan.columns = plan.columns[: gather.numel()]  # what the gather writes
            plan.gemm_matrix = self.matrix[0]
            plan.gemm_bias = None if self.bias is None else self.bias[0]

    def _dense_is_faster(self, x: Tensor, plan: _ShapeState) -> bool:
        """Time both paths on ``x`` (after a warm-up call each); the shortest calls decide.

        On a CPU with one torch thread the clock is this thread's CPU time, which leaves out the
        time other jobs hold the core (the choice would otherwise follow the machine's load).
        """
        single = x.device.type == "cpu" and torch.get_num_threads() == 1
        clock = time.thread_time if single else time.perf_counter
        rows = _seconds(lambda: self._skip_rows(x, plan), clock)
        return _seconds(lambda: self._masked_dense(x, plan), clock) < rows

    def forward(self, x: Tensor) -> Tensor:
        """The conv's output with the skipped rows zero, computing only the kept rows (on the ``rows`` path).

        Args:
            x: A ``(B, C, H, W)`` input.

        Returns:
            ``(B, Cout, Ho, Wo)``, channels-last in memory.

        Raises:
            RowsFastPathError: If ``x`` is not 4-D, has other channels, or needs a gradient.
        """
        if x.dim() != 4:
            raise RowsFastPathError(
                f"layer '{self.layer_name}': the row-skipping kernel takes batched (B, C, H, W) inputs, "
                f"got {x.dim()}-D; add a batch dimension"
            )
        if x.shape[1] != self.in_channels:
            raise RowsFastPathError(
                f"layer '{self.layer_name}': expected {self.in_channels} input channels, got {x.shape[1]}"
            )
        if torch.is_grad_enabled() and x.requires_grad:
            raise RowsFastPathError(
                f"layer '{self.layer_name}': the row-skipping kernel is inference-only; "
                "train the row-masked SparseConv2d instead (or run under torch.no_grad())"
            )
        plan = self._plan_for(x)
        return self._masked_dense(x, plan) if plan.kernel == "dense" else self._skip_rows(x, plan)

    def _masked_dense(self, x: Tensor, plan: _ShapeState) -> Tensor:
        """The dense conv with the skipped rows zeroed: no work saved, the reference the kernel matches."""
        left, right, top, bottom = self.padding
        weight = plan.weight if plan.weight is not None else self.dense_weight()
        bias = None if self.bias is None else self.bias.reshape(-1)
        if left == right and top == bottom:
            out = F.conv2d(x, weight, bias, self.stride, (top, left), self.dilation, self.groups)
        else:
            out = F.conv2d(F.pad(x, self.padding), weight, bias, self.stride, 0, self.dilation, self.groups)
        return out.mul_(plan.keep)

    def _skip_rows(self, x: Tensor, plan: _ShapeState) -> Tensor:
        if plan.fused is not None:
            bias = None if self.bias is None else self.bias.view(-1)
            out_h, out_w = plan.output_size
            return plan.fused(
                x, self.packed, bias, plan.scatter, plan.skipped, self.out_channels, out_h, out_w, plan.geometry
            )
        batch, channels, _, _ = x.shape
        source = x.permute(0, 2, 3, 1)
        if not any(self.padding) and source.is_contiguous():  # channels-last input, no border: read it in place
            flat = source.reshape(-1, channels)
        else:
            plan.interior.copy_(source)
            flat = plan.padded.view(-1, channels)
        torch.index_select(flat, 0, plan.gather, out=plan.columns)
        if plan.gemm_matrix is not None:  # one plain GEMM (rows + 1, kh kw C) x (kh kw C, Cout)
            # (no out=: for few rows torch's mm is measurably faster allocating its result)
            if plan.gemm_bias is None:
                results = torch.mm(plan.gemm_columns, plan.gemm_matrix)
            else:
                results = torch.addmm(plan.gemm_bias, plan.gemm_columns, plan.gemm_matrix)
                results[-1].zero_()
        else:
            results = plan.results  # its last row stays zero
            groups, k_per_group, _ = self.matrix.shape
            rows = plan.scatter.numel()
            taps = self.kernel_size[0] * self.kernel_size[1]
            # (rows, taps, groups, Cg) -> (groups, rows, taps * Cg)
            columns = plan.columns.view(rows, taps, groups, channels // groups).permute(2, 0, 1, 3)
            columns = columns.reshape(groups, rows, k_per_group)
            if self.bias is None:
                torch.bmm(columns, self.matrix, out=plan.products)
            else:
                torch.baddbmm(self.bias, columns, self.matrix, out=plan.products)
            plan.kept_results.view(rows, groups, -1).copy_(plan.products.permute(1, 0, 2))
        out_h, out_w = plan.output_size
        # Scatter as one gather: every output row copies its GEMM row, or the zero row if skipped.
        out = torch.index_select(results, 0, plan.source)
        cout = self.out_channels
        return out.as_strided((batch, cout, out_h, out_w), (out_h * out_w * cout, 1, out_w * cout, cout))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, rows_skipped={self.sparsity}, "
            f"path={self.path!r}"
        )


def skip_masked_rows(model: nn.Module, *, inplace: bool = False, path: str = "rows") -> nn.Module:
    """Replace every row-masked conv of ``model`` by a :class:`RowSkippingConv2d` (inference only).

    Every layer is converted (and so validated) before the first is swapped in.

    Args:
        model: A model with row-masked convs.
        inplace: Modify ``model`` instead of a copy.
        path: ``"rows"`` skips the masked rows in every layer; ``"auto"`` times, on each layer's first
            input of a shape, the row-skipping kernel against the dense conv with the rows zeroed
            and keeps the faster (both give the same outputs); ``"dense"`` is the masked dense reference.

    Returns:
        The converted model (``model`` itself when ``inplace``).

    Raises:
        NMSearchError: If the model has no row-masked layer.
        RowsFastPathError: If a layer cannot be converted or ``path`` is unknown.
    """
    target = model if inplace else copy.deepcopy(model)
    layers = row_masked_layers(target)
    if not layers:
        raise NMSearchError("skip_masked_rows: the model has no row-masked layers (apply a scheme with rows first)")
    fast = {name: RowSkippingConv2d.from_layer(layer, name, path=path) for name, layer in layers.items()}
    if "" in fast:  # the model is itself a row-masked conv
        return fast[""]
    for name, module in fast.items():
        parent_name, _, child = name.rpartition(".")
        parent = target.get_submodule(parent_name) if parent_name else target
        setattr(parent, child, module)
    return target
