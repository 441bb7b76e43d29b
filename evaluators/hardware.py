"""Hardware profiles: peak dense / sparse throughput per dtype, memory bandwidth, the N:M patterns
the sparse tensor cores accept, efficiency factors, the GEMM shape model (SMs, tile, padding of
sparse kernels, per-tile and per-call overheads) and energy per MAC and per DRAM byte.

Profiles live in ``conf/hardware/<name>.yaml`` (shipped as package data, see :func:`nmsearch.config_dir`);
:func:`load_profile` takes such a name, a path to a YAML file or a mapping (e.g. a Hydra config node)
and validates every field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from nmsearch import config_dir
from search_space import NMPattern, NMSearchError
from search_space.io import atomic_write_text

HARDWARE_DIR = config_dir() / "hardware"

# Bytes one element occupies in memory (TF32 tensors are stored as FP32).
DTYPE_BYTES: Mapping[str, int] = MappingProxyType({"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1})

ANY_PATTERN = "any"


class HardwareProfileError(NMSearchError):
    """A hardware profile that is unknown, incomplete or inconsistent, or a dtype it lacks."""


def runs_on(pattern: NMPattern, hardware: NMPattern) -> bool:
    """Whether every aligned block of ``hardware.m`` entries of an N:M tensor holds at most ``hardware.n``
    non-zeros, so the tensor is a valid operand for ``hardware``'s sparse format (1:8 runs as 2:4).

    Groups of M are aligned, so a block of m0 lies inside one group when ``M % m0 == 0`` (at most
    N non-zeros) and spans ``m0 / M`` whole groups when ``m0 % M == 0``.
    """
    if pattern.is_dense:
        return False
    if pattern.m % hardware.m == 0:
        return pattern.n <= hardware.n
    if hardware.m % pattern.m == 0:
        return pattern.n * (hardware.m // pattern.m) <= hardware.n
    return False


@dataclass(frozen=True)
class DtypeSpec:
    """Peak throughput of one dtype. TFLOPS for floating point, TOPS for integers (a MAC is 2 operations)."""

    dense_tflops: float
    sparse_tflops: float | None
    sparse_patterns: tuple[NMPattern, ...] | str
    pj_per_mac: float

    @property
    def accelerates_any_pattern(self) -> bool:
        """A hypothetical accelerator that runs every N:M at M/N times the dense peak."""
        return self.sparse_patterns == ANY_PATTERN

    def sparse_speedup(self, pattern: NMPattern | None) -> float:
        """Peak-throughput ratio of the sparse tensor cores for one operand with ``pattern`` (1.0: runs dense)."""
        if pattern is None or pattern.is_dense:
            return 1.0
        if self.accelerates_any_pattern:
            return pattern.m / pattern.n
        # Datasheet peaks are rounded (1979 / 989): the skipped fraction bounds the ratio.
        ratios = [
            min(self.sparse_tflops / self.dense_tflops, hw.m / hw.n)
            for hw in self.sparse_patterns
            if runs_on(pattern, hw)
        ]
        return max(ratios, default=1.0)

    def to_dict(self) -> dict[str, Any]:
        patterns = self.sparse_patterns
        return {
            "dense_tflops": self.dense_tflops,
            "sparse_tflops": self.sparse_tflops,
            "sparse_patterns": patterns if isinstance(patterns, str) else [str(p) for p in patterns],
            "pj_per_mac": self.pj_per_mac,
        }


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak the kernels reach: dense GEMMs, sparse GEMMs (of the sparse peak), DRAM bandwidth.

    ``compute_rows`` is the dense peak fraction of the row-skipping kernel's GEMM, where that kernel is
    another library than the dense layers' (on this project's CPU: oneDNN's brgemm micro-kernel against
    MKL and oneDNN's own convolutions); ``None`` means the same as ``compute_dense``.
    """

    compute_dense: float
    compute_sparse: float
    memory: float
    compute_rows: float | None = None

    @property
    def rows(self) -> float:
        """The row-skipping kernel's dense peak fraction."""
        return self.compute_dense if self.compute_rows is None else self.compute_rows


