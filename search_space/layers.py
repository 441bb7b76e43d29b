"""Thin sparse wrappers for ``nn.Conv2d`` and ``nn.Linear``.

A wrapper *is* a ``Conv2d`` / ``Linear`` (subclass) that adopts the wrapped module's state:
the same ``Parameter`` objects under the same names, so ``state_dict`` keys do not change
and a dense checkpoint loads into the sparse model and back. Masks live in caches and
non-persistent buffers only.

Weight masks are recomputed only when the weight changed (tracked by the tensor's version
counter), so evaluation passes reuse them and training recomputes once per optimizer step.
Activation masks are dynamic (every forward); backward keeps a ``bool`` mask, never a float
copy: the masked input the conv/linear saves is rebuilt from the input and the mask.

A conv's activation choice may instead be a :class:`~search_space.rows.RowPattern`: a static mask
over its output positions (GEMM rows), cut from the model's shared :class:`~search_space.rows.RowScores`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from search_space.masks import (
    activation_nm_mask,
    activation_weighted_scores,
    input_column_sq_sums,
    nm_mask,
    weight_column_norms,
)
from search_space.patterns import IneligibleLayerError, NMPattern, NMSearchError, check_divisible
from search_space.rows import RowPattern, RowScores, conv_output_size, row_keep_mask

WEIGHT_SCORES = ("magnitude", "activation")
ACTIVATION_SCORES = ("magnitude", "weight")
ESTIMATORS = ("ste", "srste", "fixed")


@dataclass(frozen=True)
class MaskState:
    """How the weight mask is applied right now; set per step by a :class:`Recipe`.

    Attributes:
        enabled: ``False`` runs the layer dense (warm-up).
        estimator: The backward: ``ste`` passes the dense gradient, ``srste`` adds
            ``srste_lambda * (1 - E) * W``, ``fixed`` masks the gradient too.
        srste_lambda: SR-STE's lambda_w.
        decay_beta: Lets pruned weights through scaled by beta (mask decay); 0 is the binary mask.
        weight_nm: Overrides the target ``(n, m)`` (a structure-decay stage).
        row_sparsity: Overrides a row mask's target sparsity (its ramp).

    Raises:
        NMSearchError: If ``estimator`` is unknown, or SR-STE is combined with ``decay_beta > 0``.
    """

    enabled: bool = True
    estimator: str = "ste"
    srste_lambda: float = 0.0
    decay_beta: float = 0.0
    weight_nm: tuple[int, int] | None = None
    row_sparsity: float | None = None

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise NMSearchError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.estimator == "srste" and self.decay_beta:
            raise NMSearchError("SR-STE cannot be combined with mask decay (decay_beta > 0)")


def _masked(weight: Tensor, mask: Tensor, beta: float) -> Tensor:
    """``W * (E + beta (1 - E))`` for a 0/1 mask ``E`` in the weight's dtype."""
    return weight * (mask * (1.0 - beta) + beta if beta else mask)


class _MaskedWeight(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, weight: Tensor, mask: Tensor, beta: float, srste_lambda: float, mask_gradient: bool
    ) -> Tensor:
        ctx.srste_lambda = srste_lambda
        ctx.mask_gradient = mask_gradient
        masked = _masked(weight, mask, beta)
        ctx.save_for_backward(
            mask if mask_gradient or srste_lambda else None,
            weight if srste_lambda else None,
        )
        return masked

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        mask, weight = ctx.saved_tensors
        grad_weight = grad * mask if ctx.mask_gradient else grad
        if ctx.srste_lambda:
            # ``g + lambda W (1 - E)`` formed directly: the term is exactly 0 on kept weights, so their
            # gradient is ``g`` bit for bit. ``g + lambda W - lambda W E`` would round ``g`` against
            # ``lambda W`` first (in bf16 at small loss scales it loses ``g`` entirely).
            grad_weight = grad_weight + ctx.srste_lambda * (weight * (1 - mask))
        return grad_weight, None, None, None, None


