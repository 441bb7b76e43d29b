"""One-shot N:M pruning of a pre-trained model: magnitude, Wanda and SparseGPT.

Every method prunes the weights a :class:`~search_space.Scheme` sparsifies, without training:

* ``magnitude`` -- keep the N largest ``|w|`` of each group (no calibration data);
* ``wanda`` (Sun et al. 2024) -- keep the N largest ``|w_ij| * ||X_j||_2``, the input feature
  norm over the calibration tokens; no weight update;
* ``sparsegpt`` (Frantar & Alistarh 2023) -- per layer ``H = 2 X^T X / T`` over the
  calibration tokens, dampened by ``0.01 * mean(diag H)``, ``U = chol(H^-1)^T`` (upper); the
  columns are walked in blocks of 128; at the first column of each group of M the M-N entries
  of each row with the smallest ``w^2 / U_cc^2`` are pruned, every column's error
  ``(w_c - q_c) / U_cc`` is propagated to the block's later columns at once and, after the
  block, to all remaining columns (the lazy batched update).

Layers are GEMMs ``Y = X W^T`` with groups of M along K: Linear as is (Hugging Face ``Conv1D``
with its stored weight transposed), Conv2d on its im2col
inputs with K ordered ``(kh, kw, Cin/groups)`` (the N:M layout of :mod:`search_space.masks`),
one Hessian per conv group. A layer with activation N:M is calibrated on its *masked* inputs,
the ones it computes with.

Calibration modes:

* ``sequential`` (the papers' setting, the default for export): each layer is calibrated on the
  inputs of the model whose earlier layers are already pruned. One forward pass over the
  calibration batch does it: a pre-forward hook prunes each layer the first time it runs, so
  every later layer sees pruned predecessors. Results are cached by the *scheme prefix* (the
  options of every layer that ran before, and the layer's own), which is exact: a layer's
  inputs depend on nothing else.
* ``independent`` (a named variant for search speed): every layer is calibrated on the dense
  model's inputs, so its statistics depend only on ``(layer, activation option)`` and its pruned
  weight only on ``(layer, option)``; both are cached and a scheme costs a weight copy per
  layer. Scores are slightly optimistic for deep stacks of sparse layers.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from search_space.layers import SparseLayerMixin, weight_group_dim
from search_space.masks import nm_mask
from search_space.patterns import NMPattern, NMSearchError
from search_space.scheme import Option, Scheme
from search_space.surgery import prunable_modules

__all__ = [
    "CALIBRATION_MODES",
    "ONESHOT_METHODS",
    "CalibrationError",
    "LayerStatistics",
    "OneShotPruner",
    "call_model",
    "gemm_inputs",
    "gemm_weight",
    "layer_error",
    "move_inputs",
    "oneshot_prune",
    "set_gemm_weight",
    "sparsegpt_prune",
]

ONESHOT_METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATION_MODES = ("sequential", "independent")
DEFAULT_BLOCKSIZE = 128
DEFAULT_DAMPENING = 0.01
# A Cholesky failure is retried with the dampening multiplied by this, at most this often.
_DAMP_GROWTH, _DAMP_RETRIES = 10.0, 3

Inputs = Tensor | Sequence[Any] | Mapping[str, Any]


class CalibrationError(NMSearchError):
    """Calibration data that cannot give a layer's statistics (too few tokens, non-finite values)."""


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model(inputs)``, ``model(*inputs)`` for a tuple/list or ``model(**inputs)`` for a dict.

    Args:
        model: The model.
        inputs: A tensor, a tuple/list of positional arguments or a mapping of keyword ones.

    Returns:
        What the model returns.
    """
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def move_inputs(inputs: Inputs, device: torch.device | str) -> Inputs:
    """``inputs`` (a tensor, tuple/list or dict of tensors) on ``device``; other values unchanged.

    Args:
        inputs: The inputs (nested tuples, lists and mappings are moved recursively).
        device: The target device.

    Returns:
        The inputs, of the same structure, on ``device``.
    """
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: move_inputs(v, device) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(move_inputs(v, device) for v in inputs)
    return inputs


# -- GEMM views of a layer ---------------------------------------------------------------------
def _groups(module: nn.Module) -> int:
    return module.groups if isinstance(module, nn.Conv2d) else 1


def gemm_weight(module: nn.Module) -> Tensor:
    """The weight as ``(groups, N/groups, K)`` float32, K in N:M order (conv: ``kh, kw, Cin/groups``).

    Args:
        module: A prunable layer (``Linear``, ``Conv2d`` or a transposed-weight ``Conv1D``).

    Returns:
        A detached float32 copy of the weight in GEMM layout.

    Raises:
        NMSearchError: If a non-conv layer's weight is not 2-D.
    """
    w = module.weight.detach().float()
    if isinstance(module, nn.Conv2d):
        cout = w.shape[0]
        return w.permute(0, 2, 3, 1).reshape(module.groups, cout // module.groups, -1)
    if w.dim() != 2:
        raise NMSearchError(f"{type(module).__name__}: expected a 2-D weight, got shape {tuple(w.shape)}")
    return (w.T if weight_group_dim(module) == 0 else w).unsqueeze(0)


def set_gemm_weight(module: nn.Module, weight: Tensor) -> None:
    """Write a ``(groups, N/groups, K)`` weight from :func:`gemm_weight` back, in the module's layout and dtype.

    Args:
        module: The layer whose weight is overwritten in place.
        weight: The weight in the layout :func:`gemm_weight` returns.
    """
    target = module.weight
    if isinstance(module, nn.Conv2d):
        cout, cpg, kh, kw = target.shape
        weight = weight.reshape(cout, kh, kw, cpg).permute(0, 3, 1, 2)
    elif weight_group_dim(module) == 0:  # Conv1D stores (K, N)
        weight = weight[0].T
    else:
        weight = weight.reshape(target.shape)
    with torch.no_grad():
        target.copy_(weight.to(target.dtype))


def gemm_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's GEMM input rows as ``(groups, T, K)`` float32 (conv: im2col, K as in :func:`gemm_weight`).

    Args:
        module: The layer.
        x: Its input (conv: ``(B, C, H, W)`` or ``(C, H, W)``; otherwise features last).

    Returns:
        One row per token (conv: per output position), ``T`` rows per group.
    """
    x = x.detach().float()
    if not isinstance(module, nn.Conv2d):
        return x.reshape(1, -1, x.shape[-1])
    if x.dim() == 3:
        x = x.unsqueeze(0)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, list(module._reversed_padding_repeated_twice), mode=mode)
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)  # (B, C*kh*kw, L)
    batch, _, positions = cols.shape
    groups = module.groups
    cpg = module.in_channels // groups
    kernel = module.kernel_size[0] * module.kernel_size[1]
    cols = cols.view(batch, groups, cpg, kernel, positions).permute(1, 0, 4, 3, 2)
    return cols.reshape(groups, batch * positions, kernel * cpg)


