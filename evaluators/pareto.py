"""Pareto analysis for any number of objectives with per-objective directions.

Internally every objective is turned into "smaller is better" (maximised ones are negated), so
one definition of dominance serves all: ``a`` dominates ``b`` when it is no worse in every
objective and strictly better in one. Rows with a NaN objective (failed or infeasible
candidates) are never on a front.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from evaluators.base import MAXIMIZE, MINIMIZE, Objective
from search_space import NMSearchError

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _as_minimization(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or values.shape[1] != len(directions):
        raise NMSearchError(f"expected a (points, {len(directions)}) array of objective values, got {values.shape}")
    for direction in directions:
        if direction not in (MAXIMIZE, MINIMIZE):
            raise NMSearchError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    signs = np.array([-1.0 if d == MAXIMIZE else 1.0 for d in directions])
    return values * signs


def pareto_mask(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``values``.

    Identical points are all kept; rows with a NaN are never on the front. O(P² K), in chunks,
    which is fine for the thousands of candidates a search produces.

    Args:
        values: ``(points, objectives)`` array.
        directions: ``"maximize"`` or ``"minimize"`` per objective.

    Returns:
        A ``bool`` array of length ``points``.

    Raises:
        NMSearchError: If the shape does not match ``directions`` or a direction is unknown.
    """
    losses = _as_minimization(values, directions)
    valid = ~np.isnan(losses).any(axis=1)
    mask = np.zeros(len(losses), dtype=bool)
    candidates = losses[valid]
    if len(candidates) == 0:
        return mask
    dominated = np.zeros(len(candidates), dtype=bool)
    chunk = max(1, 2_000_000 // max(1, len(candidates) * losses.shape[1]))
    for start in range(0, len(candidates), chunk):
        block = candidates[start : start + chunk, None, :]  # (c, 1, K) vs all (1, P, K)
        no_worse = (candidates[None, :, :] <= block).all(axis=2)
        better = (candidates[None, :, :] < block).any(axis=2)
        dominated[start : start + chunk] = (no_worse & better).any(axis=1)
    mask[np.flatnonzero(valid)] = ~dominated
    return mask


def pareto_front(frame: pd.DataFrame, objectives: Sequence[Objective]) -> pd.DataFrame:
    """The non-dominated rows of a table of candidates.

    Args:
        frame: One row per candidate, one column per objective (other columns are kept).
        objectives: The objectives to compare on.

    Returns:
        The front's rows (index preserved), sorted best first by the first objective.

    Raises:
        NMSearchError: If an objective has no column.
    """
    missing = [o.name for o in objectives if o.name not in frame.columns]
    if missing:
        raise NMSearchError(f"no column {missing[0]!r} to compute a Pareto front over")
    mask = pareto_mask(frame[[o.name for o in objectives]].to_numpy(dtype=float), [o.direction for o in objectives])
    first = objectives[0]
    return frame[mask].sort_values(first.name, ascending=first.direction == MINIMIZE, kind="stable")


def _hypervolume_min(points: np.ndarray, reference: np.ndarray) -> float:
    """Exact hypervolume of minimisation ``points`` dominated region bounded by ``reference``."""
    points = points[(points < reference).all(axis=1)]
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(reference[0] - points[:, 0].min())
    if points.shape[1] == 2:
        order = np.lexsort((points[:, 1], points[:, 0]))
        volume, best_y = 0.0, reference[1]
        for x, y in points[order]:
            if y < best_y:
                volume += (reference[0] - x) * (best_y - y)
                best_y = y
        return float(volume)
    # Slice along the last objective: between consecutive levels, the points at or below the
    # level dominate a (K-1)-dimensional region; recurse on it (exact, for small fronts).
    order = np.argsort(points[:, -1], kind="stable")
    points = points[order]
    levels = np.append(points[:, -1], reference[-1])
    volume = 0.0
    for i in range(len(points)):
        depth = levels[i + 1] - levels[i]
        if depth > 0:
            volume += depth * _hypervolume_min(points[: i + 1, :-1], reference[:-1])
    return float(volume)


def hypervolume(values: np.ndarray, directions: Sequence[str], reference: Sequence[float]) -> float:
    """Volume of objective space dominated by ``values`` and bounded by ``reference``.

    2-D is exact in O(P log P); more objectives are exact by slicing, meant for small fronts.

    Args:
        values: ``(points, objectives)`` array; rows with a NaN are ignored.
        directions: ``"maximize"`` or ``"minimize"`` per objective.
        reference: The bounding point in the objectives' own units and directions, e.g.
            ``(accuracy=0.0, latency=dense latency)``; see :func:`reference_point`.

    Returns:
        The hypervolume (0 when no point is better than the reference).

    Raises:
        NMSearchError: If the shape does not match ``directions`` or a direction is unknown.
    """
    directions = list(directions)
    losses = _as_minimization(values, directions)
    losses = losses[~np.isnan(losses).any(axis=1)]
    ref = _as_minimization(np.asarray(reference, dtype=float)[None, :], directions)[0]
    if len(losses) == 0:
        return 0.0
    losses = losses[pareto_mask(losses, [MINIMIZE] * len(directions))]
    return _hypervolume_min(np.unique(losses, axis=0), ref)


def reference_point(
    frames: Sequence[pd.DataFrame], objectives: Sequence[Objective], margin: float = 0.1
) -> list[float]:
    """A reference point shared by several results, so their hypervolumes compare on equal terms.

    Args:
        frames: The results' candidate tables.
        objectives: The objectives.
        margin: How far past each objective's worst value, as a fraction of its range.

    Returns:
        Per objective, its worst value over all frames pushed ``margin`` of its range further out.

    Raises:
        NMSearchError: If an objective has no finite value.
    """
    values = pd.concat([f[[o.name for o in objectives]] for f in frames], ignore_index=True).astype(float)
    reference = []
    for objective in objectives:
        column = values[objective.name].dropna()
        if column.empty:
            raise NMSearchError(f"no finite values of {objective.name!r} to place a reference point")
        span = (column.max() - column.min()) or abs(column.max()) or 1.0
        worst = column.min() if objective.direction == MAXIMIZE else column.max()
        reference.append(float(worst - objective.sign * margin * span))
    return reference


def knee_index(front: pd.DataFrame, objectives: Sequence[Objective]) -> int:
    """Row label of the front's knee: the balanced point of the trade-off.

    Objectives are normalised to [0, 1] over the front (0 = best). With two objectives the knee
    is the point farthest from the chord joining the two extremes (the bend of the trade-off);
    with more, the point closest to the ideal point.

    Args:
        front: A Pareto front (see :func:`pareto_front`).
        objectives: Its objectives.

    Returns:
        The index label of the knee's row.

    Raises:
        NMSearchError: If the front is empty.
    """
    if front.empty:
        raise NMSearchError("the Pareto front is empty: no candidate completed")
    losses = _as_minimization(
        front[[o.name for o in objectives]].to_numpy(dtype=float), [o.direction for o in objectives]
    )
    span = losses.max(axis=0) - losses.min(axis=0)
    normalised = (losses - losses.min(axis=0)) / np.where(span > 0, span, 1.0)
    if len(objectives) == 2 and len(front) > 2:
        a, b = normalised[normalised[:, 0].argmin()], normalised[normalised[:, 0].argmax()]
        chord = b - a
        length = np.hypot(*chord)
        if length > 0:
            distance = np.abs(chord[0] * (normalised[:, 1] - a[1]) - chord[1] * (normalised[:, 0] - a[0])) / length
            return front.index[int(distance.argmax())]
    return front.index[int(np.linalg.norm(normalised, axis=1).argmin())]


def plot_pareto(
    results: Mapping[str, pd.DataFrame],
    x: Objective,
    y: Objective,
    *,
    ax: Axes | None = None,
    show_all: bool = True,
    title: str | None = None,
) -> Axes:
    """Overlay several results' fronts (e.g. one per strategy) in the ``x``-``y`` plane.

    Each result's candidates are drawn faintly and its 2-D front as a staircase.

    Args:
        results: Label to candidate table (e.g. ``SearchResult.trials``).
        x: The objective on the horizontal axis.
        y: The objective on the vertical axis.
        ax: Draw into these axes; default a new figure.
        show_all: Also draw every candidate, not only the fronts.
        title: The axes' title.

    Returns:
        The axes (``ax.figure.savefig(...)`` saves it).
    """
    if ax is None:
        import matplotlib.pyplot as plt  # here, so importing the package does not load matplotlib

        _, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (label, frame) in enumerate(results.items()):
        color = f"C{i}"
        points = frame[[x.name, y.name]].dropna()
        if show_all:
            ax.scatter(points[x.name], points[y.name], s=10, alpha=0.25, color=color)
        front = pareto_front(points, [x, y]).sort_values(x.name)
        ax.plot(front[x.name], front[y.name], drawstyle="steps-post", marker="o", color=color, label=label)
    ax.set_xlabel(x.label)
    ax.set_ylabel(y.label)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax
