"""Fit a profile's efficiency factors to measured layer latencies, and check the model on held-out shapes.

The measurements come from ``benchmarks/gpu_latency.py`` (or any CSV with :data:`LATENCY_COLUMNS`):
one row per linear layer ``Y = X W^T`` (no bias) and option, with its measured latency. The fit
is least squares on log latency over the efficiency factors (dense compute, sparse compute as a
fraction of dense, memory) and the launch overhead; each row is predicted with the plan its kernel
ran (``w2:4`` = the weights on the sparse tensor cores), not the fastest plan. Whole shapes are
held out, and the fitted model is scored there by Kendall tau (predicted vs measured latency) and
decision accuracy (does it call "sparse is faster than dense" right for each shape).

    python -m evaluators.calibration latency.csv --profile h100_sxm --out h100_sxm_calibrated.yaml
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import least_squares
from scipy.stats import kendalltau

from evaluators.cost import PLANS, Workload, gemm_terms, roofline
from evaluators.hardware import DTYPE_BYTES, Efficiency, HardwareProfile, load_profile
from search_space import NMSearchError, Option

LATENCY_COLUMNS = ("device", "dtype", "tokens", "in_features", "out_features", "option", "latency_ms")
REQUIRED_COLUMNS = ("dtype", "tokens", "in_features", "out_features", "option", "latency_ms")  # device: a label
SHAPE_COLUMNS = ("dtype", "tokens", "in_features", "out_features")
FACTORS = ("compute_dense", "compute_sparse", "memory", "launch_overhead_us")
_LOWER = np.array([1e-3, 1e-3, 1e-3, 0.0])
_UPPER = np.array([1.0, 1.0, 1.0, 1e3])


class CalibrationError(NMSearchError):
    """A latency CSV that cannot be used for calibration."""


def _label(source: str | Path | pd.DataFrame) -> str:
    return "latency table" if isinstance(source, pd.DataFrame) else f"latency CSV {str(source)!r}"


def read_latencies(source: str | Path | pd.DataFrame) -> pd.DataFrame:
    """The measured rows, checked: required columns, positive sizes and latencies, known options."""
    label = _label(source)
    frame = source.copy() if isinstance(source, pd.DataFrame) else pd.read_csv(source)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise CalibrationError(f"{label}: missing column {missing[0]!r}; expected: {', '.join(REQUIRED_COLUMNS)}")
    if frame.empty:
        raise CalibrationError(f"{label}: no rows")
    for column in ("tokens", "in_features", "out_features", "latency_ms"):
        values = pd.to_numeric(frame[column], errors="coerce")
        if not (values > 0).all():
            row = int(np.flatnonzero(~(values > 0))[0])
            raise CalibrationError(
                f"{label}: row {row}: {column} must be a positive number, got {frame[column][row]!r}"
            )
    for row, (dtype, option) in enumerate(zip(frame["dtype"], frame["option"], strict=True)):
        if dtype not in DTYPE_BYTES:
            raise CalibrationError(
                f"{label}: row {row}: unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_BYTES)}"
            )
        try:
            parsed = Option.parse(option)
        except NMSearchError as error:
            raise CalibrationError(f"{label}: row {row}: {error}") from None
        if parsed.weight and parsed.activation:
            raise CalibrationError(
                f"{label}: row {row}: option {option!r} makes both operands sparse; a measured kernel accelerates one"
            )
    return frame.reset_index(drop=True)


def _plan(option: Option) -> int:
    if option.weight:
        return PLANS.index("sparse weights")
    return PLANS.index("sparse activations") if option.activation else PLANS.index("dense")


def _with_factors(profile: HardwareProfile, x: np.ndarray) -> HardwareProfile:
    """``x`` = (dense compute, sparse / dense compute, memory, launch µs): the ratio keeps sparse <= dense."""
    dense, ratio, memory, launch = (float(v) for v in x)
    return profile.with_efficiency(Efficiency(dense, dense * ratio, memory), launch)


class _Predictor:
    """Terms of every row computed once; latencies for any efficiency factors are then vectorised."""

    def __init__(self, profile: HardwareProfile, frame: pd.DataFrame, label: str) -> None:
        self.groups = []
        for dtype, rows in frame.groupby("dtype", sort=False):
            spec = profile.dtype(dtype)
            options = [Option.parse(o) for o in rows["option"]]
            workloads = [
                Workload.linear(int(t), int(k), int(n))
                for t, k, n in zip(rows["tokens"], rows["in_features"], rows["out_features"], strict=True)
            ]
            terms = gemm_terms(workloads, options, spec, DTYPE_BYTES[dtype])
            plans = np.array([_plan(o) for o in options])
            unsupported = terms.speedup[np.arange(len(plans)), plans] <= 1
            unsupported[plans == 0] = False
            if unsupported.any():
                row = rows.index[np.flatnonzero(unsupported)[0]]
                raise CalibrationError(
                    f"{label}: row {row}: option {frame['option'][row]!r} does not run on {profile.name}'s "
                    f"{dtype} sparse tensor cores, so the measured kernel cannot have accelerated it"
                )
            self.groups.append((rows.index.to_numpy(), terms, spec, plans))
        self.size = len(frame)

    def latency_ms(self, profile: HardwareProfile) -> np.ndarray:
        out = np.empty(self.size)
        for index, terms, spec, plans in self.groups:
            out[index] = roofline(terms, profile, spec, plans).latency_s * 1e3
        return out


def predict_latency_ms(profile: str | Path | HardwareProfile, latencies: str | Path | pd.DataFrame) -> np.ndarray:
    """The latency ``profile`` predicts for each measured row, with the plan its kernel ran."""
    profile = profile if isinstance(profile, HardwareProfile) else load_profile(profile)
    return _Predictor(profile, read_latencies(latencies), _label(latencies)).latency_ms(profile)


def decision_accuracy(frame: pd.DataFrame, predicted: np.ndarray) -> float:
    """Fraction of (shape, sparse option) pairs where "sparse is faster than dense" is predicted right."""
    data = (
        frame.assign(predicted=predicted)
        .groupby([*SHAPE_COLUMNS, "option"], as_index=False)[["latency_ms", "predicted"]]
        .mean()
    )
    dense = data[data["option"] == "dense"].drop(columns="option")
    pairs = data[data["option"] != "dense"].merge(dense, on=list(SHAPE_COLUMNS), suffixes=("", "_dense"))
    if pairs.empty:
        return float("nan")
    measured = pairs["latency_ms"] < pairs["latency_ms_dense"]
    return float((measured == (pairs["predicted"] < pairs["predicted_dense"])).mean())


@dataclass(frozen=True)
class CalibrationResult:
    """The fitted profile, its held-out quality, and every row's prediction before and after."""

    profile: HardwareProfile
    initial: HardwareProfile
    rmse_log_train: float
    kendall_tau: float
    decision_accuracy: float
    kendall_tau_initial: float
    decision_accuracy_initial: float
    predictions: pd.DataFrame

    @property
    def factors(self) -> dict[str, float]:
        return {
            "compute_dense": self.profile.efficiency.compute_dense,
            "compute_sparse": self.profile.efficiency.compute_sparse,
            "memory": self.profile.efficiency.memory,
            "launch_overhead_us": self.profile.launch_overhead_us,
        }

    def summary(self) -> str:
        held_out = int((self.predictions["split"] == "test").sum())
        factors = ", ".join(f"{k}={v:.3g}" for k, v in self.factors.items())
        return (
            f"{self.profile.name}: {factors}; train RMSE(log latency) {self.rmse_log_train:.3f}; "
            f"held-out ({held_out} rows) Kendall tau {self.kendall_tau_initial:.3f} -> {self.kendall_tau:.3f}, "
            f"decision accuracy {self.decision_accuracy_initial:.3f} -> {self.decision_accuracy:.3f}"
        )


