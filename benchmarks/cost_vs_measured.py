"""Predicted vs measured speedups on this CPU: the cost model against what nmsearch deploys here.

    python benchmarks/cost_vs_measured.py [--rounds 25] [--csv docs/results/cost_vs_measured_cpu.csv]
                                          [--fit] [--update conf/hardware/cpu_x86_avx2.yaml]
                                          [--measured earlier.csv] [--repeat-of earlier.csv]

Every layer (Linear and 3x3 Conv2d, batch 1 and 64, fp32) is deployed as nmsearch deploys it on a
CPU and timed: the dense layer; ``w2:4`` and ``w1:8`` as finalized weights (zeros baked into a plain
dense module, ``Scheme.finalize``: the only way N:M weights run here); ``a2:4`` as the dynamic
activation mask (the sparse wrapper computing the N:M mask of every input); ``r0.2`` / ``r0.3`` on
convs as the row-skipping kernel (``skip_masked_rows``). Conv inputs are NCHW (a network's default
layout; the row-skipping kernel converts them to channels-last on every call), or channels-last
with ``--channels-last``. Each round runs every option of a layer
back to back (a few calls each, after a warm-up). The cost model
(:class:`~evaluators.cost.HardwareCostModel`, ``--profile``, fp32, the layer's batch) predicts
each option's latency; the table shows predicted and measured latency and speedup over dense.

Measured latencies are the fastest round (every slower one carries other jobs' time; ``spread`` is
the median over the fastest) and speedups are ratios of those. One torch thread by default: on a
shared machine a multi-threaded kernel stalls whenever one of its threads is preempted (a 3x3
conv went from 0.8 ms to 76-156 ms at 2 threads under load 15).

``--fit`` fits the profile's CPU factors (dense compute efficiency, per-call overhead, per-tile K
overhead, the dynamic mask's selection time per value and fixed cost per call, the row-skipping
kernel's GEMM efficiency and gather time per value; memory efficiency stays 1: the profile's
bandwidth is the measured copy bandwidth) to the measured latencies with
:func:`evaluators.calibration.fit_factors` and prints the table again;
``--update`` also rewrites those numbers in the profile YAML (comments kept, atomic write). The fit
weighs log latency and log speedup (the ratio a search compares; a mask pass's fixed cost is small
in a layer's latency but not in its speedup). ``--measured`` refits an earlier run's ``--csv``
without timing again; ``--repeat-of`` reports how well this run's speedups agree with an earlier
run's (Kendall tau): no model can rank this machine's timings better than they rank each other.

Targets (benchmark, not test): every speedup within 25% of measured, Kendall tau >= 0.8 over all
points, and no option that runs dense predicted faster than dense by more than its real saving.
The machine is shared: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from evaluators.calibration import (
    FACTORS,
    CalibrationError,
    apply_factors,
    factors_of,
    fit_factors,
    speedup_scores,
    update_profiles,
)
from evaluators.cost import HardwareCostModel
from evaluators.hardware import HardwareProfile, load_profile
from search_space import SearchSpace, skip_masked_rows
from search_space.io import atomic_write_text

TARGETS = ("weights", "activations", "rows")
WEIGHT_OPTIONS = ("w2:4", "w1:8")
CPU_FITTED = (
    "compute_dense",
    "launch_overhead_us",
    "k_overhead",
    "mask_ns_per_value",
    "mask_overhead_us",
    "compute_rows_ratio",
    "row_gather_ns_per_value",
)


@dataclass(frozen=True)
class LayerCase:
    label: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # without the batch dimension
    rows: bool  # a conv: row masks apply


CASES = (
    LayerCase("linear 1024->1024", lambda: nn.Linear(1024, 1024, bias=False), (1024,), False),
    LayerCase("linear 4096->4096", lambda: nn.Linear(4096, 4096, bias=False), (4096,), False),
    LayerCase("conv 64ch 32x32", lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False), (64, 32, 32), True),
    LayerCase("conv 256ch 8x8", lambda: nn.Conv2d(256, 256, 3, padding=1, bias=False), (256, 8, 8), True),
)
BATCHES = (1, 64)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"load average {os.getloadavg()}"


def deployed(model: nn.Module, space: SearchSpace, option: str) -> nn.Module:
    """``model`` with ``option`` on its layer, as it runs on this CPU (see the module docstring)."""
    if option == "dense":
        return model
    scheme = space.scheme({"0": option})
    sparse = scheme.finalize(scheme.apply(model))
    if scheme.has_rows:
        sparse = skip_masked_rows(sparse, inplace=True, path="rows")
    return sparse.eval()


def time_case(case: LayerCase, batch: int, rounds: int, channels_last: bool = False) -> list[dict]:
    torch.manual_seed(0)
    model = nn.Sequential(case.build()).eval()
    x = torch.randn(batch, *case.input_shape)
    space = SearchSpace.from_model(model, x, targets=TARGETS)
    if channels_last and case.rows:
        # The layout inside a network after a row-skipping conv (it writes channels-last): no
        # conversion per call, and oneDNN's dense conv on that layout.
        x = x.contiguous(memory_format=torch.channels_last)
    options = ["dense", *WEIGHT_OPTIONS, "a2:4", *(("r0.2", "r0.3") if case.rows else ())]
    modules = {option: deployed(copy.deepcopy(model), space, option) for option in options}
    with torch.no_grad():
        reference = modules["dense"](x)
        for option in WEIGHT_OPTIONS:  # same kernel, zeros baked in: outputs must differ from dense only by them
            assert modules[option](x).shape == reference.shape
        calls = {}
        for option, module in modules.items():
            # Warm up first: a first call (a kernel library loading, a lazy build) is not the
            # layer's time, and sizing the rounds from it would time that option one cold call at a time.
            for _ in range(3):
                module(x)
            start = time.perf_counter()
            for _ in range(3):
                module(x)
            calls[option] = max(1, int(0.004 / max((time.perf_counter() - start) / 3, 1e-6)))
        samples: dict[str, list[float]] = {option: [] for option in options}
        for _ in range(rounds):
            for option, module in modules.items():
                start = time.perf_counter()
                for _ in range(calls[option]):
                    module(x)
                samples[option].append((time.perf_counter() - start) / calls[option])
    dense = np.array(samples["dense"])
    return [
        {
            "layer": case.label,
            "kind": "conv" if case.rows else "linear",
            "batch": batch,
            "option": option,
            # The fastest round: on a shared machine every slower one carries other jobs' time.
            "measured_ms": min(samples[option]) * 1e3,
            "measured_speedup": float(dense.min() / min(samples[option])),
            "spread": float(np.median(samples[option]) / min(samples[option])),
            "space": space,
        }
        for option in options
    ]


def predict(rows: list[dict], profile: HardwareProfile) -> np.ndarray:
    """The model's latency (ms) of every measured row under ``profile``."""
    out = []
    for row in rows:
        model = HardwareCostModel(profile, "fp32", row["batch"])
        space = row["space"]
        out.append(model.evaluate(space, space.scheme({"0": row["option"]})).totals["latency_ms"])
    return np.array(out)


