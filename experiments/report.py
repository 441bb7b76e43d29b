"""What a finished search shows: ``pareto.png`` and the printed summary of the main job.

* :func:`plot_result` -- one panel per cost objective: every candidate, the front, and marked
  points (the chosen ``scheme.json``, the dense model, each uniform scheme when the search
  evaluated them: Optuna's warm start and the uniform strategy do). A top axis reads cost as a
  speed-up over dense; an axis whose values span less than :data:`TINY_RANGE` of their size
  says so on the panel, since a 1% spread drawn full-width looks like a trade-off that is not
  there.
* :func:`summary` -- the front as a table with each layer's option (``w2:4``, ``a1:8``...).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from evaluators import Objective
from evaluators.pareto import plot_pareto
from search_space import SearchSpace
from strategies import SearchResult

__all__ = ["TINY_RANGE", "baseline_trials", "layer_options", "plot_result", "summary"]

TINY_RANGE = 0.02  # relative spread of an axis below which it is flagged as "no real trade-off"


def baseline_trials(result: SearchResult, space: SearchSpace) -> dict[str, int]:
    """The first completed trial of each uniform scheme of the space that the search evaluated.

    Args:
        result: The search result.
        space: Its search space (``space.uniform_schemes()`` gives the baselines).

    Returns:
        ``{label: trial}`` with labels such as ``"dense"`` or ``"weights 2:4"``; baselines the
        search did not evaluate are absent.
    """
    by_choices = {json.dumps(s.choices, separators=(",", ":")): label for label, s in space.uniform_schemes().items()}
    found: dict[str, int] = {}
    for row in result.completed.itertuples():
        label = by_choices.get(row.scheme)
        if label is not None:
            found.setdefault(label, int(row.trial))
    return found


def _short_label(label: str) -> str:
    """``"weights 2:4"`` -> ``"w2:4"``, ``"both 1:8"`` -> ``"w+a1:8"``, ``"rows 0.2"`` -> ``"r0.2"``."""
    target, _, value = label.partition(" ")
    return {"weights": "w", "activations": "a", "both": "w+a", "rows": "r"}.get(target, target) + value


def _over(reference: float) -> Callable[[np.ndarray], np.ndarray]:
    """``reference / value`` (a cost as a factor of the dense cost; its own inverse)."""
    return lambda value: reference / np.maximum(value, 1e-300)


def _mark_range(ax: Axes, values: pd.Series, objective: Objective) -> None:
    values = values.dropna()
    if values.empty:
        return
    size = max(abs(values.max()), abs(values.min())) or 1.0
    spread = (values.max() - values.min()) / size
    if spread < TINY_RANGE:
        ax.text(
            0.5,
            0.5,
            f"{objective.name} varies by only {100 * spread:.2g}%\nacross all candidates: no real trade-off",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=9,
            color="firebrick",
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "firebrick"},
        )


def plot_result(
    result: SearchResult, title: str, chosen: int | None = None, space: SearchSpace | None = None
) -> plt.Figure:
    """Accuracy against each cost objective of ``result``, with the chosen and baseline points.

    Args:
        result: A finished search (first objective: accuracy; the others: costs).
        title: The figure title.
        chosen: The trial written as ``scheme.json`` (marked with a star).
        space: The search space, to recognise the dense and uniform baselines among the trials.

    Returns:
        The figure (one panel per cost objective).
    """
    accuracy, *costs = result.objectives
    trials = result.trials.set_index("trial")
    baselines = baseline_trials(result, space) if space is not None else {}
    fig, axes = plt.subplots(1, len(costs), figsize=(5.6 * len(costs), 4.4), squeeze=False)
    for ax, cost in zip(axes[0], costs, strict=True):
        plot_pareto({result.strategy: result.completed}, cost, accuracy, ax=ax)
        for i, (label, trial) in enumerate(sorted(baselines.items(), key=lambda item: item[0] != "dense")):
            row = trials.loc[trial]
            marker, color = ("s", "black") if label == "dense" else ("X", "dimgray")
            ax.scatter(row[cost.name], row[accuracy.name], marker=marker, s=40, color=color, zorder=3,
                       label="dense" if label == "dense" else ("uniform" if i <= 1 else None))  # fmt: skip
            if label != "dense":
                ax.annotate(_short_label(label), (row[cost.name], row[accuracy.name]), fontsize=6, xytext=(3, -8),
                            textcoords="offset points", color="dimgray")  # fmt: skip
        if chosen is not None:
            row = trials.loc[chosen]
            ax.scatter(row[cost.name], row[accuracy.name], marker="*", s=220, color="gold", edgecolor="black",
                       zorder=4, label=f"scheme.json (trial {chosen})")  # fmt: skip
        if "dense" in baselines:
            dense = float(trials.loc[baselines["dense"], cost.name])
            if dense > 0:
                top = ax.secondary_xaxis("top", functions=(_over(dense), _over(dense)))
                top.set_xlabel(f"speed-up over dense ({cost.name})" if cost.name == "latency_ms" else
                               f"dense / {cost.name} (x)", fontsize=8)  # fmt: skip
        _mark_range(ax, result.completed[cost.name], cost)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def layer_options(scheme_json: str) -> str:
    """A trial's per-layer options in layer order, e.g. ``"dense w2:4 w1:8"``.

    Args:
        scheme_json: The trial's ``scheme`` column entry (``{layer: option}`` as JSON).

    Returns:
        The option names, space-separated.
    """
    return " ".join(json.loads(scheme_json).values())


def summary(result: SearchResult, trial: int, out: Path) -> str:
    """The printed summary: the front (distinct schemes), each layer's option, the chosen trial.

    Args:
        result: The search result.
        trial: The chosen trial (starred; its scheme is ``scheme.json``).
        out: The results folder, named on the last line.

    Returns:
        The summary text (a Markdown table of the front and a few lines around it).
    """
    columns = ["trial", *(o.name for o in result.objectives)]
    front = result.front
    table = front[columns].copy()
    table.insert(0, "", ["*" if t == trial else "" for t in front["trial"]])
    table["layers"] = [layer_options(s) for s in front["scheme"]]
    layers = list(json.loads(front["scheme"].iloc[0])) if len(front) else []
    duplicates = int(result.trials.get("duplicate_of", pd.Series(dtype="Int64")).notna().sum())
    lines = [
        f"{result.strategy}: {len(result.trials)} candidates, {len(front)} distinct schemes on the Pareto front "
        f"({', '.join(f'{o.name} {o.direction}' for o in result.objectives)})"
        + (f"; {duplicates} repeated schemes linked to their first trial" if duplicates else ""),
        table.to_markdown(index=False, floatfmt=".4g"),
        f"layers: {', '.join(layers)}",
        f"* = scheme.json (trial {trial})",
        f"results: {out}",
    ]
    return "\n".join(lines)