class _MaskedInputRecipe:
    """What autograd keeps instead of a masked input: the input, its bool mask and the view."""

    __slots__ = ("mask", "offset", "shape", "stride", "version", "x")

    def __init__(self, x: Tensor, mask: Tensor, saved: Tensor) -> None:
        self.x, self.mask, self.version = x, mask, x._version
        self.shape, self.stride, self.offset = saved.shape, saved.stride(), saved.storage_offset()

    def rebuild(self) -> Tensor:
        if self.x._version != self.version:
            raise RuntimeError(
                "the input of a sparse layer was modified in place after the forward pass; "
                "its masked copy cannot be rebuilt for backward (avoid in-place ops on it)"
            )
        return (self.x * self.mask).as_strided(self.shape, self.stride, self.offset)


def _outer_saved_tensors_hooks() -> tuple | None:
    # Compose with hooks a caller installed (offloading, checkpointing) instead of hiding
    # tensors from them; torch exposes the current pair only through this private helper.
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


@contextmanager
def _save_masked_input_as_recipe(masked: Tensor, x: Tensor, mask: Tensor) -> Iterator[None]:
    """Let the layer's op save ``x * mask`` as ``(x, bool mask)`` and rebuild it in backward.

    ``x`` is usually kept alive anyway (the preceding ReLU saves it), so the masked float
    copy -- as large as the activation -- is not held between forward and backward.
    """
    # Autograd keeps the hooks with every saved tensor: capture no reference to ``masked``.
    storage, device = masked.untyped_storage().data_ptr(), masked.device
    outer = _outer_saved_tensors_hooks()

    def pack(t: Tensor) -> object:
        if t.device == device and t.untyped_storage().data_ptr() == storage:
            return _MaskedInputRecipe(x, mask, t)
        return outer[0](t) if outer else t

    def unpack(packed: object) -> Tensor:
        if isinstance(packed, _MaskedInputRecipe):
            return packed.rebuild()
        return outer[1](packed) if outer else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _as_pattern(value: NMPattern | str | tuple[int, int] | None) -> NMPattern | None:
    if value is None:
        return None
    pattern = NMPattern.parse(value)
    return None if pattern.is_dense else pattern


ActivationChoice = NMPattern | RowPattern | str | tuple[int, int] | None


def _as_activation(value: ActivationChoice) -> NMPattern | RowPattern | None:
    """An N:M pattern (``"2:4"``) or a row pattern (``RowPattern(0.2)``, ``"r0.2"``)."""
    if isinstance(value, RowPattern) or (isinstance(value, str) and value.strip().startswith("r")):
        return RowPattern.parse(value)
    return _as_pattern(value)


