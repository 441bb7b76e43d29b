"""Hardware cost model: what a scheme costs at inference on a :class:`~evaluators.hardware.HardwareProfile`.

Every layer is ``G`` GEMMs ``Y[M x N] = X[M x K] W^T`` (conv groups times calls). Each layer
option is costed on every **plan** it can run -- dense, the weights on the sparse tensor cores,
or the activations on them (at most one operand is accelerated) -- and the fastest plan is taken,
as a runtime picking kernels would. Everything a plan reads follows the plan:

* **bytes** (plan-consistent): the dense plan reads the finalized dense weights (zeros included)
  unless the profile lists the pattern in ``compressed_dense_kernels`` (a kernel that decompresses
  on load); a sparse plan reads the *hardware format* the pattern runs as, whatever the
  pattern: 1:8, 2:8 and 2:16 run as 2:4 and are stored as 2:4, values plus a 2-bit index per kept
  value (:func:`format_fraction`: FP16/BF16 0.5625, INT8/FP8 0.625, TF32 1:2 0.53125 of dense).
  Only a hypothetical ``any``-pattern accelerator stores N:M itself (``ceil(log2 M)`` index bits).
  Input activations are read once, outputs written dense. Dynamic activation masks cost a pass
  (read the dense activation, write the masked or compressed one, one launch plus
  ``mask_overhead_us``, ``mask_ns_per_value`` of selection work per value) unless the profile
  fuses it into the producer.
* **row masks** (``r0.2``): skipped GEMM rows are never computed, read or written: M, input and
  output bytes shrink to the kept fraction of rows; the smaller GEMM then runs any plan above. The
  row-skipping kernel gathers the kept rows' operand (``gather = G M' K row_gather_ns_per_value``)
  and its dense GEMM runs at ``efficiency.compute_rows`` (default: ``compute_dense``).
* **shape-aware compute**: a GEMM's output tiles (``tile_m x tile_n``) run in whole waves over
  the profile's ``sms``, the row tile ``tile_m'`` shrinking to the rows there are (a power of two,
  at least 16) and the K loop split over idle SMs when there are fewer tiles than SMs, as shape
  heuristics pick kernels; a sparse kernel pads the dense operand's rows to ``sparse_row_multiple``;
  the compressed operand halves the K loop (``K / s``, ``s`` the plan's peak ratio) while every
  tile keeps ``k_overhead`` fixed steps::

      tiles   = G / calls * ceil(M' / tile_m') * ceil(N' / tile_n)         (per call)
      split   = max(1, floor(sms / tiles))                                  (split-K)
      work    = calls * ceil(tiles * split / sms) * sms * tile_m' * tile_n * (K / (s split) + k_overhead)
      compute = 2 work / (eta_c P_dense)
      t       = max(compute, bytes / (eta_m BW)) + calls (t0 + t_sparse [sparse plans]) + mask pass + gather

  ``eta_c`` is the dense or sparse efficiency. With the default shape model (1 SM, 1x1 tiles, no
  overheads) this is the plain roofline.
* **energy**: executed MACs (dense MACs / plan speedup) x pJ per MAC + DRAM bytes x pJ per byte.

A scheme's totals are sums over layers, so :meth:`HardwareCostModel.table` precomputes every
(layer, option) once: scoring many schemes is a gather and a sum, and the expected cost under
per-layer option probabilities is a differentiable torch contraction.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import torch

from evaluators.base import MINIMIZE, Evaluation, Objective
from evaluators.hardware import DTYPE_BYTES, DtypeSpec, HardwareProfile, load_profile, runs_on
from search_space import (
    DEFAULT_TARGETS,
    DENSE,
    LayerInfo,
    NMPattern,
    NMSearchError,
    Option,
    Scheme,
    SearchSpace,
    output_positions,
    row_kept_fraction,
)

__all__ = [
    "COST_METRICS",
    "METRIC_UNITS",
    "PLANS",
    "SPARSE_FORMAT_INDEX_BITS",
    "CostEvaluator",
    "CostModelError",
    "CostReport",
    "CostTable",
    "GemmTerms",
    "HardwareCostModel",
    "Roofline",
    "Workload",
    "compressed_fraction",
    "dram_rereads",
    "executed_macs",
    "format_fraction",
    "gemm_terms",
    "metric_columns",
    "plan_costs",
    "roofline",
]

COST_METRICS = ("latency_ms", "bytes_mb", "energy_mj", "params", "macs")
METRIC_UNITS: Mapping[str, str] = MappingProxyType(
    {"latency_ms": "ms", "bytes_mb": "MB", "energy_mj": "mJ", "params": "", "macs": ""}
)
PLANS = ("dense", "sparse weights", "sparse activations")
MIN_TILE_ROWS = 16  # the smallest row tile of the shape-aware model (tensor-core MMA rows)
# Index bits per kept value in the sparse tensor-core format (2:4 for FP16/BF16/INT8/FP8, 1:2 for
# TF32): PTX ISA, "Sparse matrix storage" of mma.sp (a 2-bit index per non-zero; TF32 1:2 keeps
# the 2:4 metadata layout, 4 bits per group of four); cuSPARSELt / CUTLASS store it the same way.
SPARSE_FORMAT_INDEX_BITS = 2


class CostModelError(NMSearchError):
    """Bad input to the cost model: batch size, metric names, option indices or probabilities."""


def compressed_fraction(pattern: NMPattern | None, bytes_per_element: int) -> float:
    """Bytes of a tensor stored in generic N:M form relative to dense: values plus ceil(log2 M) index
    bits per kept value (the format of a hypothetical any-pattern accelerator).

    Never above 1: a pattern whose metadata outweighs the zeros (7:8) is stored dense.
    """
    if pattern is None or pattern.is_dense:
        return 1.0
    index_bits = math.ceil(math.log2(pattern.m))
    return min(1.0, pattern.density * (1 + index_bits / (8 * bytes_per_element)))


def format_fraction(hardware: NMPattern, bytes_per_element: int) -> float:
    """Bytes of a tensor in a sparse tensor-core format relative to dense.

    Args:
        hardware: the hardware pattern (2:4, or 1:2 for TF32).
        bytes_per_element: bytes of one value of the dtype.

    Returns:
        The kept values plus :data:`SPARSE_FORMAT_INDEX_BITS` per kept value: FP16/BF16 2:4 0.5625,
        INT8 / FP8 2:4 0.625, TF32 1:2 0.53125.
    """
    return hardware.density * (1 + SPARSE_FORMAT_INDEX_BITS / (8 * bytes_per_element))


def _run_format(spec: DtypeSpec, pattern: NMPattern | None, bytes_per_element: int) -> tuple[float, float]:
    """(peak ratio, stored fraction) of the fastest sparse format ``pattern`` runs as; (1, 1) if none."""
    if pattern is None or pattern.is_dense:
        return 1.0, 1.0
    if spec.accelerates_any_pattern:
        return pattern.m / pattern.n, compressed_fraction(pattern, bytes_per_element)
    best = (1.0, 1.0)
    for hardware in spec.sparse_patterns:
        if runs_on(pattern, hardware):
            ratio = min(spec.sparse_tflops / spec.dense_tflops, hardware.m / hardware.n)
            best = max(best, (ratio, -format_fraction(hardware, bytes_per_element)))
    return best[0], abs(best[1])


@dataclass(frozen=True)
class Workload:
    """A layer's GEMM work in one forward pass (all calls), already scaled to the batch size.

    ``rows``, ``outputs`` and ``reduction`` are one GEMM's M, N and K; ``gemms`` is how many run
    (conv groups times calls). Left at 0 they are derived from the totals (one GEMM per call).
    """

    macs: float
    weight_numel: int
    bias_numel: int
    input_numel: float
    output_numel: float
    calls: int = 1
    positions: int | None = None  # a conv's output positions per image: the GEMM rows a row mask picks from
    rows: float = 0.0
    outputs: int = 0
    reduction: int = 0
    gemms: int = 0

    def gemm_shape(self) -> tuple[float, float, float, int]:
        """(M, N, K, G) of this workload's GEMMs."""
        if self.rows and self.outputs and self.reduction:
            return self.rows, self.outputs, self.reduction, self.gemms or self.calls
        gemms = self.calls
        rows = self.macs / self.weight_numel
        outputs = self.output_numel / (rows * gemms) if rows else 0.0
        return rows / gemms, outputs, self.weight_numel / outputs if outputs else 0.0, gemms

    @classmethod
    def of_layer(cls, info: LayerInfo, scale: float = 1.0) -> Workload:
        """``scale`` multiplies the batch-dependent sizes (tokens, activations), not the weights."""
        weight_numel = math.prod(info.weight_shape)
        return cls(
            macs=info.macs * scale,
            weight_numel=weight_numel,
            bias_numel=info.params - weight_numel,
            input_numel=info.input_numel * scale,
            output_numel=info.output_numel * scale,
            calls=info.calls,
            positions=output_positions(info),
            rows=info.tokens * scale / info.calls,
            outputs=info.outputs,
            reduction=info.reduction,
            gemms=info.calls * info.groups,
        )

    @classmethod
    def linear(cls, tokens: int, in_features: int, out_features: int, bias: bool = False) -> Workload:
        """One ``Y[tokens x out] = X[tokens x in] W^T`` GEMM."""
        return cls(
            macs=tokens * in_features * out_features,
            weight_numel=in_features * out_features,
            bias_numel=out_features if bias else 0,
            input_numel=tokens * in_features,
            output_numel=tokens * out_features,
            rows=tokens,
            outputs=out_features,
            reduction=in_features,
            gemms=1,
        )


