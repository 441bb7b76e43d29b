"""Measure dense vs 2:4 semi-structured sparse linear latencies on a CUDA GPU, for cost-model calibration.

    python benchmarks/gpu_latency.py --out docs/latency_h100.csv [--dtype fp16] [--backend cusparselt]
    python -m evaluators.calibration docs/latency_h100.csv --profile h100_sxm --out h100_calibrated.yaml

For every shape ``Y[T x N] = X[T x K] W^T`` (no bias) it times ``F.linear(x, w)`` with the dense
weight (option ``dense``) and with the 2:4-pruned weight converted by
``torch.sparse.to_sparse_semi_structured`` (option ``w2:4``), back to back on one stream between
CUDA events; the median over ``--repeats`` samples of ``--inner`` calls each is written per row.
The CSV has the columns :data:`evaluators.calibration.LATENCY_COLUMNS` (plus ``backend`` and
``torch``). Needs a CUDA build of torch and compute capability >= 8.0; exits with status 1 otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from evaluators.calibration import LATENCY_COLUMNS
from search_space import weight_nm_mask

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_TOKENS = (1, 16, 128, 1024, 8192)
DEFAULT_FEATURES = ("1024x1024", "4096x4096", "4096x11008", "11008x4096", "8192x8192")


def cuda_problem() -> str | None:
    """Why this machine cannot run the benchmark, or ``None`` when it can."""
    if not torch.cuda.is_available():
        return (
            f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}); "
            "run it on an NVIDIA GPU with compute capability >= 8.0 and a CUDA build of torch"
        )
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        name = torch.cuda.get_device_name()
        return f"{name} has compute capability {major}.{minor}; 2:4 sparse tensor cores need >= 8.0"
    return None


def median_ms(fn: Callable[[], torch.Tensor], repeats: int, inner: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def measure(
    tokens: Sequence[int], features: Sequence[tuple[int, int]], dtype: str, repeats: int, inner: int
) -> pd.DataFrame:
    device = torch.cuda.get_device_name()
    rows = []
    for in_features, out_features in features:
        weight = torch.randn(out_features, in_features, device="cuda", dtype=DTYPES[dtype])
        weight = weight * weight_nm_mask(weight, 2, 4)
        sparse_weight = torch.sparse.to_sparse_semi_structured(weight)
        for t in tokens:
            x = torch.randn(t, in_features, device="cuda", dtype=DTYPES[dtype])
            for option, w in (("dense", weight), ("w2:4", sparse_weight)):
                latency = median_ms(lambda x=x, w=w: F.linear(x, w), repeats, inner)
                rows.append((device, dtype, t, in_features, out_features, option, latency))
                print(f"{dtype} T={t} K={in_features} N={out_features} {option}: {latency:.4f} ms", flush=True)
    return pd.DataFrame(rows, columns=list(LATENCY_COLUMNS))


def parse_features(text: str) -> tuple[int, int]:
    in_features, _, out_features = text.partition("x")
    try:
        return int(in_features), int(out_features)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected IN x OUT features like 4096x11008, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="CSV to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS), help="T values (rows of X)")
    parser.add_argument(
        "--features",
        type=parse_features,
        nargs="+",
        default=[parse_features(f) for f in DEFAULT_FEATURES],
        help="IN x OUT feature pairs (multiples of 64)",
    )
    parser.add_argument(
        "--backend",
        choices=("default", "cutlass"),
        default="default",
        help="cutlass forces torch's CUTLASS kernels instead of cuSPARSELt",
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed samples per row (median is written)")
    parser.add_argument("--inner", type=int, default=10, help="back-to-back calls per sample")
    args = parser.parse_args(argv)
    problem = cuda_problem()
    if problem:
        print(f"gpu_latency.py: {problem}", file=sys.stderr)
        return 1
    torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS = args.backend == "cutlass"
    frame = measure(args.tokens, args.features, args.dtype, args.repeats, args.inner)
    frame.assign(backend=args.backend, torch=torch.__version__).to_csv(args.out, index=False)
    print(f"wrote {len(frame)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
