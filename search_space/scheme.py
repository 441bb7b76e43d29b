"""Per-layer sparsity choices (``Option``), whole-model schemes (``Scheme``) and JSON format v1."""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from importlib.resources import files
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jsonschema

from search_space.io import atomic_write_text
from search_space.patterns import NMPattern, NMSearchError
from search_space.rows import InvalidSparsityError, RowPattern

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

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
    (skipped output positions, :class:`~search_space.rows.RowPattern`), both, or neither.

    A dense pattern (``N == M``) is stored as ``None``.

    Attributes:
        weight: The weights' N:M pattern, or ``None`` (dense).
        activation: The input's N:M pattern, a row pattern, or ``None`` (dense).
    """

    weight: NMPattern | None = None
    activation: NMPattern | RowPattern | None = None

    def __post_init__(self) -> None:
        for attr in ("weight", "activation"):
            pattern = getattr(self, attr)
            if pattern is not None and pattern.is_dense:
                object.__setattr__(self, attr, None)

    @property
    def target(self) -> str:
        """``"dense"``, ``"weights"``, ``"activations"`` (N:M or rows) or ``"both"``."""
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
        """Read an option from its name.

        Args:
            name: ``"dense"``, ``"w2:4"``, ``"a1:8"``, ``"r0.2"``, ``"w2:4+a2:4"``, ``"w2:4+r0.2"``, or an
                ``Option`` (returned as is).

        Returns:
            The option.

        Raises:
            SchemeError: If the name has none of these forms or a row sparsity is invalid.
            InvalidPatternError: If an N:M pattern is invalid.
        """
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
        """The option's ``target``, ``weights`` and ``activations`` entries of a scheme file."""

        def pattern(p: NMPattern | RowPattern | None) -> dict[str, Any] | None:
            if isinstance(p, RowPattern):
                return {"pattern": "rows", "sparsity": p.sparsity}
            return None if p is None else {"n": p.n, "m": p.m}

        return {"target": self.target, "weights": pattern(self.weight), "activations": pattern(self.activation)}


DENSE = Option()