@dataclass(frozen=True)
class GemmTerms:
    """What does not depend on the efficiency factors, one entry per (workload, option).

    Arrays shaped ``(entries, plans)`` hold one column per :data:`PLANS` entry.
    """

    macs: np.ndarray
    calls: np.ndarray
    rows: np.ndarray  # M per GEMM, after row skipping
    outputs: np.ndarray  # N
    reduction: np.ndarray  # K
    gemms: np.ndarray  # G
    weight_bytes: np.ndarray  # (entries, plans): what each plan reads
    input_bytes: np.ndarray
    input_values: np.ndarray
    input_sparse_bytes: np.ndarray
    output_bytes: np.ndarray
    activation_sparse: np.ndarray
    row_skipping: np.ndarray  # the option skips GEMM rows: a row-skipping kernel runs
    speedup: np.ndarray  # (entries, plans): peak ratio of each plan; 1 where a sparse plan is unavailable
    params: np.ndarray
    effective_macs: np.ndarray


def gemm_terms(
    workloads: Sequence[Workload],
    options: Sequence[Option],
    spec: DtypeSpec,
    bytes_per_element: int,
    profile: HardwareProfile | None = None,
) -> GemmTerms:
    """The efficiency-free terms of every (workload, option) pair.

    Args:
        workloads: the layers' GEMM work.
        options: one option per workload.
        spec: the dtype's peaks and sparse patterns.
        bytes_per_element: bytes of one value of the dtype.
        profile: says which patterns a dense-compute kernel reads compressed (none without it).

    Returns:
        The terms, with per-plan weight bytes and peak ratios.
    """

    def column(values: Any, dtype: type = np.float64) -> np.ndarray:
        return np.fromiter(values, dtype=dtype, count=len(workloads))

    pairs = list(zip(workloads, options, strict=True))
    nm_activations = [None if o.rows else o.activation for o in options]
    # Skipped rows are neither computed nor read nor written: the GEMM is that much shorter.
    kept_rows = column(row_kept_fraction(w.positions, o.rows.sparsity) if o.rows else 1.0 for w, o in pairs)
    weight_formats = [_run_format(spec, o.weight, bytes_per_element) for o in options]
    activation_formats = [_run_format(spec, a, bytes_per_element) for a in nm_activations]
    shapes = np.array([w.gemm_shape() for w in workloads], dtype=np.float64).reshape(len(workloads), 4)
    w_density = column(o.weight.density if o.weight else 1.0 for _, o in pairs)
    a_density = column(a.density if a else 1.0 for a in nm_activations)
    macs = column(w.macs for w, _ in pairs) * kept_rows
    calls = column(w.calls for w, _ in pairs)
    weight_numel = column(w.weight_numel for w, _ in pairs)
    bias_numel = column(w.bias_numel for w, _ in pairs)
    input_bytes = column(w.input_numel for w, _ in pairs) * bytes_per_element * kept_rows
    # Plan-consistent weight bytes: dense plan -> finalized dense weights (compressed only where a
    # dense kernel reads the pattern compressed), sparse-weights plan -> the hardware format it runs as.
    dense_read = column(
        compressed_fraction(o.weight, bytes_per_element)
        if profile is not None and profile.reads_compressed_when_dense(o.weight)
        else 1.0
        for o in options
    )
    w_frac = np.stack([dense_read, column(f for _, f in weight_formats), dense_read], axis=1)
    speedup = np.ones((len(pairs), len(PLANS)))
    speedup[:, 1] = column(r for r, _ in weight_formats)
    speedup[:, 2] = column(r for r, _ in activation_formats)
    a_frac = column(f for _, f in activation_formats)
    return GemmTerms(
        macs=macs,
        calls=calls,
        rows=shapes[:, 0] * kept_rows,
        outputs=shapes[:, 1],
        reduction=shapes[:, 2],
        gemms=shapes[:, 3],
        weight_bytes=(weight_numel[:, None] * w_frac + bias_numel[:, None]) * bytes_per_element * calls[:, None],
        input_bytes=input_bytes,
        input_values=input_bytes / bytes_per_element,
        input_sparse_bytes=input_bytes * a_frac,
        output_bytes=column(w.output_numel for w, _ in pairs) * bytes_per_element * kept_rows,
        activation_sparse=column((a is not None for a in nm_activations), bool),
        row_skipping=column((bool(o.rows) for o in options), bool),
        speedup=speedup,
        params=weight_numel * w_density + bias_numel,
        effective_macs=macs * w_density * a_density,
    )


