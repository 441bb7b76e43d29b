"""DominoSearch on the digits task: its scheme against uniform and random N:M at the same weight sparsity.

    python benchmarks/domino.py [--seeds 0 1 2 3 4] [--m 16] [--sparsity 0.875 0.9375] [--finetune-epochs 10]
                                [--configs reference reference:1.0 nmsearch_v1] [--max-epochs 100]
                                [--threads 1] [--csv out.csv]

``--configs`` lists the Domino runs as ``variant[:shrink_lambda]`` (``reference`` alone uses the
reference's own decay, 0.1 every 5th step). Per seed (of pre-training, search and fine-tuning; the
data split is the task's fixed one) and target sparsity:

1. Dense pre-training into a fresh cache directory (not timed as part of the search).
2. Each ``DominoStrategy(m, target="params", target_value=sparsity, variant=...)`` on the space of the
   task's model, scored ``oneshot``; the wall time of ``search`` is the search time.
3. Every Domino scheme, uniform N:M at the target (1:8 and 2:16 at 87.5 %, 1:16 at 93.75 %) and one
   random power-of-two allocation at the same sparsity (``sparsity - 0.001`` to ``+ 0.015``, as Domino
   may land) -- each fine-tuned once the same way (``finetune`` fidelity, SR-STE,
   ``--finetune-epochs``) and scored on the validation split and the test split (the report).

``--threads`` sets torch's intra-op threads (default 1): the model is tiny, and on a shared 2-core
machine two threads per process slow training down several times once other processes compete.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from evaluators import AccuracyConfig, AccuracyEvaluator, Trainer
from experiments.tasks import get_task
from search_space import NMPattern, Option, RecipeConfig, Scheme, SearchSpace
from strategies.domino import DominoStrategy, domino_space

UNIFORM = {0.875: ["1:8", "2:16"], 0.9375: ["1:16"]}


def scoring_space(space: SearchSpace, m: int) -> SearchSpace:
    """Domino's space (every ``N:m`` on the searchable layers) plus the uniform baselines' patterns
    (a space offers only its own ratios)."""
    domino = domino_space(space, m)
    extra = [NMPattern(*(int(v) for v in p.split(":"))) for patterns in UNIFORM.values() for p in patterns]
    ratios = list(dict.fromkeys([*(NMPattern(n, m) for n in range(1, m)), *extra]))
    fixed = [name for name in space.layer_names if name not in space.searchable]
    return SearchSpace(domino.layers, skipped=domino.skipped, fingerprint=domino.fingerprint,
                       example_batch_size=domino.example_batch_size, ratios=ratios, targets=("weights",),
                       fixed_dense=fixed)  # fmt: skip


def parse_config(text: str) -> tuple[str, float | None]:
    variant, _, strength = text.partition(":")
    return variant, float(strength) if strength else None


def allocation(scheme: Scheme, space: SearchSpace) -> str:
    """The searchable layers' weight N:M, in module order (``dense`` for none)."""
    options = dict(scheme.layers)
    return " ".join(str(options[name].weight or "dense") for name in space.searchable)


def weight_sparsity(scheme: Scheme, space: SearchSpace) -> float:
    options = dict(scheme.layers)
    sizes = {name: math.prod(space.info(name).weight_shape) for name in space.searchable}
    weights = {name: options[name].weight for name in sizes}
    kept = sum(size * (weights[name].n / weights[name].m if weights[name] else 1.0) for name, size in sizes.items())
    return 1.0 - kept / sum(sizes.values())


def random_allocation(space: SearchSpace, m: int, sparsity: float, seed: int) -> Scheme:
    """Per-layer N drawn from the powers of two up to ``m`` until the weight sparsity is in
    ``[sparsity - 0.001, sparsity + 0.015]``."""
    rng = np.random.default_rng(seed)
    powers = [2**k for k in range(int(math.log2(m)) + 1)]
    sizes = np.array([math.prod(space.info(name).weight_shape) for name in space.searchable], dtype=float)
    for _ in range(100_000):
        ns = rng.choice(powers, size=len(sizes))
        reached = 1.0 - float(sizes @ (ns / m)) / sizes.sum()
        if sparsity - 0.001 <= reached <= sparsity + 0.015:
            choices = {name: Option(weight=NMPattern(int(n), m)) if n < m else Option()
                       for name, n in zip(space.searchable, ns, strict=True)}  # fmt: skip
            return space.scheme(choices, provenance={"strategy": "random", "seed": seed})
    raise RuntimeError(f"no random power-of-two allocation at sparsity {sparsity} found")