@dataclass(frozen=True)
class GemmShape:
    """How a GEMM's shape turns into executed work (see :mod:`evaluators.cost`).

    ``sms`` parallel units each run one ``tile_m x tile_n`` output tile at a time: the tiles of a
    GEMM run in whole waves over the units. A sparse kernel pads the dense operand's rows to a
    multiple of ``sparse_row_multiple``. Every tile pays ``k_overhead`` reduction steps (pipeline
    fill and epilogue) on top of its K loop, so a sparse kernel whose K loop is halved gains less
    than 2x at small K. ``sparse_overhead_us`` is a sparse kernel's extra fixed cost per call.
    ``mask_ns_per_value`` is the compute time per activation value of a dynamic N:M mask pass
    (selecting the kept values) on top of its memory traffic, ``mask_overhead_us`` its fixed cost
    per call beyond one launch (on a CPU, the wrapper's dispatch of its small ops).
    ``row_gather_ns_per_value`` is the time a row-skipping kernel spends gathering each value of the
    kept rows' operand (a conv's im2col rows, built per tile) on top of its GEMM. ``l2_mb`` is the
    last-level cache.
    ``sparse_row_order`` says the sparse kernels launch their thread blocks in plain row order over
    the sparse operand (torch's CUTLASS kernels): an operand larger than the cache is then read
    from DRAM again by every wave that touches it. Dense libraries, cuSPARSELt and TensorRT
    rasterise tiles for cache reuse: each tensor is read once. The defaults make the model a plain
    roofline.
    """

    sms: int = 1
    tile_m: int = 1
    tile_n: int = 1
    sparse_row_multiple: int = 1
    k_overhead: float = 0.0
    sparse_overhead_us: float = 0.0
    mask_ns_per_value: float = 0.0
    mask_overhead_us: float = 0.0
    row_gather_ns_per_value: float = 0.0
    l2_mb: float = 0.0
    sparse_row_order: bool = False


@dataclass(frozen=True)
class HardwareProfile:
    """One accelerator as the cost model sees it (see ``conf/hardware/*.yaml`` for the fields' sources)."""

    name: str
    source: str
    memory_bandwidth_gbs: float
    launch_overhead_us: float
    fused_activation_compression: bool
    pj_per_dram_byte: float
    efficiency: Efficiency
    dtypes: Mapping[str, DtypeSpec]
    gemm: GemmShape = GemmShape()
    # N:M weight patterns a dense-compute kernel reads compressed (weight-only decompression);
    # every other pattern that runs dense is stored and read as finalized dense weights.
    compressed_dense_kernels: tuple[NMPattern, ...] = ()
    origin: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtypes", MappingProxyType(dict(self.dtypes)))

    def dtype(self, name: str) -> DtypeSpec:
        if name not in self.dtypes:
            raise HardwareProfileError(
                f"hardware profile {self.origin or self.name!r} has no dtype {name!r}; "
                f"available: {', '.join(self.dtypes)}"
            )
        return self.dtypes[name]

    def with_efficiency(
        self, efficiency: Efficiency, launch_overhead_us: float, gemm: GemmShape | None = None
    ) -> HardwareProfile:
        """A copy with other efficiency factors, launch overhead and GEMM shape model (what calibration fits)."""
        return replace(self, efficiency=efficiency, launch_overhead_us=launch_overhead_us, gemm=gemm or self.gemm)

    def reads_compressed_when_dense(self, pattern: NMPattern | None) -> bool:
        """Whether a dense-compute kernel of this profile reads ``pattern``'s weights compressed."""
        return pattern is not None and pattern in self.compressed_dense_kernels

    def to_dict(self) -> dict[str, Any]:
        """The YAML fields, in the order the shipped files use."""
        return {
            "name": self.name,
            "source": self.source,
            "memory_bandwidth_gbs": self.memory_bandwidth_gbs,
            "launch_overhead_us": self.launch_overhead_us,
            "fused_activation_compression": self.fused_activation_compression,
            "pj_per_dram_byte": self.pj_per_dram_byte,
            "efficiency": {key: value for key, value in asdict(self.efficiency).items() if value is not None},
            "gemm": asdict(self.gemm),
            "compressed_dense_kernels": [str(p) for p in self.compressed_dense_kernels],
            "dtypes": {name: spec.to_dict() for name, spec in self.dtypes.items()},
        }

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


MEASURED_CONFIG = "measured"  # conf/hardware/measured.yaml: a measured latency table, not a profile


def available_profiles() -> list[str]:
    """Names of the shipped profiles (file stems in ``conf/hardware``, less the measured-table config)."""
    return sorted(path.stem for path in HARDWARE_DIR.glob("*.yaml") if path.stem != MEASURED_CONFIG)