def _ceil_to(values: np.ndarray, multiple: int | np.ndarray) -> np.ndarray:
    return np.ceil(values / multiple) * multiple


def executed_macs(terms: GemmTerms, profile: HardwareProfile) -> np.ndarray:
    """MAC slots the tensor cores spend per plan (see the module docstring for the formula).

    Args:
        terms: the entries' GEMM shapes and plan peak ratios.
        profile: its ``gemm`` block (SMs, tile, sparse padding, per-tile K overhead).

    Returns:
        ``(entries, plans)`` dense-MAC equivalents: whole waves of tiles over the SMs, the sparse
        kernels' padded rows, the K loop shortened by the plan's peak ratio plus the fixed steps.
    """
    gemm = profile.gemm
    rows, outputs = terms.rows[:, None], terms.outputs[:, None]
    pad = np.array([1, gemm.sparse_row_multiple, 1])
    out_pad = np.array([1, 1, gemm.sparse_row_multiple])
    # The sparse-weights kernel pads the dense operand (X, M rows); the sparse-activations one pads W (N rows).
    padded_rows = np.where(terms.speedup > 1, _ceil_to(rows, pad), rows)
    padded_outputs = np.where(terms.speedup > 1, _ceil_to(outputs, out_pad), outputs)
    k_loop = terms.reduction[:, None] / terms.speedup + gemm.k_overhead
    if gemm.sms == gemm.tile_m == gemm.tile_n == 1:
        # Plain roofline: no quantisation, so fractional rows (batch scaling) stay exact.
        return terms.gemms[:, None] * padded_rows * padded_outputs * k_loop
    # Kernels are picked per shape, as cuBLAS / cuSPARSELt heuristics do: the row tile shrinks to the
    # rows there are (a power of two, at least 16), and when there are fewer tiles than SMs the K
    # loop is split over the idle SMs (split-K). One kernel per call runs all its GEMMs' (conv
    # groups') tiles in whole waves over the SMs.
    tile_m = np.clip(2 ** np.ceil(np.log2(np.maximum(padded_rows, 1))), MIN_TILE_ROWS, gemm.tile_m)
    per_call = (terms.gemms / terms.calls)[:, None]
    tiles = per_call * np.ceil(padded_rows / tile_m) * np.ceil(padded_outputs / gemm.tile_n)
    split = np.maximum(1, np.floor(gemm.sms / tiles))
    k_loop = terms.reduction[:, None] / (terms.speedup * split) + gemm.k_overhead
    slots = np.ceil(tiles * split / gemm.sms) * gemm.sms * tile_m * gemm.tile_n
    return terms.calls[:, None] * slots * k_loop