def read_measured(path: Path) -> list[dict]:
    """The measured rows of an earlier run's ``--csv`` (refit without timing again); exits in one line if unusable."""
    cases = {case.label: case for case in CASES}
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise SystemExit(f"--measured {path}: cannot read it ({error}); pass a file written by --csv") from None
    missing = [c for c in ("layer", "batch", "option", "measured_ms", "spread") if c not in frame.columns]
    if missing:
        raise SystemExit(f"--measured {path}: missing column {missing[0]!r}; pass a file written by --csv")
    unknown = sorted(set(frame["layer"]) - set(cases))
    if unknown:
        raise SystemExit(f"--measured {path}: unknown layer {unknown[0]!r}; this script times {', '.join(cases)}")
    if not (pd.to_numeric(frame["measured_ms"], errors="coerce") > 0).all():
        raise SystemExit(f"--measured {path}: every measured_ms must be a positive number")
    rows = []
    for (label, batch), group in frame.groupby(["layer", "batch"], sort=False):
        if "dense" not in set(group["option"]):
            raise SystemExit(f"--measured {path}: {label} at batch {batch} has no dense row; speedups need it")
        case = cases[label]
        model = nn.Sequential(case.build())
        space = SearchSpace.from_model(model, torch.randn(int(batch), *case.input_shape), targets=TARGETS)
        dense_ms = float(group.loc[group["option"] == "dense", "measured_ms"].iloc[0])
        for record in group.itertuples():
            if record.option not in space.option_names("0"):
                raise SystemExit(f"--measured {path}: option {record.option!r} is not one of {label}'s options")
            rows.append(
                {
                    "layer": label,
                    "kind": "conv" if case.rows else "linear",
                    "batch": int(batch),
                    "option": record.option,
                    "measured_ms": float(record.measured_ms),
                    "measured_speedup": dense_ms / float(record.measured_ms),
                    "spread": float(record.spread),
                    "space": space,
                }
            )
    return rows


