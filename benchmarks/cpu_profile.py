"""Measure this machine's CPU for a cost-model profile: dense FP32 GEMM throughput, memory bandwidth,
per-call overhead and how much of the GEMM peak batch-1 convolutions reach.

    python benchmarks/cpu_profile.py [--repeats 30] [--update conf/hardware/cpu_x86_avx2.yaml]

* ``dense_tflops``: the best median throughput of ``torch.mm`` on square FP32 matrices (a practical
  peak: what MKL reaches on these cores, not a datasheet number);
* ``memory_bandwidth_gbs``: ``copy_`` between two 256 MiB tensors (bytes read + written per second),
  far larger than the last-level cache;
* ``launch_overhead_us``: one ``F.conv2d`` call on a 1x8x4x4 input (framework and dispatch cost);
* ``efficiency.compute_dense``: the median over the 3x3 convs of a CIFAR ResNet-18 at batch 1 of
  their achieved FLOPS (fastest of NCHW and channels-last) divided by the GEMM peak.

Run it on an idle machine (it waits up to ``--wait-s`` for the load average to drop below
``--max-load`` and prints it before and after); ``--update`` rewrites those four
numbers in a profile YAML in place, keeping its comments, and checks that the result loads.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import median_s

from evaluators.hardware import load_profile


def wait_for_load(max_load: float, wait_s: float) -> None:
    """Wait (up to ``wait_s``) for the 1-minute load average to drop below ``max_load``: other jobs skew it all."""
    deadline = time.monotonic() + wait_s
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(15)


def gemm_tflops(repeats: int) -> dict[int, float]:
    results = {}
    for size in (512, 1024, 2048):
        a, b, c = torch.randn(size, size), torch.randn(size, size), torch.empty(size, size)
        seconds = median_s(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), repeats, warmup=3)
        results[size] = 2 * size**3 / seconds / 1e12
    return results


def copy_bandwidth_gbs(repeats: int, mib: int = 256) -> float:
    source = torch.ones(mib * 2**20 // 4)
    target = torch.empty_like(source)
    seconds = median_s(lambda: target.copy_(source), repeats, warmup=3)
    return 2 * source.numel() * 4 / seconds / 1e9


def call_overhead_us(repeats: int) -> float:
    x, w = torch.randn(1, 8, 4, 4), torch.randn(8, 8, 1, 1)
    return median_s(lambda: F.conv2d(x, w), repeats * 20, warmup=3) * 1e6


# (channels, resolution, stride) of the CIFAR ResNet-18's 3x3 convs (input side), batch 1.
RESNET18_CIFAR_3X3 = [(64, 32, 1), (64, 32, 2), (128, 16, 1), (128, 16, 2), (256, 8, 1), (256, 8, 2), (512, 4, 1)]


def conv_fraction_of_peak(peak_tflops: float, repeats: int) -> list[float]:
    fractions = []
    with torch.no_grad():
        for channels, size, stride in RESNET18_CIFAR_3X3:
            cout = channels * stride
            x = torch.randn(1, channels, size, size)
            w = torch.randn(cout, channels, 3, 3)
            layouts = [
                (x, w),
                (x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)),
            ]
            seconds = min(
                median_s(lambda x=x, w=w, stride=stride: F.conv2d(x, w, None, stride, 1), repeats, warmup=3)
                for x, w in layouts
            )
            out = size // stride
            flops = 2 * out * out * cout * channels * 9
            fractions.append(flops / seconds / 1e12 / peak_tflops)
    return fractions


def update_profile(path: Path, numbers: dict[str, float]) -> None:
    """Rewrite the measured numbers in place (keeps comments); the file must still load."""
    text = path.read_text()
    replacements = {
        r"(memory_bandwidth_gbs:\s*)[0-9.]+": numbers["memory_bandwidth_gbs"],
        r"(launch_overhead_us:\s*)[0-9.]+": numbers["launch_overhead_us"],
        r"(compute_dense:\s*)[0-9.]+": numbers["compute_dense"],
        r"(compute_sparse:\s*)[0-9.]+": numbers["compute_dense"],  # unused (no sparse cores); must be <= dense
        r"(fp32: \{dense_tflops:\s*)[0-9.]+": numbers["dense_tflops"],
    }
    for pattern, value in replacements.items():
        text, count = re.subn(pattern, lambda m, v=value: f"{m.group(1)}{v}", text)
        if count != 1:
            raise SystemExit(f"{path}: expected one match of {pattern!r}, found {count}")
    path.write_text(text)
    load_profile(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--update", type=Path, help="profile YAML whose measured numbers to rewrite")
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-minute load average below this")
    parser.add_argument("--wait-s", type=float, default=1800)
    args = parser.parse_args()
    torch.manual_seed(0)
    wait_for_load(args.max_load, args.wait_s)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    gemm = gemm_tflops(args.repeats)
    for size, tflops in gemm.items():
        print(f"mm {size}x{size} fp32: {tflops * 1e3:.1f} GFLOPS")
    peak = max(gemm.values())
    bandwidth = copy_bandwidth_gbs(args.repeats)
    overhead = call_overhead_us(args.repeats)
    fractions = conv_fraction_of_peak(peak, args.repeats)
    print(f"copy bandwidth: {bandwidth:.1f} GB/s")
    print(f"conv2d call overhead: {overhead:.1f} us")
    print("ResNet-18 CIFAR 3x3 convs, batch 1, fraction of the GEMM peak: " + ", ".join(f"{f:.2f}" for f in fractions))
    numbers = {
        "dense_tflops": round(peak, 4),
        "memory_bandwidth_gbs": round(bandwidth, 1),
        "launch_overhead_us": round(overhead, 1),
        "compute_dense": round(min(statistics.median(fractions), 1.0), 2),
    }
    print(f"load average {os.getloadavg()}")
    print(numbers)
    if args.update:
        update_profile(args.update, numbers)
        print(f"updated {args.update}")


if __name__ == "__main__":
    main()
