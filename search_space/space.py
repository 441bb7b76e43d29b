"""The search space of a model: its layers (shapes, GEMM dims, MACs) and each layer's options.

``SearchSpace.from_model`` runs one forward pass with hooks on example inputs. Every Conv2d /
Linear (subclasses included) that ran through its ``forward`` is *modelled* (its cost counts);
it is *searchable* when it has more than the dense option. Layers whose weights a model uses
functionally (``nn.MultiheadAttention``'s packed ``in_proj_weight`` and ``out_proj``), whose
weight another module shares (tied embeddings such as GPT-2's ``lm_head``), embedding tables,
and layers that never ran are listed in ``skipped`` with the reason. Example inputs may be a
tensor, a tuple of positional arguments or a dict of keyword arguments (Hugging Face
``input_ids`` + ``attention_mask``).
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from search_space.layers import SparseLayerMixin, transposed_linear_type, weight_group_dim
from search_space.oneshot import move_inputs
from search_space.patterns import NMPattern, NMSearchError
from search_space.rows import DEFAULT_ROW_SPARSITIES, RowPattern, pruned_rows
from search_space.scheme import DENSE, TARGETS, Option, Scheme, SchemeError, SchemeMismatchError
from search_space.surgery import close_matches, functional_use_reason, model_fingerprint, prunable_modules

DEFAULT_RATIOS = ("2:4", "1:4", "2:8", "1:8")
DEFAULT_TARGETS = ("weights", "activations", "both")
# Opt-in targets beyond the defaults: "rows", a static mask over a conv's output positions.
SPACE_TARGETS = (*DEFAULT_TARGETS, "rows")


@dataclass(frozen=True)
class LayerInfo:
    """A modelled layer as the example pass saw it. GEMM ``Y[T x N] = X[T x K] W^T`` per group.

    ``tokens`` (T), ``macs``, ``input_numel`` and ``output_numel`` sum over all calls of the
    layer in one pass; shapes are those of the first call.

    Attributes:
        name: Qualified module name.
        kind: ``"conv2d"`` or ``"linear"``.
        module_type: The module's class name.
        weight_shape: The weight's shape.
        input_shape: The first call's input shape.
        output_shape: The first call's output shape.
        calls: Calls per forward pass.
        tokens: GEMM rows T (output positions times batch), summed over calls.
        reduction: GEMM reduction K per group.
        outputs: GEMM outputs N per group.
        groups: Conv groups (1 for a Linear).
        channels: The dimension N:M groups run along (input channels per conv group, or ``in_features``).
        params: Parameters, bias included.
        macs: Multiply-accumulates, summed over calls.
        input_numel: Input elements, summed over calls.
        output_numel: Output elements, summed over calls.
        note: Why the layer has only some options (e.g. kept dense), when it has.
    """

    name: str
    kind: str
    module_type: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    calls: int
    tokens: int
    reduction: int
    outputs: int
    groups: int
    channels: int
    params: int
    macs: int
    input_numel: int
    output_numel: int
    note: str = ""


@dataclass(frozen=True)
class SkippedLayer:
    """A Conv2d / Linear the search leaves out, and why (e.g. used functionally, never called).

    Attributes:
        name: Qualified module name.
        module_type: The module's class name.
        reason: Why it is not modelled.
    """

    name: str
    module_type: str
    reason: str


@dataclass
class _Record:
    module: nn.Module
    order: int
    calls: int = 0
    input_shape: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()
    tokens: int = 0
    input_numel: int = 0
    output_numel: int = 0


def _gemm_tokens(kind: str, x: torch.Tensor, y: torch.Tensor, module: nn.Module) -> int:
    if kind == "conv2d":
        return y.shape[0] * y.shape[2] * y.shape[3] if y.dim() == 4 else y.shape[1] * y.shape[2]
    return x.numel() // x.shape[-1]


def _matches(name: str, module: nn.Module, patterns: Iterable[str | type]) -> str | None:
    for pattern in patterns:
        if isinstance(pattern, type):
            if isinstance(module, pattern):
                return pattern.__name__
        elif fnmatch.fnmatchcase(name, pattern) or type(module).__name__ == pattern:
            return pattern
    return None


def _describe_inputs(inputs: Any) -> str:
    if isinstance(inputs, torch.Tensor):
        return f"shape {tuple(inputs.shape)}"
    if isinstance(inputs, Mapping):
        return ", ".join(f"{k}: {_describe_inputs(v)}" for k, v in inputs.items())
    if isinstance(inputs, tuple | list):
        return ", ".join(_describe_inputs(v) for v in inputs)
    return type(inputs).__name__


def _check_patterns(modules: Mapping[str, nn.Module], patterns: Iterable[str | type], what: str) -> None:
    """A pattern of ``include`` / ``exclude`` that matches no Conv2d / Linear is a typo: say so,
    with the closest layer or class names."""
    names = list(modules)
    for pattern in patterns:
        if any(_matches(name, module, [pattern]) for name, module in modules.items()):
            continue
        label = pattern.__name__ if isinstance(pattern, type) else str(pattern)
        classes = sorted({type(module).__name__ for module in modules.values()})
        close = difflib.get_close_matches(label, [*names, *classes], n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise NMSearchError(
            f"space.{what} pattern {label!r} matches no layer; {hint}layers: {shown} "
            f"(use name globs like 'layer4.*' or class names like {classes[0]!r})"
        )


class SearchSpace:
    """Layers of a model and, per layer, the sparsity options a strategy may choose from.

    Options: ``dense`` plus weights / activations / both at the configured ratios, filtered by
    eligibility (the grouped channel count must be divisible by M). ``both`` ties the weight
    and activation ratio unless ``tie_both=False``, which searches every pair. The opt-in target
    ``rows`` adds, on Conv2d layers, a row mask at each of ``row_sparsities`` (``r0.2``) and, when
    ``weights`` is a target too, each row mask with each weight ratio (``w2:4+r0.2``).

    Usually built by :meth:`from_model`.

    Args:
        layers: The modelled layers, in execution order.
        skipped: Layers left out, with the reason.
        fingerprint: The model's fingerprint.
        example_batch_size: Batch size of the example pass (the cost model scales from it).
        ratios: N:M ratios offered per target.
        targets: Any of ``"weights"``, ``"activations"``, ``"both"``, ``"rows"``.
        tie_both: ``both`` uses one ratio for weights and activations.
        fixed_dense: Layers offered only ``dense``.
        row_sparsities: Row-mask sparsities offered with the ``rows`` target.

    Raises:
        NMSearchError: If a ratio is dense or a target unknown.
        InvalidPatternError: If a ratio is not a valid N:M.
        InvalidSparsityError: If a row sparsity is outside (0, 1).
    """

    def __init__(
        self,
        layers: Sequence[LayerInfo],
        *,
        skipped: Sequence[SkippedLayer] = (),
        fingerprint: str = "",
        example_batch_size: int = 1,
        ratios: Sequence[str | NMPattern] = DEFAULT_RATIOS,
        targets: Sequence[str] = DEFAULT_TARGETS,
        tie_both: bool = True,
        fixed_dense: Iterable[str] = (),
        row_sparsities: Sequence[float] = DEFAULT_ROW_SPARSITIES,
    ) -> None:
        self.layers: tuple[LayerInfo, ...] = tuple(layers)
        self.skipped: tuple[SkippedLayer, ...] = tuple(skipped)
        self.fingerprint = fingerprint
        self.example_batch_size = example_batch_size
        self.ratios: tuple[NMPattern, ...] = tuple(NMPattern.parse(r) for r in ratios)
        if any(r.is_dense for r in self.ratios):
            raise NMSearchError("space.ratios must be sparse N:M patterns (N < M), e.g. ['2:4', '1:8']")
        unknown = [t for t in targets if t not in SPACE_TARGETS]
        if unknown:
            raise NMSearchError(f"space.targets: {unknown[0]!r} is not one of {', '.join(SPACE_TARGETS)}")
        self.targets = tuple(targets)
        self.tie_both = tie_both
        self.row_sparsities: tuple[float, ...] = tuple(RowPattern.parse(s).sparsity for s in row_sparsities)
        fixed = set(fixed_dense)
        self.options: dict[str, tuple[Option, ...]] = {
            info.name: (DENSE,) if info.name in fixed else self._layer_options(info) for info in self.layers
        }
        self._index = {name: {o: i for i, o in enumerate(opts)} for name, opts in self.options.items()}
        self._info = {info.name: info for info in self.layers}

    # -- discovery -------------------------------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        example_inputs: torch.Tensor | Sequence[Any] | Mapping[str, Any],
        *,
        include: Iterable[str | type] | None = None,
        exclude: Iterable[str | type] = (),
        keep_first_last_dense: bool = False,
        ratios: Sequence[str | NMPattern] = DEFAULT_RATIOS,
        targets: Sequence[str] = DEFAULT_TARGETS,
        tie_both: bool = True,
        row_sparsities: Sequence[float] = DEFAULT_ROW_SPARSITIES,
    ) -> SearchSpace:
        """Discover the space of a model from one forward pass (eval mode, no grad) with hooks.

        Args:
            model: Any ``nn.Module`` with Conv2d / Linear layers (subclasses included).
            example_inputs: A tensor, a tuple of positional arguments, or a dict of keyword arguments;
                its tensors are moved to the device of the model's parameters.
            include: Name globs (``"layer4.*"``), class names or classes of the layers to search;
                ``None`` searches every layer. Others stay in the space (their cost counts) with
                only ``dense``.
            exclude: Layers to keep dense, in the same forms.
            keep_first_last_dense: Keep the first and the last layer dense.
            ratios: N:M ratios offered per target.
            targets: ``(*DEFAULT_TARGETS, "rows")`` adds row masks at ``row_sparsities`` to Conv2d layers.
            tie_both: ``both`` uses one ratio for weights and activations.
            row_sparsities: Row-mask sparsities offered with the ``rows`` target.

        Returns:
            The space; layers the model uses functionally or never calls are in ``skipped``.

        Raises:
            NMSearchError: If the model is itself a single layer, has no Conv2d / Linear layer,
                or an argument is invalid.
        """
        include = list(include) if include is not None else None
        exclude = list(exclude)
        modules = prunable_modules(model)
        if isinstance(model, nn.Conv2d | nn.Linear):
            raise NMSearchError(
                f"the model itself is a {type(model).__name__}: layers are addressed by name, so wrap it, "
                "e.g. nn.Sequential(model)"
            )
        if not modules:
            raise NMSearchError(
                f"{type(model).__name__} has no Conv2d or Linear layers: there is nothing to search over"
            )
        parameter = next(model.parameters(), None)
        if parameter is not None:  # a model moved to CUDA with the task's CPU inputs
            example_inputs = move_inputs(example_inputs, parameter.device)
        records: dict[str, _Record] = {}
        handles = []

        def hook(name: str, module: nn.Module, args: tuple, output: Any) -> None:
            record = records.setdefault(name, _Record(module, len(records)))
            x = args[0]
            y = output
            kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
            record.calls += 1
            if record.calls == 1:
                record.input_shape, record.output_shape = tuple(x.shape), tuple(y.shape)
            record.tokens += _gemm_tokens(kind, x, y, module)
            record.input_numel += x.numel()
            record.output_numel += y.numel()

        for name, module in modules.items():
            handles.append(module.register_forward_hook(lambda m, a, o, name=name: hook(name, m, a, o)))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if isinstance(example_inputs, Mapping):
                    model(**example_inputs)
                elif isinstance(example_inputs, tuple | list):
                    model(*example_inputs)
                else:
                    model(example_inputs)
        except (RuntimeError, ValueError, TypeError, IndexError) as error:  # shape / dtype / arity mismatches
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise NMSearchError(
                f"{type(model).__name__} cannot run on the example inputs ({_describe_inputs(example_inputs)}): "
                f"{detail}; pass inputs of the shape the model takes, e.g. a batch of one real sample"
            ) from None
        finally:
            model.train(was_training)
            for handle in handles:
                handle.remove()

        skipped = []
        for owner_name, owner in model.named_modules():
            if isinstance(owner, nn.MultiheadAttention) and owner.in_proj_weight is not None:
                skipped.append(
                    SkippedLayer(
                        f"{owner_name}.in_proj_weight" if owner_name else "in_proj_weight",
                        "MultiheadAttention",
                        "packed q/k/v projection used functionally by nn.MultiheadAttention; not searchable",
                    )
                )
        for owner_name, owner in model.named_modules():
            if isinstance(owner, nn.Embedding | nn.EmbeddingBag):
                skipped.append(
                    SkippedLayer(
                        owner_name, type(owner).__name__, "embedding table (a lookup, not a GEMM): not searchable"
                    )
                )
        sharers = _weight_sharers(model)
        for name, module in modules.items():
            reason = functional_use_reason(model, name) or _shared_weight_reason(module, sharers)
            if name not in records:
                reason = reason or "never ran through forward() in the example pass (used functionally or bypassed)"
            if reason:
                skipped.append(SkippedLayer(name, type(module).__name__, reason))
                records.pop(name, None)
                continue
            transposed = transposed_linear_type(module)
            base_forwards = (nn.Conv2d.forward, nn.Linear.forward, *((transposed.forward,) if transposed else ()))
            if type(module).forward not in base_forwards and not isinstance(module, SparseLayerMixin):
                skipped.append(
                    SkippedLayer(
                        name, type(module).__name__, "overrides forward(); masking could change what it computes"
                    )
                )
                records.pop(name)

        ordered = sorted(records.items(), key=lambda item: item[1].order)
        layers = [_layer_info(name, record) for name, record in ordered]
        if not layers:
            raise NMSearchError(
                f"no Conv2d/Linear layer of {type(model).__name__} ran through forward() on the example inputs: "
                "nothing to search over"
            )
        _check_patterns(modules, include or (), "include")
        _check_patterns(modules, exclude, "exclude")
        fixed: dict[str, str] = {}
        for info in layers:
            module = records[info.name].module
            if include is not None and not _matches(info.name, module, include):
                fixed[info.name] = "not matched by include"
            hit = _matches(info.name, module, exclude)
            if hit:
                fixed[info.name] = f"excluded by {hit!r}"
        if keep_first_last_dense:
            fixed.setdefault(layers[0].name, "first layer kept dense")
            fixed.setdefault(layers[-1].name, "last layer kept dense")
        layers = [
            LayerInfo(**{**info.__dict__, "note": fixed.get(info.name, "")}) if info.name in fixed else info
            for info in layers
        ]
        batch = layers[0].input_shape[0] if layers[0].input_shape else 1
        return cls(
            layers,
            skipped=skipped,
            fingerprint=model_fingerprint(model),
            example_batch_size=batch,
            ratios=ratios,
            targets=targets,
            tie_both=tie_both,
            fixed_dense=fixed,
            row_sparsities=row_sparsities,
        )

    def _layer_options(self, info: LayerInfo) -> tuple[Option, ...]:
        eligible = [r for r in self.ratios if info.channels % r.m == 0]
        options = [DENSE]
        if "weights" in self.targets:
            options += [Option(weight=r) for r in eligible]
        if "activations" in self.targets:
            options += [Option(activation=r) for r in eligible]
        if "both" in self.targets:
            if self.tie_both:
                options += [Option(r, r) for r in eligible]
            else:
                options += [Option(w, a) for w in eligible for a in eligible]
        if "rows" in self.targets:
            rows = [RowPattern(s) for s in self.row_sparsities if _skips_rows(info, s)]
            options += [Option(activation=r) for r in rows]
            if "weights" in self.targets:
                options += [Option(w, r) for w in eligible for r in rows]
        return tuple(dict.fromkeys(options))

    # -- description -----------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        """The modelled layers' names, in execution order."""
        return [info.name for info in self.layers]

    @property
    def searchable(self) -> list[str]:
        """Layers with more than one option."""
        return [name for name, options in self.options.items() if len(options) > 1]

    def info(self, name: str) -> LayerInfo:
        """A layer's shapes, GEMM dims, parameters and MACs.

        Args:
            name: The layer's qualified name.

        Returns:
            Its :class:`LayerInfo`.

        Raises:
            SchemeMismatchError: If the layer is not in the space (the message suggests close names).
        """
        if name not in self._info:
            raise SchemeMismatchError(
                f"layer {name!r} is not in the search space{close_matches(name, self.layer_names)}"
            )
        return self._info[name]

    @property
    def size(self) -> int:
        """Number of distinct schemes."""
        return math.prod(len(options) for options in self.options.values())

    @property
    def log10_size(self) -> float:
        """``log10`` of the number of distinct schemes."""
        return sum(math.log10(len(options)) for options in self.options.values())

    @property
    def max_options(self) -> int:
        """The most options any layer has (the width of option-index tables)."""
        return max(len(options) for options in self.options.values())

    def option_names(self, name: str) -> list[str]:
        """A layer's option names in index order (``"dense"`` first)."""
        return [option.name for option in self.options[name]]

    def option_valid_mask(self) -> np.ndarray:
        """``(layers, max_options)`` booleans: which option slots exist (rows padded after the last)."""
        mask = np.zeros((len(self.layers), self.max_options), dtype=bool)
        for row, name in enumerate(self.layer_names):
            mask[row, : len(self.options[name])] = True
        return mask

    def to_frame(self) -> pd.DataFrame:
        """One row per modelled layer: type, shapes, GEMM dims, parameters, MACs, options."""
        rows = []
        for info in self.layers:
            row = {k: v for k, v in info.__dict__.items() if k not in ("input_numel", "output_numel")}
            row["options"] = len(self.options[info.name])
            rows.append(row)
        return pd.DataFrame(rows)

    def options_frame(self) -> pd.DataFrame:
        """One row per (layer, option) with its index in the layer's categorical choice."""
        rows = [
            {
                "layer": name,
                "index": index,
                "option": option.name,
                "target": option.target,
                "weights": str(option.weight or ""),
                "activations": str(option.activation or ""),
            }
            for name, options in self.options.items()
            for index, option in enumerate(options)
        ]
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return (
            f"SearchSpace({len(self.layers)} layers, {len(self.searchable)} searchable, "
            f"{len(self.skipped)} skipped, 10^{self.log10_size:.1f} schemes)"
        )

    # -- schemes ---------------------------------------------------------------------------
    def scheme(self, choices: Mapping[str, Option | str], **metadata_fields: Any) -> Scheme:
        """A scheme of this space from ``{layer: option}``; unnamed layers are dense.

        Args:
            choices: ``{layer name: option}``, options as :class:`~search_space.Option` or names
                like ``"w2:4"``.
            **metadata_fields: ``hardware``, ``metrics``, ``provenance`` of the scheme.

        Returns:
            A scheme listing every layer, with the space's fingerprint and weight shapes.

        Raises:
            SchemeMismatchError: If a layer is not in the space or an option is not available for
                it (the message says why and lists what is).
            SchemeError: If an option name is invalid.
        """
        parsed = {name: Option.parse(option) for name, option in choices.items()}
        for name, option in parsed.items():
            info = self.info(name)
            if option.rows and option not in self._index[name]:
                reason = _rows_reason(self, info)
                raise SchemeMismatchError(f"option {option.name!r} is not available for layer {name!r}: {reason}")
            if option not in self._index[name]:
                raise SchemeMismatchError(
                    f"option {option.name!r} is not available for layer {name!r} "
                    f"({info.channels} grouped channels{', ' + info.note if info.note else ''}); "
                    f"available: {', '.join(self.option_names(name))}"
                )
        return Scheme(
            tuple((name, parsed.get(name, DENSE)) for name in self.layer_names),
            fingerprint=self.fingerprint,
            shapes={info.name: info.weight_shape for info in self.layers},
            **metadata_fields,
        )

    def dense(self) -> Scheme:
        """Every layer dense.

        Returns:
            The dense scheme of this space.
        """
        return self.scheme({name: DENSE for name in self.layer_names})

    def uniform(self, target: str, n: int, m: int) -> Scheme:
        """The same N:M on every layer the space offers it for.

        Layers the space marks ineligible for the option (channel count not divisible by M,
        excluded, kept dense) stay dense. Asking for an option the space offers on no layer is an
        error, never an all-dense scheme.

        Args:
            target: ``"weights"``, ``"activations"`` or ``"both"``.
            n: kept entries per group.
            m: group size.

        Returns:
            The uniform scheme (provenance ``strategy: uniform``).

        Raises:
            SchemeError: an unknown target, or an option no layer of the space offers.
        """
        if target not in TARGETS[1:]:
            raise SchemeError(f"uniform target must be one of {', '.join(TARGETS[1:])}, got {target!r}")
        pattern = NMPattern(n, m)
        option = Option(
            pattern if target in ("weights", "both") else None,
            pattern if target in ("activations", "both") else None,
        )
        return self._uniform(option, {"target": target, "pattern": str(pattern)})

    def uniform_rows(self, sparsity: float) -> Scheme:
        """The same row mask on every layer the space offers it for (other layers stay dense).

        Args:
            sparsity: fraction of output positions skipped, in (0, 1).

        Returns:
            The uniform row-mask scheme.

        Raises:
            SchemeError: the space offers that row mask on no layer.
        """
        rows = RowPattern.parse(sparsity)
        return self._uniform(Option(activation=rows), {"target": "rows", "sparsity": rows.sparsity})

    def _uniform(self, option: Option, provenance: dict[str, Any]) -> Scheme:
        if option != DENSE and not any(option in self._index[name] for name in self.layer_names):
            offered = sorted({o.name for options in self.options.values() for o in options if o != DENSE})
            raise SchemeError(
                f"uniform option {option.name!r} is offered on no layer of this search space "
                f"(ratios {', '.join(map(str, self.ratios))}, targets {', '.join(self.targets)}); "
                f"it offers: {', '.join(offered) or 'dense only'}"
            )
        return self.scheme(
            {name: option if option in self._index[name] else DENSE for name in self.layer_names},
            provenance={"strategy": "uniform", **provenance},
        )

    def random(self, seed: int | None = None) -> Scheme:
        """Each layer's option drawn uniformly from its options.

        Args:
            seed: generator seed; ``None`` draws a fresh one (recorded as ``None``).

        Returns:
            The random scheme (provenance ``strategy: random``).
        """
        generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        choices = {}
        for name in self.layer_names:
            options = self.options[name]
            choices[name] = options[int(torch.randint(len(options), (1,), generator=generator))]
        return self.scheme(choices, provenance={"strategy": "random", "seed": seed})

    def uniform_schemes(self) -> dict[str, Scheme]:
        """The dense scheme and every uniform scheme of the space (the baselines and the warm start).

        Returns:
            ``{"dense": ..., "weights 2:4": ..., "rows 0.2": ..., ...}``: per target and ratio (or
            row sparsity) the uniform scheme, ineligible layers dense; schemes equal to an earlier
            one, and options no layer offers, are dropped.
        """
        schemes = {"dense": self.dense()}
        candidates: dict[str, Scheme] = {}
        for target in self.targets:
            makers = (
                {f"rows {s}": lambda s=s: self.uniform_rows(s) for s in self.row_sparsities}
                if target == "rows"
                else {f"{target} {r}": lambda t=target, r=r: self.uniform(t, r.n, r.m) for r in self.ratios}
            )
            for label, make in makers.items():
                try:
                    candidates[label] = make()
                except SchemeError:
                    continue  # offered on no layer: it would be the dense scheme again
        for label, scheme in candidates.items():
            if scheme not in schemes.values():
                schemes[label] = scheme
        return schemes

    def check(self, scheme: Scheme) -> None:
        """Check that a scheme belongs to this space.

        Args:
            scheme: Any scheme.

        Raises:
            SchemeMismatchError: If its fingerprint is another model's, or a layer or option is not
                in the space.
        """
        if scheme.fingerprint and self.fingerprint and scheme.fingerprint != self.fingerprint:
            raise SchemeMismatchError(
                f"scheme fingerprint {scheme.fingerprint} does not match the search space's {self.fingerprint}: "
                "it was made for another model"
            )
        self.scheme(dict(scheme.layers))

    def encode(self, scheme: Scheme) -> np.ndarray:
        """A scheme as option indices (the form cost tables and strategies use).

        Args:
            scheme: A scheme of this space.

        Returns:
            ``(layers,)`` int64 option index per layer (``0`` = dense), in layer order.

        Raises:
            SchemeMismatchError: If the scheme does not belong to this space.
        """
        self.check(scheme)
        return np.array([self._index[name][scheme[name]] for name in self.layer_names], dtype=np.int64)

    def encode_many(self, schemes: Iterable[Scheme]) -> np.ndarray:
        """Many schemes as option indices.

        Args:
            schemes: Schemes of this space.

        Returns:
            ``(schemes, layers)`` int64 option indices.

        Raises:
            SchemeMismatchError: If a scheme does not belong to this space.
        """
        rows = [self.encode(s) for s in schemes]
        return np.stack(rows) if rows else np.zeros((0, len(self.layers)), dtype=np.int64)

    def decode(self, indices: Sequence[int] | np.ndarray, **metadata_fields: Any) -> Scheme:
        """The scheme of option indices (the inverse of :meth:`encode`).

        Args:
            indices: One option index per layer, in layer order.
            **metadata_fields: ``hardware``, ``metrics``, ``provenance`` of the scheme.

        Returns:
            The scheme.

        Raises:
            SchemeMismatchError: If the count is not one per layer or an index is out of range.
        """
        indices = [int(i) for i in indices]
        if len(indices) != len(self.layers):
            raise SchemeMismatchError(f"expected {len(self.layers)} option indices (one per layer), got {len(indices)}")
        choices = {}
        for name, index in zip(self.layer_names, indices, strict=True):
            options = self.options[name]
            if not 0 <= index < len(options):
                raise SchemeMismatchError(f"layer {name!r} has {len(options)} options, got index {index}")
            choices[name] = options[index]
        return self.scheme(choices, **metadata_fields)


