"""DominoSearch (Sun et al., NeurIPS 2021) on digits: does a layer-wise N:M scheme beat uniform N:M at
the same budget?

    python benchmarks/claims_layerwise.py [--seeds 5] [--trials 40] [--gumbel-epochs 12]
                                         [--finetune-epochs 10] [--quick]

Two budgets, each set by uniform weight 1:8 on every searchable layer:

* ``params``: 87.5 % weight sparsity of the searchable layers (uniform 1:8);
* ``latency``: the modelled latency of uniform 1:8 on Jetson AGX Orin (FP16, batch 1, the
  memory-bound edge setting).

Per seed (of pre-training, search and fine-tuning) and budget, four schemes:

* ``uniform 1:8`` (and ``uniform 2:16``, same density, M = 16 like Domino, for reference);
* ``domino``: ``DominoStrategy(m=16, target="params", target_value=0.875)`` or
  ``target="latency_ms"`` at the uniform scheme's fraction of the dense latency (Orin, batch 1);
* ``optuna``: TPE over the weights-only space with ratios 2:4, 1:4, 2:8, 1:8, 2:16, 1:16,
  ``--trials`` evaluations of accuracy (1-epoch SR-STE fine-tune, validation split) under the
  constraint ``params <= uniform 1:8`` (or ``latency_ms <=``); the best feasible trial;
* ``gumbel``: ``GumbelStrategy(loss="budget")`` over the same space at the budget (as a fraction of
  dense cost), with ``budget_weight`` scaled by the reachable range (``10 / (1 - floor)^2``), 8
  sampled schemes besides the argmax, all scored by 1-epoch fine-tune; the best one within the
  budget (the cheapest one when none is).

Every scheme is then fine-tuned the same way (``finetune`` fidelity, SR-STE, ``--finetune-epochs``
at the task's fine-tuning rate) and scored on the test split (360 images: 0.28 points each).

Writes ``docs/claims_layerwise.csv`` and ``docs/claims_layerwise.png``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import optuna
import pandas as pd
from claims_common import DOCS, describe, header, markdown, save_figure, write_csv

from evaluators import (
    AccuracyConfig,
    AccuracyEvaluator,
    CompositeEvaluator,
    CostEvaluator,
    HardwareCostModel,
    Trainer,
)
from experiments.tasks import get_task
from search_space import NMPattern, RecipeConfig, Scheme, SearchSpace
from strategies import GumbelStrategy, OptunaStrategy
from strategies.domino import DominoStrategy

SEARCH_RATIOS = ("2:4", "1:4", "2:8", "1:8", "2:16", "1:16")
PROFILE, BATCH = "orin", 1
METHODS = ("uniform 1:8", "uniform 2:16", "domino", "optuna", "gumbel")


def weight_sparsity(scheme: Scheme, space: SearchSpace) -> float:
    """Global weight sparsity of the searchable layers (what DominoSearch's ``params`` target counts)."""
    total = kept = 0.0
    for name in space.searchable:
        numel = math.prod(space.info(name).weight_shape)
        pattern = scheme[name].weight
        total += numel
        kept += numel * (pattern.n / pattern.m if pattern is not None else 1.0)
    return 1.0 - kept / total


def run_seed(seed: int, args: argparse.Namespace, log: list[dict]) -> list[dict]:
    task = get_task("digits")
    trainer = Trainer(task, seed=seed, cache_dir=args.cache_dir, progress=False)
    trainer.pretrained()
    model = trainer.fresh_model()
    space = SearchSpace.from_model(model, task.example_inputs(), targets=("weights",), ratios=SEARCH_RATIOS)
    # every pattern any method can pick (Domino's N:16 included), for the final fine-tuning
    wide_ratios = sorted({*SEARCH_RATIOS, *(f"{n}:16" for n in range(1, 16))}, key=lambda r: NMPattern.parse(r).m)
    wide = SearchSpace.from_model(model, task.example_inputs(), targets=("weights",), ratios=wide_ratios)
    cost_model = HardwareCostModel.from_profile(PROFILE, dtype="fp16", batch_size=BATCH)
    cost = CostEvaluator(space, cost_model, metrics=("params", "latency_ms"))
    wide_cost = CostEvaluator(wide, cost_model, metrics=("params", "latency_ms"))
    search_config = AccuracyConfig("finetune", finetune_epochs=1, recipe=RecipeConfig(estimator="srste"))
    searcher = CompositeEvaluator(AccuracyEvaluator(trainer, space, search_config), cost)
    final = AccuracyEvaluator(
        trainer,
        wide,
        AccuracyConfig("finetune", finetune_epochs=args.finetune_epochs, recipe=RecipeConfig(estimator="srste")),
    )
    dense_cost = wide_cost.evaluate(Scheme.dense(wide)).values
    uniform = Scheme.uniform(space, "weights", 1, 8)
    reference = cost.evaluate(uniform).values
    budgets = {
        "params": ("params", reference["params"]),
        "latency": ("latency_ms", reference["latency_ms"]),
    }
    rows = []
    for budget, (metric, limit) in budgets.items():
        if budget not in args.budgets:
            continue
        fraction = limit / dense_cost[metric]
        schemes: dict[str, tuple[Scheme, float]] = {
            "uniform 1:8": (uniform, 0.0),
            "uniform 2:16": (Scheme.uniform(wide, "weights", 2, 16), 0.0),
        }
        start = time.perf_counter()
        if budget == "params":
            domino = DominoStrategy(m=16, target="params", target_value=weight_sparsity(uniform, space), seed=seed)
        else:
            domino = DominoStrategy(m=16, target="latency_ms", target_value=fraction, seed=seed,
                                    hardware=PROFILE, batch_size=BATCH)  # fmt: skip
        result = domino.search(space, AccuracyEvaluator(trainer, space))
        schemes["domino"] = (result.schemes[result.metadata["final_trial"]], time.perf_counter() - start)
        diagnostics = ("epochs", "steps", "decisions", "forced_decisions", "objective")
        log.append({"seed": seed, "budget": budget, "method": "domino", **{k: result.metadata[k] for k in diagnostics}})

        start = time.perf_counter()
        constraint = f"{metric}<={limit * (1 + 1e-9)!r}"
        optuna_result = OptunaStrategy(n_trials=args.trials, seed=seed, objectives=["accuracy"],
                                       constraints=[constraint]).search(space, searcher)  # fmt: skip
        # the warm start holds uniform 1:8, so a feasible trial exists once the budget covers it
        best = optuna_result.select([constraint], objective="accuracy")
        schemes["optuna"] = (optuna_result.schemes[best], time.perf_counter() - start)
        feasible = int(optuna_result.completed.eval(f"{metric} <= {limit * (1 + 1e-9)!r}").sum())
        log.append({"seed": seed, "budget": budget, "method": "optuna", "feasible_trials": feasible})

        start = time.perf_counter()
        table = cost.table
        values = np.where(table.valid, table.values[..., table.metrics.index(metric)], np.inf)
        floor = float(values.min(axis=1).sum() / dense_cost[metric])
        gumbel = GumbelStrategy(
            epochs=args.gumbel_epochs,
            loss="budget",
            budgets=[fraction],
            cost_metric=metric,
            budget_weight=10.0 / (1.0 - floor) ** 2,
            arch_lr=0.02,
            samples=8,
            seed=seed,
        )
        gumbel_result = gumbel.search(space, searcher)
        done = gumbel_result.completed
        within = done[done[metric] <= limit * (1 + 1e-9)]
        pick = within.loc[within.accuracy.idxmax()] if len(within) else done.loc[done[metric].idxmin()]
        schemes["gumbel"] = (gumbel_result.schemes[int(pick.trial)], time.perf_counter() - start)
        log.append(
            {
                "seed": seed,
                "budget": budget,
                "method": "gumbel",
                "within_budget": len(within),
                "candidates": len(done),
                "picked": pick.get("info.pick", ""),
            }
        )

        for method, (scheme, search_s) in schemes.items():
            start = time.perf_counter()
            test = final.evaluate_on(scheme, "test").values["accuracy"]
            costs = wide_cost.evaluate(scheme).values
            rows.append({
                "seed": seed, "budget": budget, "method": method, "test_accuracy": test,
                "weight_sparsity": weight_sparsity(scheme, space), "params": costs["params"],
                "latency_ms": costs["latency_ms"], "within_budget": bool(costs[metric] <= limit * (1 + 1e-9)),
                "scheme": describe(scheme, space), "search_s": search_s,
                "finetune_s": time.perf_counter() - start,
            })  # fmt: skip
            print(f"  seed {seed} {budget:8s} {method:13s} test {test:.4f} sparsity "
                  f"{rows[-1]['weight_sparsity']:.4f} latency {costs['latency_ms'] * 1e3:.3f} us  "
                  f"{rows[-1]['scheme']}", flush=True)  # fmt: skip
    return rows


def plot(frame: pd.DataFrame, path: Path) -> None:
    budgets = list(dict.fromkeys(frame.budget))
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4), squeeze=False)
    for ax, budget in zip(axes[0], budgets, strict=True):
        group = frame[frame.budget == budget]
        methods = [m for m in METHODS if m in set(group.method)]
        for i, method in enumerate(methods):
            values = 100 * group[group.method == method].test_accuracy
            ax.bar(i, values.mean(), yerr=values.std() if len(values) > 1 else 0, color=f"C{i}", alpha=0.7, capsize=4)
            ax.scatter([i] * len(values), values, color="k", s=10, zorder=3)
        ax.set_xticks(range(len(methods)), methods, rotation=20)
        low = 100 * group.test_accuracy.min()
        ax.set_ylim(max(0, low - 3), 100)
        ax.set_ylabel("test accuracy after fine-tuning [%]")
        ax.set_title(f"equal {budget} (uniform 1:8)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("digits: layer-wise vs uniform N:M at equal budget (mean, std and seeds)")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=40, help="Optuna evaluations per seed and budget")
    parser.add_argument("--gumbel-epochs", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--budgets", nargs="+", default=["params", "latency"], choices=["params", "latency"])
    parser.add_argument("--cache-dir", type=Path, default=None, help="pre-training cache (default: nmsearch's)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 8 trials, 2 Gumbel epochs, 1 epoch")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.trials, args.gumbel_epochs, args.finetune_epochs = 1, 8, 2, 1
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    header("claims_layerwise", args.threads)
    start = time.perf_counter()
    log: list[dict] = []
    frame = pd.DataFrame([row for seed in range(args.seeds) for row in run_seed(seed, args, log)])
    suffix = "_quick" if args.quick else ""
    write_csv(frame, f"claims_layerwise{suffix}.csv", args.out)
    plot(frame, args.out / f"claims_layerwise{suffix}.png")
    print("\n## Per seed\n")
    print(markdown(frame.drop(columns=["params"]), ".4f"))
    summary = frame.groupby(["budget", "method"], sort=False).agg(
        test_mean=("test_accuracy", "mean"), test_std=("test_accuracy", "std"),
        sparsity=("weight_sparsity", "mean"), latency_us=("latency_ms", lambda s: 1e3 * s.mean()),
        search_s=("search_s", "median"),
    )  # fmt: skip
    print("\n## Mean over seeds\n")
    print(markdown(summary.reset_index(), ".4f"))
    uniform = frame[frame.method == "uniform 1:8"].set_index(["budget", "seed"]).test_accuracy
    others = frame[frame.method != "uniform 1:8"]
    base = uniform.loc[list(zip(others.budget, others.seed, strict=True))].to_numpy()
    deltas = others.assign(delta_points=100 * (others.test_accuracy.to_numpy() - base))
    print("\n## Difference to uniform 1:8 (points, paired by seed)\n")
    paired = deltas.groupby(["budget", "method"], sort=False).delta_points.agg(["mean", "std", "min", "max"])
    print(markdown(paired.reset_index(), ".2f"))
    print("\n## Search diagnostics\n")
    print(markdown(pd.DataFrame(log), ".4f"))
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