# -- statistics --------------------------------------------------------------------------------
@dataclass
class LayerStatistics:
    """Calibration statistics of one layer: token count, per-column sums of squares and
    (for SparseGPT) ``X^T X``, each per conv group."""

    tokens: int
    sq_sum: Tensor  # (groups, K)
    gram: Tensor | None = None  # (groups, K, K)

    @classmethod
    def of(cls, rows: Tensor, with_gram: bool) -> LayerStatistics:
        """Statistics of GEMM input rows ``(groups, T, K)`` (see :func:`gemm_inputs`).

        Args:
            rows: The GEMM input rows.
            with_gram: Also compute ``X^T X`` (SparseGPT needs it, Wanda does not).

        Returns:
            The statistics.
        """
        return cls(rows.shape[1], rows.pow(2).sum(1), rows.transpose(1, 2) @ rows if with_gram else None)

    @property
    def nbytes(self) -> int:
        """Memory held by the statistics' tensors, in bytes (for the cache's size limit)."""
        return sum(t.numel() * t.element_size() for t in (self.sq_sum, self.gram) if t is not None)


def _check_finite(stats: LayerStatistics, layer: str) -> None:
    # Dampening cannot repair NaN/inf: they come from the inputs (a diverged model, bad data).
    values = stats.gram if stats.gram is not None else stats.sq_sum
    if not bool(torch.isfinite(values).all()):
        raise CalibrationError(
            f"layer {layer!r}: its calibration inputs hold NaN or inf values; check the calibration data and "
            "the layers before it"
        )


