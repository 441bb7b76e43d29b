"""Where a 2:4 GEMM's time goes on this CUDA GPU: host time per call, GPU kernel time, CUDA-graph replay.

    python benchmarks/gpu_overhead.py [--shapes MxNxK ...]

For dense ``F.linear(x, w)`` and the same 2:4 weight converted by
``torch.sparse.to_sparse_semi_structured``, per call: the CUDA-event time of back-to-back calls (what
``benchmarks/gpu_latency.py`` records), the host time to issue one call (no synchronisation), the
time of the GPU kernels it launches (``torch.profiler``) with their names, and the event time of one
call replayed from a CUDA graph (or why capture failed). When the host time exceeds the kernel time,
eager PyTorch is launch-bound: the GPU idles between calls and the sparse kernel's own speed does
not show. Without CUDA it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from gpu_latency import cuda_problem, events_ms, graphed, operands, parse_shape
from torch.profiler import ProfilerActivity, profile

DEFAULT_SHAPES = ("1x4096x4096", "256x4096x4096", "4096x4096x4096", "16384x4096x4096", "32768x768x3072")


def graph_ms(fn: Callable[[], object]) -> str:
    """One call captured in a CUDA graph, replayed: its time, or why capture failed."""
    try:
        return f"{events_ms(graphed(fn), 50):.4f} ms"
    except RuntimeError as error:
        torch.cuda.synchronize()
        return f"capture failed ({str(error).splitlines()[0][:100]})"


def breakdown(fn: Callable[[], object], calls: int = 50) -> str:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e3
    torch.cuda.synchronize()
    events = events_ms(fn, calls)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    kernel = sum(e.self_device_time_total for e in kernels) / calls / 1e3
    names = "; ".join(
        f"{e.key[:50]} x{e.count / calls:g} {e.self_device_time_total / e.count / 1e3:.4f} ms" for e in kernels
    )
    return f"events {events:.4f} ms, host {host:.4f} ms, kernels {kernel:.4f} ms, graph {graph_ms(fn)} | {names}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", type=parse_shape, nargs="+", default=[parse_shape(s) for s in DEFAULT_SHAPES], help="MxNxK"
    )
    args = parser.parse_args(argv)
    problem = cuda_problem()
    if problem:
        print(f"gpu_overhead.py: skipped: {problem}")
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fp16, per call:")
    for m, n, k in args.shapes:
        x, weight = operands(m, n, k, torch.half)
        sparse = torch.sparse.to_sparse_semi_structured(weight)
        print(f"{m}x{n}x{k} dense: {breakdown(lambda x=x, w=weight: F.linear(x, w))}", flush=True)
        print(f"{m}x{n}x{k} 2:4:   {breakdown(lambda x=x, w=sparse: F.linear(x, w))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
