"""Row-skipping convolution (semi-structured activation sparsity) against torch's dense conv2d on this CPU.

    python benchmarks/rows.py [--rounds 30] [--runs 1] [--threads N] [--clock wall|cpu] [--max-load 1.2]
                              [--csv-dir docs/results --csv-tag NAME]

1. Layers: the 3x3 and 1x1 convs of ResNet-18 at ImageNet (224²) and CIFAR (32²) resolution,
   batch 1. Dense ``F.conv2d`` in NCHW and in channels-last, and :class:`RowSkippingConv2d` with
   no row skipped and at s = 0.1, 0.2, 0.3, 0.5 (column ``kernel``: ``fused``, the C++ extension,
   or ``gather``, the pure-PyTorch fallback). The speedup is against the faster dense layout;
   the ideal is ``P / kept rows`` (``1 / (1 - s)`` up to rounding to whole rows).
2. Whole networks, eval mode: the CIFAR ResNet-18 (``experiments.models.resnet18(10, "cifar")``)
   at batch 1 and 8 and the ImageNet one at batch 1, dense (both layouts) and with a row mask on
   every conv (``Scheme.uniform_rows``, converted by ``skip_masked_rows``; channels-last input),
   with every row-masked conv skipping rows (``path="rows"``) and with ``path="auto"`` (per layer,
   the faster of that and the dense conv with the skipped rows zeroed, timed on its first call).

Targets (issue 22): the row-skipping conv >= 0.8 of the ideal speedup on every large ResNet-18
layer at s = 0.2 and 0.5; the whole CIFAR ResNet-18 at s = 0.2 >= 1.15x dense (batch 1 and 8).
``--clock cpu`` times this thread's CPU time (``time.thread_time``) instead of wall time: it leaves
out the time other jobs hold the core, so it estimates the quiet-machine numbers on a loaded one
(one thread only; cache sharing with other jobs still counts). Every table row carries the load
average (as ``uptime`` prints it) when its shape started.

Each round runs every variant of a layer (or network) back to back, a few calls each; times are
medians over rounds, ratios are medians (and quartiles) of the per-round ratios. Before timing,
every variant's output is checked against the row-masked dense convolution. Each of ``--runs``
runs waits (up to ``--wait-s``) for the 1-minute load average to drop below ``--max-load`` and
prints the load; with several runs, a summary gives the median over runs and their range, and
the CSVs hold every run (column ``run``).
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from experiments.models import resnet18
from search_space import (
    DEFAULT_ROW_SPARSITIES,
    MaskState,
    RowSkippingConv2d,
    Scheme,
    SearchSpace,
    pruned_rows,
    row_masked_layers,
    skip_masked_rows,
    sparsify,
)
from search_space.io import atomic_write_text

SPARSITIES = (0.0, *DEFAULT_ROW_SPARSITIES, 0.5)
# Whole networks: every row-masked conv skipping rows, and "auto" (per layer, the faster of that
# and the dense conv with the rows zeroed, timed on the first call).
PATHS = ("rows", "auto")


@dataclass(frozen=True)
class ConvShape:
    label: str
    cin: int
    cout: int
    size: int
    kernel: int
    stride: int

    def conv(self) -> nn.Conv2d:
        return nn.Conv2d(self.cin, self.cout, self.kernel, self.stride, self.kernel // 2, bias=False)


SHAPES = [
    ConvShape("imagenet layer1 3x3", 64, 64, 56, 3, 1),
    ConvShape("imagenet layer2 3x3", 128, 128, 28, 3, 1),
    ConvShape("imagenet layer3 3x3", 256, 256, 14, 3, 1),
    ConvShape("imagenet layer4 3x3", 512, 512, 7, 3, 1),
    ConvShape("imagenet layer2.0 3x3 s2", 64, 128, 56, 3, 2),
    ConvShape("imagenet layer2.0 1x1 s2", 64, 128, 56, 1, 2),
    ConvShape("cifar layer1 3x3", 64, 64, 32, 3, 1),
    ConvShape("cifar layer2 3x3", 128, 128, 16, 3, 1),
    ConvShape("cifar layer3 3x3", 256, 256, 8, 3, 1),
    ConvShape("cifar layer4 3x3", 512, 512, 4, 3, 1),
]


def wait_for_load(max_load: float, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(15)
    print(f"at start: {uptime()}")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"load average {os.getloadavg()}"


def row_layer(conv: nn.Conv2d, sparsity: float) -> nn.Module:
    """A row-masked wrapper of ``conv`` skipping ``sparsity`` of its rows (0: none)."""
    layer = sparsify(conv, activation="r0.1")
    layer.mask_state = MaskState(row_sparsity=sparsity)
    return layer


# time.perf_counter (wall) or time.thread_time (this thread's CPU time), set by --clock.
CLOCK: dict[str, Callable[[], float]] = {"now": time.perf_counter}


def load_1min() -> float:
    return round(os.getloadavg()[0], 2)


def time_rounds(variants: dict[str, Callable[[], object]], rounds: int, calls: int) -> pd.DataFrame:
    """Seconds per call of each variant in each round (variants interleaved within a round)."""
    for fn in variants.values():
        fn()
    clock = CLOCK["now"]
    rows = []
    for round_index in range(rounds):
        for name, fn in variants.items():
            start = clock()
            for _ in range(calls):
                fn()
            rows.append({"round": round_index, "variant": name, "seconds": (clock() - start) / calls})
    return pd.DataFrame(rows).pivot(index="round", columns="variant", values="seconds")


def ratio_stats(dense: pd.Series, variant: pd.Series) -> dict[str, float]:
    """Median and interquartile range of the per-round speedups ``dense / variant``."""
    ratios = dense / variant
    return {
        "speedup": float(ratios.median()),
        "speedup_q25": float(ratios.quantile(0.25)),
        "speedup_q75": float(ratios.quantile(0.75)),
    }


def calls_for(fn: Callable[[], object], target_s: float = 0.004) -> int:
    clock = CLOCK["now"]
    start = clock()
    fn()
    return max(1, round(target_s / max(clock() - start, 1e-6)))


@torch.no_grad()
def layer_table(rounds: int) -> pd.DataFrame:
    results = []
    for shape in SHAPES:
        load = load_1min()
        conv = shape.conv()
        x = torch.randn(1, shape.cin, shape.size, shape.size)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        w_cl = conv.weight.contiguous(memory_format=torch.channels_last)
        pad = shape.kernel // 2
        variants: dict[str, Callable[[], object]] = {
            "dense nchw": lambda x=x, conv=conv, shape=shape, pad=pad: F.conv2d(
                x, conv.weight, None, shape.stride, pad
            ),
            "dense channels-last": lambda x=x_cl, w=w_cl, shape=shape, pad=pad: F.conv2d(x, w, None, shape.stride, pad),
        }
        kept, kernels = {}, {}
        for sparsity in SPARSITIES:
            layer = row_layer(conv, sparsity)
            fast = RowSkippingConv2d.from_layer(layer)
            torch.testing.assert_close(fast(x_cl), layer(x), atol=1e-4, rtol=1e-4)
            kernels[sparsity] = fast.kernel_in_use
            positions = (shape.size // shape.stride) ** 2
            kept[sparsity] = positions - (pruned_rows(positions, sparsity) if sparsity else 0)
            variants[f"rows {sparsity}"] = lambda fast=fast, x=x_cl: fast(x)
        times = time_rounds(variants, rounds, calls_for(variants["dense nchw"]))
        dense_layout = (
            "dense nchw"
            if times["dense nchw"].median() <= times["dense channels-last"].median()
            else "dense channels-last"
        )
        positions = (shape.size // shape.stride) ** 2
        for sparsity in SPARSITIES:
            stats = ratio_stats(times[dense_layout], times[f"rows {sparsity}"])
            ideal = positions / kept[sparsity]
            results.append(
                {
                    "layer": shape.label,
                    "shape": f"{shape.cin}->{shape.cout} @{shape.size} k{shape.kernel} s{shape.stride}",
                    "dense_nchw_ms": times["dense nchw"].median() * 1e3,
                    "dense_cl_ms": times["dense channels-last"].median() * 1e3,
                    "faster_dense": dense_layout.removeprefix("dense "),
                    "sparsity": sparsity,
                    "kernel": kernels[sparsity],
                    "rows_ms": times[f"rows {sparsity}"].median() * 1e3,
                    **stats,
                    "ideal": ideal,
                    "of_ideal": stats["speedup"] / ideal,
                    "load_1min": load,
                }
            )
    return pd.DataFrame(results)


def networks() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    cifar = resnet18(10, "cifar")
    return {
        "resnet18 cifar b1": (cifar, torch.randn(1, 3, 32, 32)),
        "resnet18 cifar b8": (cifar, torch.randn(8, 3, 32, 32)),
        "resnet18 imagenet b1": (resnet18(1000, "imagenet"), torch.randn(1, 3, 224, 224)),
    }


@torch.no_grad()
def network_table(rounds: int) -> pd.DataFrame:
    results = []
    for label, (model, x) in networks().items():
        load = load_1min()
        model.eval()
        space = SearchSpace.from_model(model, x, targets=["rows"], row_sparsities=SPARSITIES[1:])
        x_cl = x.contiguous(memory_format=torch.channels_last)
        model_cl = _channels_last_copy(model)
        variants: dict[str, Callable[[], object]] = {
            "dense nchw": lambda model=model, x=x: model(x),
            "dense channels-last": lambda model=model_cl, x=x_cl: model(x),
        }
        masked_layers, skipping, fused = 0, {}, {}
        for sparsity in SPARSITIES:
            sparse = Scheme.uniform_rows(space, sparsity or DEFAULT_ROW_SPARSITIES[0]).apply(model)
            layers = row_masked_layers(sparse)
            masked_layers = len(layers)
            for layer in layers.values():
                layer.mask_state = MaskState(row_sparsity=sparsity)
            for path in PATHS:
                fast = skip_masked_rows(sparse, path=path)
                torch.testing.assert_close(fast(x_cl), sparse(x), atol=1e-3, rtol=1e-3)  # "auto" chooses here
                kernels = [m for m in fast.modules() if isinstance(m, RowSkippingConv2d)]
                skipping[path, sparsity] = sum(m.path_in_use == "rows" for m in kernels)
                fused[path, sparsity] = sum(m.kernel_in_use == "fused" for m in kernels)
                variants[f"{path} {sparsity}"] = lambda fast=fast, x=x_cl: fast(x)
        times = time_rounds(variants, rounds, calls_for(variants["dense nchw"], 0.02))
        dense_layout = (
            "dense nchw"
            if times["dense nchw"].median() <= times["dense channels-last"].median()
            else "dense channels-last"
        )
        for path in PATHS:
            for sparsity in SPARSITIES:
                results.append(
                    {
                        "network": label,
                        "path": path,
                        "row_masked_convs": masked_layers,
                        "convs_skipping_rows": skipping[path, sparsity],
                        "convs_fused": fused[path, sparsity],
                        "dense_nchw_ms": times["dense nchw"].median() * 1e3,
                        "dense_cl_ms": times["dense channels-last"].median() * 1e3,
                        "faster_dense": dense_layout.removeprefix("dense "),
                        "sparsity": sparsity,
                        "rows_ms": times[f"{path} {sparsity}"].median() * 1e3,
                        **ratio_stats(times[dense_layout], times[f"{path} {sparsity}"]),
                        "ideal": 1 / (1 - sparsity),
                        "load_1min": load,
                    }
                )
    return pd.DataFrame(results)


def _channels_last_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def summary(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per ``keys``: the median over runs of the speedup (and its fraction of the ideal) and its range."""
    grouped = table.groupby(keys, sort=False)
    result = grouped.agg(
        speedup=("speedup", "median"),
        speedup_min=("speedup", "min"),
        speedup_max=("speedup", "max"),
        ideal=("ideal", "first"),
    )
    result["of_ideal"] = result["speedup"] / result["ideal"]
    return result.reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--runs", type=int, default=1, help="repeat everything (each run waits for a low load)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: this thread's CPU time")
    parser.add_argument("--max-load", type=float, default=1.2)
    parser.add_argument("--wait-s", type=float, default=1800)
    parser.add_argument("--csv-dir", type=Path, help="write rows_layers.csv and rows_network.csv here (every run)")
    parser.add_argument("--csv-tag", default="", help="name the CSVs rows_layers_TAG.csv and rows_network_TAG.csv")
    parser.add_argument("--skip-layers", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        sys.exit("error: --clock cpu times one thread's CPU time; add --threads 1")
    if args.csv_dir and not args.csv_dir.is_dir():
        sys.exit(f"error: --csv-dir {args.csv_dir} is not a directory")
    CLOCK["now"] = time.thread_time if args.clock == "cpu" else time.perf_counter
    pd.set_option("display.width", 200)
    tables: dict[str, list[pd.DataFrame]] = {"rows_layers": [], "rows_network": []}
    for run in range(1, args.runs + 1):
        torch.manual_seed(0)
        wait_for_load(args.max_load, args.wait_s)
        print(
            f"run {run}: torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
            f"{args.rounds} rounds"
        )
        if not args.skip_layers:
            tables["rows_layers"].append(layer_table(args.rounds).assign(run=run))
            print(tables["rows_layers"][-1].to_markdown(index=False, floatfmt=".3f"))
        tables["rows_network"].append(network_table(args.rounds).assign(run=run))
        print(tables["rows_network"][-1].to_markdown(index=False, floatfmt=".3f"))
        print(f"at end of run {run}: {uptime()}")
    setting = {"threads": torch.get_num_threads(), "clock": args.clock}
    merged = {name: pd.concat(runs, ignore_index=True).assign(**setting) for name, runs in tables.items() if runs}
    if args.runs > 1:
        print(f"medians over {args.runs} runs (min and max of the run medians):")
        if "rows_layers" in merged:
            print(
                summary(merged["rows_layers"], ["layer", "shape", "sparsity"]).to_markdown(index=False, floatfmt=".3f")
            )
        print(summary(merged["rows_network"], ["network", "path", "sparsity"]).to_markdown(index=False, floatfmt=".3f"))
    if args.csv_dir:
        for name, table in merged.items():
            suffix = f"_{args.csv_tag}" if args.csv_tag else ""
            atomic_write_text(args.csv_dir / f"{name}{suffix}.csv", table.to_csv(index=False))


if __name__ == "__main__":
    main()