def sparsegpt_prune(
    weight: Tensor,
    gram: Tensor,
    tokens: int,
    n: int,
    m: int,
    *,
    blocksize: int = DEFAULT_BLOCKSIZE,
    dampening: float = DEFAULT_DAMPENING,
    layer: str = "<layer>",
) -> Tensor:
    """SparseGPT N:M pruning with weight reconstruction of one GEMM weight.

    Args:
        weight: ``(N, K)`` weight, groups of ``m`` consecutive entries along K.
        gram: ``X^T X`` of the ``tokens`` calibration rows, ``(K, K)``.
        tokens: number of calibration rows (must be >= K).
        n: entries kept per group.
        m: group size.
        blocksize: columns per lazy-update block (rounded up to a multiple of ``m``).
        dampening: ``λ = dampening * mean(diag H)`` is added to the diagonal.
        layer: name used in error messages.

    Returns:
        The reconstructed ``(N, K)`` float32 weight, exactly zero at the pruned entries.

    Raises:
        CalibrationError: fewer tokens than columns, or ``H`` not positive definite even after
            ``_DAMP_RETRIES`` retries with ten times more dampening each.
    """
    columns = weight.shape[1]
    if columns % m:
        raise NMSearchError(f"layer {layer!r}: K={columns} is not divisible by M={m}")
    if tokens < columns:
        raise CalibrationError(
            f"layer {layer!r}: SparseGPT needs at least {columns} calibration tokens (one per column of its "
            f"{columns}x{columns} Hessian), got {tokens}; add calibration samples"
        )
    w = weight.detach().clone().float()
    hessian = gram.detach().float() * (2.0 / tokens)
    dead = torch.diagonal(hessian) == 0
    hessian[dead, dead] = 1.0  # an input that is always zero: its weights do not matter
    w[:, dead] = 0.0
    upper = _upper_cholesky_of_inverse(hessian, dampening, layer)
    blocksize = -(-blocksize // m) * m  # groups of M never straddle a block
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        w1 = w[:, start:end].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = upper[start:end, start:end]
        prune1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(end - start):
            if i % m == 0:
                score = w1[:, i : i + m].pow(2) / torch.diagonal(u1)[i : i + m].pow(2).unsqueeze(0)
                drop = torch.topk(score, m - n, dim=1, largest=False).indices
                prune1.scatter_(1, i + drop, True)
            column = w1[:, i]
            q = column.masked_fill(prune1[:, i], 0.0)
            q1[:, i] = q
            error = (column - q) / u1[i, i]
            w1[:, i:] -= error.unsqueeze(1) @ u1[i, i:].unsqueeze(0)
            err1[:, i] = error
        w[:, start:end] = q1
        pruned[:, start:end] = prune1
        w[:, end:] -= err1 @ upper[start:end, end:]
    return w.masked_fill(pruned, 0.0)


def _upper_cholesky_of_inverse(hessian: Tensor, dampening: float, layer: str) -> Tensor:
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean_diag = float(torch.diagonal(hessian).mean())
    for attempt in range(_DAMP_RETRIES + 1):
        factor = dampening * _DAMP_GROWTH**attempt
        lower, info = torch.linalg.cholesky_ex(hessian + factor * mean_diag * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper
    raise CalibrationError(
        f"layer {layer!r}: the SparseGPT Hessian is not positive definite even with dampening {factor:g} "
        "x mean(diag H); use more (and more varied) calibration data"
    )


def _prune_weight(
    method: str,
    weight: Tensor,
    stats: LayerStatistics | None,
    pattern: NMPattern,
    *,
    blocksize: int,
    dampening: float,
    layer: str,
) -> Tensor:
    """``(groups, N/groups, K)`` weight pruned to ``pattern`` by ``method`` (zeros at pruned entries)."""
    n, m = pattern.n, pattern.m
    if method == "magnitude":
        return weight * nm_mask(weight.abs(), n, m, dim=-1)
    if method == "wanda":
        scores = weight.abs() * stats.sq_sum.sqrt().unsqueeze(1)
        return weight * nm_mask(scores, n, m, dim=-1)
    return torch.stack(
        [
            sparsegpt_prune(
                weight[g], stats.gram[g], stats.tokens, n, m, blocksize=blocksize, dampening=dampening, layer=layer
            )
            for g in range(weight.shape[0])
        ]
    )


# -- the pruner --------------------------------------------------------------------------------
class OneShotPruner:
    """Prunes ``model`` (kept dense and untouched) to any scheme with one calibration batch.

    Args:
        model: the pre-trained dense model.
        calibration: one batch of calibration inputs (a tensor, tuple, or dict such as
            ``{"input_ids": ..., "attention_mask": ...}``), run through the model in one pass.
        method: ``magnitude``, ``wanda`` or ``sparsegpt``.
        mode: ``sequential`` (default) or ``independent`` (see the module docstring).
        blocksize: SparseGPT's lazy-update block (columns).
        dampening: SparseGPT's relative dampening.
        cache_mb: bound on the cached statistics and pruned weights (least recently used go first).

    Raises:
        NMSearchError: an unknown method or mode.
    """

    def __init__(
        self,
        model: nn.Module,
        calibration: Inputs | None = None,
        method: str = "sparsegpt",
        *,
        mode: str = "sequential",
        blocksize: int = DEFAULT_BLOCKSIZE,
        dampening: float = DEFAULT_DAMPENING,
        cache_mb: float = 1024.0,
    ) -> None:
        if method not in ONESHOT_METHODS:
            raise NMSearchError(f"one-shot method {method!r} is not one of {', '.join(ONESHOT_METHODS)}")
        if mode not in CALIBRATION_MODES:
            raise NMSearchError(f"calibration mode {mode!r} is not one of {', '.join(CALIBRATION_MODES)}")
        if method != "magnitude" and calibration is None:
            raise NMSearchError(f"one-shot method {method!r} needs calibration inputs")
        if not (blocksize >= 1 and dampening > 0):
            raise NMSearchError(f"blocksize must be >= 1 and dampening > 0, got {blocksize} and {dampening}")
        self.model, self.calibration, self.method, self.mode = model, calibration, method, mode
        self.blocksize, self.dampening = blocksize, dampening
        self._cache: OrderedDict[tuple, Tensor | LayerStatistics] = OrderedDict()
        self._cache_limit = int(cache_mb * 2**20)
        self._cache_bytes = 0
        self.hits = self.misses = 0

    def prune(self, scheme: Scheme) -> nn.Module:
        """A sparse copy of the model under ``scheme`` with its weights pruned.

        The copy comes from ``Scheme.apply``; for SparseGPT the kept weights are reconstructed.
        ``scheme.verify`` holds on it.

        Args:
            scheme: A scheme of the model's search space.

        Returns:
            The pruned model (the pruner's model is left unchanged).

        Raises:
            SchemeMismatchError: If ``scheme`` does not fit the model.
            CalibrationError: If the calibration data cannot give a layer's statistics.
        """
        sparse = scheme.apply(self.model)
        layers = {name: module for name, module in prunable_modules(sparse).items() if scheme[name].weight}
        if not layers or self.method == "magnitude":
            return sparse  # the wrappers' own magnitude masks are exactly this method
        device = next(sparse.parameters()).device
        calibration = move_inputs(self.calibration, device)
        if self.mode == "sequential":
            self._prune_sequential(sparse, scheme, calibration)
        else:
            self._prune_independent(sparse, scheme, layers, calibration)
        return sparse

    # -- sequential: one pass, each layer pruned by a pre-forward hook when it first runs ------
    def _prune_sequential(self, sparse: nn.Module, scheme: Scheme, calibration: Inputs) -> None:
        ran: list[tuple[str, str]] = []
        handles = []

        def hook(name: str, module: nn.Module, args: tuple) -> None:
            if any(seen == name for seen, _ in ran):
                return  # a shared layer is pruned on its first call
            option = scheme[name]
            ran.append((name, option.name))
            if option.weight:
                key = ("sequential", self.method, tuple(ran))
                weight = self._get(key)
                if weight is None:
                    stats = self._statistics(module, args[0], name)
                    weight = self._pruned(module, stats, option, name)
                    self._put(key, weight)
                set_gemm_weight(module, weight)

        for name, module in prunable_modules(sparse).items():
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: hook(name, m, a)))
        try:
            self._run(sparse, calibration)
        finally:
            for handle in handles:
                handle.remove()
        self._check_ran(scheme, {name for name, _ in ran})

    # -- independent: dense-input statistics per (layer, activation option) --------------------
    def _prune_independent(
        self, sparse: nn.Module, scheme: Scheme, layers: Mapping[str, nn.Module], calibration: Inputs
    ) -> None:
        def weight_key(name: str) -> tuple:
            return ("weight", self.method, name, scheme[name].name)

        weights = {name: self._get(weight_key(name)) for name in layers}
        missing = {name for name, w in weights.items() if w is None}
        stats = {name: self._get(self._stats_key(name, scheme[name])) for name in missing}
        needed = {name for name, s in stats.items() if s is None}
        if needed:
            self._collect_dense(layers, needed, stats, calibration)
        for name in missing:
            weights[name] = self._pruned(layers[name], stats[name], scheme[name], name)
            self._put(weight_key(name), weights[name])
        for name, weight in weights.items():
            set_gemm_weight(layers[name], weight)

    def _collect_dense(
        self,
        layers: Mapping[str, nn.Module],
        needed: set[str],
        out: dict[str, LayerStatistics | None],
        calibration: Inputs,
    ) -> None:
        """One pass through the dense model: each needed layer's input masked as its wrapper would, and
        -- since the pass runs anyway -- the dense-input statistics of every other layer not cached yet,
        so a search (or a sensitivity sweep) pays for one calibration pass, not one per layer."""
        dense_modules = prunable_modules(self.model)
        extra = {
            name: module
            for name, module in dense_modules.items()
            if name not in needed and self._cache.get(self._stats_key(name, None)) is None
        }
        handles = []

        def hook(name: str, args: tuple) -> None:
            if name in needed and out.get(name) is None:
                out[name] = self._statistics(layers[name], args[0], name)
                self._put(self._stats_key(name, layers[name]), out[name])
            elif name in extra and self._cache.get(self._stats_key(name, None)) is None:
                self._put(self._stats_key(name, None), self._statistics(extra[name], args[0], name))

        for name in needed | set(extra):
            handles.append(dense_modules[name].register_forward_pre_hook(lambda m, a, name=name: hook(name, a)))
        try:
            self._run(self.model, calibration)
        finally:
            for handle in handles:
                handle.remove()
        self._check_ran_names(needed, {name for name in needed if out.get(name) is not None})

    def _stats_key(self, name: str, option: Option | nn.Module | None) -> tuple:
        """Cache key of a layer's dense-input statistics under its activation choice (an option, a
        sparse wrapper, or ``None`` for dense activations)."""
        activation = option.activation if isinstance(option, Option) else getattr(option, "activation_pattern", None)
        return ("stats", self.method == "sparsegpt", name, str(activation or "dense"))

    # -- shared steps ----------------------------------------------------------------------
    @staticmethod
    def _run(model: nn.Module, calibration: Inputs) -> None:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                call_model(model, calibration)
        finally:
            model.train(was_training)

    def _statistics(self, module: nn.Module, x: Tensor, name: str) -> LayerStatistics:
        """Statistics of the inputs the (sparse) layer computes with: masked under activation N:M."""
        if isinstance(module, SparseLayerMixin) and isinstance(module.activation_pattern, NMPattern):
            mask = module.input_mask(x)
            if mask is not None:
                x = x * mask
        stats = LayerStatistics.of(gemm_inputs(module, x), with_gram=self.method == "sparsegpt")
        _check_finite(stats, name)
        return stats

    def _pruned(self, module: nn.Module, stats: LayerStatistics, option: Option, name: str) -> Tensor:
        return _prune_weight(
            self.method,
            gemm_weight(module),
            stats,
            option.weight,
            blocksize=self.blocksize,
            dampening=self.dampening,
            layer=name,
        )

    @staticmethod
    def _check_ran(scheme: Scheme, ran: set[str]) -> None:
        OneShotPruner._check_ran_names({name for name, option in scheme if option.weight}, ran)

    @staticmethod
    def _check_ran_names(wanted: set[str], ran: set[str]) -> None:
        absent = sorted(wanted - ran)
        if absent:
            raise CalibrationError(
                f"layer {absent[0]!r} did not run in the calibration pass, so it cannot be calibrated; "
                "check the calibration inputs reach it or keep it dense"
            )

    # -- cache -----------------------------------------------------------------------------
    def _get(self, key: tuple) -> Any:
        value = self._cache.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._cache.move_to_end(key)
        return value

    def _put(self, key: tuple, value: Tensor | LayerStatistics) -> None:
        size = value.nbytes if isinstance(value, LayerStatistics) else value.numel() * value.element_size()
        if size > self._cache_limit:
            return
        self._cache[key] = value
        self._cache_bytes += size
        while self._cache_bytes > self._cache_limit:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes if isinstance(old, LayerStatistics) else old.numel() * old.element_size()

    def cache_info(self) -> dict[str, float]:
        """Entries, megabytes, hits and misses of the statistics / pruned-weight cache.

        Returns:
            ``{"entries", "mb", "hits", "misses": value}``.
        """
        return {
            "entries": len(self._cache),
            "mb": self._cache_bytes / 2**20,
            "hits": self.hits,
            "misses": self.misses,
        }


