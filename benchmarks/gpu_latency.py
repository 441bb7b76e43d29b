"""Measure dense vs 2:4 semi-structured sparse GEMMs on this CUDA GPU, in the format of the published
points, so they can join the calibration data with "measured here" as their source.

    python benchmarks/gpu_latency.py --out docs/gpu_h200.csv [--hardware h200] [--dtype fp16]
    python -m evaluators.calibration docs/gpu_h200.csv
    # or append the rows to evaluators/data/published_gemm_2to4.csv and refit

For every shape ``Y[m x n] = X[m x k] W^T`` (no bias) it times ``F.linear(x, w)`` with the dense
2:4-pruned weight and with the same weight converted by ``torch.sparse.to_sparse_semi_structured``,
for each backend torch offers (cuSPARSELt, CUTLASS), back to back on one stream between CUDA
events; the median over ``--repeats`` samples of ``--inner`` calls each is written. ``--graph``
times CUDA-graph replays of the same calls instead: the kernels alone, without the host work torch
does per call (on torch 2.11, 0.4-0.7 ms of cuSPARSELt setup per 2:4 call on an H200; such eager
rows belong in the calibration data as ``kernel=untuned``). The CSV has the
columns of :data:`evaluators.calibration.MEASUREMENT_COLUMNS` plus ``kernel`` and ``notes``.

Without CUDA (or below compute capability 8.0) it prints why and skips: exit status 0, no file.
A device whose profile cannot be told from its name needs ``--hardware``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from evaluators.calibration import MEASUREMENT_COLUMNS
from evaluators.hardware import HardwareProfileError, available_profiles, load_profile
from search_space import weight_nm_mask
from search_space.io import atomic_write_text

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Default grid (MxNxK): the shapes of the published points plus the layers nmsearch users prune --
# LLM projections (4096/11008) from decode (M=1) to prefill, BERT-base and MiniLM encoder layers at
# 256x128 tokens, and the m = n sweep at K=10240 of pytorch/ao#174 -- so that the measured points
# test the shape model where it matters (small M, skinny N or K, the large-m drop).
DEFAULT_SHAPES = (
    *(
        f"{m}x{n}x{k}"
        for n, k in ((4096, 4096), (11008, 4096), (4096, 11008))
        for m in (1, 16, 64, 256, 1024, 4096, 16384)
    ),
    *(f"{m}x{n}x{k}" for n, k in ((768, 768), (3072, 768), (768, 3072)) for m in (256, 4096, 32768)),
    *(f"{m}x{n}x{k}" for n, k in ((384, 384), (1536, 384), (384, 1536)) for m in (4096, 32768)),
    *(f"{m}x{m}x10240" for m in (1024, 2048, 3072, 4096, 8192, 16384)),
    "3072x3072x768",
    "3072x768x3072",
    "16384x8192x8192",
    "8192x28672x8192",
    "8192x8192x28672",
)
# Device-name fragments -> shipped profile, most specific first.
DEVICE_PROFILES = (
    ("H100 PCIe", "h100_pcie"),
    ("H200", "h200"),
    ("H100", "h100_sxm"),
    ("A100", "a100"),
    ("L4", "l4"),
    ("RTX 4090", "rtx4090"),
    ("RTX 4070 Ti SUPER", "rtx4070tis"),
    ("RTX 3060", "rtx3060"),
    ("Orin", "orin"),
)
BACKENDS = ("cusparselt", "cutlass")


def cuda_problem() -> str | None:
    """Why this machine cannot run the benchmark, or ``None`` when it can."""
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        name = torch.cuda.get_device_name()
        return f"{name} has compute capability {major}.{minor}; 2:4 sparse tensor cores need >= 8.0"
    return None


def profile_for_device(name: str) -> str | None:
    """The shipped profile a CUDA device name maps to, or ``None`` if it cannot be told."""
    return next((profile for fragment, profile in DEVICE_PROFILES if fragment in name), None)


def parse_shape(text: str) -> tuple[int, int, int]:
    """``MxNxK`` (rows of X, output features, input features) as three positive integers."""
    parts = text.split("x")
    try:
        m, n, k = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MxNxK like 3072x3072x10240, got {text!r}") from None
    if min(m, n, k) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return m, n, k


def graphed(fn: Callable[[], object], calls: int = 1) -> Callable[[], None]:
    """``calls`` back-to-back calls of ``fn`` captured in one CUDA graph; returns its replay.

    Host work done while ``fn`` is captured (torch 2.11 rebuilds cuSPARSELt descriptors on every
    2:4 call) is not replayed: a replay times the kernels alone.

    Raises:
        RuntimeError: ``fn`` cannot be captured.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def median_ms(fn: Callable[[], object], repeats: int, inner: int, graph: bool = False) -> float:
    """Median over ``repeats`` samples of the time per call of ``inner`` back-to-back calls (with
    ``graph``: one replay of the ``inner`` calls captured in a CUDA graph)."""
    if graph:
        replay = graphed(fn, inner)
        return median_ms(replay, repeats, 1) / inner
    for _ in range(3):
        fn()
    return statistics.median(events_ms(fn, inner) for _ in range(repeats))