def _weight_sharers(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (module, qualified parameter name) holding each parameter, by the parameter's id."""
    sharers: dict[int, list[tuple[nn.Module, str]]] = {}
    for owner_name, owner in model.named_modules(remove_duplicate=False):
        for param_name, param in owner.named_parameters(recurse=False):
            qualified = f"{owner_name}.{param_name}" if owner_name else param_name
            sharers.setdefault(id(param), []).append((owner, qualified))
    return sharers


def _shared_weight_reason(module: nn.Module, sharers: Mapping[int, list[tuple[nn.Module, str]]]) -> str | None:
    """Why a layer whose weight another module also uses (tied embeddings, e.g. GPT-2's lm_head) is skipped."""
    others = [name for owner, name in sharers.get(id(module.weight), []) if owner is not module]
    if not others:
        return None
    return f"weight shared with {', '.join(repr(o) for o in others)} (tied): pruning it would prune that too"


def output_positions(info: LayerInfo) -> int | None:
    """Output positions per image of a conv: its GEMM rows per image.

    Args:
        info: A modelled layer.

    Returns:
        ``Ho * Wo`` for a Conv2d; ``None`` for other layers.
    """
    shape = info.output_shape
    if info.kind != "conv2d" or len(shape) < 3:
        return None
    return shape[-2] * shape[-1]


def _skips_rows(info: LayerInfo, sparsity: float) -> bool:
    """Whether a row mask at ``sparsity`` skips at least one of the layer's output positions."""
    positions = output_positions(info)
    return positions is not None and pruned_rows(positions, sparsity) > 0


def _rows_reason(space: SearchSpace, info: LayerInfo) -> str:
    if info.kind != "conv2d":
        return f"row masks apply to Conv2d layers only, {info.name!r} is a {info.module_type}"
    if info.note:
        return info.note
    if "rows" not in space.targets:
        return "the space has no 'rows' target (SearchSpace.from_model(..., targets=[..., 'rows']))"
    return f"available: {', '.join(space.option_names(info.name))}"


def _layer_info(name: str, record: _Record) -> LayerInfo:
    module = record.module
    weight_shape = tuple(module.weight.shape)
    params = module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
    if isinstance(module, nn.Conv2d):
        groups = module.groups
        reduction = weight_shape[1] * weight_shape[2] * weight_shape[3]
        outputs = weight_shape[0] // groups
        channels, kind = weight_shape[1], "conv2d"
    else:
        # (out, in) for Linear; Hugging Face Conv1D stores (in, out)
        in_features, out_features = weight_shape if weight_group_dim(module) == 0 else weight_shape[::-1]
        groups, reduction, outputs = 1, in_features, out_features
        channels, kind = in_features, "linear"
    dense_type = getattr(module, "dense_type", type(module))
    return LayerInfo(
        name=name,
        kind=kind,
        module_type=dense_type.__name__,
        weight_shape=weight_shape,
        input_shape=record.input_shape,
        output_shape=record.output_shape,
        calls=record.calls,
        tokens=record.tokens,
        reduction=reduction,
        outputs=outputs,
        groups=groups,
        channels=channels,
        params=params,
        macs=groups * record.tokens * reduction * outputs,
        input_numel=record.input_numel,
        output_numel=record.output_numel,
    )