def oneshot_prune(
    model: nn.Module,
    scheme: Scheme,
    calibration: Inputs | None = None,
    method: str = "sparsegpt",
    **options: Any,
) -> nn.Module:
    """A sparse copy of ``model`` pruned one-shot to ``scheme`` (see :class:`OneShotPruner`).

    Args:
        model: the pre-trained dense model (left untouched).
        scheme: which layers get which N:M.
        calibration: one batch of calibration inputs (tensor, tuple or keyword dict).
        method: ``magnitude``, ``wanda`` or ``sparsegpt``.
        **options: ``mode``, ``blocksize``, ``dampening`` of :class:`OneShotPruner`.

    Returns:
        The sparse model (wrappers in place; ``scheme.finalize`` bakes the masks in).

    Raises:
        CalibrationError: calibration data too small or non-finite for a layer.
    """
    return OneShotPruner(model, calibration, method, cache_mb=0, **options).prune(scheme)


def layer_error(dense: Tensor, pruned: Tensor, inputs: Tensor) -> float:
    """Relative output error ``||X (W - W')^T|| / ||X W^T||`` of one ``(N, K)`` GEMM weight.

    Args:
        dense: the dense weight.
        pruned: the pruned (and possibly reconstructed) weight.
        inputs: ``(T, K)`` input rows.

    Returns:
        The Frobenius-norm ratio.
    """
    reference = inputs @ dense.T
    return float((inputs @ (dense - pruned).T).norm() / reference.norm().clamp_min(math.ulp(1.0)))