@functools.cache
def nmsearch_version() -> str:
    """The installed nmsearch version (``"unknown"`` when run from a source tree without installing)."""
    try:
        return metadata.version("nmsearch")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Scheme:
    """An immutable per-layer choice. Layers not listed are dense.

    Equality and hashing use the choices only; ``fingerprint``, ``shapes``, ``hardware``,
    ``metrics`` and ``provenance`` are metadata carried into the JSON file. Build one with
    :meth:`SearchSpace.scheme <search_space.SearchSpace.scheme>`, ``space.uniform(...)``,
    :meth:`from_choices` or :meth:`load`.

    Attributes:
        layers: ``(layer name, Option)`` pairs.
        fingerprint: The model's fingerprint (see :func:`~search_space.model_fingerprint`).
        shapes: Weight shape per layer, checked when the scheme is applied.
        hardware: The hardware profile the metrics were modelled on.
        metrics: Objective values of this scheme.
        provenance: Where it came from (strategy, seed, config, version, time).

    Raises:
        SchemeError: If a layer appears twice or an option name is invalid.
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
        """Build a scheme from a mapping of choices.

        Args:
            choices: ``{layer name: option}``, options as :class:`Option` or names like ``"w2:4"``.
            **metadata_fields: ``fingerprint``, ``shapes``, ``hardware``, ``metrics``, ``provenance``.

        Returns:
            The scheme (not checked against a space: see ``SearchSpace.check``).

        Raises:
            SchemeError: If an option name is invalid.
        """
        return cls(tuple((name, Option.parse(option)) for name, option in choices.items()), **metadata_fields)

    @classmethod
    def dense(cls, space: SearchSpace) -> Scheme:
        """Alias of :meth:`SearchSpace.dense <search_space.SearchSpace.dense>`."""
        return space.dense()

    @classmethod
    def uniform(cls, space: SearchSpace, target: str, n: int, m: int) -> Scheme:
        """Alias of :meth:`SearchSpace.uniform <search_space.SearchSpace.uniform>`."""
        return space.uniform(target, n, m)

    @classmethod
    def uniform_rows(cls, space: SearchSpace, sparsity: float) -> Scheme:
        """Alias of :meth:`SearchSpace.uniform_rows <search_space.SearchSpace.uniform_rows>`."""
        return space.uniform_rows(sparsity)

    @classmethod
    def random(cls, space: SearchSpace, seed: int | None = None) -> Scheme:
        """Alias of :meth:`SearchSpace.random <search_space.SearchSpace.random>`."""
        return space.random(seed)

    # -- access ----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Option:
        """The option of a layer (``DENSE`` for a layer not listed)."""
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
        """One row per listed layer: ``layer``, ``target``, ``weights``, ``activations``."""
        import pandas as pd

        rows = [
            {"layer": n, "target": o.target, "weights": str(o.weight or ""), "activations": str(o.activation or "")}
            for n, o in self.layers
        ]
        return pd.DataFrame(rows, columns=["layer", "target", "weights", "activations"])

    def summary(self) -> str:
        """Layers per option, dense first, e.g. ``"1 dense, 2 w2:4"``.

        The N:M stays visible: counting targets only would not tell 2:4 from 1:8.

        Returns:
            One line, ``"<count> <option>"`` per option, comma-separated.
        """
        counts = Counter(o.name for _, o in self.layers)
        order = sorted(counts, key=lambda name: (name != DENSE.name, name))
        return ", ".join(f"{counts[name]} {name}" for name in order)

    # -- JSON ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The scheme as a format-v1 document (see the scheme format reference).

        Returns:
            A JSON-able dict; ``provenance`` gains the nmsearch version and the UTC time.
        """
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
        """Read a format-v1 document, validated against the shipped JSON Schema.

        Args:
            data: The parsed JSON.
            source: Names the document in error messages, e.g. ``"scheme file 'a.json'"``.

        Returns:
            The scheme with its metadata.

        Raises:
            SchemeError: If it is not an nmsearch scheme, its version is newer than this nmsearch
                reads, or it breaks the schema (the message names the first offending field).
        """
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
        """Write JSON format v1 atomically (a temporary file renamed over ``path``).

        Args:
            path: The file to write.

        Returns:
            ``path`` as a ``Path``.
        """
        return atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scheme:
        """Read and validate a scheme file against the shipped JSON Schema.

        Args:
            path: A scheme file (format v1).

        Returns:
            The scheme.

        Raises:
            SchemeError: If the file cannot be read, is not JSON, or is not a valid scheme.
        """
        source = f"scheme file '{path}'"
        try:
            text = Path(path).read_bytes().decode("utf-8")
        except OSError as error:
            raise SchemeError(f"{source}: cannot be read ({error.strerror})") from error
        except UnicodeDecodeError:
            raise SchemeError(f"{source} is not a JSON text file (it holds binary data); pass a scheme .json") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SchemeError(
                f"{source} is not valid JSON: line {error.lineno} column {error.colno}: {error.msg}"
            ) from error
        return cls.from_json(data, source)

    # -- DominoSearch interop --------------------------------------------------------------
    def to_domino(self) -> dict[str, list[int]]:
        """The scheme in DominoSearch's format.

        Returns:
            ``{layer: [N, M]}`` for the layers with sparse weights.

        Raises:
            SchemeError: If a layer sparsifies activations (DominoSearch cannot express it).
        """
        activation_layers = [name for name, option in self.layers if option.activation]
        if activation_layers:
            raise SchemeError(
                f"DominoSearch dicts hold weight N:M only; layer {activation_layers[0]!r} sparsifies activations"
            )
        return {name: [option.weight.n, option.weight.m] for name, option in self.layers if option.weight}

    @classmethod
    def from_domino(cls, layers: Mapping[str, Any], **metadata_fields: Any) -> Scheme:
        """Read DominoSearch's format.

        Args:
            layers: ``{layer: [N, M]}`` (``N == M`` means dense).
            **metadata_fields: As for :meth:`from_choices`; ``provenance.strategy`` defaults to ``"domino"``.

        Returns:
            The weights-only scheme.

        Raises:
            SchemeError: If an entry is not a pair.
            InvalidPatternError: If a pair is not a valid N:M.
        """
        choices = {}
        for name, value in layers.items():
            if not (isinstance(value, list | tuple) and len(value) == 2):
                raise SchemeError(f"DominoSearch entry for layer {name!r} must be [N, M], got {value!r}")
            choices[name] = Option(weight=NMPattern(int(value[0]), int(value[1])))
        provenance = {"strategy": "domino", **metadata_fields.pop("provenance", {})}
        return cls.from_choices(choices, provenance=provenance, **metadata_fields)

    @property
    def has_rows(self) -> bool:
        """Whether any layer uses a row mask."""
        return any(option.rows for _, option in self.layers)

    # -- models (thin methods over search_space.surgery) ------------------------------------
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
        """A sparse copy of ``model``; see :func:`search_space.surgery.apply_scheme`."""
        from search_space.surgery import apply_scheme

        return apply_scheme(
            self,
            model,
            inplace=inplace,
            strict=strict,
            weight_score=weight_score,
            activation_score=activation_score,
            row_seed=row_seed,
        )

    def check_model(self, model: nn.Module, *, strict: bool = True) -> None:
        """See :func:`search_space.surgery.check_model`."""
        from search_space.surgery import check_model

        check_model(self, model, strict=strict)

    def finalize(self, model: nn.Module) -> nn.Module:
        """See :func:`search_space.surgery.finalize_model`."""
        from search_space.surgery import finalize_model

        return finalize_model(model)

    def verify(self, model: nn.Module) -> pd.DataFrame:
        """See :func:`search_space.surgery.verify_model`."""
        from search_space.surgery import verify_model

        return verify_model(self, model)


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
