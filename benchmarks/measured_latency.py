"""Measured latency tables on this CPU: profiling time, additivity, rank correlation, scoring speed.

    python benchmarks/measured_latency.py [--schemes 20] [--min-run-time 0.2] [--clock wall|cpu]
                                          [--tables DIR] [--csv docs/results/measured_latency_cpu.csv]

For the CIFAR ResNet-18 (batch 1 and 8) and the digits CNN (batch 1), fp32, one torch thread, the
default search space (``conf/space/default.yaml``: weights / activations / both x 2:4, 1:4, 2:8, 1:8):

1. profiles every (layer, option) with :func:`experiments.profile.profile_model` (wall time
   reported; target for the ResNet-18: <= 10 minutes);
2. additivity: dense, uniform and 3 random schemes timed end to end against the table's prediction
   (``<rest>`` + layers); target |error| <= 15%;
3. ``--schemes`` random schemes (ResNet-18 batch 1 and digits): Kendall tau between predicted and
   measured end-to-end latency; target >= 0.8;
4. scoring speed of the measured cost model (``CostTable.totals`` of 100,000 schemes); target
   >= 100,000 schemes/s.

Both statistics of the table are reported: the median (default of a search) and the fastest
block (``statistic: min``), each against the same statistic of the end-to-end timing. The machine is
shared: ``uptime`` is printed before and after; read the numbers with the load in mind.
``--clock cpu`` times the thread's CPU time instead of wall time (leaves out other jobs' time).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import kendalltau

from evaluators.measured import LatencyTable, MeasuredCostModel
from experiments.config import SpaceConfig
from experiments.models import resnet18
from experiments.profile import ProfileSettings, additivity_schemes, measure_scheme, profile_model
from experiments.tasks import get_task
from search_space import SearchSpace
from search_space.io import atomic_write_text


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def cases() -> list[tuple[str, torch.nn.Module, torch.Tensor, int, bool]]:
    """(label, model, example inputs, batch, rank over random schemes)."""
    digits = get_task("digits")
    torch.manual_seed(0)
    return [
        ("resnet18-cifar b1", resnet18(10, "cifar").eval(), torch.randn(2, 3, 32, 32), 1, True),
        ("resnet18-cifar b8", resnet18(10, "cifar").eval(), torch.randn(2, 3, 32, 32), 8, False),
        ("digits-cnn b1", digits.build_model().eval(), digits.example_inputs(), 1, True),
    ]


def scores(frame: pd.DataFrame) -> dict[str, float]:
    """Largest additivity error over the ``dense`` / ``uniform`` / ``random`` schemes and Kendall tau over
    the ``rank`` ones, for the median and the fastest-block statistic."""
    additive = frame[~frame["scheme"].str.startswith("rank")]
    ranked = frame[frame["scheme"].str.startswith("rank")]
    out = {}
    for suffix, predicted, measured in (
        ("", "predicted_ms", "measured_ms"),
        ("_min", "predicted_min_ms", "measured_min_ms"),
    ):
        out[f"additivity_max_error{suffix}"] = float((additive[predicted] / additive[measured] - 1).abs().max())
        tau = kendalltau(ranked[predicted], ranked[measured]).statistic if len(ranked) > 1 else np.nan
        out[f"kendall_tau{suffix}"] = float(tau)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemes", type=int, default=20)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--tables", type=Path, default=Path("/tmp/nmsearch_measured_tables"))
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="see ProfileSettings.clock")
    parser.add_argument("--csv", type=Path, help="write the per-scheme results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    space_kwargs = dataclasses.asdict(SpaceConfig())
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{started}; torch {torch.__version__}, 1 thread, {args.clock} clock; {uptime()}")
    print(f"command: python {' '.join(sys.argv)}")
    rows, summary = [], []
    for label, model, example, batch, rank in cases():
        space = SearchSpace.from_model(model, example, **space_kwargs)
        settings = ProfileSettings(batch_size=batch, min_run_time=args.min_run_time, clock=args.clock)
        path = args.tables / f"{label.replace(' ', '_')}_{args.clock}.csv"
        path.unlink(missing_ok=True)
        start = time.perf_counter()
        table = profile_model(model, example, space, path, settings, label=label)
        profiling_s = time.perf_counter() - start
        schemes = additivity_schemes(space, random=3)
        if rank:
            schemes |= {f"rank {i}": space.random(100 + i) for i in range(args.schemes)}
        for name, scheme in schemes.items():
            median, iqr, fastest = measure_scheme(model, scheme, example, settings)
            rows.append(
                {"case": label, "scheme": name, "measured_ms": median, "iqr_ms": iqr, "measured_min_ms": fastest}
                | {"predicted_ms": table.predict(scheme)}
                | {"predicted_min_ms": dataclasses.replace(table, statistic="min").predict(scheme)}
            )
        frame = pd.DataFrame([r for r in rows if r["case"] == label])
        model_cost = MeasuredCostModel.from_table(LatencyTable.read(path))
        cost_table = model_cost.table(space)
        counts = space.option_valid_mask().sum(axis=1)
        indices = (np.random.default_rng(0).random((100_000, len(counts))) * counts).astype(np.int64)
        start = time.perf_counter()
        cost_table.totals(indices, ["latency_ms"])
        rate = 100_000 / (time.perf_counter() - start)
        summary.append(
            {"case": label, "entries": len(table.rows), "profiling_s": profiling_s}
            | scores(frame)
            | {"schemes_per_s": rate}
        )
        print(f"\n{label}: {space}; {len(table.rows)} entries profiled in {profiling_s:.0f} s; {uptime()}")
        print(frame.drop(columns="case").to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nsummary ({uptime()}); targets: additivity <= 0.15, tau >= 0.8, ResNet-18 profiling <= 600 s, >= 1e5/s")
    print(pd.DataFrame(summary).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.csv:
        atomic_write_text(args.csv, pd.DataFrame(rows).to_csv(index=False, float_format="%.6g"))
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
