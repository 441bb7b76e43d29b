"""Mask and training-step overhead of nmsearch's N:M primitives on this machine's CPU.

    python benchmarks/masks.py [--repeats 10] [--csv docs/masks.csv]
    python benchmarks/masks.py --load [--repeats 10] [--csv docs/results/masks_loaded.csv]

1. Mask time for a 512x512x3x3 conv weight and a 4096x4096 linear weight at 2:4, 1:8 and
   2:16 against the argsort-per-forward approach of the SR-STE reference code.
2. One SGD step (forward, backward, update) of a CIFAR ResNet-18, batch 32 at 32x32:
   dense vs weight-2:4 SR-STE vs activation-2:4 vs both (every layer but the 3-channel stem),
   timed in rounds that run every variant back to back (median step time, and the median
   and interquartile range of the per-round ratio to dense), and the peak bytes torch's allocator holds
   during training (profiler memory events from model construction on: weights, momentum,
   gradients, activations and masks).

``--load`` runs only the contention report instead: nmsearch's mask vs argsort at 2:4, 1:8,
2:8, 2:16 and 4:16 on a 512x512x3x3 conv weight and an 8x256x28x28 conv activation, the two
run back to back in every round, with the load average (as ``uptime`` prints it) before and
after. Targets: nmsearch <= 1.5x argsort at load ~2x cores; >= 2x faster than argsort quiet
for 2:4 (docs/results/masks.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from timing import interleaved_s, median_s, sgd_step
from torch import nn
from torch.profiler import ProfilerActivity, profile

from experiments.models import resnet18
from search_space import Recipe, RecipeConfig, activation_nm_mask, set_submodule, sparsify, weight_nm_mask
from search_space.io import atomic_write_text


def argsort_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The SR-STE reference approach: permute to NHWC, argsort every group, zero the smallest."""
    w = weight.detach().abs()
    nhwc = w.permute(0, 2, 3, 1) if w.dim() == 4 else w
    groups = nhwc.reshape(-1, m)
    index = torch.argsort(groups, dim=1)[:, : m - n]
    mask = torch.ones_like(groups).scatter_(1, index, 0).reshape(nhwc.shape)
    return mask.permute(0, 3, 1, 2) if w.dim() == 4 else mask


def mask_table(repeats: int) -> pd.DataFrame:
    weights = {"conv 512x512x3x3": torch.randn(512, 512, 3, 3), "linear 4096x4096": torch.randn(4096, 4096)}
    rows = []
    for label, weight in weights.items():
        for n, m in [(2, 4), (1, 8), (2, 16)]:
            # Same kept magnitudes in every group (argsort breaks exact float ties arbitrarily).
            kept = [(mask * weight.abs()).unflatten(1, (-1, m)).sum(2) for mask in
                    (argsort_mask(weight, n, m), weight_nm_mask(weight, n, m))]  # fmt: skip
            torch.testing.assert_close(kept[0], kept[1])
            baseline = 1e3 * median_s(lambda w=weight, n=n, m=m: argsort_mask(w, n, m), repeats)
            ours = 1e3 * median_s(lambda w=weight, n=n, m=m: weight_nm_mask(w, n, m), repeats)
            rows.append(
                {"weight": label, "pattern": f"{n}:{m}", "argsort_ms": baseline, "nmsearch_ms": ours,
                 "speedup": baseline / ours}
            )  # fmt: skip
    return pd.DataFrame(rows)


LOAD_PATTERNS = [(2, 4), (1, 8), (2, 8), (2, 16), (4, 16)]