def dram_rereads(terms: GemmTerms, profile: HardwareProfile) -> tuple[np.ndarray, np.ndarray]:
    """How many times each plan reads its inputs and its weights from DRAM (1 = once).

    Dense kernels read each tensor once (libraries rasterise tiles for cache reuse), and so do
    sparse ones unless the profile says ``gemm.sparse_row_order``: torch's CUTLASS kernels use the
    identity threadblock swizzle over the sparse operand ``A`` (the weights; the activations for a
    sparse-activation plan), so one wave of ``sms`` tiles spans ``c = min(sms, tiles along the
    sparse operand)`` of its row tiles and ``r = ceil(sms / that)`` of the other operand's; every
    wave reads those panels over the whole K. An operand that fits in ``gemm.l2_mb`` is read once.

    Args:
        terms: the entries' GEMM shapes and per-plan bytes.
        profile: its ``gemm`` block (SMs, tile, sparse padding, ``l2_mb``, ``sparse_row_order``).

    Returns:
        ``(input_reads, weight_reads)``, each ``(entries, plans)``, at least 1.
    """
    gemm = profile.gemm
    ones = np.ones_like(terms.weight_bytes)
    if not gemm.sparse_row_order or gemm.sms == gemm.tile_m == gemm.tile_n == 1:
        return ones, ones.copy()
    rows, outputs = terms.rows[:, None], terms.outputs[:, None]
    sparse = terms.speedup > 1
    padded_rows = np.where(sparse, _ceil_to(rows, np.array([1, gemm.sparse_row_multiple, 1])), rows)
    padded_outputs = np.where(sparse, _ceil_to(outputs, np.array([1, 1, gemm.sparse_row_multiple])), outputs)
    tile_m = np.clip(2 ** np.ceil(np.log2(np.maximum(padded_rows, 1))), MIN_TILE_ROWS, gemm.tile_m)
    row_tiles, out_tiles = np.ceil(padded_rows / tile_m), np.ceil(padded_outputs / gemm.tile_n)
    waves = np.ceil(row_tiles * out_tiles / gemm.sms)
    # Sparse weights walk the output tiles first, sparse activations the row tiles.
    walks_outputs = np.array([True, True, False])
    walked, other = np.where(walks_outputs, out_tiles, row_tiles), np.where(walks_outputs, row_tiles, out_tiles)
    span_walked = np.minimum(gemm.sms, walked)
    span_other = np.minimum(other, np.ceil(gemm.sms / walked))
    output_reads = waves * np.where(walks_outputs, span_walked, span_other) * gemm.tile_n / padded_outputs
    row_reads = waves * np.where(walks_outputs, span_other, span_walked) * tile_m / padded_rows
    cache = gemm.l2_mb * 1e6
    gemms = terms.gemms[:, None]
    activation = np.stack([terms.input_bytes, terms.input_bytes, terms.input_sparse_bytes], axis=1)
    input_reads = np.where(sparse & (activation / gemms > cache), np.maximum(row_reads, 1.0), 1.0)
    weight_reads = np.where(sparse & (terms.weight_bytes / gemms > cache), np.maximum(output_reads, 1.0), 1.0)
    return input_reads, weight_reads


