"""Per-layer sensitivity and the OWL-style non-uniform allocation baseline built from it.

:func:`layer_sensitivity` prunes every searchable layer *alone* (the rest dense) to each of its
weight options and scores the model with any evaluator (one-shot fidelity, accuracy): the drop
from the dense score is the layer's *damage* at that option. With a cost model it also records
the modelled latency the option saves.

:func:`allocation_schemes` turns the table into a sequence of non-uniform schemes, from one
sparse layer to all of them: greedily, the next step is the (layer, sparser option) upgrade with
the most saving per unit of added damage -- so sensitive layers stay dense (or at a milder N:M)
longest, in the spirit of OWL (Yin et al. 2024), which lowers the sparsity of layers with many
outliers. Damages are treated as additive (they are measured one layer at a time). The schemes
are a baseline of their own and a warm start for Optuna
(``OptunaStrategy(warm_start_schemes=[s.choices for s in schemes])``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd

from evaluators import Evaluator, HardwareCostModel
from search_space import DENSE, NMSearchError, Option, Scheme, SearchSpace

if TYPE_CHECKING:
    import matplotlib.pyplot as plt

__all__ = ["allocation_schemes", "layer_sensitivity", "plot_sensitivity"]

SENSITIVITY_COLUMNS = ("layer", "option", "score", "damage", "latency_saving_ms", "duration_s")


def layer_sensitivity(
    space: SearchSpace,
    evaluator: Evaluator,
    options: Sequence[str] | None = None,
    *,
    cost_model: HardwareCostModel | None = None,
    objective: str = "accuracy",
) -> pd.DataFrame:
    """Each searchable layer pruned alone, scored by ``evaluator``.

    Args:
        space: the search space.
        evaluator: scores a scheme; its ``objective`` is maximised (e.g. fidelity or accuracy).
        options: option names to try per layer (e.g. ``["w2:4"]``); default every weight-only
            option of the layer. Options a layer lacks are skipped for it.
        cost_model: adds each option's modelled latency saving over dense.
        objective: the evaluator's value to use.

    Returns:
        One row per (layer, option): ``score``, ``damage`` (dense score minus score),
        ``latency_saving_ms`` (NaN without a cost model) and ``duration_s``.

    Raises:
        NMSearchError: an evaluation failed, or no layer offers any of ``options``.
    """
    wanted = [Option.parse(o) for o in options] if options is not None else None
    dense = _score(evaluator, space.dense(), objective)
    dense_latency = cost_model.evaluate(space, space.dense()).totals["latency_ms"] if cost_model else math.nan
    rows = []
    for name in space.searchable:
        layer_options = [o for o in space.options[name] if o.weight and not o.activation]
        for option in wanted if wanted is not None else layer_options:
            if option not in space.options[name]:
                continue
            scheme = space.scheme({name: option})
            start = time.perf_counter()
            score = _score(evaluator, scheme, objective)
            saving = dense_latency - cost_model.evaluate(space, scheme).totals["latency_ms"] if cost_model else math.nan
            rows.append((name, option.name, score, dense - score, saving, time.perf_counter() - start))
    if not rows:
        raise NMSearchError(f"no searchable layer offers any of the options {list(options or [])}")
    return pd.DataFrame(rows, columns=list(SENSITIVITY_COLUMNS))


def _score(evaluator: Evaluator, scheme: Scheme, objective: str) -> float:
    evaluation = evaluator.evaluate(scheme)
    if evaluation.failed or objective not in evaluation.values:
        raise NMSearchError(f"sensitivity: scoring {scheme.summary()} failed: {evaluation.reason or 'no ' + objective}")
    return float(evaluation.values[objective])


def allocation_schemes(space: SearchSpace, sensitivity: pd.DataFrame, *, min_damage: float = 1e-6) -> list[Scheme]:
    """Greedy non-uniform allocations from a :func:`layer_sensitivity` table, sparsest last.

    Args:
        space: the search space the table was measured on.
        sensitivity: needs ``layer``, ``option``, ``damage`` and ``latency_saving_ms``.
        min_damage: floor of a step's added damage (a harmless step ranks by saving alone).

    Returns:
        One scheme per greedy step (each adds one layer or moves one layer to a sparser option).

    Raises:
        NMSearchError: the table has no latency savings (measure it with a cost model).
    """
    table = sensitivity.dropna(subset=["latency_saving_ms"])
    if table.empty:
        raise NMSearchError("allocation needs latency_saving_ms: run layer_sensitivity(..., cost_model=...)")
    choices: dict[str, tuple[Option, float, float]] = {name: (DENSE, 0.0, 0.0) for name in table["layer"].unique()}
    steps = []
    while True:
        best, best_ratio = None, -math.inf
        for row in table.itertuples():
            _, damage, saving = choices[row.layer]
            gain = row.latency_saving_ms - saving
            if gain <= 0:
                continue
            ratio = gain / max(row.damage - damage, min_damage)
            if ratio > best_ratio:
                best, best_ratio = row, ratio
        if best is None:
            return steps
        choices[best.layer] = (Option.parse(best.option), best.damage, best.latency_saving_ms)
        steps.append(
            space.scheme(
                {name: option for name, (option, _, _) in choices.items()},
                provenance={"strategy": "sensitivity_allocation", "step": len(steps)},
            )
        )


def plot_sensitivity(sensitivity: pd.DataFrame, ax: plt.Axes | None = None) -> plt.Figure:
    """Damage per layer (one bar group per layer, one bar per option)."""
    import matplotlib.pyplot as plt  # here: importing strategies does not load matplotlib

    pivot = sensitivity.pivot_table(index="layer", columns="option", values="damage", sort=False)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(pivot)), 3.6))
    pivot.plot.bar(ax=ax, width=0.8)
    ax.set_ylabel("damage (dense score - score)")
    ax.set_xlabel("")
    ax.set_xticklabels([_short(name) for name in pivot.index], rotation=90, fontsize=7)
    ax.set_title("per-layer sensitivity (each layer pruned alone, one-shot)")
    ax.figure.tight_layout()
    return ax.figure


def _short(name: str) -> str:
    """``encoder.encoder.layer.3.attention.self.query`` -> ``3.attention.self.query``."""
    parts = name.split(".")
    return ".".join(parts[parts.index("layer") + 1 :]) if "layer" in parts else name