def load_table(repeats: int) -> pd.DataFrame:
    """nmsearch vs argsort masks, interleaved per round, with the load average around each row."""
    torch.manual_seed(0)
    cases = {
        "weight 512x512x3x3": (torch.randn(512, 512, 3, 3), lambda t, n, m: weight_nm_mask(t, n, m)),
        "activation 8x256x28x28": (torch.randn(8, 256, 28, 28), lambda t, n, m: activation_nm_mask(t, n, m, dim=1)),
    }
    rows = []
    for label, (tensor, ours) in cases.items():
        for n, m in LOAD_PATTERNS:
            kept = [(mask * tensor.abs()).unflatten(1, (-1, m)).sum(2) for mask in
                    (argsort_mask(tensor, n, m), ours(tensor, n, m))]  # fmt: skip
            torch.testing.assert_close(kept[0], kept[1])
            load_before = os.getloadavg()[0]
            times = interleaved_s(
                {"argsort": lambda t=tensor, n=n, m=m: argsort_mask(t, n, m),
                 "nmsearch": lambda t=tensor, n=n, m=m, f=ours: f(t, n, m)},
                repeats,
            )  # fmt: skip
            ratios = [o / a for o, a in zip(times["nmsearch"], times["argsort"], strict=True)]
            rows.append(
                {"tensor": label, "pattern": f"{n}:{m}", "argsort_ms": 1e3 * statistics.median(times["argsort"]),
                 "nmsearch_ms": 1e3 * statistics.median(times["nmsearch"]),
                 "nmsearch_vs_argsort": statistics.median(ratios), "load_1min_before": load_before,
                 "load_1min_after": os.getloadavg()[0], "cores": os.cpu_count(), "repeats": repeats}
            )  # fmt: skip
    return pd.DataFrame(rows)


VARIANTS = {
    "dense": (None, None),
    "weights 2:4 SR-STE": ("2:4", None),
    "activations 2:4": (None, "2:4"),
    "both 2:4": ("2:4", "2:4"),
}


def build(variant: str) -> nn.Module:
    torch.manual_seed(0)
    model = resnet18(10, "cifar")
    weight, activation = VARIANTS[variant]
    if weight or activation:
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Conv2d | nn.Linear) and name != "conv1":
                set_submodule(model, name, sparsify(module, weight, activation, name=name))
        Recipe(model, RecipeConfig(estimator="srste")).step(0)
    return model


def peak_step_mib(variant: str, x: torch.Tensor, y: torch.Tensor) -> float:
    """Peak bytes held by torch's CPU allocator during a training step, everything included
    (weights, optimizer state, gradients, activations, masks): profiled from construction
    on, so every allocation and free is seen."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = build(variant)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals) / 2**20


def step_table(repeats: int) -> pd.DataFrame:
    x = torch.randn(32, 3, 32, 32)
    y = torch.randint(0, 10, (32,))
    steps = {variant: sgd_step(build(variant), x, y) for variant in VARIANTS}
    times = interleaved_s(steps, repeats)
    # One fresh process per variant: memory a previous variant left to the allocator or the
    # garbage collector must not count against the next one.
    peaks = {}
    for variant in VARIANTS:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            peaks[variant] = pool.submit(peak_step_mib, variant, x, y).result()
    rows = []
    for variant in VARIANTS:
        # Ratio per round (variants run back to back), so drifts in machine speed cancel.
        ratios = [t / d for t, d in zip(times[variant], times["dense"], strict=True)]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        rows.append(
            {"variant": variant, "step_ms": statistics.median(times[variant]) * 1e3,
             "vs_dense": statistics.median(ratios), "vs_dense_iqr": f"{q1:.2f}-{q3:.2f}",
             "peak_mib": peaks[variant], "peak_vs_dense": peaks[variant] / peaks["dense"]}
        )  # fmt: skip
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--csv", type=Path, help="also write the table(s) to this CSV")
    parser.add_argument("--load", action="store_true", help="only the masks-under-contention report")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    if args.load:
        print("load average (1, 5, 15 min) at start: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
        table = load_table(args.repeats)
        print("\nMask time under load (median ms)\n" + table.to_markdown(index=False, floatfmt=".2f"))
        print("load average (1, 5, 15 min) at end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
        if args.csv:
            atomic_write_text(args.csv, table.to_csv(index=False))
        return
    masks = mask_table(args.repeats)
    print("\nMask time (median ms)\n" + masks.to_markdown(index=False, floatfmt=".2f"))
    steps = step_table(args.repeats)
    print("\nCIFAR ResNet-18 SGD step, batch 32\n" + steps.to_markdown(index=False, floatfmt=".2f"))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        pd.concat([masks.assign(table="mask"), steps.assign(table="step")]).to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