class SparseLayerMixin:
    """Weight and/or activation N:M masking shared by :class:`SparseConv2d` and :class:`SparseLinear`."""

    dense_base: type[nn.Module]
    input_dim: int  # dimension of the input holding the reduction channels
    weight_group_dim: int = 1  # dimension of the weight N:M groups run along (K)
    supports_rows: bool  # whether row masks (skipped output positions) apply

    weight: nn.Parameter
    groups: int

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        weight: NMPattern | str | tuple[int, int] | None = None,
        activation: ActivationChoice = None,
        *,
        name: str = "",
        weight_score: str = "magnitude",
        activation_score: str = "magnitude",
    ) -> SparseLayerMixin:
        """Wrap ``module`` (left untouched) into a sparse layer sharing its parameters.

        Args:
            module: A dense layer of this class's ``dense_base`` (``nn.Conv2d`` or ``nn.Linear``,
                or a subclass that keeps its ``forward``).
            weight: The weight's N:M pattern (``"2:4"``, ``(2, 4)``, an ``NMPattern``) or ``None``.
            activation: The input's N:M pattern, a row pattern (``"r0.2"``, ``RowPattern(0.2)``,
                Conv2d only) or ``None``.
            name: The layer's name in the model, for messages and SAD records.
            weight_score: ``"magnitude"`` (``|w|``) or ``"activation"`` (``|w| * ||x_col||``, needs
                :func:`calibrate_input_norms`).
            activation_score: ``"magnitude"`` (``|x|``) or ``"weight"`` (``|x| * ||w_col||``).

        Returns:
            The sparse layer, holding the same ``Parameter`` objects under the same names.

        Raises:
            NMSearchError: If ``module`` is already sparse, of another type, overrides ``forward``,
                or a score name is unknown.
            InvalidPatternError: If a pattern is invalid.
            IneligibleLayerError: If the grouped channels are not divisible by M, or a row pattern
                is put on a Linear.
        """
        name = name or type(module).__name__
        if isinstance(module, SparseLayerMixin):
            raise NMSearchError(f"layer '{name}' is already sparse; call .to_dense() first")
        if not cls._wraps(module):
            raise NMSearchError(f"layer '{name}': {cls.__name__} wraps {cls._base_name()}, got {type(module).__name__}")
        if not cls._keeps_forward(module):
            raise NMSearchError(
                f"layer '{name}' ({type(module).__name__}) overrides forward(), so masking it could change "
                "what it computes; exclude it from the search"
            )
        if weight_score not in WEIGHT_SCORES:
            raise NMSearchError(f"layer '{name}': weight_score must be one of {WEIGHT_SCORES}, got {weight_score!r}")
        if activation_score not in ACTIVATION_SCORES:
            raise NMSearchError(
                f"layer '{name}': activation_score must be one of {ACTIVATION_SCORES}, got {activation_score!r}"
            )
        weight_pattern, activation_pattern = _as_pattern(weight), _as_activation(activation)
        group_dim, what = cls._reduction_channels(module)
        if weight_pattern is not None:
            check_divisible(group_dim, weight_pattern.m, layer=name, what=what)
        if isinstance(activation_pattern, RowPattern):
            cls._check_rows(name, type(module))
        elif activation_pattern is not None:
            check_divisible(group_dim, activation_pattern.m, layer=name, what=what)

        layer = cls.__new__(cls)
        layer.__dict__.update({k: copy.copy(v) if isinstance(v, dict | set) else v for k, v in module.__dict__.items()})
        layer.dense_type = type(module)
        layer.layer_name = name
        layer.weight_pattern = weight_pattern
        layer.activation_pattern = activation_pattern
        layer.weight_score = weight_score
        layer.activation_score = activation_score
        layer.mask_state = MaskState()
        layer.register_buffer("fixed_weight_mask", None, persistent=False)
        layer.register_buffer("input_sq_sum", None, persistent=False)
        layer._calibrating = False
        layer._mask_cache = None
        layer._mask_cache_key = None
        layer._flip_reference = None
        layer.mask_updates = 0
        layer.mask_flips = 0
        layer._unread_flips = 0
        layer._unread_updates = 0
        layer.row_scores = RowScores()
        layer._row_mask_cache = None
        return layer

    @classmethod
    def _wraps(cls, module: nn.Module) -> bool:
        return isinstance(module, cls.dense_base)

    @classmethod
    def _base_name(cls) -> str:
        return cls.dense_base.__name__

    @classmethod
    def _keeps_forward(cls, module: nn.Module) -> bool:
        return type(module).forward is cls.dense_base.forward

    @classmethod
    def _reduction_channels(cls, module: nn.Module) -> tuple[int, str]:
        raise NotImplementedError

    @classmethod
    def _check_rows(cls, name: str, module_type: type[nn.Module]) -> None:
        if not cls.supports_rows:
            raise IneligibleLayerError(
                f"layer '{name}': row masks skip a Conv2d's output positions, {module_type.__name__} layers are "
                "not eligible; keep its activations dense or use activation N:M"
            )

    # -- weights ---------------------------------------------------------------------------
    @property
    def weight_nm(self) -> tuple[int, int] | None:
        """The ``(n, m)`` the weight mask uses now (a structure-decay stage or the target)."""
        if self.weight_pattern is None:
            return None
        return self.mask_state.weight_nm or (self.weight_pattern.n, self.weight_pattern.m)

    def _weight_scores(self) -> Tensor:
        if self.weight_score == "magnitude":
            return self.weight.detach().abs()
        if self.input_sq_sum is None:
            raise NMSearchError(
                f"layer '{self.layer_name}' scores weights by |w|*||x_col|| but was never calibrated; "
                "run search_space.calibrate_input_norms(model, batches) first"
            )
        if self.weight_group_dim == 0:  # (K, N) storage: score the (N, K) view
            return activation_weighted_scores(self.weight.T, self.input_sq_sum.sqrt()).T
        return activation_weighted_scores(self.weight, self.input_sq_sum.sqrt(), self.groups)

    def _forward_weight_mask(self) -> Tensor | None:
        """The mask for this forward: fresh in the weight's dtype when the weight changed (a
        float multiply is much faster than a bool one on CPU), else the cached bool mask."""
        nm = self.weight_nm
        if nm is None:
            return None
        if self.fixed_weight_mask is not None and self.mask_state.estimator == "fixed":
            return self.fixed_weight_mask
        w = self.weight
        key = (w._version, w.data_ptr(), w.device, nm, self.weight_score)
        if key == self._mask_cache_key:
            return self._mask_cache
        mask = nm_mask(self._weight_scores(), nm[0], nm[1], dim=self.weight_group_dim, dtype=w.dtype)
        keep = mask.bool()
        self._count_flips(keep, nm)
        self._mask_cache, self._mask_cache_key = keep, key
        return mask

    def weight_mask(self) -> Tensor | None:
        """The boolean weight mask for the current weights and stage.

        Returns:
            A ``bool`` tensor of the weight's shape, or ``None`` when the weights stay dense.

        Raises:
            NMSearchError: If the layer scores by activations and was never calibrated.
        """
        if self._forward_weight_mask() is None:
            return None
        if self.fixed_weight_mask is not None and self.mask_state.estimator == "fixed":
            return self.fixed_weight_mask
        return self._mask_cache

    def _count_flips(self, mask: Tensor, nm: tuple[int, int]) -> None:
        """SAD: entries whose keep/prune decision changed since the previous mask update."""
        reference = self._flip_reference
        if reference is not None and reference[0] == nm and reference[1].shape == mask.shape:
            # the reference is a plain attribute: it stays behind when the layer moves (.cuda())
            flips = torch.count_nonzero(torch.logical_xor(reference[1].to(mask.device), mask))
            self.mask_flips = self.mask_flips + flips
            self._unread_flips = self._unread_flips + flips
            self.mask_updates += 1
            self._unread_updates += 1
        self._flip_reference = (nm, mask)

    def read_mask_flips(self) -> tuple[int, int]:
        """Count the mask flips since the last read, then reset the count (drives SAD history).

        Returns:
            ``(flips, updates)``: entries whose keep/prune decision changed, and mask recomputations.
        """
        flips, updates = int(self._unread_flips), self._unread_updates
        self._unread_flips, self._unread_updates = 0, 0
        return flips, updates

    def fix_weight_mask(self) -> None:
        """Freeze the current mask (one-shot / ASP) and zero the pruned weights in place."""
        mask = self.weight_mask()
        if mask is None:
            return
        self.fixed_weight_mask = mask.clone()
        with torch.no_grad():
            self.weight.mul_(self.fixed_weight_mask)

    def sparse_weight(self) -> Tensor:
        """The weight as the forward pass uses it: masked, decayed, or dense.

        Returns:
            A tensor of the weight's shape; differentiable with the recipe's estimator in the
            backward when gradients are enabled.
        """
        state = self.mask_state
        mask = self._forward_weight_mask() if state.enabled else None
        if mask is None:
            return self.weight
        beta = state.decay_beta
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return _masked(self.weight, mask, beta)
        srste_lambda = state.srste_lambda if state.estimator == "srste" else 0.0
        return _MaskedWeight.apply(self.weight, mask, beta, srste_lambda, state.estimator == "fixed")

    # -- activations -----------------------------------------------------------------------
    def input_mask(self, x: Tensor, pattern: NMPattern | RowPattern | None = None) -> Tensor | None:
        """The activation mask of ``x`` under ``pattern``. Supernets call it with every activation choice.

        Args:
            x: An input of this layer.
            pattern: An N:M or row pattern; default the layer's own (whose row sparsity is the
                one its recipe set, e.g. the ramp).

        Returns:
            For N:M, a ``bool`` mask of the shape of ``x``. For a
            :class:`~search_space.rows.RowPattern`, the ``(Ho, Wo)`` ``bool`` mask of the *output*
            positions (GEMM rows) kept for an input like ``x``: multiply the layer's output by it.
            ``None`` when nothing is masked (dense activations, masks off, or no row skipped).

        Raises:
            IneligibleLayerError: If the channels are not divisible by M, or rows are asked of a Linear.
        """
        if pattern is None:
            if not self.mask_state.enabled:
                return None
            pattern = self.activation_pattern
            if isinstance(pattern, RowPattern):
                return self._row_mask(x, self.row_sparsity, torch.bool)
        if pattern is None:
            return None
        if isinstance(pattern, RowPattern):
            self._check_rows(self.layer_name, self.dense_type)
            return self._row_mask(x, pattern.sparsity, torch.bool)
        scale = None
        if self.activation_score == "weight":
            weight = self.weight.T if self.weight_group_dim == 0 else self.weight
            scale = weight_column_norms(weight, self.groups)
        return activation_nm_mask(x, pattern.n, pattern.m, self.input_dim, scale, layer=self.layer_name)

    @property
    def row_sparsity(self) -> float:
        """Fraction of output positions skipped now: the recipe's ramp value, else the target; 0 without
        rows or while masks are off (warm-up)."""
        if not (isinstance(self.activation_pattern, RowPattern) and self.mask_state.enabled):
            return 0.0
        override = self.mask_state.row_sparsity
        return self.activation_pattern.sparsity if override is None else override

    def _row_mask(self, x: Tensor, sparsity: float, dtype: torch.dtype) -> Tensor | None:
        """Kept output positions ``(Ho, Wo)`` for an input like ``x``, cached per shape, field and dtype."""
        input_size = tuple(x.shape[-2:])
        scores = self.row_scores

        def key() -> tuple:
            return (input_size, sparsity, dtype, x.device, scores.seed, scores.input_size)

        if self._row_mask_cache is not None and self._row_mask_cache[0] == key():
            return self._row_mask_cache[1]
        output_size = conv_output_size(
            input_size, self.kernel_size, self.stride, self.dilation, self._reversed_padding_repeated_twice
        )
        keep = row_keep_mask(scores.pooled(output_size, input_size), sparsity)
        mask = None if bool(keep.all()) else keep.to(device=x.device, dtype=dtype)
        self._row_mask_cache = (key(), mask)  # after pooled(): it may have set the field's input size
        return mask

    def forward(self, x: Tensor) -> Tensor:
        """The wrapped layer's output with the current weight and activation masks applied."""
        if self._calibrating:  # calibration observes the dense model's inputs
            self._observe_input(x)
            return self._dense_forward(x, self.weight)
        weight = self.sparse_weight()
        if isinstance(self.activation_pattern, RowPattern):
            keep = self._row_mask(x, self.row_sparsity, weight.dtype)
            out = self._dense_forward(x, weight)
            # In place: a conv's backward needs its input and weight, not its output.
            return out if keep is None else out.mul_(keep)
        mask = self.input_mask(x)
        if mask is None:
            return self._dense_forward(x, weight)
        masked = x * mask  # autograd keeps the bool mask for this product's backward
        if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            return self._dense_forward(masked, weight)
        with _save_masked_input_as_recipe(masked, x, mask):
            return self._dense_forward(masked, weight)

    def _dense_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def _observe_input(self, x: Tensor) -> None:
        raise NotImplementedError

    # -- conversions -----------------------------------------------------------------------
    def to_dense(self) -> nn.Module:
        """Unwrap the layer.

        Returns:
            A module of the original type sharing this layer's parameters (no mask applied).
        """
        dense = self.dense_type.__new__(self.dense_type)
        dense.__dict__.update({k: copy.copy(v) if isinstance(v, dict | set) else v for k, v in self.__dict__.items()})
        for attr in _SPARSE_ATTRS:
            dense.__dict__.pop(attr, None)
        for buffer in ("fixed_weight_mask", "input_sq_sum"):
            dense._buffers.pop(buffer, None)
            dense._non_persistent_buffers_set.discard(buffer)
        return dense

    def with_patterns(
        self,
        weight: NMPattern | str | tuple[int, int] | None,
        activation: ActivationChoice,
    ) -> SparseLayerMixin:
        """A new wrapper over the same parameters with other patterns (validated first).

        Args:
            weight: The new weight pattern, or ``None``.
            activation: The new activation choice, or ``None``.

        Returns:
            The new sparse layer; it keeps the calibration and the row field of this one.

        Raises:
            InvalidPatternError: If a pattern is invalid.
            IneligibleLayerError: If the layer is not eligible for a pattern.
        """
        layer = type(self).from_dense(
            self.to_dense(),
            weight,
            activation,
            name=self.layer_name,
            weight_score=self.weight_score,
            activation_score=self.activation_score,
        )
        layer.mask_state = replace(self.mask_state, weight_nm=None)
        layer.input_sq_sum = self.input_sq_sum
        layer.row_scores = self.row_scores
        return layer

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        parts = [base] if base else [f"in_features={self.weight.shape[0]}, out_features={self.weight.shape[1]}"]
        parts.append(f"weight_nm={self.weight_pattern or 'dense'}")
        activation = self.activation_pattern
        if isinstance(activation, RowPattern):
            parts.append(f"activation_rows={activation.sparsity}")
        else:
            parts.append(f"activation_nm={activation or 'dense'}")
        return ", ".join(parts)