@dataclass(frozen=True)
class Roofline:
    """Per-entry costs of the chosen plan (seconds, bytes, joules)."""

    plan: np.ndarray
    speedup: np.ndarray
    compute_s: np.ndarray
    memory_s: np.ndarray
    launch_s: np.ndarray
    compress_s: np.ndarray
    gather_s: np.ndarray
    latency_s: np.ndarray
    weight_bytes: np.ndarray
    activation_bytes: np.ndarray
    output_bytes: np.ndarray
    compress_bytes: np.ndarray
    energy_j: np.ndarray

    @property
    def total_bytes(self) -> np.ndarray:
        return self.weight_bytes + self.activation_bytes + self.output_bytes + self.compress_bytes

    @property
    def compute_bound(self) -> np.ndarray:
        return self.compute_s >= self.memory_s


def plan_costs(terms: GemmTerms, profile: HardwareProfile, spec: DtypeSpec) -> dict[str, np.ndarray]:
    """Every plan's costs, shaped ``(entries, plans)``; unavailable plans have infinite latency."""
    eff = profile.efficiency
    fused = profile.fused_activation_compression
    bandwidth = profile.memory_bandwidth_gbs * 1e9 * eff.memory
    launch = terms.calls * profile.launch_overhead_us * 1e-6
    sparse_launch = terms.calls * profile.gemm.sparse_overhead_us * 1e-6
    efficiency = np.array([eff.compute_dense, eff.compute_sparse, eff.compute_sparse])
    # A row-skipping option runs its own kernel: its GEMM's efficiency, and the gathering of the kept
    # rows' operand (a conv's im2col rows) on top.
    efficiency = np.where(terms.row_skipping[:, None] & (np.arange(len(PLANS)) == 0), eff.rows, efficiency)
    gathered = np.where(terms.row_skipping, terms.gemms * terms.rows * terms.reduction, 0.0)
    gather_s = gathered * profile.gemm.row_gather_ns_per_value * 1e-9
    compute = 2 * executed_macs(terms, profile) / (spec.dense_tflops * 1e12 * efficiency)
    stored = np.where(terms.activation_sparse & fused, terms.input_sparse_bytes, terms.input_bytes)
    activation = np.stack([stored, stored, terms.input_sparse_bytes], axis=1)
    compress = np.zeros_like(activation)
    if not fused:
        # A dynamic activation mask is a pass of its own: read the dense activation, write it
        # masked (dense plans) or compressed (sparse-activations plan).
        masked = np.where(terms.activation_sparse, 2 * terms.input_bytes, 0.0)
        compress[:, 0] = compress[:, 1] = masked
        compress[:, 2] = terms.input_bytes + terms.input_sparse_bytes
    gemm_bytes = terms.weight_bytes + activation + terms.output_bytes[:, None]
    # Time counts what the kernel reads from DRAM (sparse kernels re-read operands larger than the
    # cache); bytes and energy count each tensor once, as the plan stores it.
    input_reads, weight_reads = dram_rereads(terms, profile)
    traffic = terms.weight_bytes * weight_reads + activation * input_reads + terms.output_bytes[:, None]
    memory = traffic / bandwidth
    # The pass also selects the kept values: compute per activation value (CPU: a sort per group).
    select_s = np.where(terms.activation_sparse & (not fused), terms.input_values * profile.gemm.mask_ns_per_value, 0.0)
    mask_fixed = launch + terms.calls * profile.gemm.mask_overhead_us * 1e-6
    compress_s = compress / bandwidth + (compress > 0) * (mask_fixed[:, None] + select_s[:, None] * 1e-9)
    available = terms.speedup > 1
    available[:, 0] = True
    launches = launch[:, None] + np.where(available & (terms.speedup > 1), sparse_launch[:, None], 0.0)
    gather_s = np.broadcast_to(gather_s[:, None], compute.shape)
    latency = np.where(available, np.maximum(compute, memory) + launches + compress_s + gather_s, np.inf)
    executed = terms.macs[:, None] / terms.speedup
    energy = (executed * spec.pj_per_mac + (gemm_bytes + compress) * profile.pj_per_dram_byte) * 1e-12
    return {
        "compute_s": compute,
        "memory_s": memory,
        "launch_s": launches,
        "compress_s": compress_s,
        "gather_s": gather_s,
        "latency_s": latency,
        "weight_bytes": terms.weight_bytes,
        "activation_bytes": activation,
        "compress_bytes": compress,
        "energy_j": energy,
    }


