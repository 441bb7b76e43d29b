"""Per-layer sparsity choices (``Option``), whole-model schemes (``Scheme``) and JSON format v1."""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from importlib.resources import files
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jsonschema
import pandas as pd
import torch
from torch import nn

from search_space.io import atomic_write_text
from search_space.layers import SparseLayerMixin, set_submodule, sparsify
from search_space.patterns import NMPattern, NMSearchError
from search_space.rows import InvalidSparsityError, RowPattern, share_row_scores

if TYPE_CHECKING:
    from search_space.space import SearchSpace

FORMAT = "nmsearch.scheme"
VERSION = 1
TARGETS = ("dense", "weights", "activations", "both")
_OPTION_NAME = re.compile(r"^(?:w(?P<w>\d+:\d+))?(?:\+)?(?:a(?P<a>\d+:\d+)|r(?P<r>[0-9.eE+-]+))?$")


class SchemeError(NMSearchError):
    """A scheme file or object that is malformed."""


class SchemeMismatchError(SchemeError):
    """A scheme that does not fit the model or search space it is used with."""


@dataclass(frozen=True)
class Option:
    """One layer's choice: N:M on its weights, and N:M on its input activations or a row mask
    (skipped output positions, :class:`~search_space.rows.RowPattern`), both, or neither."""

    weight: NMPattern | None = None
    activation: NMPattern | RowPattern | None = None

    def __post_init__(self) -> None:
        for attr in ("weight", "activation"):
            pattern = getattr(self, attr)
            if pattern is not None and pattern.is_dense:
                object.__setattr__(self, attr, None)

    @property
    def target(self) -> str:
        if self.weight and self.activation:
            return "both"
        if self.weight:
            return "weights"
        return "activations" if self.activation else "dense"

    @property
    def rows(self) -> RowPattern | None:
        """The row mask, when the activation choice is one."""
        return self.activation if isinstance(self.activation, RowPattern) else None

    @property
    def name(self) -> str:
        """``dense``, ``w2:4``, ``a1:8``, ``w2:4+a2:4``, ``r0.2`` or ``w2:4+r0.2``: the value Optuna and
        JSON dicts use."""
        parts = [f"w{self.weight}"] if self.weight else []
        if self.activation:
            parts.append(str(self.activation) if self.rows else f"a{self.activation}")
        return "+".join(parts) or "dense"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str | Option) -> Option:
        if isinstance(name, Option):
            return name
        text = str(name).strip()
        if text == "dense":
            return cls()
        match = _OPTION_NAME.match(text)
        if not text or match is None or not (match["w"] or match["a"] or match["r"]):
            raise SchemeError(
                f"unknown option {name!r}: use 'dense', 'wN:M' (weights), 'aN:M' (activations), "
                "'rS' (row mask, 0 < S < 1), 'wN:M+aN:M' or 'wN:M+rS'"
            )
        if match["r"]:
            try:
                activation: NMPattern | RowPattern | None = RowPattern.parse(match["r"])
            except InvalidSparsityError as error:
                raise SchemeError(f"option {name!r}: {error}") from None
        else:
            activation = NMPattern.parse(match["a"]) if match["a"] else None
        return cls(NMPattern.parse(match["w"]) if match["w"] else None, activation)

    def to_json(self) -> dict[str, Any]:
        def pattern(p: NMPattern | RowPattern | None) -> dict[str, Any] | None:
            if isinstance(p, RowPattern):
                return {"pattern": "rows", "sparsity": p.sparsity}
            return None if p is None else {"n": p.n, "m": p.m}

        return {"target": self.target, "weights": pattern(self.weight), "activations": pattern(self.activation)}


DENSE = Option()


