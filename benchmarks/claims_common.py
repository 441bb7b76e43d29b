"""Shared pieces of the ``claims_*`` benchmarks (issue 11): load, timing, caching and output helpers."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch

from evaluators import AccuracyEvaluator, Evaluation, Trainer
from search_space import RecipeConfig, Scheme, SearchSpace

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DOCS = Path(__file__).resolve().parent.parent / "docs"


def header(name: str, threads: int = 1) -> None:
    """Set torch's intra-op threads (1 by default: the digits model is too small to gain from more, and
    on a shared 2-core machine a second thread mostly waits) and print torch, threads and the load."""
    torch.set_num_threads(threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{name}: torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.2f}")


@contextmanager
def timed(label: str, log: dict[str, float]) -> Iterator[None]:
    """Record the wall time of the block under ``label`` in ``log`` (and print it)."""
    start = time.perf_counter()
    yield
    log[label] = time.perf_counter() - start
    print(f"  {label}: {log[label]:.1f} s", flush=True)


def describe(scheme: Scheme, space: SearchSpace) -> str:
    """The scheme's options on the searchable layers, in layer order (``dense w2:4 a1:8 ...``)."""
    return " ".join(scheme[name].name for name in space.searchable)


class CachedAccuracy:
    """An :class:`AccuracyEvaluator` whose results are kept per scheme: evaluations re-seed, so a
    scheme always gets the same score, and several searches (other cost metrics, other spaces over
    the same model) can share them. ``evaluator.space`` must hold every option the searches use."""

    def __init__(self, evaluator: AccuracyEvaluator) -> None:
        self.evaluator = evaluator
        self.objectives = evaluator.objectives
        self.cache: dict[Scheme, Evaluation] = {}
        self.misses = 0

    def evaluate(self, scheme: Scheme) -> Evaluation:
        if scheme not in self.cache:  # equality and hashing use the choices only
            self.misses += 1
            self.cache[scheme] = self.evaluator.evaluate(scheme)
        return self.cache[scheme]


def write_csv(frame: pd.DataFrame, name: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    frame.to_csv(path, index=False)
    print(f"wrote {path}")
    return path


def save_figure(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def markdown(frame: pd.DataFrame, floatfmt: str = ".4f") -> str:
    return frame.to_markdown(index=False, floatfmt=floatfmt)


def train_sparse(
    trainer: Trainer, scheme: Scheme, recipe: RecipeConfig, *, from_scratch: bool = True, epochs: int | None = None
) -> dict[str, object]:
    """Train ``scheme`` with ``recipe`` from a fresh model over the task's whole schedule (the SR-STE
    setting; ``from_scratch=False``: fine-tune the pre-trained model at ``finetune_lr``) and return
    the test and validation accuracy, the wall time and the per-epoch SAD (mask flip rate)."""
    schedule = trainer.schedule
    start = time.perf_counter()
    if from_scratch:
        model = scheme.apply(trainer.fresh_model(), inplace=True)
        epochs = epochs or schedule.epochs
        fit = trainer.fit(model, epochs=epochs, lr=schedule.lr, recipe=recipe, warmup_epochs=schedule.warmup_epochs)
    else:
        model = scheme.apply(trainer.pretrained(), inplace=True)
        epochs = epochs or 10
        fit = trainer.fit(model, epochs=epochs, lr=schedule.finetune_lr, recipe=recipe)
    train_s = time.perf_counter() - start
    steps_per_epoch = fit.steps // epochs
    history = fit.recipe.sad_history()
    numel = {name: layer.weight.numel() for name, layer in fit.recipe.layers.items()}
    history = history.assign(epoch=history.step // steps_per_epoch, checked=history.layer.map(numel) * history.updates)
    per_epoch = history.groupby("epoch")[["flips", "checked"]].sum()
    return {
        "test_accuracy": trainer.evaluate(model, "test").accuracy,
        "val_accuracy": trainer.evaluate(model, "val").accuracy,
        "train_loss": fit.train_loss,
        "train_s": train_s,
        "flips": int(history.flips.sum()),
        "flip_rate": float(history.flips.sum() / history.checked.sum()) if len(history) else 0.0,
        "sad_per_epoch": (per_epoch.flips / per_epoch.checked).rename("flip_rate").reset_index(),
    }