def calibrate(
    profile: str | Path | HardwareProfile,
    latencies: str | Path | pd.DataFrame,
    *,
    holdout: float = 0.25,
    seed: int = 0,
) -> CalibrationResult:
    """Fit ``profile``'s efficiency factors and launch overhead to ``latencies`` (a CSV path or frame).

    A ``holdout`` fraction of the distinct shapes (dtype, tokens, in, out) is kept out of the fit.
    """
    initial = profile if isinstance(profile, HardwareProfile) else load_profile(profile)
    frame = read_latencies(latencies)
    if not 0 < holdout < 1:
        raise CalibrationError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    shapes = frame[list(SHAPE_COLUMNS)].drop_duplicates()
    if len(shapes) < 2:
        raise CalibrationError("calibration needs at least 2 distinct shapes (one to fit, one to hold out)")
    order = np.random.default_rng(seed).permutation(len(shapes))
    test_shapes = shapes.iloc[order[: max(1, round(holdout * len(shapes)))]]
    is_test = frame.merge(test_shapes, how="left", indicator=True)["_merge"].eq("both").to_numpy()
    train, test = frame[~is_test], frame[is_test]

    predictor = _Predictor(initial, frame, _label(latencies))
    measured_log = np.log(train["latency_ms"].to_numpy(dtype=float))
    eff = initial.efficiency
    start = np.clip(
        [eff.compute_dense, eff.compute_sparse / eff.compute_dense, eff.memory, initial.launch_overhead_us],
        _LOWER,
        _UPPER,
    )

    def residuals(x: np.ndarray) -> np.ndarray:
        return np.log(predictor.latency_ms(_with_factors(initial, x))[~is_test]) - measured_log

    fit = least_squares(residuals, start, bounds=(_LOWER, _UPPER), x_scale="jac")
    fitted = replace(
        _with_factors(initial, fit.x),
        source=f"{initial.source}; efficiency and launch overhead fitted to {len(train)} measured latencies",
        origin="",
    )
    before, after = predictor.latency_ms(initial), predictor.latency_ms(fitted)
    predictions = frame.assign(
        split=np.where(is_test, "test", "train"), predicted_initial_ms=before, predicted_ms=after
    )

    def tau(predicted: np.ndarray) -> float:
        return float(kendalltau(predicted[is_test], test["latency_ms"]).statistic)

    return CalibrationResult(
        profile=fitted,
        initial=initial,
        rmse_log_train=float(np.sqrt(np.mean(fit.fun**2))),
        kendall_tau=tau(after),
        decision_accuracy=decision_accuracy(test, after[is_test]),
        kendall_tau_initial=tau(before),
        decision_accuracy_initial=decision_accuracy(test, before[is_test]),
        predictions=predictions,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", help="latencies written by benchmarks/gpu_latency.py")
    parser.add_argument("--profile", required=True, help="profile name (e.g. h100_sxm) or YAML path to start from")
    parser.add_argument("--out", help="write the calibrated profile to this YAML file")
    parser.add_argument("--holdout", type=float, default=0.25, help="fraction of shapes held out (default 0.25)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        result = calibrate(args.profile, args.csv, holdout=args.holdout, seed=args.seed)
    except NMSearchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result.summary())
    if args.out:
        result.profile.save(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
