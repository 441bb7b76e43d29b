"""Fit a profile's kernel parameters to measured dense-vs-2:4 GEMM timings and check how well the
cost model ranks held-out measurements.

The measurements are a CSV with :data:`MEASUREMENT_COLUMNS`: one row per GEMM
``Y[m x n] = X[m x k] W^T`` with the dense time and the time with 2:4 (TF32: 1:2) weights on the
sparse tensor cores, the hardware profile it ran on, the kernel library and the source (a URL, or
"measured here" for ``benchmarks/gpu_latency.py``). The shipped :data:`PUBLISHED_CSV` collects
published points. The fitted parameters (:data:`FACTORS`: dense and sparse compute efficiency,
memory efficiency, per-call overhead, per-tile K overhead and the sparse kernels' extra per-call
overhead) are **shared** by every GPU in the file; each GPU keeps its own peaks, bandwidth, SMs,
tile and padding. The fit is least squares on log dense latency and log speedup (the ratio the
search compares; weighing it directly keeps one GPU's clock offset from bending the sparse factors).

Rows whose ``library`` starts with "CUTLASS" are costed with ``gemm.sparse_row_order`` (torch's and
the CUTLASS profiler's sparse kernels launch thread blocks in plain row order and re-read operands
larger than the L2 cache), the others without it, whatever the profile says.

An optional ``kernel`` column marks rows ``untuned`` when their own source says the kernel was not
the tuned, shipped one (a work-in-progress integration, a too-old compiler, another architecture's
kernels, per-call setup a later release removed); by default those rows are kept in the file and
in the report but left out of the fit and the scores (``--all`` uses every row).

Quality is cross-validated by **leaving one source out** (a source on one GPU: a thread collecting
tables from several GPUs holds independent series): the parameters are fitted without that
source's rows, which are then predicted; over all held-out predictions the command reports the
Kendall tau and the median relative error of the sparse speedup (dense time / sparse time).

    python -m evaluators.calibration                                  # the shipped published points
    python -m evaluators.calibration my_points.csv --profile a100 --out a100_fitted.yaml
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import least_squares
from scipy.stats import kendalltau

from evaluators.cost import PLANS, Workload, gemm_terms, roofline
from evaluators.hardware import (
    DTYPE_BYTES,
    Efficiency,
    HardwareProfile,
    HardwareProfileError,
    load_profile,
)
from search_space import NMSearchError, Option
from search_space.io import atomic_write_text

__all__ = [
    "DEFAULT_FIXED",
    "FACTORS",
    "KERNEL_STATUSES",
    "MEASUREMENT_COLUMNS",
    "PAIR_CLASSES",
    "PUBLISHED_CSV",
    "CalibrationError",
    "CalibrationResult",
    "apply_factors",
    "calibrate",
    "factors_of",
    "fit_factors",
    "main",
    "pair_accounting",
    "predict_ms",
    "read_measurements",
    "repeat_agreement",
    "row_order_kernels",
    "source_summary",
    "speedup_scores",
    "update_profile_text",
    "update_profiles",
]

PUBLISHED_CSV = Path(__file__).resolve().parent / "data" / "published_gemm_2to4.csv"
KERNEL_STATUSES = ("tuned", "untuned")
# How two scored points relate: the pooled tau mixes rankings within one source (one fold's model),
# across sources on one GPU (what a search on that GPU compares) and across GPUs.
PAIR_CLASSES = ("same source", "same hardware, other source", "other hardware")
MEASUREMENT_COLUMNS = ("hardware", "dtype", "m", "n", "k", "library", "dense_ms", "sparse_ms", "source")
FACTORS = (
    "compute_dense",
    "compute_sparse_ratio",
    "memory",
    "launch_overhead_us",
    "k_overhead",
    "sparse_overhead_us",
    "mask_ns_per_value",
    "mask_overhead_us",
    "compute_rows_ratio",
    "row_gather_ns_per_value",
)
# Back-to-back GEMM timings hide the per-call launch gap, hold too few memory-bound points to
# identify the DRAM efficiency and no activation masks or row-skipping kernels: the command line
# keeps those fixed.
DEFAULT_FIXED = (
    "memory=0.8",
    "launch_overhead_us=5",
    "mask_ns_per_value=0",
    "mask_overhead_us=0",
    "compute_rows_ratio=1",
    "row_gather_ns_per_value=0",
)
_LOWER = np.array([1e-3, 1e-3, 1e-3, 0.0, 0.0, 0.0, 0.0, 0.0, 1e-3, 0.0])
# The row kernel's ratio may exceed 1 (another library than the dense one); its efficiency is capped at 1.
_UPPER = np.array([1.0, 1.0, 1.0, 1e3, 4096.0, 1e4, 1e4, 1e4, 1e3, 1e4])


class CalibrationError(NMSearchError):
    """A measurements CSV or a fit that cannot be used."""


def _label(source: str | Path | pd.DataFrame) -> str:
    return "measurements table" if isinstance(source, pd.DataFrame) else str(source)


def _fold(frame: pd.DataFrame) -> pd.Series:
    """The unit left out in cross-validation: one source on one GPU (a thread that collects several
    people's tables on different GPUs holds independent measurement series)."""
    return frame["source"] + " [" + frame["hardware"] + "]"


def read_measurements(source: str | Path | pd.DataFrame) -> pd.DataFrame:
    """The measured rows, validated before any fitting.

    Args:
        source: a CSV path or a frame with :data:`MEASUREMENT_COLUMNS` (``kernel``, ``notes`` optional).

    Returns:
        The rows with integer ``m``, ``n``, ``k``, float times and a ``kernel`` column.

    Raises:
        CalibrationError: a missing file or column, an unreadable CSV, no rows, or a row with a bad
            value (non-positive size or time, unknown dtype / profile, a profile without sparse
            cores for the dtype, empty source, unknown kernel status); the message names the file,
            the row and its CSV line, and the fix.
    """
    label = _label(source)
    if isinstance(source, pd.DataFrame):
        frame = source.copy()
    else:
        path = Path(source)
        if not path.is_file():
            raise CalibrationError(f"{label}: no such file; pass a CSV with columns {', '.join(MEASUREMENT_COLUMNS)}")
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as error:
            raise CalibrationError(
                f"{label}: not a readable CSV ({str(error).splitlines()[0]}); fix the quoting / field count"
            ) from None
        except pd.errors.EmptyDataError:
            raise CalibrationError(f"{label}: empty file; write a header {','.join(MEASUREMENT_COLUMNS)}") from None
    missing = [c for c in MEASUREMENT_COLUMNS if c not in frame.columns]
    if missing:
        raise CalibrationError(
            f"{label}: missing column {missing[0]!r}; the header must include {','.join(MEASUREMENT_COLUMNS)}"
        )
    if frame.empty:
        raise CalibrationError(f"{label}: no data rows")
    frame = frame.reset_index(drop=True)

    def where(row: int) -> str:
        return f"{label}: row {row + 1} (line {row + 2})"

    for column in ("m", "n", "k"):
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = ~((values > 0) & (values == np.floor(values)))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise CalibrationError(
                f"{where(row)}: {column} must be a positive integer, got {frame[column][row]!r}; fix or delete the row"
            )
        frame[column] = values.astype(np.int64)
    for column in ("dense_ms", "sparse_ms"):
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = ~((values > 0) & np.isfinite(values))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise CalibrationError(
                f"{where(row)}: {column} must be a positive time in ms, got {frame[column][row]!r}; "
                "fix or delete the row"
            )
        frame[column] = values.astype(float)
    if "kernel" in frame.columns:
        bad = ~frame["kernel"].isin(KERNEL_STATUSES)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise CalibrationError(
                f"{where(row)}: kernel must be one of {', '.join(KERNEL_STATUSES)}, got {frame['kernel'][row]!r}"
            )
    else:
        frame["kernel"] = "tuned"
    for row, (hardware, dtype, source) in enumerate(
        zip(frame["hardware"], frame["dtype"], frame["source"], strict=True)
    ):
        if not str(source).strip():
            raise CalibrationError(f"{where(row)}: empty source; give the URL it was read from or 'measured here'")
        if dtype not in DTYPE_BYTES:
            raise CalibrationError(f"{where(row)}: unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
        try:
            spec = load_profile(hardware).dtype(dtype)
        except HardwareProfileError as error:
            raise CalibrationError(f"{where(row)}: {error}") from None
        if not isinstance(spec.sparse_patterns, tuple) or not spec.sparse_patterns:
            raise CalibrationError(
                f"{where(row)}: {hardware} has no sparse tensor cores for {dtype}, so no sparse time can be "
                "costed; drop the row or pick the profile of the GPU it ran on"
            )
        group = spec.sparse_patterns[0].m
        if frame["k"][row] % group:
            raise CalibrationError(
                f"{where(row)}: k={frame['k'][row]} cannot hold a {spec.sparse_patterns[0]} weight (k must be a "
                f"multiple of {group}); fix k or delete the row"
            )
    return frame


def apply_factors(profile: HardwareProfile, x: Sequence[float]) -> HardwareProfile:
    """``profile`` with other kernel factors.

    Args:
        profile: the profile whose peaks, bandwidth and GEMM shape are kept.
        x: the :data:`FACTORS` values in order (the sparse efficiency as a ratio of the dense one).

    Returns:
        A copy of ``profile`` with those factors.
    """
    dense, ratio, memory, launch, k_overhead, sparse_overhead, mask_ns, mask_us, rows_ratio, gather_ns = (
        float(v) for v in x
    )
    gemm = replace(
        profile.gemm,
        k_overhead=k_overhead,
        sparse_overhead_us=sparse_overhead,
        mask_ns_per_value=mask_ns,
        mask_overhead_us=mask_us,
        row_gather_ns_per_value=gather_ns,
    )
    rows = None if rows_ratio == 1.0 and profile.efficiency.compute_rows is None else min(1.0, dense * rows_ratio)
    return profile.with_efficiency(Efficiency(dense, dense * ratio, memory, rows), launch, gemm)


def factors_of(profile: HardwareProfile) -> np.ndarray:
    """The :data:`FACTORS` values of ``profile`` (clipped into the fit's bounds).

    Args:
        profile: a hardware profile.

    Returns:
        The factor vector, in :data:`FACTORS` order.
    """
    eff = profile.efficiency
    x = [
        eff.compute_dense,
        eff.compute_sparse / eff.compute_dense,
        eff.memory,
        profile.launch_overhead_us,
        profile.gemm.k_overhead,
        profile.gemm.sparse_overhead_us,
        profile.gemm.mask_ns_per_value,
        profile.gemm.mask_overhead_us,
        eff.rows / eff.compute_dense,
        profile.gemm.row_gather_ns_per_value,
    ]
    return np.clip(x, _LOWER, _UPPER)


def row_order_kernels(frame: pd.DataFrame) -> np.ndarray:
    """Which rows timed a sparse kernel that launches its thread blocks in plain row order.

    Args:
        frame: measurement rows with a ``library`` column.

    Returns:
        True where ``library`` starts with "CUTLASS" (any case): torch's and the CUTLASS profiler's
        sparse kernels use the identity threadblock swizzle; cuSPARSELt rasterises for cache reuse.
    """
    return frame["library"].astype(str).str.strip().str.lower().str.startswith("cutlass").to_numpy()


class _Predictor:
    """Dense and sparse latency of every row under shared factors; terms are computed once per row.

    Each row runs on its GPU's profile with ``gemm.sparse_row_order`` set from its library.
    """

    def __init__(self, frame: pd.DataFrame, profiles: Mapping[str, HardwareProfile]) -> None:
        self.groups = []
        frame = frame.assign(_row_order=row_order_kernels(frame))
        for (hardware, dtype, row_order), rows in frame.groupby(["hardware", "dtype", "_row_order"], sort=False):
            base = profiles[hardware]
            profile = replace(base, gemm=replace(base.gemm, sparse_row_order=bool(row_order)))
            spec = profile.dtype(dtype)
            option = Option(weight=spec.sparse_patterns[0])
            workloads = [Workload.linear(int(m), int(k), int(n)) for m, n, k in rows[["m", "n", "k"]].to_numpy()]
            options = [Option()] * len(rows) + [option] * len(rows)
            terms = gemm_terms(workloads * 2, options, spec, DTYPE_BYTES[dtype], profile)
            plans = np.repeat([PLANS.index("dense"), PLANS.index("sparse weights")], len(rows))
            self.groups.append((rows.index.to_numpy(), profile, spec, terms, plans))
        self.size = len(frame)

    def __call__(self, x: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        dense, sparse = np.empty(self.size), np.empty(self.size)
        for index, profile, spec, terms, plans in self.groups:
            latency = roofline(terms, apply_factors(profile, x), spec, plans).latency_s * 1e3
            dense[index], sparse[index] = latency[: len(index)], latency[len(index) :]
        return dense, sparse


def fit_factors(
    predict: Callable[[np.ndarray], np.ndarray],
    measured_ms: np.ndarray,
    start: np.ndarray,
    *,
    fixed: Mapping[str, float] | None = None,
    label: str = "measurements",
) -> tuple[np.ndarray, float]:
    """Least squares on log latency over the :data:`FACTORS` not in ``fixed``.

    Args:
        predict: maps a full factor vector to predicted latencies (ms), aligned with ``measured_ms``.
        measured_ms: the measured latencies.
        start: the starting factor vector (all of :data:`FACTORS`).
        fixed: factors held at a given value instead of fitted.
        label: names the data in errors.

    Returns:
        The fitted factor vector and the RMSE of the log residuals.

    Raises:
        CalibrationError: fewer measurements than fitted parameters.
    """
    fixed = dict(fixed or {})
    unknown = [name for name in fixed if name not in FACTORS]
    if unknown:
        raise CalibrationError(f"unknown factor {unknown[0]!r}; factors: {', '.join(FACTORS)}")
    free = np.array([name not in fixed for name in FACTORS])
    base = np.array([fixed.get(name, value) for name, value in zip(FACTORS, start, strict=True)], dtype=float)
    if len(measured_ms) < free.sum():
        raise CalibrationError(
            f"{label}: {len(measured_ms)} measured values cannot fit {free.sum()} parameters; "
            f"add measurements or fix some of {', '.join(np.array(FACTORS)[free])}"
        )
    target = np.log(measured_ms)

    def full(values: np.ndarray) -> np.ndarray:
        x = base.copy()
        x[free] = values
        return x

    def residuals(values: np.ndarray) -> np.ndarray:
        return np.log(predict(full(values))) - target

    fit = least_squares(residuals, np.clip(base[free], _LOWER[free], _UPPER[free]), bounds=(_LOWER[free], _UPPER[free]))
    return full(fit.x), float(np.sqrt(np.mean(fit.fun**2)))


def speedup_scores(measured: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """How well predicted speedups match measured ones.

    Args:
        measured: measured speedups.
        predicted: predicted speedups, aligned with ``measured``.

    Returns:
        (Kendall tau, median relative error ``|predicted / measured - 1|``).
    """
    tau = float(kendalltau(predicted, measured).statistic) if len(measured) > 1 else math.nan
    return tau, float(np.median(np.abs(predicted / measured - 1)))


@dataclass(frozen=True)
class CalibrationResult:
    """The fitted factors, their in-sample and leave-one-source-out quality, every row's predictions."""

    factors: dict[str, float]
    rmse_log: float
    kendall_tau: float
    median_rel_error: float
    loso_kendall_tau: float
    loso_median_rel_error: float
    initial_kendall_tau: float
    initial_median_rel_error: float
    predictions: pd.DataFrame

    def profile(self, profile: str | Path | HardwareProfile) -> HardwareProfile:
        """``profile`` with the fitted factors (its peaks, bandwidth and GEMM shape kept)."""
        base = profile if isinstance(profile, HardwareProfile) else load_profile(profile)
        fitted = apply_factors(base, [self.factors[name] for name in FACTORS])
        points = int(self.predictions["used"].sum())
        return replace(fitted, source=f"{base.source}; kernel factors fitted to {points} measured GEMMs", origin="")

    def summary(self) -> str:
        factors = ", ".join(f"{k}={v:.4g}" for k, v in self.factors.items())
        used = self.predictions[self.predictions["used"]]
        sources = _fold(used).nunique()
        return (
            f"{len(used)} of {len(self.predictions)} points used, {sources} sources; fitted {factors}; "
            f"RMSE(log dense latency, log speedup) "
            f"{self.rmse_log:.3f}\nspeedup, shipped profiles: Kendall tau {self.initial_kendall_tau:.3f}, "
            f"median relative error {self.initial_median_rel_error:.1%}\n"
            f"speedup, fitted (in sample): Kendall tau {self.kendall_tau:.3f}, "
            f"median relative error {self.median_rel_error:.1%}\n"
            f"speedup, leave-one-source-out: Kendall tau {self.loso_kendall_tau:.3f}, "
            f"median relative error {self.loso_median_rel_error:.1%}"
        )


def predict_ms(
    measurements: str | Path | pd.DataFrame, profiles: Mapping[str, HardwareProfile] | None = None
) -> pd.DataFrame:
    """Dense and sparse latency each row's own profile predicts.

    Args:
        measurements: a CSV path or frame with :data:`MEASUREMENT_COLUMNS`.
        profiles: profiles by name overriding the shipped ones.

    Returns:
        The validated rows with ``predicted_dense_ms`` and ``predicted_sparse_ms``.

    Raises:
        CalibrationError: bad measurements (see :func:`read_measurements`).
    """
    frame = read_measurements(measurements)
    loaded = {name: (profiles or {}).get(name) or load_profile(name) for name in frame["hardware"].unique()}
    dense, sparse = _predict_each(frame, loaded)
    return frame.assign(predicted_dense_ms=dense, predicted_sparse_ms=sparse)


def _predict_each(frame: pd.DataFrame, profiles: Mapping[str, HardwareProfile]) -> tuple[np.ndarray, np.ndarray]:
    """Each row on its own profile's factors (not shared)."""
    dense, sparse = np.empty(len(frame)), np.empty(len(frame))
    for name, rows in frame.groupby("hardware", sort=False):
        d, s = _Predictor(rows.reset_index(drop=True), profiles)(factors_of(profiles[name]))
        dense[rows.index], sparse[rows.index] = d, s
    return dense, sparse


def calibrate(
    measurements: str | Path | pd.DataFrame = PUBLISHED_CSV,
    *,
    start: str | Path | HardwareProfile = "a100",
    fixed: Mapping[str, float] | None = None,
    include_untuned: bool = False,
) -> CalibrationResult:
    """Fit the shared :data:`FACTORS` to ``measurements`` and cross-validate leaving one source out.

    Args:
        measurements: a CSV path or frame with :data:`MEASUREMENT_COLUMNS`.
        start: the profile whose factors start the fit.
        fixed: factors held fixed (name -> value).
        include_untuned: also fit and score the rows marked ``kernel=untuned``.

    Returns:
        The fit, its in-sample and held-out speedup quality, and per-row predictions (every row;
        ``used`` says which entered the fit and the scores).

    Raises:
        CalibrationError: bad measurements, fewer points than parameters, or a single source.
    """
    label = _label(measurements)
    every = read_measurements(measurements)
    used = (every["kernel"] == "tuned").to_numpy() | include_untuned
    frame = every[used].reset_index(drop=True)
    if frame.empty:
        raise CalibrationError(f"{label}: every row is marked kernel=untuned; pass include_untuned (--all)")
    profiles = {name: load_profile(name) for name in every["hardware"].unique()}
    initial = start if isinstance(start, HardwareProfile) else load_profile(start)
    x0 = factors_of(initial)
    measured_speedup = (frame["dense_ms"] / frame["sparse_ms"]).to_numpy()

    def fit_on(rows: np.ndarray) -> tuple[np.ndarray, float]:
        subset = frame[rows].reset_index(drop=True)
        predictor = _Predictor(subset, profiles)
        dense = subset["dense_ms"].to_numpy()
        target = np.concatenate([dense, dense / subset["sparse_ms"].to_numpy()])

        def predict(x: np.ndarray) -> np.ndarray:
            d, s = predictor(x)
            return np.concatenate([d, d / s])

        return fit_factors(predict, target, x0, fixed=fixed, label=label)

    folds = _fold(frame)
    sources = folds.unique()
    if len(sources) < 2:
        raise CalibrationError(f"{label}: leave-one-source-out needs at least 2 sources, got {len(sources)}")
    everything = np.ones(len(frame), dtype=bool)
    x, rmse = fit_on(everything)
    predictor = _Predictor(frame, profiles)
    dense, sparse = predictor(x)
    held_out = np.empty(len(frame))
    for source in sources:
        out = (folds == source).to_numpy()
        x_without, _ = fit_on(~out)
        d, s = predictor(x_without)
        held_out[out] = (d / s)[out]
    initial_dense, initial_sparse = _predict_each(every, profiles)
    all_dense, all_sparse = _Predictor(every, profiles)(x)
    loso = np.full(len(every), np.nan)
    loso[used] = held_out
    predictions = every.assign(
        used=used,
        measured_speedup=(every["dense_ms"] / every["sparse_ms"]).to_numpy(),
        predicted_dense_ms=all_dense,
        predicted_sparse_ms=all_sparse,
        predicted_speedup=all_dense / all_sparse,
        loso_speedup=loso,
        initial_speedup=initial_dense / initial_sparse,
    )
    initial_speedup = (initial_dense / initial_sparse)[used]
    tau, err = speedup_scores(measured_speedup, dense / sparse)
    loso_tau, loso_err = speedup_scores(measured_speedup, held_out)
    init_tau, init_err = speedup_scores(measured_speedup, initial_speedup)
    return CalibrationResult(
        factors=dict(zip(FACTORS, (float(v) for v in x), strict=True)),
        rmse_log=rmse,
        kendall_tau=tau,
        median_rel_error=err,
        loso_kendall_tau=loso_tau,
        loso_median_rel_error=loso_err,
        initial_kendall_tau=init_tau,
        initial_median_rel_error=init_err,
        predictions=predictions,
    )


def _used(predictions: pd.DataFrame, column: str) -> pd.DataFrame:
    missing = [c for c in ("used", "source", "hardware", "measured_speedup", column) if c not in predictions.columns]
    if missing:
        raise CalibrationError(f"predictions lack column {missing[0]!r}; pass CalibrationResult.predictions")
    return predictions[predictions["used"].astype(bool)].reset_index(drop=True)


def pair_accounting(predictions: pd.DataFrame, column: str = "loso_speedup") -> pd.DataFrame:
    """Where the pooled Kendall tau of the speedups is won and lost: every pair of scored points by class.

    Args:
        predictions: :attr:`CalibrationResult.predictions` (only the ``used`` rows are scored).
        column: the predicted speedup compared with the measured one (``loso_speedup`` held out,
            ``predicted_speedup`` in sample).

    Returns:
        One row per :data:`PAIR_CLASSES` entry and a ``total``: ``pairs``, ``concordant``,
        ``discordant``, ``tied`` (equal on either side) and ``agreement`` = (concordant - discordant)
        / (concordant + discordant), NaN without untied pairs.

    Raises:
        CalibrationError: ``predictions`` lacks a needed column.
    """
    rows = _used(predictions, column)
    i, j = np.triu_indices(len(rows), k=1)
    measured, predicted = rows["measured_speedup"].to_numpy(), rows[column].to_numpy()
    sign = np.sign(measured[i] - measured[j]) * np.sign(predicted[i] - predicted[j])
    source, hardware = _fold(rows).to_numpy(), rows["hardware"].to_numpy()
    same_source = source[i] == source[j]
    same_hardware = hardware[i] == hardware[j]
    masks = {
        PAIR_CLASSES[0]: same_source,
        PAIR_CLASSES[1]: same_hardware & ~same_source,
        PAIR_CLASSES[2]: ~same_hardware,
        "total": np.ones_like(same_source),
    }
    table = []
    for mask in masks.values():
        concordant, discordant = int((sign[mask] > 0).sum()), int((sign[mask] < 0).sum())
        untied = concordant + discordant
        table.append(
            {
                "pairs": int(mask.sum()),
                "concordant": concordant,
                "discordant": discordant,
                "tied": int(mask.sum()) - untied,
                "agreement": (concordant - discordant) / untied if untied else math.nan,
            }
        )
    return pd.DataFrame(table, index=pd.Index(list(masks), name="pairs of points"))


def source_summary(predictions: pd.DataFrame) -> pd.DataFrame:
    """Each source's scored points, held-out error and ranking.

    Args:
        predictions: :attr:`CalibrationResult.predictions`.

    Returns:
        One row per source and GPU (in file order): ``hardware``, ``points``, the measured speedup range,
        ``loso_median_rel_error`` and ``loso_kendall_tau`` within the source (NaN below 2 points).

    Raises:
        CalibrationError: ``predictions`` lacks a needed column.
    """
    rows = _used(predictions, "loso_speedup")
    table = []
    for (source, hardware), group in rows.groupby(["source", "hardware"], sort=False):
        measured, held_out = group["measured_speedup"].to_numpy(), group["loso_speedup"].to_numpy()
        tau, error = speedup_scores(measured, held_out)
        table.append(
            {
                "source": source,
                "hardware": hardware,
                "points": len(group),
                "measured_min": float(measured.min()),
                "measured_max": float(measured.max()),
                "loso_median_rel_error": error,
                "loso_kendall_tau": tau,
            }
        )
    return pd.DataFrame(table)


def repeat_agreement(measurements: pd.DataFrame, min_shapes: int = 3) -> pd.DataFrame:
    """How well two measurement series of the same shapes rank each other: a ceiling for any model.

    A series is one (source, library) on one GPU and dtype; two series that both time at least
    ``min_shapes`` identical (m, n, k) are compared by the Kendall tau of their measured speedups.
    A cost model that sees only the shape predicts one speedup per shape, so it cannot rank both
    series better than they rank each other.

    Args:
        measurements: rows with :data:`MEASUREMENT_COLUMNS` (e.g. :attr:`CalibrationResult.predictions`;
            rows with ``used`` false are skipped when the column is there).
        min_shapes: the fewest shared shapes for a comparison.

    Returns:
        One row per compared pair of series: ``hardware``, ``dtype``, ``series_a``, ``series_b``
        ("source | library"), ``shapes`` and ``kendall_tau``; empty when no series share enough shapes.
    """
    rows = measurements[measurements["used"].astype(bool)] if "used" in measurements.columns else measurements
    rows = rows.assign(series=rows["source"] + " | " + rows["library"], speedup=rows["dense_ms"] / rows["sparse_ms"])
    table = []
    for (hardware, dtype), group in rows.groupby(["hardware", "dtype"], sort=False):
        by_series = {
            name: series.groupby(["m", "n", "k"])["speedup"].mean()
            for name, series in group.groupby("series", sort=False)
        }
        names = list(by_series)
        for a, b in ((a, b) for index, a in enumerate(names) for b in names[index + 1 :]):
            shared = by_series[a].index.intersection(by_series[b].index)
            if len(shared) >= min_shapes:
                tau = float(kendalltau(by_series[a][shared], by_series[b][shared]).statistic)
                table.append(
                    {
                        "hardware": hardware,
                        "dtype": dtype,
                        "series_a": a,
                        "series_b": b,
                        "shapes": len(shared),
                        "kendall_tau": tau,
                    }
                )
    columns = ["hardware", "dtype", "series_a", "series_b", "shapes", "kendall_tau"]
    return pd.DataFrame(table, columns=columns)


def update_profile_text(text: str, factors: Mapping[str, float], label: str = "profile") -> str:
    """A profile YAML's text with its kernel factors replaced in place (comments and layout kept).

    Args:
        text: the YAML text of a profile (a GPU's, or a CPU's fitted by ``benchmarks/cost_vs_measured.py``).
        factors: the :data:`FACTORS` values (as :attr:`CalibrationResult.factors`).
        label: names the file in errors.

    Returns:
        The new text: ``compute_dense``, ``compute_sparse`` (dense x ratio), ``memory``,
        ``launch_overhead_us``, ``k_overhead``, ``sparse_overhead_us`` and, where the file has them,
        the optional ``mask_ns_per_value``, ``mask_overhead_us``, ``compute_rows`` and
        ``row_gather_ns_per_value``.

    Raises:
        CalibrationError: a factor's key is missing or appears more than once.
    """
    values = {
        "compute_dense": round(factors["compute_dense"], 4),
        "compute_sparse": round(factors["compute_dense"] * factors["compute_sparse_ratio"], 4),
        "memory": round(factors["memory"], 4),
        "launch_overhead_us": round(factors["launch_overhead_us"], 3),
        "k_overhead": round(factors["k_overhead"], 1),
        "sparse_overhead_us": round(factors["sparse_overhead_us"], 2),
        "mask_ns_per_value": round(factors["mask_ns_per_value"], 3),
        "mask_overhead_us": round(factors["mask_overhead_us"], 3),
        "compute_rows": round(min(1.0, factors["compute_dense"] * factors["compute_rows_ratio"]), 4),
        "row_gather_ns_per_value": round(factors["row_gather_ns_per_value"], 3),
    }
    optional = ("mask_ns_per_value", "mask_overhead_us", "compute_rows", "row_gather_ns_per_value")
    for key, value in values.items():
        pattern = rf"(?<![\w.])({key}:\s*)[-+0-9.eE]+"
        text, count = re.subn(pattern, lambda match, v=value: f"{match.group(1)}{v:g}", text)
        if count != 1 and not (key in optional and count == 0):
            raise CalibrationError(
                f"{label}: expected one '{key}:' entry to update, found {count}; is it a hardware profile YAML?"
            )
    return text


def update_profiles(paths: Sequence[str | Path], factors: Mapping[str, float]) -> None:
    """Rewrite the kernel factors of every profile file (:func:`update_profile_text`), each atomically,
    only once all of them are known to load afterwards.

    Args:
        paths: profile YAML files.
        factors: the :data:`FACTORS` values.

    Raises:
        CalibrationError: a missing file, a factor's key missing from one, or a result that does not load.
    """
    texts = {}
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise CalibrationError(f"--update {name}: no such file; pass profile YAML paths (conf/hardware/a100.yaml)")
        text = update_profile_text(path.read_text(), factors, label=name)
        with tempfile.TemporaryDirectory() as folder:
            check = Path(folder) / path.name
            check.write_text(text)
            try:
                load_profile(check)
            except HardwareProfileError as error:
                raise CalibrationError(f"--update {name}: the updated profile does not load ({error})") from None
        texts[path] = text
    for path, text in texts.items():
        atomic_write_text(path, text)


def _parse_fixed(items: Sequence[str]) -> dict[str, float]:
    if list(items) == ["none"]:
        return {}
    fixed = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            fixed[name] = float(value)
        except ValueError:
            raise CalibrationError(
                f"--fix {item!r}: expected NAME=NUMBER with NAME one of {', '.join(FACTORS)}"
            ) from None
        if name not in FACTORS:
            raise CalibrationError(f"--fix {item!r}: unknown factor {name!r}; factors: {', '.join(FACTORS)}")
    return fixed


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: fit, print the quality, optionally write one profile with the fitted factors."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="?", default=str(PUBLISHED_CSV), help="measurements (default: the shipped points)")
    parser.add_argument("--profile", help="profile to write with the fitted factors (name or YAML path)")
    parser.add_argument("--out", help="YAML file to write that profile to (written only if the fit succeeds)")
    parser.add_argument("--start", default="a100", help="profile whose factors start the fit (default a100)")
    parser.add_argument(
        "--fix",
        action="append",
        default=None,
        metavar="NAME=VALUE",
        help="hold a factor fixed (repeatable; default: " + " ".join(DEFAULT_FIXED) + ", "
        "which back-to-back GEMM timings cannot identify); --fix none fits all",
    )
    parser.add_argument("--all", action="store_true", help="also fit and score the rows marked kernel=untuned")
    parser.add_argument(
        "--update",
        nargs="+",
        metavar="YAML",
        help="profile files to rewrite in place with the fitted factors (comments kept, atomic, all or none)",
    )
    parser.add_argument(
        "--table",
        action="store_true",
        help="also print every point's measured and predicted speedup, the per-source scores, the pooled "
        "tau's pairs by class and the agreement of repeated measurements",
    )
    args = parser.parse_args(argv)
    if bool(args.profile) != bool(args.out):
        print("error: --profile and --out go together (which profile to write, and where)", file=sys.stderr)
        return 2
    try:
        fixed = _parse_fixed(args.fix if args.fix is not None else list(DEFAULT_FIXED))
        target = load_profile(args.profile) if args.profile else None
        result = calibrate(args.csv, start=args.start, fixed=fixed, include_untuned=args.all)
    except NMSearchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result.summary())
    if args.table:
        columns = ["hardware", "dtype", "m", "n", "k", "kernel", "measured_speedup", "predicted_speedup"]
        columns += ["loso_speedup", "initial_speedup"]
        print(result.predictions[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print("\nper source (held out):")
        print(source_summary(result.predictions).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print("\npairs of points, measured vs held-out speedup:")
        print(pair_accounting(result.predictions).to_string(float_format=lambda v: f"{v:.3f}"))
        repeats = repeat_agreement(result.predictions)
        if not repeats.empty:
            print("\nrepeat measurements of the same shapes (a ceiling for a shape-only model):")
            print(repeats.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    try:
        if target is not None:
            result.profile(target).save(args.out)
            print(f"wrote {args.out}")
        if args.update:
            update_profiles(args.update, result.factors)
            print(f"updated {', '.join(args.update)}")
    except NMSearchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