def run_seed(cache_dir: Path, seed: int, sparsity: float, args: argparse.Namespace) -> dict[str, object]:
    trainer = Trainer(get_task("digits"), seed=seed, cache_dir=cache_dir, progress=False)
    dense = trainer.pretrained()
    search_evaluator = AccuracyEvaluator(trainer)
    space = search_evaluator.space
    wide_space = scoring_space(space, args.m)
    config = AccuracyConfig("finetune", finetune_epochs=args.finetune_epochs, recipe=RecipeConfig(estimator="srste"))
    wide = AccuracyEvaluator(trainer, wide_space, config)
    row: dict[str, object] = {"seed": str(seed), "target": sparsity}  # seed: a label, not a number to format
    schemes: dict[str, Scheme] = {}
    for text in args.configs:
        variant, strength = parse_config(text)
        strategy = DominoStrategy(m=args.m, target="params", target_value=sparsity, seed=seed, variant=variant,
                                  shrink_lambda=strength, max_epochs=args.max_epochs)  # fmt: skip
        start = time.perf_counter()
        result = strategy.search(space, search_evaluator)
        row[f"{text} search_s"] = time.perf_counter() - start
        row[f"{text} load"] = os.getloadavg()[0]  # 1-minute load average right after the search
        row[f"{text} steps"] = result.metadata["steps"]
        row[f"{text} forced"] = result.metadata["forced_decisions"]
        row[f"{text} sparsity"] = result.metadata["objective"]
        scheme = result.schemes[result.metadata["final_trial"]]
        row[f"{text} scheme"] = allocation(scheme, space)
        schemes[text] = scheme
    for pattern in UNIFORM.get(sparsity, []):
        n, m = (int(v) for v in pattern.split(":"))
        schemes[f"uniform {pattern}"] = wide_space.uniform("weights", n, m)
    schemes["random"] = random_allocation(wide_space, args.m, sparsity, seed)
    row["random scheme"] = allocation(schemes["random"], wide_space)
    row["random sparsity"] = weight_sparsity(schemes["random"], wide_space)
    row["dense test"] = trainer.evaluate(dense, "test").accuracy
    scored: dict[Scheme, dict[str, float]] = {}
    for label, scheme in schemes.items():
        if scheme not in scored:  # the same scheme is fine-tuned once (same seed: the same model)
            model = wide.sparse_model(scheme)
            scored[scheme] = {split: trainer.evaluate(model, split).accuracy for split in ("val", "test")}
        for split, value in scored[scheme].items():
            row[f"{label} {split}"] = value
    return row


def summary(values: pd.Series) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"mean {values.mean():.4f}, std {spread:.4f}, min {values.min():.4f}, max {values.max():.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.875, 0.9375])
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--configs", nargs="+", default=["reference", "reference:1.0", "nmsearch_v1"],
                        help="Domino runs, variant[:shrink_lambda]")  # fmt: skip
    parser.add_argument("--max-epochs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--csv", type=Path, help="write the per-seed table to this file")
    args = parser.parse_args()
    for text in args.configs:
        variant, _ = parse_config(text)
        DominoStrategy(variant=variant)._validate()  # a bad variant fails before any training
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for seed in args.seeds:
            for sparsity in args.sparsity:
                rows.append(run_seed(Path(cache), seed, sparsity, args))
                print(f"seed {seed} sparsity {sparsity} done at {time.perf_counter() - started:.0f} s", flush=True)
                if args.csv:  # partial results survive an interrupted run
                    pd.DataFrame(rows).to_csv(args.csv, index=False)
    frame = pd.DataFrame(rows)
    print(f"load average at the end {os.getloadavg()}, benchmark wall time {time.perf_counter() - started:.0f} s\n")
    for sparsity, group in frame.groupby("target"):
        print(f"## target sparsity {sparsity}")
        for column in [c for c in group.columns if c.endswith(" test") and group[c].notna().all()]:
            print(f"{column}: {summary(group[column])}")
        for text in args.configs:
            for baseline in [f"uniform {p}" for p in UNIFORM.get(sparsity, [])] + ["random"]:
                gap = 100 * (group[f"{text} test"] - group[f"{baseline} test"])
                print(f"{text} - {baseline} test (points): {summary(gap)}")
    if args.csv:
        frame.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