def with_speedups(rows: list[dict], latencies: np.ndarray) -> np.ndarray:
    """Latencies followed by every non-dense row's speedup over its layer's dense row (what a fit weighs)."""
    dense = {(row["layer"], row["batch"]): i for i, row in enumerate(rows) if row["option"] == "dense"}
    sparse = [i for i, row in enumerate(rows) if row["option"] != "dense"]
    reference = [dense[rows[i]["layer"], rows[i]["batch"]] for i in sparse]
    return np.concatenate([latencies, latencies[reference] / latencies[sparse]])


def table(rows: list[dict], predicted: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame([{k: v for k, v in row.items() if k != "space"} for row in rows])
    frame["predicted_ms"] = predicted
    dense = frame[frame["option"] == "dense"].set_index(["layer", "batch"])
    key = list(zip(frame["layer"], frame["batch"], strict=True))
    frame["predicted_speedup"] = [dense.loc[k, "predicted_ms"] for k in key] / frame["predicted_ms"]
    frame["speedup_error"] = frame["predicted_speedup"] / frame["measured_speedup"] - 1
    frame["latency_error"] = frame["predicted_ms"] / frame["measured_ms"] - 1
    return frame


def report(frame: pd.DataFrame, title: str) -> None:
    print(f"\n{title}")
    print(frame.drop(columns=["kind"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    sparse = frame[frame["option"] != "dense"]
    tau, median = speedup_scores(sparse["measured_speedup"].to_numpy(), sparse["predicted_speedup"].to_numpy())
    tau_latency, _ = speedup_scores(frame["measured_ms"].to_numpy(), frame["predicted_ms"].to_numpy())
    runs_dense = frame["option"].isin([*WEIGHT_OPTIONS, "a2:4"])
    over = (frame["predicted_speedup"] - frame["measured_speedup"])[runs_dense].max()
    latency_within = (frame["latency_error"].abs() <= 0.25).mean()
    print(
        f"speedups (non-dense options): Kendall tau {tau:.3f}, median |error| {median:.1%}, "
        f"max |error| {sparse['speedup_error'].abs().max():.1%}, within 25%: "
        f"{(sparse['speedup_error'].abs() <= 0.25).mean():.0%}\n"
        f"latencies (all points): Kendall tau {tau_latency:.3f}, median |error| "
        f"{frame['latency_error'].abs().median():.1%}, within 25%: {latency_within:.0%}\n"
        f"options that run dense (finalized N:M weights, activation masks): largest predicted - measured "
        f"speedup {over:+.3f}"
    )


def repeat_agreement(frame: pd.DataFrame, other: list[dict]) -> None:
    """How well two timings of the same points agree: the ceiling of any model's score here."""
    earlier = pd.DataFrame([{k: v for k, v in row.items() if k != "space"} for row in other])
    pairs = frame.merge(earlier, on=["layer", "batch", "option"], suffixes=("", "_earlier"))
    pairs = pairs[pairs["option"] != "dense"]
    tau, median = speedup_scores(pairs["measured_speedup_earlier"].to_numpy(), pairs["measured_speedup"].to_numpy())
    worst = pairs.iloc[int(np.argmax(np.abs(pairs["measured_speedup"] / pairs["measured_speedup_earlier"] - 1)))]
    print(
        f"repeat agreement with the earlier run ({len(pairs)} speedups): Kendall tau {tau:.3f}, median |difference| "
        f"{median:.1%}; largest: {worst['layer']} batch {worst['batch']} {worst['option']} "
        f"{worst['measured_speedup_earlier']:.3f} then {worst['measured_speedup']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu_x86_avx2")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine, multi-threaded kernels stall on preempted threads)",
    )
    parser.add_argument("--csv", type=Path, help="write the (fitted, if --fit) table here")
    parser.add_argument("--measured", type=Path, help="read the measurements from an earlier --csv instead of timing")
    parser.add_argument(
        "--repeat-of", type=Path, help="an earlier run's --csv: report how well the two timings agree (the ceiling)"
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="feed the convs channels-last inputs (default NCHW: a network's default layout)",
    )
    parser.add_argument("--fit", action="store_true", help="fit the CPU factors to the measurements")
    parser.add_argument("--update", type=Path, help="with --fit: profile YAML to rewrite with the fitted factors")
    args = parser.parse_args()
    if args.update and not args.fit:
        raise SystemExit("--update needs --fit")
    torch.set_num_threads(args.threads)
    profile = load_profile(args.profile)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{started}; torch {torch.__version__}, {torch.get_num_threads()} threads; {uptime()}")
    print("(the machine is shared with other jobs: timings move with its load)")
    if args.measured:
        rows = read_measured(args.measured)
        print(f"measurements read from {args.measured} (not timed again)")
    else:
        rows = [
            row
            for case in CASES
            for batch in BATCHES
            for row in time_case(case, batch, args.rounds, channels_last=args.channels_last)
        ]
        print(f"after timing: {uptime()}")
    frame = table(rows, predict(rows, profile))
    report(frame, f"profile {args.profile} as shipped")
    if args.repeat_of:
        repeat_agreement(frame, read_measured(args.repeat_of))
    if args.fit:
        # Least squares on log latency and log speedup: the speedup is what a search compares, and a
        # layer's fixed costs (a mask pass's dispatch) are small in its latency but not in its speedup.
        measured = with_speedups(rows, frame["measured_ms"].to_numpy())
        fixed = {name: value for name, value in zip(FACTORS, factors_of(profile), strict=True)}
        fixed = {name: value for name, value in fixed.items() if name not in CPU_FITTED}
        x, rmse = fit_factors(
            lambda x: with_speedups(rows, predict(rows, apply_factors(profile, x))),
            measured,
            factors_of(profile),
            fixed=fixed,
            label="CPU measurements",
        )
        profile = apply_factors(profile, x)
        print("\nfitted: " + ", ".join(f"{n}={v:.4g}" for n, v in zip(FACTORS, x, strict=True) if n in CPU_FITTED))
        print(f"RMSE(log latency, log speedup) {rmse:.3f}")
        frame = table(rows, predict(rows, profile))
        report(frame, "fitted profile")
        if args.update:
            try:  # the calibration's rewrite: comments kept, checked to load, atomic
                update_profiles([args.update], dict(zip(FACTORS, factors_of(profile), strict=True)))
            except CalibrationError as error:
                raise SystemExit(str(error)) from None
            print(f"updated {args.update}")
    if args.csv:
        atomic_write_text(args.csv, frame.to_csv(index=False, float_format="%.6g"))
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
