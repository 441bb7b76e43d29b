"""Speed of the hardware cost model on a ResNet-18 (ImageNet, 224x224) search space, on one CPU core.

    python benchmarks/cost_model.py [--profile a100] [--schemes 100000] [--repeats 20]

Measures, median of ``--repeats`` runs, pinned to one core:
1. building the layer x option table (``HardwareCostModel.table``);
2. scoring ``--schemes`` random schemes at once from their option indices (``CostTable.totals``,
   all five metrics) -- the path strategies use; the target is >= 100,000 schemes/s;
3. ``CostEvaluator.evaluate`` on one ``Scheme`` (encoding included) and
   ``HardwareCostModel.evaluate`` (the per-layer DataFrame report);
4. the expected latency under option probabilities, forward and backward (``CostTable.expected``).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from timing import median_s

from evaluators.cost import CostEvaluator, HardwareCostModel
from experiments.models import resnet18
from search_space import Scheme, SearchSpace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="a100")
    parser.add_argument("--schemes", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)

    space = SearchSpace.from_model(resnet18(1000, "imagenet"), torch.randn(1, 3, 224, 224))
    model = HardwareCostModel.from_profile(args.profile)
    table = model.table(space)
    counts = space.option_valid_mask().sum(axis=1)
    rng = np.random.default_rng(0)
    indices = (rng.random((args.schemes, len(counts))) * counts).astype(np.int64)
    scheme = Scheme.random(space, seed=0)
    evaluator = CostEvaluator(space, model, metrics=("latency_ms", "energy_mj"))
    logits = torch.randn(*space.option_valid_mask().shape, requires_grad=True)
    padded = torch.from_numpy(~space.option_valid_mask())

    def expected_step() -> None:
        probs = torch.softmax(logits.masked_fill(padded, float("-inf")), dim=-1)
        table.expected(probs).backward()

    timings = {
        "table build (ms)": median_s(lambda: model.table(space), args.repeats) * 1e3,
        f"vectorised totals of {args.schemes} schemes (ms)": median_s(lambda: table.totals(indices), args.repeats)
        * 1e3,
        "CostEvaluator.evaluate, one Scheme (µs)": median_s(lambda: evaluator.evaluate(scheme), args.repeats * 10)
        * 1e6,
        "HardwareCostModel.evaluate with DataFrame (ms)": median_s(lambda: model.evaluate(space, scheme), args.repeats)
        * 1e3,
        "expected latency forward+backward (µs)": median_s(expected_step, args.repeats * 10) * 1e6,
    }
    print(f"{space} on {model.profile.name} {model.dtype}, batch {model.batch_size}, 1 core")
    for name, value in timings.items():
        print(f"  {name:<50} {value:10.3f}")
    rate = args.schemes / (timings[f"vectorised totals of {args.schemes} schemes (ms)"] / 1e3)
    print(f"  vectorised scoring: {rate:,.0f} schemes/s (target >= 100,000)")


if __name__ == "__main__":
    main()
