"""Gumbel supernet: step cost against a dense step, and a lambda sweep on digits.

    python benchmarks/gumbel.py steps [--repeats 20] [--models digits cifar] [--groups 2 all] [--threads 1]
                                      [--clock wall|cpu]
    python benchmarks/gumbel.py sweep [--lambdas 0 0.1 0.3 1 3] [--epochs 20] [--out docs/gumbel]

``steps``: supernet steps against one dense SGD step of the same model and batch, in rounds that
run them back to back (median of the per-round ratio): the digits CNN (batch 32) and a CIFAR
ResNet-18 (batch 32, 32x32), with the default space (13 options per layer, 5 activation choices).
A weight step computes the sampled option alone; a logit step (weights frozen, Adam on the
logits) computes ``--groups`` activation groups per layer (2, the default, and all); the epoch
mix is what a training epoch costs per step (4 weight steps per logit step). ``--clock cpu`` times
each step by this thread's CPU time instead of the wall clock (with ``--threads 1`` every op runs on
this thread): on a shared, loaded machine it leaves out the time the process waited for a core.

``sweep``: GumbelStrategy over a lambda sweep on digits (cost: bytes moved on A100, batch 1;
accuracy: the finetune fidelity, 3 epochs SR-STE, validation split), against the uniform
baselines scored the same way; writes the candidates and the fronts' figure.

``hardware``: the same search (lambda 1, latency) for an ImageNet ResNet-18 costed at 224x224 on
a memory-bound setting (Jetson AGX Orin, batch 1) and a compute-bound one (A100, batch 256). The
supernet trains on synthetic 32x32 images (ResNets are resolution-agnostic; no ImageNet here),
so the accuracy signal is weak and the picture shows what the cost model steers the choice to.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch
from timing import interleaved_s, sgd_step
from torch import nn

from evaluators import (
    AccuracyConfig,
    AccuracyEvaluator,
    CompositeEvaluator,
    CostEvaluator,
    HardwareCostModel,
    Trainer,
)
from evaluators.pareto import hypervolume, pareto_front, pareto_mask, plot_pareto, reference_point
from evaluators.task import TensorTask, TrainingSchedule
from experiments.models import resnet18
from experiments.tasks import get_task
from search_space import RecipeConfig, SearchSpace
from strategies import UniformStrategy
from strategies.gumbel import ARCH_SHARE, GumbelStrategy, build_supernet


def logit_step(model: nn.Module, logits: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> callable:
    """One architecture step: the weights frozen, cross-entropy backward into the logits, an Adam update."""
    for p in model.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(logits, lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()
    return step


def step_ratio(
    make: callable, x: torch.Tensor, y: torch.Tensor, active_groups: int | None, repeats: int, clock: callable
) -> dict:
    """Medians of the per-round ratios of a supernet step to a dense step: a weight step (the sampled
    option alone), a logit step (``active_groups`` activation groups) and the mix of a training epoch
    (``ARCH_SHARE - 1`` weight steps per logit step)."""
    dense = make()
    weights_net, logits_net = make(), make()
    space = SearchSpace.from_model(weights_net, x[:1])
    steps = {"dense": sgd_step(dense, x, y)}
    for label, net in (("weights", weights_net), ("logits", logits_net)):
        logits = {n: torch.zeros(len(space.options[n]), requires_grad=True) for n in space.searchable}
        for layer in build_supernet(net, space, logits).values():
            layer.active_groups = active_groups
            layer.train_logits = label == "logits"
        steps[label] = sgd_step(net, x, y) if label == "weights" else logit_step(net, list(logits.values()), x, y)
    times = interleaved_s(steps, repeats, clock)
    row = {"dense_ms": statistics.median(times["dense"]) * 1e3}
    for label in ("weights", "logits"):
        ratios = [s / d for s, d in zip(times[label], times["dense"], strict=True)]
        row[f"{label} step / dense"] = statistics.median(ratios)
    mixed = [((ARCH_SHARE - 1) * w + a) / (ARCH_SHARE * d)
             for w, a, d in zip(times["weights"], times["logits"], times["dense"], strict=True)]  # fmt: skip
    row["epoch mix / dense"] = statistics.median(mixed)
    q1, _, q3 = statistics.quantiles(mixed, n=4)
    row["epoch mix IQR"] = f"{q1:.2f}-{q3:.2f}"
    return row


def steps(repeats: int, models: list[str], groups: list[int | None], clock: str = "wall") -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {clock} clock, "
          f"load average {os.getloadavg()}")  # fmt: skip
    timer = time.thread_time if clock == "cpu" else time.perf_counter
    digits = get_task("digits")
    cases = {
        "digits CNN, batch 32": (digits.build_model, torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))),
        "CIFAR ResNet-18, batch 32": (
            lambda: resnet18(10, "cifar"),
            torch.randn(32, 3, 32, 32),
            torch.randint(0, 10, (32,)),
        ),
    }
    rows = []
    for label, (make, x, y) in cases.items():
        if label.split()[0].lower() not in models:
            continue
        for active in groups:
            torch.manual_seed(0)
            row = step_ratio(make, x, y, active, repeats, timer)
            rows.append({"model": label, "active_groups": active or "all", **row})
            print(pd.DataFrame(rows[-1:]).to_markdown(index=False, floatfmt=".2f"), flush=True)
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f"))
    print(f"load average at the end {os.getloadavg()}")


def sweep(lambdas: list[float], epochs: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as cache:
        trainer = Trainer(get_task("digits"), cache_dir=cache, progress=False)
        accuracy = AccuracyEvaluator(
            trainer, config=AccuracyConfig("finetune", finetune_epochs=3, recipe=RecipeConfig(estimator="srste"))
        )
        space = accuracy.space
        evaluator = CompositeEvaluator(
            accuracy, CostEvaluator(space, HardwareCostModel.from_profile("a100"), metrics=("bytes_mb",))
        )
        trainer.pretrained()
        start = time.perf_counter()
        gumbel = GumbelStrategy(epochs=epochs, lambdas=lambdas, arch_lr=0.02, cost_metric="bytes_mb").search(
            space, evaluator
        )
        gumbel_s = time.perf_counter() - start
        uniform = UniformStrategy().search(space, evaluator)
    frames = {"gumbel": gumbel.completed, "uniform": uniform.completed}
    objectives = gumbel.objectives
    reference = reference_point(list(frames.values()), objectives)
    rows = []
    for name, frame in frames.items():
        values = frame[[o.name for o in objectives]].to_numpy(dtype=float)
        rows.append({"strategy": name, "candidates": len(frame),
                     "hypervolume": hypervolume(values, [o.direction for o in objectives], reference)})  # fmt: skip
    both = pd.concat([f.assign(strategy=n) for n, f in frames.items()], ignore_index=True)
    on_front = pareto_mask(both[[o.name for o in objectives]].to_numpy(dtype=float), [o.direction for o in objectives])
    dominated = [
        int(t) for t in both[(both.strategy == "gumbel") & ~on_front]["trial"]
    ]  # gumbel candidates that some other point (uniform or gumbel) beats
    print(f"lambda sweep {lambdas}, {epochs} epochs each: {gumbel_s:.0f} s for the search and its evaluations")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".5f"))
    print(gumbel.trials[["trial", "accuracy", "bytes_mb", "info.setting", "summary"]].to_markdown(index=False))
    print("gumbel candidates dominated by another candidate:", dominated or "none")
    uniform_only = pareto_front(frames["uniform"], objectives)
    by_uniform = [
        int(t) for t in frames["gumbel"]["trial"]
        if not pareto_mask(
            pd.concat([uniform_only, frames["gumbel"][frames["gumbel"]["trial"] == t]])[[o.name for o in objectives]]
            .to_numpy(dtype=float), [o.direction for o in objectives])[-1]
    ]  # fmt: skip
    print("gumbel candidates dominated by a uniform baseline:", by_uniform or "none")
    both.to_csv(out / "gumbel_sweep.csv", index=False)
    ax = plot_pareto(frames, objectives[1], objectives[0], title="digits: Gumbel lambda sweep vs uniform")
    ax.figure.savefig(out / "gumbel_sweep.png", dpi=120, bbox_inches="tight")


@dataclass(frozen=True)
class SyntheticImages(TensorTask):
    """Noisy class prototypes at 3x32x32 for an ImageNet ResNet-18 (10 classes)."""

    name: ClassVar[str] = "synthetic_images"
    schedule: TrainingSchedule = field(
        default_factory=lambda: TrainingSchedule(epochs=3, batch_size=32, eval_batch_size=128, lr=0.05)
    )
    size: int = 256

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(0)
        prototypes = torch.randn(10, 3, 32, 32, generator=generator)
        splits = {}
        for split in ("train", "val", "test"):
            labels = torch.arange(self.size) % 10
            splits[split] = (prototypes[labels] + torch.randn(self.size, 3, 32, 32, generator=generator), labels)
        return splits

    def build_model(self) -> nn.Module:
        return resnet18(10, "imagenet")


def hardware(epochs: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    settings = {"Jetson AGX Orin, batch 1": ("orin", 1), "A100, batch 256": ("a100", 256)}
    choices = {}
    with tempfile.TemporaryDirectory() as cache:
        trainer = Trainer(SyntheticImages(), cache_dir=cache, progress=False)
        space = SearchSpace.from_model(trainer.fresh_model(), torch.randn(1, 3, 224, 224))
        accuracy = AccuracyEvaluator(trainer, space)
        for label, (profile, batch) in settings.items():
            cost = CostEvaluator(space, HardwareCostModel.from_profile(profile, batch_size=batch))
            start = time.perf_counter()
            result = GumbelStrategy(epochs=epochs, lambdas=(1.0,), arch_lr=0.05).search(
                space, CompositeEvaluator(accuracy, cost)
            )
            scheme = result.schemes[0]
            report = cost.cost_model.evaluate(space, scheme)
            print(f"{label}: {time.perf_counter() - start:.0f} s, modelled speedup {report.speedup:.2f}x, "
                  f"{scheme.summary()}")  # fmt: skip
            choices[label] = scheme.to_frame().set_index("layer")
    table = pd.concat({label: frame.apply(_option_name, axis=1) for label, frame in choices.items()}, axis=1)
    print(table.to_markdown())
    table.to_csv(out / "gumbel_hardware.csv")
    fig, ax = plt.subplots(figsize=(10, 3.6))
    for i, (label, frame) in enumerate(choices.items()):
        weights = [_density(choice) for choice in frame["weights"]]
        ax.bar([x + 0.4 * i for x in range(len(frame))], weights, width=0.4, label=label)
    ax.set_xticks([x + 0.2 for x in range(len(space.layer_names))], space.layer_names, rotation=90, fontsize=7)
    ax.set_ylabel("kept weights (N/M)")
    ax.set_title("ResNet-18 @224: weight density Gumbel picks per layer")
    ax.legend()
    fig.savefig(out / "gumbel_hardware.png", dpi=120, bbox_inches="tight")


def _option_name(choice: pd.Series) -> str:
    parts = [f"w{choice['weights']}"] if choice["weights"] else []
    parts += [f"a{choice['activations']}"] if choice["activations"] else []
    return "+".join(parts) or "dense"


def _density(text: str) -> float:
    if not text:
        return 1.0
    n, m = text.split(":")
    return int(n) / int(m)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_steps = sub.add_parser("steps")
    p_steps.add_argument("--repeats", type=int, default=20)
    p_steps.add_argument("--models", nargs="+", choices=("digits", "cifar"), default=["digits", "cifar"])
    p_steps.add_argument("--groups", nargs="+", default=["2", "all"], help="active_groups values (all: every group)")
    p_steps.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier when shared)")
    p_steps.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: this thread's CPU time")
    p_sweep = sub.add_parser("sweep")
    p_sweep.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.1, 0.3, 1.0, 3.0])
    p_sweep.add_argument("--epochs", type=int, default=20)
    p_sweep.add_argument("--out", type=Path, default=Path("docs/gumbel"))
    p_hardware = sub.add_parser("hardware")
    p_hardware.add_argument("--epochs", type=int, default=12)
    p_hardware.add_argument("--out", type=Path, default=Path("docs/gumbel"))
    args = parser.parse_args()
    if args.command == "steps":
        torch.set_num_threads(args.threads)
        if args.clock == "cpu" and args.threads != 1:
            parser.error("--clock cpu times this thread alone: use it with --threads 1")
        steps(args.repeats, args.models, [None if g == "all" else int(g) for g in args.groups], args.clock)
    elif args.command == "sweep":
        sweep(args.lambdas, args.epochs, args.out)
    else:
        hardware(args.epochs, args.out)


if __name__ == "__main__":
    main()