def _conv_or_linear(module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def prunable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``Conv2d`` / ``Linear`` (subclasses and sparse wrappers included), by qualified name."""
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


def _close_matches(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


@functools.cache
def nmsearch_version() -> str:
    try:
        return metadata.version("nmsearch")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Scheme:
    """An immutable per-layer choice. Layers not listed are dense.

    Equality and hashing use the choices only; ``fingerprint``, ``shapes``, ``hardware``,
    ``metrics`` and ``provenance`` are metadata carried into the JSON file.
    """

    layers: tuple[tuple[str, Option], ...] = ()
    fingerprint: str | None = field(default=None, compare=False)
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict, compare=False)
    hardware: str | None = field(default=None, compare=False)
    metrics: Mapping[str, float] = field(default_factory=dict, compare=False)
    provenance: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        names = [name for name, _ in self.layers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise SchemeError(f"layer {duplicates[0]!r} appears more than once in the scheme")
        object.__setattr__(self, "layers", tuple((str(n), Option.parse(o)) for n, o in self.layers))
        for attr in ("shapes", "metrics", "provenance"):
            object.__setattr__(self, attr, MappingProxyType(dict(getattr(self, attr))))

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_choices(cls, choices: Mapping[str, Option | str], **metadata_fields: Any) -> Scheme:
        """From ``{layer name: option}`` (options as :class:`Option` or names like ``"w2:4"``)."""
        return cls(tuple((name, Option.parse(option)) for name, option in choices.items()), **metadata_fields)

    @classmethod
    def dense(cls, space: SearchSpace) -> Scheme:
        return space.scheme({name: DENSE for name in space.layer_names})

    @classmethod
    def uniform(cls, space: SearchSpace, target: str, n: int, m: int) -> Scheme:
        """The same N:M on every layer where it is eligible (other layers stay dense)."""
        if target not in TARGETS[1:]:
            raise SchemeError(f"uniform target must be one of {', '.join(TARGETS[1:])}, got {target!r}")
        pattern = NMPattern(n, m)
        option = Option(
            pattern if target in ("weights", "both") else None,
            pattern if target in ("activations", "both") else None,
        )
        return cls._uniform(space, option, {"target": target, "pattern": str(pattern)})

    @classmethod
    def uniform_rows(cls, space: SearchSpace, sparsity: float) -> Scheme:
        """The same row mask on every layer where the space offers it (other layers stay dense)."""
        rows = RowPattern.parse(sparsity)
        return cls._uniform(space, Option(activation=rows), {"target": "rows", "sparsity": rows.sparsity})

    @classmethod
    def _uniform(cls, space: SearchSpace, option: Option, provenance: dict[str, Any]) -> Scheme:
        return space.scheme(
            {name: option if option in space.options[name] else DENSE for name in space.layer_names},
            provenance={"strategy": "uniform", **provenance},
        )

    @classmethod
    def random(cls, space: SearchSpace, seed: int | None = None) -> Scheme:
        """Each layer's option drawn uniformly from its eligible options."""
        generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        choices = {}
        for name in space.layer_names:
            options = space.options[name]
            choices[name] = options[int(torch.randint(len(options), (1,), generator=generator))]
        return space.scheme(choices, provenance={"strategy": "random", "seed": seed})

    # -- access ----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Option:
        return dict(self.layers).get(name, DENSE)

    def __iter__(self) -> Iterator[tuple[str, Option]]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def choices(self) -> dict[str, str]:
        """``{layer name: option name}``."""
        return {name: option.name for name, option in self.layers}

    def with_metadata(self, **changes: Any) -> Scheme:
        """A copy with other metadata (e.g. ``metrics=...``, ``hardware=...``)."""
        return replace(self, **changes)

    def to_frame(self) -> pd.DataFrame:
        rows = [
            {"layer": n, "target": o.target, "weights": str(o.weight or ""), "activations": str(o.activation or "")}
            for n, o in self.layers
        ]
        return pd.DataFrame(rows, columns=["layer", "target", "weights", "activations"])

    def summary(self) -> str:
        counts = pd.Series([o.target for _, o in self.layers]).value_counts()
        return ", ".join(f"{target}: {counts.get(target, 0)}" for target in TARGETS)

    # -- JSON ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        layers = []
        for name, option in self.layers:
            entry = {"name": name, **option.to_json()}
            if name in self.shapes:
                entry["shape"] = list(self.shapes[name])
            layers.append(entry)
        provenance = {
            "nmsearch_version": nmsearch_version(),
            "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **self.provenance,
        }
        return {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "hardware": self.hardware,
            "metrics": {k: _json_number(v) for k, v in self.metrics.items()},
            "provenance": _jsonable(provenance),
            "layers": layers,
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "scheme") -> Scheme:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise SchemeError(f"{source}: not an nmsearch scheme (format {found!r}, expected {FORMAT!r})")
        version = data.get("version")
        if isinstance(version, int) and version > VERSION:
            raise SchemeError(
                f"{source}: scheme format version {version} is newer than this nmsearch reads ({VERSION}); "
                "upgrade nmsearch"
            )
        errors = sorted(_validator().iter_errors(data), key=lambda e: list(e.absolute_path))
        if errors:
            error = errors[0]
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
            raise SchemeError(f"{source}: {where or 'top level'}: {error.message}")
        layers, shapes = [], {}
        for entry in data["layers"]:
            option = _option_from_entry(entry, source)
            layers.append((entry["name"], option))
            if "shape" in entry:
                shapes[entry["name"]] = tuple(entry["shape"])
        return cls(
            tuple(layers),
            fingerprint=data.get("fingerprint"),
            shapes=shapes,
            hardware=data.get("hardware"),
            metrics=data.get("metrics") or {},
            provenance=data.get("provenance") or {},
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON format v1 atomically (a temporary file renamed over ``path``)."""
        return atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scheme:
        """Read and validate a scheme file against the shipped JSON Schema."""
        source = f"scheme file '{path}'"
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise SchemeError(f"{source}: cannot be read ({error.strerror})") from error
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SchemeError(
                f"{source} is not valid JSON: line {error.lineno} column {error.colno}: {error.msg}"
            ) from error
        return cls.from_json(data, source)

    # -- DominoSearch interop --------------------------------------------------------------
    def to_domino(self) -> dict[str, list[int]]:
        """DominoSearch's ``{layer: [N, M]}`` for the weights (activation choices cannot be expressed)."""
        activation_layers = [name for name, option in self.layers if option.activation]
        if activation_layers:
            raise SchemeError(
                f"DominoSearch dicts hold weight N:M only; layer {activation_layers[0]!r} sparsifies activations"
            )
        return {name: [option.weight.n, option.weight.m] for name, option in self.layers if option.weight}

    @classmethod
    def from_domino(cls, layers: Mapping[str, Any], **metadata_fields: Any) -> Scheme:
        """From DominoSearch's ``{layer: [N, M]}`` (``N == M`` means dense)."""
        choices = {}
        for name, value in layers.items():
            if not (isinstance(value, list | tuple) and len(value) == 2):
                raise SchemeError(f"DominoSearch entry for layer {name!r} must be [N, M], got {value!r}")
            choices[name] = Option(weight=NMPattern(int(value[0]), int(value[1])))
        provenance = {"strategy": "domino", **metadata_fields.pop("provenance", {})}
        return cls.from_choices(choices, provenance=provenance, **metadata_fields)

    # -- models ----------------------------------------------------------------------------
    def apply(
        self,
        model: nn.Module,
        *,
        inplace: bool = False,
        strict: bool = True,
        weight_score: str = "magnitude",
        activation_score: str = "magnitude",
        row_seed: int = 0,
    ) -> nn.Module:
        """A sparse copy of ``model`` (or ``model`` itself with ``inplace=True``).

        Everything is validated before anything changes. ``strict`` also requires the model's
        fingerprint to match the scheme's (when the scheme has one). Row masks are cut from one
        random field drawn from ``row_seed`` (:func:`~search_space.rows.select_row_masks` picks a
        better one on a batch).
        """
        self._check_layers(model, strict=strict)
        target = model if inplace else copy.deepcopy(model)
        # Every wrapper is built (and so validated) before the first one is set.
        replacements = self._replacements(target, weight_score, activation_score)
        for name, module in replacements.items():
            set_submodule(target, name, module)
        if self.has_rows:
            share_row_scores(target, row_seed)
        return target

    @property
    def has_rows(self) -> bool:
        """Whether any layer uses a row mask."""
        return any(option.rows for _, option in self.layers)

    def _replacements(self, model: nn.Module, weight_score: str, activation_score: str) -> dict[str, nn.Module]:
        replacements = {}
        for name, module in prunable_modules(model).items():
            option = self[name]
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

    def check_model(self, model: nn.Module, *, strict: bool = True) -> None:
        """Raise unless every listed layer exists, has the recorded shape and is eligible for its option."""
        self._check_layers(model, strict=strict)
        self._replacements(model, "magnitude", "magnitude")

    def _check_layers(self, model: nn.Module, *, strict: bool) -> None:
        modules = prunable_modules(model)
        names = list(modules)
        for name, option in self.layers:
            if name not in modules:
                try:
                    other = model.get_submodule(name)
                except AttributeError:
                    raise SchemeMismatchError(
                        f"scheme layer {name!r} is not a Conv2d/Linear layer of the model{_close_matches(name, names)}"
                    ) from None
                raise SchemeMismatchError(
                    f"scheme layer {name!r} is a {type(other).__name__}, not a Conv2d/Linear layer"
                )
            shape = tuple(modules[name].weight.shape)
            if name in self.shapes and self.shapes[name] != shape:
                raise SchemeMismatchError(
                    f"scheme layer {name!r} was chosen for weight shape {self.shapes[name]}, "
                    f"the model's is {shape}: the scheme belongs to another model"
                )
            if option != DENSE:
                reason = functional_use_reason(model, name)
                if reason:
                    raise SchemeMismatchError(f"scheme layer {name!r} cannot be sparsified: {reason}")
        if strict and self.fingerprint and self.fingerprint != model_fingerprint(model):
            raise SchemeMismatchError(
                f"scheme fingerprint {self.fingerprint} does not match the model's {model_fingerprint(model)} "
                "(other layer names or shapes); pass strict=False to apply it by layer name"
            )

    def finalize(self, model: nn.Module) -> nn.Module:
        """Bake weight masks into the weights (in place) and drop weight-only wrappers.

        Layers with activation sparsity keep a wrapper (activation masks are dynamic); others
        become plain modules of their original type with pruned entries set to zero.
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

    def verify(self, model: nn.Module) -> pd.DataFrame:
        """Check that every layer's weights hold at most N non-zeros per group of M and that
        activation choices are in place; returns the per-layer report, raises on a violation."""
        modules = prunable_modules(model)
        rows, failures = [], []
        for name, option in self.layers:
            if name not in modules:
                raise SchemeMismatchError(
                    f"scheme layer {name!r} is not in the model{_close_matches(name, list(modules))}"
                )
            module = modules[name]
            weight = module.sparse_weight() if isinstance(module, SparseLayerMixin) else module.weight
            max_nonzeros = None
            weights_ok = True
            if option.weight:
                groups = weight.detach().unflatten(1, (-1, option.weight.m))
                max_nonzeros = int((groups != 0).sum(2).max())
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
                failures.append(
                    f"{name!r} masks activations {actual_activation or 'dense'}, expected {option.activation}"
                )
        if failures:
            raise SchemeMismatchError(
                f"model does not satisfy the scheme: {failures[0]}"
                + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else "")
            )
        return pd.DataFrame(rows)


def _option_from_entry(entry: dict[str, Any], source: str) -> Option:
    def pattern(key: str) -> NMPattern | RowPattern | None:
        value = entry.get(key)
        if value is None:
            return None
        try:
            if value.get("pattern", "nm") == "rows":
                return RowPattern(value["sparsity"])
            return NMPattern(value["n"], value["m"])
        except NMSearchError as error:
            raise SchemeError(f"{source}: layer {entry['name']!r} {key}: {error}") from None

    option = Option(pattern("weights"), pattern("activations"))
    if option.target != entry["target"]:
        raise SchemeError(
            f"{source}: layer {entry['name']!r} says target {entry['target']!r} "
            f"but its weights/activations entries make it {option.target!r}"
        )
    return option


def _json_number(value: Any) -> Any:
    value = float(value) if hasattr(value, "__float__") else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _jsonable(value: Any) -> Any:
    """Provenance may carry configs (OmegaConf, paths, numpy numbers): keep what JSON can hold."""
    return json.loads(json.dumps(value, default=str))


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads(files("search_space").joinpath("scheme.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)