_SPARSE_ATTRS = (
    "dense_type",
    "layer_name",
    "weight_pattern",
    "activation_pattern",
    "weight_score",
    "activation_score",
    "mask_state",
    "_calibrating",
    "_mask_cache",
    "_mask_cache_key",
    "_flip_reference",
    "mask_updates",
    "mask_flips",
    "_unread_flips",
    "_unread_updates",
    "row_scores",
    "_row_mask_cache",
)


class SparseConv2d(SparseLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` with N:M weights (M consecutive input channels at a fixed ``(cout, kh, kw)``)
    and/or N:M inputs (M consecutive channels of each pixel) or a row mask (skipped output
    positions, see :mod:`search_space.rows`). Stride, padding (any mode), dilation, groups and
    bias behave exactly as in the wrapped convolution."""

    dense_base = nn.Conv2d
    input_dim = 1
    supports_rows = True

    @classmethod
    def _reduction_channels(cls, module: nn.Module) -> tuple[int, str]:
        return module.in_channels // module.groups, "input channels per group"

    def _dense_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return self._conv_forward(x, weight, self.bias)

    def _observe_input(self, x: Tensor) -> None:
        # Covers tuple, 'same' (possibly asymmetric) and 'valid' padding in every padding_mode.
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        pad = self._reversed_padding_repeated_twice
        sums = input_column_sq_sums(x, self.kernel_size, self.stride, self.dilation, pad, mode)
        self.input_sq_sum = sums if self.input_sq_sum is None else self.input_sq_sum + sums


class SparseLinear(SparseLayerMixin, nn.Linear):
    """``nn.Linear`` (or a subclass that keeps its forward, e.g. ``NonDynamicallyQuantizableLinear``)
    with N:M weights along ``in_features`` and/or N:M inputs along the last dimension."""

    dense_base = nn.Linear
    input_dim = -1
    supports_rows = False
    groups = 1

    @classmethod
    def _reduction_channels(cls, module: nn.Module) -> tuple[int, str]:
        return module.in_features, "in_features"

    def _dense_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self.bias)

    def _observe_input(self, x: Tensor) -> None:
        sums = input_column_sq_sums(x)
        self.input_sq_sum = sums if self.input_sq_sum is None else self.input_sq_sum + sums


def transposed_linear_type(module: nn.Module) -> type | None:
    """The Hugging Face ``Conv1D`` class (GPT-2 family) in ``module``'s MRO, if any: a Linear whose
    weight is stored transposed, ``(in_features, out_features)``. Found by name and shape, so
    ``transformers`` stays optional. For a :class:`SparseConv1D`, the class it wraps."""
    if isinstance(module, SparseConv1D):
        return module.dense_type
    for klass in type(module).__mro__:
        if klass.__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int):
            weight = getattr(module, "weight", None)
            return klass if isinstance(weight, Tensor) and weight.dim() == 2 else None
    return None


def weight_group_dim(module: nn.Module) -> int:
    """The dimension of ``module.weight`` that N:M groups run along: 0 for a ``Conv1D`` (dense or
    sparse), else 1."""
    return 0 if transposed_linear_type(module) is not None else getattr(module, "weight_group_dim", 1)


class SparseConv1D(SparseLayerMixin, nn.Module):
    """Hugging Face ``Conv1D`` (GPT-2's attention and MLP projections) as a sparse Linear: its
    weight is stored ``(in, out)``, so N:M groups run along dimension 0 (K) of the stored weight.
    ``to_dense`` gives back the original ``Conv1D``; ``state_dict`` keys and shapes do not change."""

    dense_base = nn.Module
    input_dim = -1
    supports_rows = False
    groups = 1
    weight_group_dim = 0

    @classmethod
    def _wraps(cls, module: nn.Module) -> bool:
        return transposed_linear_type(module) is not None and not isinstance(module, SparseLayerMixin)

    @classmethod
    def _base_name(cls) -> str:
        return "transformers' Conv1D"

    @classmethod
    def _keeps_forward(cls, module: nn.Module) -> bool:
        base = transposed_linear_type(module)
        return base is not None and type(module).forward is base.forward

    @classmethod
    def _reduction_channels(cls, module: nn.Module) -> tuple[int, str]:
        return module.weight.shape[0], "in_features"

    def _dense_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight.T, self.bias)

    def _observe_input(self, x: Tensor) -> None:
        sums = input_column_sq_sums(x)
        self.input_sq_sum = sums if self.input_sq_sum is None else self.input_sq_sum + sums


SPARSE_TYPES: tuple[type[SparseLayerMixin], ...] = (SparseConv2d, SparseLinear, SparseConv1D)


def sparsify(
    module: nn.Module,
    weight: NMPattern | str | tuple[int, int] | None = None,
    activation: ActivationChoice = None,
    *,
    name: str = "",
    weight_score: str = "magnitude",
    activation_score: str = "magnitude",
) -> SparseLayerMixin:
    """Wrap a ``Conv2d`` or ``Linear`` (or a subclass) into the matching sparse layer.

    Args:
        module: The dense layer (left untouched; the wrapper shares its parameters).
        weight: The weight's N:M pattern (``"2:4"``, ``(2, 4)``, an ``NMPattern``) or ``None``.
        activation: The input's N:M pattern, a row pattern (``"r0.2"``, Conv2d only) or ``None``.
        name: The layer's name in the model, for messages.
        weight_score: ``"magnitude"`` or ``"activation"`` (see :meth:`SparseLayerMixin.from_dense`).
        activation_score: ``"magnitude"`` or ``"weight"``.

    Returns:
        A :class:`SparseConv2d` or :class:`SparseLinear`.

    Raises:
        NMSearchError: If ``module`` is neither a Conv2d nor a Linear, or cannot be wrapped.
        InvalidPatternError: If a pattern is invalid.
        IneligibleLayerError: If the layer's grouped channels are not divisible by M.
    """
    for sparse_type in SPARSE_TYPES:
        if sparse_type._wraps(module):
            return sparse_type.from_dense(
                module,
                weight,
                activation,
                name=name,
                weight_score=weight_score,
                activation_score=activation_score,
            )
    raise NMSearchError(
        f"layer '{name or type(module).__name__}' is a {type(module).__name__}; "
        "only Conv2d and Linear layers (and subclasses) and transformers' Conv1D can be made N:M sparse"
    )


def sparse_layers(model: nn.Module) -> Iterator[tuple[str, SparseLayerMixin]]:
    """Find the sparse layers of a model.

    Args:
        model: Any module.

    Yields:
        ``(qualified name, layer)`` of every sparse layer, in ``named_modules`` order.
    """
    for name, module in model.named_modules():
        if isinstance(module, SparseLayerMixin):
            yield name, module


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted path.

    Args:
        model: The model, modified in place.
        name: The dotted path, e.g. ``"layer1.0.conv1"``.
        module: The new submodule.

    Raises:
        AttributeError: If the parent of ``name`` does not exist.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@contextmanager
def _calibration_mode(model: nn.Module) -> Iterator[list[SparseLayerMixin]]:
    layers = [layer for _, layer in sparse_layers(model)]
    for layer in layers:
        layer.input_sq_sum = None
        layer._calibrating = True
    try:
        yield layers
    finally:
        for layer in layers:
            layer._calibrating = False


@torch.no_grad()
def calibrate_input_norms(model: nn.Module, batches: Iterable[Tensor | tuple | list]) -> None:
    """Record each sparse layer's input column norms for ``weight_score="activation"`` (``|w| * ||x_col||``).

    The batches run through the dense model (eval mode, masks off); the training mode is restored.

    Args:
        model: A model with sparse layers.
        batches: Inputs, or ``(inputs, targets)`` pairs, e.g. a few training batches.
    """
    was_training = model.training
    model.eval()
    try:
        with _calibration_mode(model) as layers:
            for batch in batches:
                inputs = batch[0] if isinstance(batch, tuple | list) else batch
                model(inputs)
        for layer in layers:
            layer._mask_cache_key = None
    finally:
        model.train(was_training)