def load_profile(profile: str | Path | Mapping[str, Any]) -> HardwareProfile:
    """A validated profile from a shipped name (``"a100"``), a YAML path or a mapping of its fields."""
    if isinstance(profile, Mapping):
        return _parse(_plain(profile), "<mapping>")
    path = Path(profile)
    if str(profile) == MEASURED_CONFIG:
        raise HardwareProfileError(
            "'measured' is a measured latency table, not a profile: hardware=measured hardware.measured=<table> "
            "(Python: 'measured:<table>')"
        )
    if path.suffix not in (".yaml", ".yml"):
        path = HARDWARE_DIR / f"{profile}.yaml"
        if not path.is_file():
            raise HardwareProfileError(
                f"unknown hardware profile {str(profile)!r}; available: {', '.join(available_profiles())} "
                "(or pass a path to a .yaml file)"
            )
    if not path.is_file():
        raise HardwareProfileError(f"hardware profile file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise HardwareProfileError(
            f"hardware profile {str(path)!r} is not valid YAML: {error}".splitlines()[0]
        ) from None
    return _parse(data, str(path))


def _plain(value: Any) -> Any:
    """Hydra / OmegaConf nodes as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


class _Fields:
    """Reads one YAML mapping, naming the file and the dotted field path in every error."""

    def __init__(self, data: Any, origin: str, prefix: str = "") -> None:
        self.origin, self.prefix = origin, prefix
        if not isinstance(data, dict):
            raise self.error(f"{prefix.rstrip('.') or 'the file'} must be a mapping, got {type(data).__name__}")
        self.data = data

    def error(self, message: str) -> HardwareProfileError:
        return HardwareProfileError(f"hardware profile {self.origin!r}: {message}")

    def check_known(self, names: tuple[str, ...]) -> None:
        unknown = [k for k in self.data if k not in names]
        if unknown:
            raise self.error(f"unknown field {self.prefix + unknown[0]!r}; expected: {', '.join(names)}")

    def raw(self, key: str) -> Any:
        if key not in self.data:
            raise self.error(f"missing field {self.prefix + key!r}")
        return self.data[key]

    def text(self, key: str) -> str:
        value = self.raw(key)
        if not isinstance(value, str) or not value.strip():
            raise self.error(f"field {self.prefix + key!r} must be a non-empty string")
        return value

    def flag(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            raise self.error(f"field {self.prefix + key!r} must be true or false, got {value!r}")
        return value

    def number(self, key: str, low: float = 0.0, high: float = math.inf, *, allow_low: bool = False) -> float:
        value = self.raw(key)
        number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
        above = number >= low if allow_low else number > low
        if not (above and number <= high):
            bound = f"{'[' if allow_low else '('}{low:g}, {high:g}]"
            raise self.error(f"field {self.prefix + key!r} must be a number in {bound}, got {value!r}")
        return number

    def child(self, key: str) -> _Fields:
        return _Fields(self.raw(key), self.origin, f"{self.prefix}{key}.")


_PROFILE_FIELDS = (
    "name",
    "source",
    "memory_bandwidth_gbs",
    "launch_overhead_us",
    "fused_activation_compression",
    "pj_per_dram_byte",
    "efficiency",
    "gemm",
    "compressed_dense_kernels",
    "dtypes",
)
_EFFICIENCY_FIELDS = ("compute_dense", "compute_sparse", "memory")
_OPTIONAL_EFFICIENCY_FIELDS = ("compute_rows",)
_GEMM_FIELDS = (
    "sms",
    "tile_m",
    "tile_n",
    "sparse_row_multiple",
    "k_overhead",
    "sparse_overhead_us",
    "mask_ns_per_value",
    "mask_overhead_us",
    "row_gather_ns_per_value",
    "l2_mb",
    "sparse_row_order",
)
_DTYPE_FIELDS = ("dense_tflops", "sparse_tflops", "sparse_patterns", "pj_per_mac")


def _parse(data: Any, origin: str) -> HardwareProfile:
    fields = _Fields(data, origin)
    fields.check_known(_PROFILE_FIELDS)
    eff = fields.child("efficiency")
    eff.check_known(_EFFICIENCY_FIELDS + _OPTIONAL_EFFICIENCY_FIELDS)
    efficiency = Efficiency(
        *(eff.number(key, high=1.0) for key in _EFFICIENCY_FIELDS),
        compute_rows=eff.number("compute_rows", high=1.0) if "compute_rows" in eff.data else None,
    )
    if efficiency.compute_sparse > efficiency.compute_dense:
        raise fields.error(
            "field 'efficiency.compute_sparse' must not exceed 'efficiency.compute_dense' "
            "(a sparse kernel cannot beat the peak ratio of the sparse tensor cores)"
        )
    dtypes_fields = fields.child("dtypes")
    if not dtypes_fields.data:
        raise fields.error("field 'dtypes' must list at least one dtype")
    dtypes = {name: _parse_dtype(dtypes_fields, name) for name in dtypes_fields.data}
    gemm = _parse_gemm(fields.child("gemm")) if "gemm" in fields.data else GemmShape()
    return HardwareProfile(
        name=fields.text("name"),
        source=fields.text("source"),
        memory_bandwidth_gbs=fields.number("memory_bandwidth_gbs"),
        launch_overhead_us=fields.number("launch_overhead_us", allow_low=True),
        fused_activation_compression=fields.flag("fused_activation_compression"),
        pj_per_dram_byte=fields.number("pj_per_dram_byte"),
        efficiency=efficiency,
        dtypes=dtypes,
        gemm=gemm,
        compressed_dense_kernels=_parse_patterns(fields, "compressed_dense_kernels"),
        origin=origin,
    )


def _parse_gemm(gemm: _Fields) -> GemmShape:
    gemm.check_known(_GEMM_FIELDS)
    counts = {}
    for key in ("sms", "tile_m", "tile_n", "sparse_row_multiple"):
        value = gemm.raw(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise gemm.error(f"field 'gemm.{key}' must be a positive integer, got {value!r}")
        counts[key] = value
    return GemmShape(
        **counts,
        k_overhead=gemm.number("k_overhead", allow_low=True),
        sparse_overhead_us=gemm.number("sparse_overhead_us", allow_low=True),
        **{
            # Optional: profiles without dynamic-mask or row-kernel measurements charge their memory traffic only.
            key: gemm.number(key, allow_low=True) if key in gemm.data else 0.0
            for key in ("mask_ns_per_value", "mask_overhead_us", "row_gather_ns_per_value")
        },
        # Optional: without a cache size every tensor is read once (the compulsory traffic).
        l2_mb=gemm.number("l2_mb", allow_low=True) if "l2_mb" in gemm.data else 0.0,
        sparse_row_order=gemm.flag("sparse_row_order") if "sparse_row_order" in gemm.data else False,
    )


def _parse_patterns(fields: _Fields, key: str) -> tuple[NMPattern, ...]:
    raw = fields.data.get(key, [])
    if not isinstance(raw, list):
        raise fields.error(f"field {key!r} must be a list of N:M strings, got {raw!r}")
    return _sparse_patterns(fields, raw, repr(key))


def _sparse_patterns(fields: _Fields, raw: list, label: str) -> tuple[NMPattern, ...]:
    """The sparse N:M patterns listed in field ``label`` (each one parsed; dense ones refused)."""
    try:
        patterns = tuple(NMPattern.parse(p) for p in raw)
    except NMSearchError as error:
        raise fields.error(f"field {label}: {error}") from None
    if any(p.is_dense for p in patterns):
        raise fields.error(f"field {label} must list sparse N:M patterns (N < M)")
    return patterns


def _parse_dtype(dtypes: _Fields, name: str) -> DtypeSpec:
    if name not in DTYPE_BYTES:
        raise dtypes.error(f"unknown dtype 'dtypes.{name}'; expected one of: {', '.join(DTYPE_BYTES)}")
    spec = dtypes.child(name)
    spec.check_known(_DTYPE_FIELDS)
    dense = spec.number("dense_tflops")
    raw_patterns = spec.raw("sparse_patterns")
    if raw_patterns == ANY_PATTERN:
        patterns: tuple[NMPattern, ...] | str = ANY_PATTERN
    elif isinstance(raw_patterns, list):
        patterns = _sparse_patterns(spec, raw_patterns, f"'dtypes.{name}.sparse_patterns'")
    else:
        raise spec.error(
            f"field 'dtypes.{name}.sparse_patterns' must be a list of N:M strings or {ANY_PATTERN!r}, "
            f"got {raw_patterns!r}"
        )
    needs_sparse_peak = isinstance(patterns, tuple) and bool(patterns)
    if needs_sparse_peak:
        sparse = spec.number("sparse_tflops", low=dense, allow_low=True)
    elif spec.raw("sparse_tflops") is not None:
        raise spec.error(
            f"field 'dtypes.{name}.sparse_tflops' must be null when sparse_patterns is "
            f"{'any (the speedup is M/N)' if patterns == ANY_PATTERN else 'empty'}"
        )
    else:
        sparse = None
    return DtypeSpec(dense, sparse, patterns, spec.number("pj_per_mac"))