def roofline(terms: GemmTerms, profile: HardwareProfile, spec: DtypeSpec, plan: np.ndarray | None = None) -> Roofline:
    """Costs of the fastest plan per entry, or of the given ``plan`` indices (into :data:`PLANS`)."""
    plans = plan_costs(terms, profile, spec)
    if plan is None:
        # The fastest plan; among equally fast ones (memory- or launch-bound), the least energy.
        latency = plans["latency_s"]
        fastest = latency <= latency.min(axis=1, keepdims=True) * (1 + 1e-12)
        chosen = np.argmin(np.where(fastest, plans["energy_j"], np.inf), axis=1)
    else:
        chosen = np.asarray(plan, dtype=np.int64)

    def take(values: np.ndarray) -> np.ndarray:
        return np.take_along_axis(values, chosen[:, None], axis=1)[:, 0]

    if plan is not None and not np.isfinite(take(plans["latency_s"])).all():
        raise CostModelError("a forced plan runs a pattern the profile's sparse tensor cores do not accept")
    return Roofline(
        plan=chosen,
        speedup=take(terms.speedup),
        compute_s=take(plans["compute_s"]),
        memory_s=take(plans["memory_s"]),
        launch_s=take(plans["launch_s"]),
        compress_s=take(plans["compress_s"]),
        gather_s=take(plans["gather_s"]),
        latency_s=take(plans["latency_s"]),
        weight_bytes=take(plans["weight_bytes"]),
        activation_bytes=take(plans["activation_bytes"]),
        output_bytes=terms.output_bytes,
        compress_bytes=take(plans["compress_bytes"]),
        energy_j=take(plans["energy_j"]),
    )


def metric_columns(terms: GemmTerms, roof: Roofline) -> dict[str, np.ndarray]:
    """The total metrics' per-entry contributions, keyed by :data:`COST_METRICS`."""
    return {
        "latency_ms": roof.latency_s * 1e3,
        "bytes_mb": roof.total_bytes / 1e6,
        "energy_mj": roof.energy_j * 1e3,
        "params": terms.params,
        "macs": terms.effective_macs,
    }