def events_ms(fn: Callable[[], object], calls: int) -> float:
    """Time per call of ``calls`` back-to-back calls of ``fn``, between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def operands(m: int, n: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``X[m x k]`` and a 2:4-pruned ``W[n x k]`` on the GPU."""
    weight = torch.randn(n, k, device="cuda", dtype=dtype)
    return torch.randn(m, k, device="cuda", dtype=dtype), weight * weight_nm_mask(weight, 2, 4)


def measure(
    hardware: str,
    shapes: Sequence[tuple[int, int, int]],
    dtype: str,
    repeats: int,
    inner: int,
    graph: bool = False,
) -> pd.DataFrame:
    """One row per (shape, backend): dense and sparse median times in the calibration CSV format,
    of eager calls or (``graph``) of CUDA-graph replays."""
    device = torch.cuda.get_device_name()
    mode = "CUDA-graph replay" if graph else "eager"
    sparse_class = torch.sparse.SparseSemiStructuredTensor
    rows = []
    for m, n, k in shapes:
        x, weight = operands(m, n, k, DTYPES[dtype])
        dense = median_ms(lambda x=x, w=weight: F.linear(x, w), repeats, inner, graph)
        for backend in BACKENDS:
            sparse_class._FORCE_CUTLASS = backend == "cutlass"
            try:
                sparse_weight = torch.sparse.to_sparse_semi_structured(weight)
                sparse = median_ms(lambda x=x, w=sparse_weight: F.linear(x, w), repeats, inner, graph)
            except (RuntimeError, NotImplementedError) as error:  # a backend missing from this build
                print(f"m={m} n={n} k={k} {backend}: skipped ({str(error).splitlines()[0]})", flush=True)
                continue
            rows.append(
                {
                    "hardware": hardware,
                    "dtype": dtype,
                    "m": m,
                    "n": n,
                    "k": k,
                    "library": f"{backend} (torch {torch.__version__} to_sparse_semi_structured, {mode})",
                    "dense_ms": dense,
                    "sparse_ms": sparse,
                    "kernel": "tuned",
                    "source": "measured here",
                    "notes": f"{device}; benchmarks/gpu_latency.py, median of {repeats} x {inner} calls ({mode})",
                }
            )
            print(f"m={m} n={n} k={k} {backend}: dense {dense:.4f} ms, 2:4 {sparse:.4f} ms", flush=True)
    sparse_class._FORCE_CUTLASS = False
    return pd.DataFrame(rows, columns=[*MEASUREMENT_COLUMNS, "kernel", "notes"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="CSV to write")
    parser.add_argument("--hardware", help="profile name of this GPU (default: told from the device name)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument(
        "--shapes", type=parse_shape, nargs="+", default=[parse_shape(s) for s in DEFAULT_SHAPES], help="MxNxK"
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed samples per row (median is written)")
    parser.add_argument("--inner", type=int, default=10, help="back-to-back calls per sample")
    parser.add_argument(
        "--graph",
        action="store_true",
        help="time CUDA-graph replays of the calls: the kernels without torch's per-call host setup",
    )
    args = parser.parse_args(argv)
    if args.hardware:
        try:
            load_profile(args.hardware)
        except HardwareProfileError as error:
            print(f"gpu_latency.py: {error}", file=sys.stderr)
            return 2
    problem = cuda_problem()
    if problem:
        print(f"gpu_latency.py: skipped: {problem}; nothing written")
        return 0
    hardware = args.hardware or profile_for_device(torch.cuda.get_device_name())
    if hardware is None:
        print(
            f"gpu_latency.py: cannot tell the profile of {torch.cuda.get_device_name()!r}; pass --hardware "
            f"(one of {', '.join(available_profiles())})",
            file=sys.stderr,
        )
        return 2
    frame = measure(hardware, args.shapes, args.dtype, args.repeats, args.inner, args.graph)
    atomic_write_text(args.out, frame.to_csv(index=False))
    print(f"wrote {len(frame)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
