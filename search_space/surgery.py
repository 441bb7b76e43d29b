"""Model surgery: a :class:`~search_space.scheme.Scheme` applied to, baked into and checked
against an ``nn.Module``, plus the model introspection the search space shares with it.

The scheme itself is a value object (``search_space.scheme``); everything here touches a model.
``Scheme.apply`` / ``finalize`` / ``verify`` / ``check_model`` are thin methods calling these
functions.
"""

from __future__ import annotations

import copy
import difflib
import hashlib

import pandas as pd
import torch
from torch import nn

from search_space.layers import SparseLayerMixin, set_submodule, sparsify, transposed_linear_type, weight_group_dim
from search_space.rows import share_row_scores
from search_space.scheme import DENSE, Scheme, SchemeMismatchError

__all__ = [
    "apply_scheme",
    "check_model",
    "finalize_model",
    "functional_use_reason",
    "model_fingerprint",
    "prunable_modules",
    "verify_model",
]


def _conv_or_linear(module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Linear) or transposed_linear_type(module) is not None:
        return "linear"
    return None


def prunable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``Conv2d`` / ``Linear`` (subclasses and sparse wrappers included) and Hugging Face ``Conv1D``
    (a Linear with its weight stored transposed), by qualified name."""
    return {name: m for name, m in model.named_modules() if name and _conv_or_linear(m)}


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the names, kinds and weight shapes of a model's Conv2d/Linear layers."""
    lines = [f"{name}|{_conv_or_linear(m)}|{tuple(m.weight.shape)}" for name, m in prunable_modules(model).items()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def functional_use_reason(model: nn.Module, name: str) -> str | None:
    """Why masking the layer's module would have no effect, if its owner bypasses ``forward``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
        return (
            "used functionally by nn.MultiheadAttention (F.multi_head_attention_forward reads "
            "out_proj.weight and the packed in_proj_weight directly)"
        )
    return None


def close_matches(name: str, names: list[str]) -> str:
    """`` (did you mean 'a', 'b'?)`` for names close to ``name``, or an empty string."""
    close = difflib.get_close_matches(name, names, n=3)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def apply_scheme(
    scheme: Scheme,
    model: nn.Module,
    *,
    inplace: bool = False,
    strict: bool = True,
    weight_score: str = "magnitude",
    activation_score: str = "magnitude",
    row_seed: int = 0,
) -> nn.Module:
    """A sparse copy of ``model`` (or ``model`` itself with ``inplace=True``) following ``scheme``.

    Everything is validated before anything changes. Row masks are cut from one random field drawn
    from ``row_seed`` (:func:`~search_space.rows.select_row_masks` picks a better one on a batch).

    Args:
        scheme: the per-layer choices.
        model: the dense (or already sparse) model.
        inplace: modify ``model`` rather than a deep copy.
        strict: also require the model's fingerprint to match the scheme's (when it has one).
        weight_score: how weight masks rank entries (see :func:`~search_space.sparsify`).
        activation_score: how activation masks rank entries.
        row_seed: seed of the shared row-score field.

    Returns:
        The sparse model.

    Raises:
        SchemeMismatchError: a layer is missing, has another shape or cannot be sparsified, or
            (``strict``) the fingerprints differ.
    """
    _check_layers(scheme, model, strict=strict)
    target = model if inplace else copy.deepcopy(model)
    # Every wrapper is built (and so validated) before the first one is set.
    replacements = _replacements(scheme, target, weight_score, activation_score)
    for name, module in replacements.items():
        set_submodule(target, name, module)
    if scheme.has_rows:
        share_row_scores(target, row_seed)
    return target


def _replacements(scheme: Scheme, model: nn.Module, weight_score: str, activation_score: str) -> dict[str, nn.Module]:
    replacements = {}
    for name, module in prunable_modules(model).items():
        option = scheme[name]
        dense = module.to_dense() if isinstance(module, SparseLayerMixin) else module
        if option != DENSE:
            replacements[name] = sparsify(
                dense,
                option.weight,
                option.activation,
                name=name,
                weight_score=weight_score,
                activation_score=activation_score,
            )
        elif dense is not module:
            replacements[name] = dense
    return replacements


def check_model(scheme: Scheme, model: nn.Module, *, strict: bool = True) -> None:
    """Raise unless every listed layer exists, has the recorded shape and is eligible for its option.

    Args:
        scheme: the scheme to check.
        model: the model it should fit.
        strict: also compare fingerprints.

    Raises:
        SchemeMismatchError: the first mismatch found.
    """
    _check_layers(scheme, model, strict=strict)
    _replacements(scheme, model, "magnitude", "magnitude")


def _check_layers(scheme: Scheme, model: nn.Module, *, strict: bool) -> None:
    modules = prunable_modules(model)
    names = list(modules)
    for name, option in scheme.layers:
        if name not in modules:
            try:
                other = model.get_submodule(name)
            except AttributeError:
                raise SchemeMismatchError(
                    f"scheme layer {name!r} is not a Conv2d/Linear layer of the model{close_matches(name, names)}"
                ) from None
            raise SchemeMismatchError(f"scheme layer {name!r} is a {type(other).__name__}, not a Conv2d/Linear layer")
        shape = tuple(modules[name].weight.shape)
        if name in scheme.shapes and scheme.shapes[name] != shape:
            raise SchemeMismatchError(
                f"scheme layer {name!r} was chosen for weight shape {scheme.shapes[name]}, "
                f"the model's is {shape}: the scheme belongs to another model"
            )
        if option != DENSE:
            reason = functional_use_reason(model, name)
            if reason:
                raise SchemeMismatchError(f"scheme layer {name!r} cannot be sparsified: {reason}")
    if strict and scheme.fingerprint and scheme.fingerprint != model_fingerprint(model):
        raise SchemeMismatchError(
            f"scheme fingerprint {scheme.fingerprint} does not match the model's {model_fingerprint(model)} "
            "(other layer names or shapes); pass strict=False to apply it by layer name"
        )


def finalize_model(model: nn.Module) -> nn.Module:
    """Bake weight masks into the weights (in place) and drop weight-only wrappers.

    Layers with activation sparsity keep a wrapper (activation masks are dynamic); others
    become plain modules of their original type with pruned entries set to zero.

    Args:
        model: a model made sparse by :func:`apply_scheme`.

    Returns:
        ``model`` itself.
    """
    for name, module in list(prunable_modules(model).items()):
        if not isinstance(module, SparseLayerMixin):
            continue
        mask = module.weight_mask()
        if mask is not None:
            with torch.no_grad():
                module.weight.mul_(mask)
        if module.activation_pattern is None:
            set_submodule(model, name, module.to_dense())
        elif mask is not None:
            set_submodule(model, name, module.with_patterns(None, module.activation_pattern))
    return model


def verify_model(scheme: Scheme, model: nn.Module) -> pd.DataFrame:
    """Check that every layer's weights hold at most N non-zeros per group of M and that
    activation choices are in place.

    Args:
        scheme: the scheme the model should satisfy.
        model: the sparse (or finalized) model.

    Returns:
        The per-layer report (one row per scheme layer).

    Raises:
        SchemeMismatchError: a layer is missing or violates its option.
    """
    modules = prunable_modules(model)
    rows, failures = [], []
    for name, option in scheme.layers:
        if name not in modules:
            raise SchemeMismatchError(f"scheme layer {name!r} is not in the model{close_matches(name, list(modules))}")
        module = modules[name]
        weight = module.sparse_weight() if isinstance(module, SparseLayerMixin) else module.weight
        max_nonzeros = None
        weights_ok = True
        if option.weight:
            dim = weight_group_dim(module)
            groups = weight.detach().unflatten(dim, (-1, option.weight.m))
            max_nonzeros = int((groups != 0).sum(dim + 1).max())
            weights_ok = max_nonzeros <= option.weight.n
        actual_activation = module.activation_pattern if isinstance(module, SparseLayerMixin) else None
        activations_ok = actual_activation == option.activation
        rows.append(
            {
                "layer": name,
                "target": option.target,
                "weights": str(option.weight or ""),
                "max_nonzeros_per_group": max_nonzeros,
                "weights_ok": weights_ok,
                "activations": str(option.activation or ""),
                "activations_ok": activations_ok,
            }
        )
        if not weights_ok:
            failures.append(f"{name!r} has {max_nonzeros} non-zeros in a group of {option.weight.m}")
        if not activations_ok:
            failures.append(f"{name!r} masks activations {actual_activation or 'dense'}, expected {option.activation}")
    if failures:
        raise SchemeMismatchError(
            f"model does not satisfy the scheme: {failures[0]}"
            + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else "")
        )
    return pd.DataFrame(rows)