@dataclass(frozen=True, eq=False)
class CostTable:
    """Every (layer, option) cost of one space: ``values[layer, option, metric]``, padded slots zero.

    ``totals(indices)`` scores ``(schemes, layers)`` option indices (``space.encode_many``) at once;
    ``expected(probs)`` is the differentiable expected cost for per-layer option probabilities.
    """

    layer_names: tuple[str, ...]
    values: np.ndarray
    valid: np.ndarray
    metrics: tuple[str, ...] = COST_METRICS
    _flat: np.ndarray = field(init=False, repr=False)
    _offsets: np.ndarray = field(init=False, repr=False)
    _option_counts: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        layers, options, _ = self.values.shape
        values = np.where(self.valid[..., None], self.values, 0.0)
        object.__setattr__(self, "values", values)
        # One contiguous row per metric: a gather with flat indices is the fastest numpy path.
        object.__setattr__(self, "_flat", np.ascontiguousarray(values.reshape(layers * options, -1).T))
        object.__setattr__(self, "_offsets", np.arange(layers, dtype=np.int64) * options)
        object.__setattr__(self, "_option_counts", self.valid.sum(axis=1))

    def _metric_index(self, metric: str) -> int:
        if metric not in self.metrics:
            raise CostModelError(f"unknown cost metric {metric!r}; available: {', '.join(self.metrics)}")
        return self.metrics.index(metric)

    def totals(self, indices: np.ndarray, metrics: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Per-scheme totals ``{metric: (schemes,)}`` from ``(schemes, layers)`` option indices."""
        indices = np.atleast_2d(np.asarray(indices))
        if indices.ndim != 2 or indices.shape[1] != len(self.layer_names):
            raise CostModelError(
                f"expected option indices shaped (schemes, {len(self.layer_names)}), got {indices.shape}"
            )
        if indices.size and (indices.min() < 0 or (indices >= self._option_counts).any()):
            row, col = np.argwhere((indices < 0) | (indices >= self._option_counts))[0]
            raise CostModelError(
                f"scheme {row}: layer {self.layer_names[col]!r} has {self._option_counts[col]} options, "
                f"got index {indices[row, col]}"
            )
        flat = indices + self._offsets
        return {m: self._flat[self._metric_index(m)][flat].sum(axis=1) for m in (metrics or self.metrics)}

    def expected(self, probs: torch.Tensor, metric: str = "latency_ms") -> torch.Tensor:
        """``sum_layers sum_options p(option) cost(layer, option)`` for probabilities ``(..., layers, options)``.

        Differentiable in ``probs``; padded option slots (``space.option_valid_mask()``) must hold 0.
        """
        shape = tuple(self.valid.shape)
        if tuple(probs.shape[-2:]) != shape:
            raise CostModelError(
                f"expected probabilities shaped (..., {shape[0]}, {shape[1]}), got {tuple(probs.shape)}"
            )
        padded = torch.from_numpy(~self.valid).to(probs.device)
        if bool((probs.detach()[..., padded] != 0).any()):
            raise CostModelError("probabilities on padded option slots must be 0 (mask them with option_valid_mask)")
        cost = torch.as_tensor(self.values[..., self._metric_index(metric)], dtype=probs.dtype, device=probs.device)
        return (probs * cost).sum(dim=(-2, -1))


@dataclass(frozen=True)
class CostReport:
    """A scheme's totals (and the dense model's), with the per-layer breakdown in ``layers``."""

    totals: Mapping[str, float]
    dense_totals: Mapping[str, float]
    layers: pd.DataFrame
    profile: HardwareProfile
    dtype: str
    batch_size: int

    @property
    def speedup(self) -> float:
        """Dense latency over the scheme's latency."""
        return self.dense_totals["latency_ms"] / self.totals["latency_ms"]


@dataclass(frozen=True)
class HardwareCostModel:
    """Roofline cost of a scheme on one profile, dtype and batch size."""

    profile: HardwareProfile
    dtype: str = "fp16"
    batch_size: int = 1

    def __post_init__(self) -> None:
        self.profile.dtype(self.dtype)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise CostModelError(f"batch_size must be a positive integer, got {self.batch_size!r}")

    @classmethod
    def from_profile(
        cls, profile: str | Path | Mapping[str, Any] | HardwareProfile, dtype: str = "fp16", batch_size: int = 1
    ) -> HardwareCostModel:
        """From a shipped profile name (``"a100"``), a YAML path, a mapping of its fields or a profile."""
        loaded = profile if isinstance(profile, HardwareProfile) else load_profile(profile)
        return cls(loaded, dtype, batch_size)

    @property
    def spec(self) -> DtypeSpec:
        return self.profile.dtype(self.dtype)

    def costs(self, space: SearchSpace, pairs: Sequence[tuple[str, Option]]) -> tuple[GemmTerms, Roofline]:
        """Terms and roofline of the given (layer name, option) pairs of ``space``."""
        scale = self.batch_size / space.example_batch_size
        workloads = [Workload.of_layer(space.info(name), scale) for name, _ in pairs]
        terms = gemm_terms(workloads, [option for _, option in pairs], self.spec, DTYPE_BYTES[self.dtype], self.profile)
        return terms, roofline(terms, self.profile, self.spec)

    def table(self, space: SearchSpace) -> CostTable:
        """Every (layer, option) of ``space`` costed once."""
        valid = space.option_valid_mask()
        pairs = [(name, option) for name in space.layer_names for option in space.options[name]]
        terms, roof = self.costs(space, pairs)
        columns = metric_columns(terms, roof)
        values = np.zeros((*valid.shape, len(COST_METRICS)))
        values[valid] = np.stack([columns[m] for m in COST_METRICS], axis=1)
        return CostTable(tuple(space.layer_names), values, valid)

    def evaluate(self, space: SearchSpace, scheme: Scheme) -> CostReport:
        """Totals and the per-layer breakdown (chosen vs dense) of ``scheme``."""
        space.check(scheme)
        names = space.layer_names
        chosen_terms, chosen = self.costs(space, [(name, scheme[name]) for name in names])
        dense_terms, dense = self.costs(space, [(name, DENSE) for name in names])
        columns, dense_columns = metric_columns(chosen_terms, chosen), metric_columns(dense_terms, dense)
        latency = columns["latency_ms"]
        frame = pd.DataFrame(
            {
                "layer": names,
                "option": [scheme[name].name for name in names],
                "plan": [PLANS[p] for p in chosen.plan],
                "bound": np.where(chosen.compute_bound, "compute", "memory"),
                "latency_ms": latency,
                "dense_latency_ms": dense_columns["latency_ms"],
                "speedup": dense_columns["latency_ms"] / latency,
                "latency_share": latency / latency.sum(),
                "compute_ms": chosen.compute_s * 1e3,
                "memory_ms": chosen.memory_s * 1e3,
                "launch_ms": chosen.launch_s * 1e3,
                "compress_ms": chosen.compress_s * 1e3,
                "gather_ms": chosen.gather_s * 1e3,
                "tensor_core_speedup": chosen.speedup,
                "bytes_mb": columns["bytes_mb"],
                "dense_bytes_mb": dense_columns["bytes_mb"],
                "weight_mb": chosen.weight_bytes / 1e6,
                "activation_mb": chosen.activation_bytes / 1e6,
                "output_mb": chosen.output_bytes / 1e6,
                "compress_mb": chosen.compress_bytes / 1e6,
                "energy_mj": columns["energy_mj"],
                "dense_energy_mj": dense_columns["energy_mj"],
                "params": columns["params"],
                "dense_params": dense_columns["params"],
                "macs": columns["macs"],
                "dense_macs": dense_columns["macs"],
            }
        )
        return CostReport(
            totals={m: float(columns[m].sum()) for m in COST_METRICS},
            dense_totals={m: float(dense_columns[m].sum()) for m in COST_METRICS},
            layers=frame,
            profile=self.profile,
            dtype=self.dtype,
            batch_size=self.batch_size,
        )


class CostEvaluator:
    """The :class:`~evaluators.base.Evaluator` protocol over a cost model: every objective is minimised.

    ``metrics`` picks the objectives among :data:`COST_METRICS`; ``table`` scores many schemes at once.
    """

    def __init__(
        self, space: SearchSpace, cost_model: HardwareCostModel, metrics: Sequence[str] | str = ("latency_ms",)
    ) -> None:
        if isinstance(metrics, str):  # metrics="latency_ms": one metric, not its characters
            metrics = (metrics,)
        metrics = tuple(metrics)
        if not metrics:
            raise CostModelError(f"CostEvaluator needs at least one metric of: {', '.join(COST_METRICS)}")
        unknown = [m for m in metrics if m not in COST_METRICS]
        if unknown:
            raise CostModelError(f"unknown cost metric {unknown[0]!r}; available: {', '.join(COST_METRICS)}")
        repeated = sorted({m for m in metrics if metrics.count(m) > 1})
        if repeated:
            raise CostModelError(f"cost metric {repeated[0]!r} is listed twice in metrics={metrics}")
        self.space = space
        self.cost_model = cost_model
        self.table = cost_model.table(space)
        self._objectives = tuple(Objective(m, MINIMIZE, METRIC_UNITS[m]) for m in metrics)

    @property
    def objectives(self) -> tuple[Objective, ...]:
        return self._objectives

    def evaluate(self, scheme: Scheme) -> Evaluation:
        """Totals from the table; a scheme with options outside this space (e.g. DominoSearch's
        ``w4:16``) is costed layer by layer through :meth:`HardwareCostModel.evaluate`."""
        start = time.perf_counter()
        if all(option in self.space.options.get(name, ()) for name, option in scheme):
            totals = {m: float(v[0]) for m, v in self.table.totals(self.space.encode(scheme)).items()}
        else:
            totals = dict(self.cost_model.evaluate(self._space_with_ratios_of(scheme), scheme).totals)
        names = [o.name for o in self._objectives]
        info = {
            "hardware": self.cost_model.profile.name,
            "dtype": self.cost_model.dtype,
            "batch_size": self.cost_model.batch_size,
            **{m: v for m, v in totals.items() if m not in names},
        }
        return Evaluation({name: totals[name] for name in names}, info=info, duration_s=time.perf_counter() - start)

    def _space_with_ratios_of(self, scheme: Scheme) -> SearchSpace:
        """This space's layers with the scheme's N:M ratios added, every target and untied ``both``: the
        scheme still has to fit the model (names, fingerprint, channels divisible by M) to be costed."""
        space = self.space
        patterns = {p for _, o in scheme for p in (o.weight, o.activation) if isinstance(p, NMPattern)}
        return SearchSpace(
            space.layers,
            skipped=space.skipped,
            fingerprint=space.fingerprint,
            example_batch_size=space.example_batch_size,
            ratios=sorted({*space.ratios, *patterns}),
            targets=tuple(dict.fromkeys((*DEFAULT_TARGETS, *space.targets))),
            tie_both=False,
            row_sparsities=space.row_sparsities,
        )
