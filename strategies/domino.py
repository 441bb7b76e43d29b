"""DominoSearch (Sun et al., NeurIPS 2021): layer-wise N:M weight schemes from a pre-trained dense model.

M is fixed; every eligible layer starts at N = M (dense) and the search trains the pre-trained model
while N falls layer by layer until a global budget is met:

1. **Thresholds**, set once from the dense weights: per group of M, the mean of its M/2 smallest |w|.
2. **Training** with the top-N mask of each layer's current N (recomputed every step; the gradient
   reaches every weight through the straight-through estimator, or only the kept ones). Every
   ``shrink_interval`` steps the loss adds ``lambda/2 sum_l alpha_l ||W_l * E_l||^2``, an L2 shrink
   of the kept weights whose gradient is ``lambda alpha_l W * E``.
3. **Votes** every ``vote_interval`` steps: a group votes when fewer than N of its entries are above
   its threshold; when at least ``vote_fraction`` (75 %) of a layer's groups vote, its N drops by 1.
4. **Commits**: when N reaches a power of two it is committed; the committed N of every layer forms
   the scheme whose global objective is checked against the target.
5. **Re-balancing** ("domino"): after each decision every layer's ``alpha`` is recomputed, so a layer
   that gave up cost presses less and the others more. Over the L layers still above N = 1,
   ``alpha_l = L (beta r_l / sum r + (1 - beta) c_l / sum c)`` with ``c_l`` the layer's current cost
   and ``r_l`` the cost it holds above its allotment: its ERK share of the target for ``params`` and
   ``macs``, its cost at N = 1 for cost-model metrics (:func:`shrink_alphas`).
6. **Stop** as soon as the committed scheme reaches the target.

Two variants (``DominoStrategy.variant``; ``docs/strategies/domino.md`` has the details):

* ``"reference"`` (default) follows the authors' code (github.com/aojunzz/DominoSearch) step by
  step: only the kept weights get gradient; the shrink is ``decay alpha_l W * E`` added to the gradient
  every 5th iteration with ``decay = 0.1`` (doubled at iterations 30k, 40k, ... 80k), under plain
  SGD (momentum 0, weight decay 0); ``alpha_l = 0.5 g_l / max|g| + 0.5 F_l / max F`` with ``g_l`` the
  gap between the layer's ERK sparsity and its committed sparsity (negative once a layer is sparser
  than ERK) and ``F_l`` its committed MACs, recomputed only when a layer commits; votes every 100
  iterations, after the backward pass, in module order; stop at ``target - 0.001``.
* ``"nmsearch_v1"``: this package's first version (steps 1-6 above with :func:`shrink_alphas` recomputed
  at every decision, dense STE gradient, shrink every step at ``lambda = 1`` through the task's
  optimizer, strongest vote first, votes every 50 steps before the forward pass, exact stop).

Targets: ``params`` (global weight sparsity of the searchable layers, parameter-weighted), ``macs``
or a cost-model metric (``latency_ms``, ``bytes_mb``, ``energy_mj``) as a fraction of the dense
model's total. The per-layer cost curves (cost at every N) come from the search space for ``params``
and ``macs`` and from a :class:`~evaluators.HardwareCostModel` for the others.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from evaluators import (
    AccuracyEvaluator,
    CompositeEvaluator,
    CostEvaluator,
    Evaluator,
    FidelityEvaluator,
    HardwareCostModel,
    TrainingDivergedError,
    check_evaluator,
    evaluate_safely,
    train_one_epoch,
)
from evaluators.composite import find_part_or_none
from evaluators.cost import metric_columns
from evaluators.distill import TrainingSource, training_source
from evaluators.training import epoch_seed, make_optimizer, seed_everything
from search_space import (
    DENSE,
    MaskState,
    NMPattern,
    NMSearchError,
    Option,
    Scheme,
    SearchSpace,
    atomic_write_text,
    prunable_modules,
    set_submodule,
    sparsify,
)
from search_space.layers import SparseLayerMixin
from strategies.base import (
    COMPLETE,
    FAIL,
    Candidate,
    Choice,
    SearchResult,
    StrategyBase,
    TrainLoss,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

logger = logging.getLogger(__name__)

SPACE_TARGETS = ("params", "macs")
COST_MODEL_TARGETS = ("latency_ms", "bytes_mb", "energy_mj")


class BudgetMetric(Choice):
    """What DominoSearch's budget (its ``target`` field) measures."""

    params = "params"
    macs = "macs"
    latency_ms = "latency_ms"
    bytes_mb = "bytes_mb"
    energy_mj = "energy_mj"

    @classmethod
    def invalid(cls, label: str, value: object) -> str:
        return f"unknown target {value!r}; choose one of {cls.values()}"


class Gradient(Choice):
    """Which weights the straight-through gradient reaches."""

    ste = "ste"
    masked = "masked"

    @classmethod
    def invalid(cls, label: str, value: object) -> str:
        return f"gradient must be one of {cls.values()}, got {value!r}"


class Variant(Choice):
    """Which DominoSearch runs: the authors' code step by step, or this package's first version."""

    reference = "reference"
    nmsearch_v1 = "nmsearch_v1"


REFERENCE, NMSEARCH_V1 = Variant.reference, Variant.nmsearch_v1
# Per-variant defaults of the fields left ``None``: the reference's values, and nmsearch v1's.
VARIANT_DEFAULTS: dict[Variant, dict[str, Any]] = {
    REFERENCE: {
        "gradient": Gradient.masked,
        "vote_interval": 100,
        "shrink_lambda": 0.1,
        "shrink_interval": 5,
        "shrink_double_at": [30000, 40000, 50000, 60000, 70000, 80000],
        "stop_tolerance": 0.001,
    },
    NMSEARCH_V1: {
        "gradient": Gradient.ste,
        "vote_interval": 50,
        "shrink_lambda": 1.0,
        "shrink_interval": 1,
        "shrink_double_at": [],
        "stop_tolerance": 0.0,
    },
}
LOG_TABLE = "domino_log"  # SearchResult.tables key, saved as domino_log.csv
CHECKPOINT = "domino_checkpoint.pt"  # in the run directory, rewritten at every vote
LOG_COLUMNS = (
    "step",
    "epoch",
    "layer",
    "n",
    "m",
    "committed",
    "committed_n",
    "vote_share",
    "forced",
    "objective",
    "fraction",
    "total",
)


class DominoError(NMSearchError):
    """A DominoSearch configuration or space that cannot be searched."""


class UnreachableTargetError(DominoError):
    """A target the eligible layers cannot reach even at N = 1."""


class _TargetReached(Exception):
    """Raised from inside a training step to stop the epoch when the target is reached."""


# -- the pure pieces ---------------------------------------------------------------------------
def weight_groups(weight: Tensor, m: int) -> Tensor:
    """``(groups, m)`` view of a Linear or Conv2d weight: M consecutive input channels at a fixed
    output channel and kernel offset (the layout :func:`search_space.weight_nm_mask` masks)."""
    return weight.detach().movedim(1, -1).reshape(-1, m)


def group_thresholds(weight: Tensor, m: int) -> Tensor:
    """Per group of M, the mean of its ``M // 2`` smallest magnitudes (set once, from the dense weights)."""
    smallest = weight_groups(weight, m).abs().sort(dim=1).values[:, : m // 2]
    return smallest.mean(dim=1)


def vote_share(weight: Tensor, thresholds: Tensor, n: int, m: int) -> float:
    """Share of groups with fewer than ``n`` entries whose magnitude is above the group's threshold."""
    above = (weight_groups(weight, m).abs() > thresholds[:, None]).sum(dim=1)
    return float((above < n).float().mean())


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def erk_scores(weight_shapes: Sequence[tuple[int, ...]]) -> np.ndarray:
    """Erdos-Renyi-Kernel density scores ``sum(shape) / prod(shape)``: small layers keep more weights."""
    return np.array([sum(shape) / math.prod(shape) for shape in weight_shapes], dtype=float)


def allot_densities(
    scores: np.ndarray, dense_costs: np.ndarray, budget: float, min_density: float, iterations: int = 100
) -> np.ndarray:
    """Densities ``clip(eps * scores, min_density, 1)`` whose cost ``sum(density * dense_costs)`` equals
    ``budget`` (ERK with capped layers' excess redistributed); ``eps`` found by bisection."""

    def densities(eps: float) -> np.ndarray:
        return np.clip(eps * scores, min_density, 1.0)

    low, high = 0.0, 1.0 / scores.min()  # at ``high`` every layer is dense
    for _ in range(iterations):
        middle = (low + high) / 2
        low, high = (middle, high) if float(densities(middle) @ dense_costs) < budget else (low, middle)
    return densities(high)


def shrink_alphas(cost_now: np.ndarray, allotted: np.ndarray, active: np.ndarray, beta: float) -> np.ndarray:
    """Per-layer weights of the L2 shrink: ``beta`` times the layer's share of the cost it still holds
    above its allotment, plus ``1 - beta`` times its share of the current cost, both among the layers
    still shrinking (``active``). They average 1 over those layers; finished layers get 0. When no
    layer is above its allotment, the first share falls back to the cost share."""
    alphas = np.zeros(len(cost_now))
    if not active.any():
        return alphas
    cost = cost_now[active]
    cost_share = cost / cost.sum() if cost.sum() > 0 else np.full(len(cost), 1.0 / len(cost))
    remaining = np.maximum(cost - allotted[active], 0.0)
    remaining_share = remaining / remaining.sum() if remaining.sum() > 0 else cost_share
    alphas[active] = active.sum() * (beta * remaining_share + (1 - beta) * cost_share)
    return alphas


def erk_sparsities(weight_shapes: Sequence[tuple[int, ...]], sparsity: float) -> np.ndarray:
    """Per-layer sparsities of the Erdos-Renyi-Kernel allocation at a global ``sparsity`` (RigL's, as the
    DominoSearch reference computes it): density ``eps * sum(shape) / prod(shape)`` with ``eps`` chosen so
    the kept count equals ``sum(n - floor(sparsity n))``; while a layer would exceed density 1, the layers
    with the largest raw score are made dense and ``eps`` is solved again over the rest."""
    sizes = np.array([math.prod(shape) for shape in weight_shapes], dtype=float)
    raw = erk_scores(weight_shapes)
    zeros = np.floor(sparsity * sizes)
    dense = np.zeros(len(sizes), dtype=bool)
    while True:
        rhs = float((sizes - zeros)[~dense].sum() - zeros[dense].sum())
        eps = rhs / float((raw * sizes)[~dense].sum())
        largest = raw[~dense].max()
        if eps * largest <= 1 or dense.all():
            return np.where(dense, 0.0, 1.0 - eps * raw)
        dense |= raw == largest


def reference_alphas(
    erk_sparsity: np.ndarray, macs: np.ndarray, committed: np.ndarray, m: int, erk_weight: float = 0.5
) -> np.ndarray:
    """The reference's penalty factors: ``erk_weight`` times the ERK gap ``erk_sparsity - (1 - N/M)``
    over its largest magnitude (all 0 once the largest gap is below 0.01), plus ``1 - erk_weight`` times
    the committed MACs ``macs N/M`` over their maximum. A layer already sparser than ERK gets a negative
    gap, so its alpha can be negative (the shrink then grows its kept weights)."""
    gap = erk_sparsity - (1.0 - committed / m)
    erk = np.zeros(len(gap)) if gap.max() < 0.01 else gap / np.abs(gap).max()
    flops = macs * committed / m
    return erk_weight * erk + (1.0 - erk_weight) * flops / flops.max()


@dataclass(frozen=True)
class CostCurves:
    """What the target measures, per eligible layer and N (``per_n[layer, n - 1]``), plus the cost of
    the modelled layers that stay dense (``fixed``) and the dense total the target is relative to."""

    per_n: np.ndarray
    fixed: float
    dense_total: float

    def total(self, ns: np.ndarray) -> float:
        return self.fixed + float(self.per_n[np.arange(len(ns)), np.asarray(ns) - 1].sum())

    def fraction(self, ns: np.ndarray) -> float:
        """The total at per-layer ``ns`` as a fraction of the dense total."""
        return self.total(ns) / self.dense_total

    def layer_costs(self, ns: np.ndarray) -> np.ndarray:
        return self.per_n[np.arange(len(ns)), np.asarray(ns) - 1]


@dataclass(frozen=True)
class DominoPlan:
    """Everything fixed before training: the layers N:M applies to, their cost curves, the target as
    a fraction of the dense total, each layer's allotted cost (for the remaining budget) and the
    searchable layers left dense because M does not divide their channels."""

    m: int
    target: str
    target_value: float
    layers: tuple[str, ...]
    ineligible: dict[str, str]
    curves: CostCurves
    target_fraction: float
    allotted: np.ndarray
    hardware: str | None = None
    stop_tolerance: float = 0.0
    erk_sparsity: np.ndarray | None = None  # per layer, at the target sparsity (reference alphas)
    macs: np.ndarray | None = None  # per layer, dense (reference alphas)

    def objective(self, fraction: float) -> float:
        """The target's quantity for a fraction of the dense total: sparsity for ``params``."""
        return 1.0 - fraction if self.target == "params" else fraction

    def reached(self, ns: np.ndarray) -> bool:
        """Whether per-layer ``ns`` meet the target, within ``stop_tolerance`` (the reference stops at
        ``target - 0.001`` sparsity, i.e. ``0.001`` above the target fraction)."""
        return self.curves.fraction(ns) <= (self.target_fraction + self.stop_tolerance) * (1 + 1e-9)


class DominoState:
    """Per-layer N (current and committed) and the decision log; no training inside, so it is
    tested on its own. :meth:`decrement` applies one decision and reports whether the target is met."""

    def __init__(self, plan: DominoPlan, beta: float, variant: str = REFERENCE) -> None:
        if variant == REFERENCE and (plan.erk_sparsity is None or plan.macs is None):
            raise DominoError("the reference variant needs the plan's erk_sparsity and macs")
        self.plan, self.beta, self.variant = plan, beta, variant
        self.n = np.full(len(plan.layers), plan.m, dtype=np.int64)
        self.committed = self.n.copy()
        self.commits: list[np.ndarray] = []
        self.decisions: list[dict[str, Any]] = []
        self.alphas = self._rebalance()

    @property
    def active(self) -> np.ndarray:
        """Layers that can still drop N."""
        return self.n > 1

    @property
    def reached(self) -> bool:
        return self.plan.reached(self.committed)

    def _rebalance(self) -> np.ndarray:
        if self.variant == REFERENCE:
            plan = self.plan
            return reference_alphas(plan.erk_sparsity, plan.macs, self.committed, plan.m, self.beta)
        cost_now = self.plan.curves.layer_costs(self.n)
        return shrink_alphas(cost_now, self.plan.allotted, self.active, self.beta)

    def decrement(self, index: int, *, step: int, epoch: int, share: float, to: int | None = None) -> bool:
        """Drop layer ``index``'s N by one (or straight ``to`` a lower N, for forced decisions), commit
        it at a power of two, re-balance every layer's alpha and log the decision. Returns ``reached``."""
        if self.reached:
            raise DominoError("the target is already reached: no further decisions")
        if self.n[index] <= 1:
            raise DominoError(f"layer {self.plan.layers[index]!r} is already at N=1")
        self.n[index] = self.n[index] - 1 if to is None else to
        committed = is_power_of_two(int(self.n[index]))
        if committed:
            self.committed[index] = self.n[index]
            self.commits.append(self.committed.copy())
        if committed or self.variant != REFERENCE:  # the reference re-balances on commits only
            self.alphas = self._rebalance()
        fraction = self.plan.curves.fraction(self.committed)
        self.decisions.append(
            {
                "step": step,
                "epoch": epoch,
                "layer": self.plan.layers[index],
                "n": int(self.n[index]),
                "m": self.plan.m,
                "committed": committed,
                "committed_n": int(self.committed[index]),
                "vote_share": share,
                "forced": to is not None,
                "objective": self.plan.objective(fraction),
                "fraction": fraction,
                "total": fraction * self.plan.curves.dense_total,
            }
        )
        return self.reached

    def log(self) -> pd.DataFrame:
        return pd.DataFrame(self.decisions, columns=LOG_COLUMNS)

    def state_dict(self) -> dict[str, Any]:
        """Per-layer N, committed N, every commit, alpha and the decision log, in plain types."""
        return {
            "n": self.n.tolist(),
            "committed": self.committed.tolist(),
            "commits": [c.tolist() for c in self.commits],
            "alphas": self.alphas.tolist(),
            "decisions": [
                {key: value.item() if isinstance(value, np.generic) else value for key, value in decision.items()}
                for decision in self.decisions
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` recorded."""
        self.n = np.array(state["n"], dtype=np.int64)
        self.committed = np.array(state["committed"], dtype=np.int64)
        self.commits = [np.array(c, dtype=np.int64) for c in state["commits"]]
        self.alphas = np.array(state["alphas"], dtype=float)
        self.decisions = [dict(d) for d in state["decisions"]]


def apply_votes(state: DominoState, shares: Sequence[float], vote_fraction: float, *, step: int, epoch: int) -> bool:
    """Drop N of every active layer whose vote share is at least ``vote_fraction``, in module order
    (reference) or strongest vote first (nmsearch v1); returns True as soon as the target is reached
    (the remaining layers keep their N)."""
    order = range(len(shares))
    if state.variant != REFERENCE:
        order = sorted(order, key=lambda i: -shares[i])
    for index in order:
        passed = shares[index] >= vote_fraction and state.active[index]
        if passed and state.decrement(index, step=step, epoch=epoch, share=shares[index]):
            return True
    return False


def _next_power_of_two_below(n: int) -> int:
    return 1 << ((n - 1).bit_length() - 1)


# -- spaces and evaluators ---------------------------------------------------------------------
def domino_space(space: SearchSpace, m: int) -> SearchSpace:
    """The weights-only space DominoSearch's schemes live in: every ``N:m`` on the layers that are
    searchable in ``space`` (and eligible at ``m``); the other layers stay dense."""
    fixed = [name for name in space.layer_names if name not in space.searchable]
    return SearchSpace(
        space.layers,
        skipped=space.skipped,
        fingerprint=space.fingerprint,
        example_batch_size=space.example_batch_size,
        ratios=[NMPattern(n, m) for n in range(1, m)],
        targets=("weights",),
        fixed_dense=fixed,
    )


def scoring_evaluator(evaluator: Evaluator, space: SearchSpace) -> Evaluator:
    """``evaluator`` able to score schemes of ``space`` (a :func:`domino_space`): accuracy parts are
    rebuilt over ``space`` (same trainer and config, so the same scores), since an
    :class:`~evaluators.AccuracyEvaluator` refuses options outside its own space; fidelity parts
    take ``space`` (:meth:`~evaluators.FidelityEvaluator.with_space`, sharing their pruner); cost
    parts cost such options directly."""
    if isinstance(evaluator, AccuracyEvaluator):
        return AccuracyEvaluator(evaluator.trainer, space, evaluator.config)
    if isinstance(evaluator, FidelityEvaluator):
        return evaluator.with_space(space)
    if isinstance(evaluator, CompositeEvaluator):
        return CompositeEvaluator(*(scoring_evaluator(part, space) for part in evaluator.parts))
    return evaluator


# -- the strategy ------------------------------------------------------------------------------
@dataclass
class DominoStrategy(StrategyBase):
    """DominoSearch over the weight N:M of the searchable layers, with fixed ``m`` and per-layer N.

    ``target`` / ``target_value``: ``"params"`` with the global weight sparsity of the searchable
    layers (``0.875``), or ``"macs"`` / ``"latency_ms"`` / ``"bytes_mb"`` / ``"energy_mj"`` with a
    fraction of the dense model's total (``0.125``). Cost-model targets take the
    :class:`~evaluators.HardwareCostModel` of the evaluator's :class:`~evaluators.CostEvaluator`
    part, or of ``hardware`` (a profile name, with ``dtype`` and ``batch_size``), which wins when set.

    ``variant``: ``"reference"`` (the authors' code, step by step) or ``"nmsearch_v1"`` (see the
    module docstring). The fields left ``None`` take the variant's value (``VARIANT_DEFAULTS``).

    Training: ``lr`` (default: the task's ``finetune_lr``) at a constant rate, the L2 shrink of strength
    ``shrink_lambda`` every ``shrink_interval`` steps (doubled at each step count in ``shrink_double_at``),
    votes every ``vote_interval`` steps at ``vote_fraction``; ``beta`` is the weight of the budget term
    in alpha (the reference's ERK weight ``w1``). ``gradient="ste"`` passes the dense gradient to every
    weight (pruned ones can grow back, as in SR-STE training); ``"masked"`` trains only the kept weights,
    so pruned ones stay put. The search stops once the committed scheme is within ``stop_tolerance`` of
    the target (a sparsity, or a fraction of the dense total). When ``max_epochs``
    run out first, the remaining decisions are forced (logged as such): the layer with the largest
    vote share times alpha drops to its next power of two until the target is met. ``score_intermediate``
    also scores every committed scheme before the last.

    ``train_loss``: ``task`` (cross-entropy on the task's labels), ``distill`` (the frozen dense model's
    outputs on the same batch, :mod:`evaluators.distill`; ``distill_temperature`` for ``kl``) or ``auto``
    (``task`` with labels, else ``distill``: a pre-trained task such as ``task=minilm``).
    """

    m: int = 16
    target: BudgetMetric = BudgetMetric.params
    target_value: float = 0.875
    variant: Variant = Variant.reference
    vote_interval: int | None = None
    vote_fraction: float = 0.75
    shrink_lambda: float | None = None
    shrink_interval: int | None = None
    shrink_double_at: list[int] | None = None
    stop_tolerance: float | None = None
    beta: float = 0.5
    gradient: Gradient | None = None
    lr: float | None = None
    max_epochs: int = 100
    seed: int = 0
    hardware: str | None = None
    dtype: str = "fp16"
    batch_size: int = 1
    score_intermediate: bool = False
    train_loss: TrainLoss = TrainLoss.auto
    distill_temperature: float = 1.0
    name: str = "domino"

    # -- validation and planning -------------------------------------------------------------
    def setting(self, name: str) -> Any:
        """Field ``name``, or the variant's default for it when the field is ``None``."""
        value = getattr(self, name)
        return VARIANT_DEFAULTS[self.variant][name] if value is None else value

    def _validate(self) -> None:
        NMPattern(1, self.m)  # M within the supported range
        if self.m < 2:
            raise DominoError(f"m must be >= 2, got {self.m}")
        what = "a sparsity" if self.target == "params" else "a fraction of the dense total"
        if not 0 < self.target_value < 1:
            raise DominoError(f"target_value for '{self.target}' is {what} in (0, 1), got {self.target_value}")
        for name in ("vote_interval", "shrink_interval", "max_epochs"):
            if self.setting(name) < 1:
                raise DominoError(f"{name} must be >= 1, got {self.setting(name)}")
        if not 0 < self.vote_fraction <= 1:
            raise DominoError(f"vote_fraction must be in (0, 1], got {self.vote_fraction}")
        if not 0 <= self.beta <= 1:
            raise DominoError(f"beta must be in [0, 1], got {self.beta}")
        if self.setting("shrink_lambda") < 0 or (self.lr is not None and not self.lr > 0):
            raise DominoError("shrink_lambda must be >= 0 and lr > 0")
        if not 0 <= self.setting("stop_tolerance") < 1:
            raise DominoError(f"stop_tolerance must be in [0, 1), got {self.stop_tolerance}")
        if not self.distill_temperature > 0:
            raise DominoError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if any(step < 1 for step in self.setting("shrink_double_at")):
            raise DominoError(f"shrink_double_at lists step counts >= 1, got {self.shrink_double_at}")

    def _cost_model(self, evaluator: Evaluator | None) -> HardwareCostModel:
        if self.hardware is not None:
            return HardwareCostModel.from_profile(self.hardware, dtype=self.dtype, batch_size=self.batch_size)
        part = find_part_or_none(evaluator, CostEvaluator) if evaluator is not None else None
        if part is None:
            raise DominoError(
                f"target '{self.target}' needs a hardware cost model: set hardware='a100' (or another profile) "
                "or pass an evaluator with a CostEvaluator part"
            )
        return part.cost_model

    def plan(self, space: SearchSpace, evaluator: Evaluator | None = None) -> DominoPlan:
        """Eligible layers, cost curves and target for ``space``; raises before any training when the
        target cannot be reached, or is already met with every layer at N = M."""
        self._validate()
        if "weights" not in space.targets:
            raise DominoError(f"DominoSearch searches weight N:M; the space's targets are {', '.join(space.targets)}")
        searchable = [space.info(name) for name in space.searchable]
        layers = [info for info in searchable if info.channels % self.m == 0]
        ineligible = {
            info.name: f"{info.channels} grouped input channels are not divisible by M={self.m}"
            for info in searchable
            if info.channels % self.m
        }
        for name, reason in ineligible.items():
            logger.warning("DominoSearch leaves layer %r dense: %s", name, reason)
        if not layers:
            raise DominoError(
                f"no searchable layer has grouped input channels divisible by M={self.m}: nothing to search"
            )
        names = tuple(info.name for info in layers)
        share = np.arange(1, self.m + 1) / self.m
        hardware = None
        if self.target == "params":
            weights = np.array([math.prod(info.weight_shape) for info in layers], dtype=float)
            left_dense = sum(math.prod(space.info(name).weight_shape) for name in ineligible)
            curves = CostCurves(np.outer(weights, share), float(left_dense), float(weights.sum() + left_dense))
        elif self.target == "macs":
            macs = np.array([info.macs for info in layers], dtype=float)
            total = float(sum(info.macs for info in space.layers))
            curves = CostCurves(np.outer(macs, share), total - float(macs.sum()), total)
        else:
            cost_model = self._cost_model(evaluator)
            hardware = cost_model.profile.name
            curves = _cost_model_curves(space, names, self.m, cost_model, self.target)
        target_fraction = 1.0 - self.target_value if self.target == "params" else self.target_value
        _check_reachable(curves, target_fraction, self.target, self.target_value, self.m, ineligible)
        return DominoPlan(
            m=self.m,
            target=self.target,
            target_value=self.target_value,
            layers=names,
            ineligible=ineligible,
            curves=curves,
            target_fraction=target_fraction,
            allotted=self._allotted(layers, curves, target_fraction),
            hardware=hardware,
            stop_tolerance=float(self.setting("stop_tolerance")),
            erk_sparsity=erk_sparsities([info.weight_shape for info in layers], 1.0 - target_fraction),
            macs=np.array([info.macs for info in layers], dtype=float),
        )

    def _allotted(self, layers: Sequence[Any], curves: CostCurves, target_fraction: float) -> np.ndarray:
        """Each layer's share of the target: the ERK allocation for ``params`` and ``macs`` (as the
        paper); for cost-model metrics, whose cost is not linear in density, its cost at N = 1, so
        the remaining budget is what the layer can still save on that hardware."""
        if self.target not in SPACE_TARGETS:
            return curves.per_n[:, 0].copy()
        dense_costs = curves.per_n[:, -1]
        budget = target_fraction * curves.dense_total - curves.fixed
        scores = erk_scores([info.weight_shape for info in layers])
        return allot_densities(scores, dense_costs, budget, 1.0 / self.m) * dense_costs

    # -- search ------------------------------------------------------------------------------
    def search(
        self, space: SearchSpace, evaluator: Evaluator, *, run_dir: str | os.PathLike | None = None
    ) -> SearchResult:
        """Search from the pre-trained model of the evaluator's trainer; the result's last trial is the
        Domino scheme (``metadata["final_trial"]``), ``tables["domino_log"]`` the decision log."""
        check_evaluator(evaluator)
        plan = self.plan(space, evaluator)
        source = training_source(evaluator)
        checkpoint = Path(run_dir) / CHECKPOINT if run_dir is not None else None
        resume = self._resume_from(checkpoint) if checkpoint is not None else self._take_resume()
        if resume is not None and resume.get("fingerprint") != space.fingerprint:
            logger.warning("the DominoSearch state is of another model (fingerprint); starting this run over")
            resume = None
        start = time.perf_counter()
        state, steps, epochs, distill = self._train(plan, source, space.fingerprint, checkpoint, resume)
        search_s = time.perf_counter() - start
        schemes_space = domino_space(space, self.m)
        commits = state.commits if self.score_intermediate else state.commits[-1:]
        scorer = scoring_evaluator(evaluator, schemes_space)
        candidates = [
            self._candidate(trial, schemes_space, plan, committed, scorer) for trial, committed in enumerate(commits)
        ]
        final = candidates[-1].scheme
        fraction = plan.curves.fraction(state.committed)
        metadata = {
            "m": self.m,
            "target": self.target,
            "target_value": self.target_value,
            "objective": plan.objective(fraction),
            "fraction": fraction,
            "total": fraction * plan.curves.dense_total,
            "dense_total": plan.curves.dense_total,
            "hardware": plan.hardware,
            "ineligible_layers": plan.ineligible,
            "domino": final.to_domino(),
            "final_trial": candidates[-1].trial,
            "decisions": len(state.decisions),
            "forced_decisions": sum(decision["forced"] for decision in state.decisions),
            "variant": self.variant,
            "train_loss": "distill" if distill else "task",
            "steps": steps,
            "epochs": epochs,
            "search_s": search_s,
            "fingerprint": space.fingerprint,
            "config": dataclasses.asdict(self),
        }
        result = SearchResult.from_candidates(
            self.name, evaluator.objectives, candidates, metadata, tables={LOG_TABLE: state.log()}
        )
        if run_dir is not None:
            self._write(final, Path(run_dir))
        return result

    def _candidate(
        self, trial: int, space: SearchSpace, plan: DominoPlan, committed: np.ndarray, evaluator: Evaluator
    ) -> Candidate:
        choices = {
            name: Option(weight=NMPattern(int(n), self.m)) for name, n in zip(plan.layers, committed, strict=True)
        }
        fraction = plan.curves.fraction(committed)
        provenance = {"strategy": self.name, "trial": trial, "seed": self.seed, "config": dataclasses.asdict(self)}
        scheme = space.scheme(choices, provenance=provenance, hardware=plan.hardware)
        evaluation = evaluate_safely(evaluator, scheme)
        metrics = {**evaluation.values, f"domino_{self.target}": plan.objective(fraction)}
        return Candidate(
            trial=trial,
            scheme=scheme.with_metadata(metrics=metrics),
            evaluation=evaluation,
            state=FAIL if evaluation.failed else COMPLETE,
            duration_s=evaluation.duration_s,
            reason=evaluation.reason,
        )

    @staticmethod
    def _write(scheme: Scheme, run_dir: Path) -> None:
        """Domino's own files: the scheme in our JSON format and in DominoSearch's ``{layer: [N, M]}``.
        The result files (``trials.csv``, ``domino_log.csv``, ...) are the entry point's to write
        (:meth:`SearchResult.save`)."""
        scheme.save(run_dir / "domino_scheme.json")
        atomic_write_text(run_dir / "domino.json", json.dumps(scheme.to_domino(), indent=2) + "\n")

    def _train(
        self,
        plan: DominoPlan,
        source: TrainingSource,
        fingerprint: str,
        checkpoint: Path | None,
        resume: dict[str, Any] | None,
    ) -> tuple[DominoState, int, int, bool]:
        """Run the search on the pre-trained model; returns the final state, steps and epochs run and
        whether the loss was the distillation one.
        After the update of every vote step the progress is recorded (:meth:`state_dict`) and, given
        a ``checkpoint`` path, saved there; ``resume`` continues from such a progress."""
        reference = self.variant == REFERENCE
        gradient, vote_interval = self.setting("gradient"), self.setting("vote_interval")
        state = DominoState(plan, self.beta, self.variant)
        schedule = source.schedule
        smoothing = 0.0 if reference else schedule.label_smoothing  # the reference uses no smoothing
        training = source.training(
            self.train_loss, nn.CrossEntropyLoss(label_smoothing=smoothing), self.distill_temperature
        )
        model = source.pretrained()
        layers = _wrap(model, plan.layers, self.m)
        thresholds = [group_thresholds(layer.weight, self.m) for layer in layers]
        _set_masks(layers, state.n, self.m, gradient)
        lr = self.lr or schedule.finetune_lr
        if reference:  # the reference's search config: plain SGD, no momentum or weight decay
            optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
        else:
            optimizer = make_optimizer(model.parameters(), schedule, lr)
        clock = {"step": 0, "epoch": 0, "epoch_start": 0}

        def shares() -> list[float]:
            return [
                vote_share(layer.weight, threshold, int(n), self.m) if n > 1 else 0.0
                for layer, threshold, n in zip(layers, thresholds, state.n, strict=True)
            ]

        def vote(step: int) -> None:
            if apply_votes(state, shares(), self.vote_fraction, step=step, epoch=clock["epoch"]):
                logger.info("DominoSearch reached its %s target at step %d", self.target, step)
                raise _TargetReached
            _set_masks(layers, state.n, self.m, gradient)

        def before_step(step: int) -> None:
            clock["step"] = step
            if not reference and step and step % vote_interval == 0:
                vote(step)  # nmsearch v1: before the forward pass, from step 50 on

        def before_update() -> None:
            # After the backward pass, before the weights move: the shrink joins the gradient, then
            # (reference) the vote, as the authors' training loop orders them.
            step = clock["step"]
            if step % self.setting("shrink_interval") == 0:
                _add_shrink_gradient(layers, state.alphas, self.shrink_strength(step))
            if reference and step % vote_interval == 0:
                vote(step)

        def after_update() -> None:
            step = clock["step"]
            if step % vote_interval:
                return
            # The state after this step: resuming from it runs step + 1 on, as an uninterrupted run.
            self._record_progress(
                fingerprint=fingerprint,
                step=step + 1,
                epoch=clock["epoch"],
                batch=step + 1 - clock["epoch_start"],
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                domino=state.state_dict(),
                rng=rng_state(),
            )
            if checkpoint is not None:
                save_checkpoint(checkpoint, self.state_dict())

        seed_everything(self.seed)
        first_epoch, step, skip = 0, 0, 0
        if resume is not None:
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            state.load_state_dict(resume["domino"])
            _set_masks(layers, state.n, self.m, gradient)
            first_epoch, step, skip = resume["epoch"], resume["step"], resume["batch"]
            set_rng_state(resume["rng"])
            logger.info("DominoSearch resumes at step %d (%d decisions made)", step, len(state.decisions))
        epoch = first_epoch
        stepper = _HookedOptimizer(optimizer, before_update, after_update)
        try:
            for epoch in range(first_epoch, self.max_epochs):
                clock["epoch"], clock["epoch_start"] = epoch, step
                batches = source.loader(epoch_seed(self.seed, epoch), True)
                if epoch == first_epoch and skip:
                    if skip >= len(batches):  # the checkpoint was the epoch's last step
                        continue
                    clock["epoch_start"] = step - skip
                    batches = itertools.islice(batches, skip, None)
                stats = train_one_epoch(
                    model,
                    training.batches(batches),
                    stepper,  # type: ignore[arg-type]  # an optimizer with a hook before step()
                    loss_fn=training.loss,
                    before_step=before_step,
                    start_step=step,
                    device=source.device,
                    progress=source.progress,
                    description=f"domino epoch {epoch + 1}",
                    forward=training.forward,
                )
                step = stats.end_step
        except _TargetReached:
            return state, clock["step"], epoch + 1, training.distill
        except TrainingDivergedError as error:
            raise TrainingDivergedError(f"DominoSearch on task {source.name!r} diverged: {error}") from None
        logger.warning(
            "DominoSearch: %d epochs ran out at %s %.4f (target %.4f); forcing the remaining decisions",
            self.max_epochs,
            self.target,
            plan.objective(plan.curves.fraction(state.committed)),
            self.target_value,
        )
        force_to_target(state, shares, step=step, epoch=self.max_epochs - 1)
        return state, step, self.max_epochs, training.distill

    def shrink_strength(self, step: int) -> float:
        """The shrink's strength at (0-based) ``step``: ``shrink_lambda`` doubled once for every count in
        ``shrink_double_at`` that ``step + 1`` has reached (the reference doubles at iteration 30000, ...)."""
        doublings = sum(step + 1 >= at for at in self.setting("shrink_double_at"))
        return float(self.setting("shrink_lambda")) * 2.0**doublings


class _HookedOptimizer:
    """An optimizer whose ``step()`` runs ``before`` (after the backward pass, before the update) and
    ``after`` (after the update)."""

    def __init__(self, optimizer: torch.optim.Optimizer, before: Callable[[], None], after: Callable[[], None]) -> None:
        self.optimizer, self.before, self.after = optimizer, before, after

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.before()
        self.optimizer.step()
        self.after()


def force_to_target(state: DominoState, shares: Callable[[], list[float]], *, step: int, epoch: int) -> None:
    """Out of epochs: until the target is reached, drop the active layer with the largest vote share
    times alpha (close to voting and under the most pressure) to its next power of two."""
    while not state.reached:
        current = shares()
        candidates = [i for i in range(len(current)) if state.active[i]]
        index = max(candidates, key=lambda i: current[i] * state.alphas[i])
        target_n = _next_power_of_two_below(int(state.n[index]))
        state.decrement(index, step=step, epoch=epoch, share=current[index], to=target_n)


def _check_reachable(
    curves: CostCurves, target_fraction: float, target: str, target_value: float, m: int, ineligible: dict[str, str]
) -> None:
    start = curves.fraction(np.full(len(curves.per_n), m, dtype=np.int64))
    if start <= target_fraction * (1 + 1e-9):
        raise DominoError(
            f"DominoSearch target {target} {target_value} is already met with every layer at {m}:{m} "
            f"({start:.4f} of the dense total): nothing to search"
        )
    best = curves.fraction(np.ones(len(curves.per_n), dtype=np.int64))
    if best <= target_fraction * (1 + 1e-9):
        return
    dense = f"; {len(ineligible)} searchable layer(s) stay dense (channels not divisible by M)" if ineligible else ""
    if target == "params":
        reach = f"weight sparsity {target_value} is unreachable: at 1:{m} on every eligible layer it is {1 - best:.4f}"
    else:
        reach = (
            f"{target} at {target_value} of the dense total is unreachable: at 1:{m} on every eligible layer "
            f"it is still {best:.4f} of it"
        )
    raise UnreachableTargetError(f"DominoSearch target {reach}{dense}")


def _cost_model_curves(
    space: SearchSpace, names: Sequence[str], m: int, cost_model: HardwareCostModel, metric: str
) -> CostCurves:
    pairs = [(name, Option(weight=NMPattern(n, m))) for name in names for n in range(1, m + 1)]
    terms, roof = cost_model.costs(space, pairs)
    per_n = metric_columns(terms, roof)[metric].reshape(len(names), m)
    dense_terms, dense_roof = cost_model.costs(space, [(name, DENSE) for name in space.layer_names])
    dense = metric_columns(dense_terms, dense_roof)[metric]
    eligible = np.isin(space.layer_names, names)
    return CostCurves(per_n, float(dense[~eligible].sum()), float(dense.sum()))


# -- the model ---------------------------------------------------------------------------------
def _wrap(model: nn.Module, names: Sequence[str], m: int) -> list[SparseLayerMixin]:
    """Wrap the eligible layers (in place); their N is set through ``MaskState.weight_nm``."""
    modules = prunable_modules(model)
    layers = []
    for name in names:
        layer = sparsify(modules[name], weight=NMPattern(1, m), name=name)
        set_submodule(model, name, layer)
        layers.append(layer)
    return layers


def _set_masks(layers: Sequence[SparseLayerMixin], ns: np.ndarray, m: int, gradient: str) -> None:
    # Without a frozen mask, the "fixed" estimator keeps the dynamic top-N mask and masks the gradient.
    estimator = "ste" if gradient == "ste" else "fixed"
    for layer, n in zip(layers, ns, strict=True):
        layer.mask_state = MaskState(estimator=estimator, weight_nm=(int(n), m))


def _add_shrink_gradient(layers: Sequence[SparseLayerMixin], alphas: np.ndarray, strength: float) -> None:
    """Add ``strength alpha_l W_l * E_l`` to each layer's gradient: the L2 shrink of the weights the last
    forward pass kept (the gradient of ``strength/2 sum_l alpha_l ||W_l * E_l||^2``). A negative alpha
    (reference variant) grows them instead."""
    with torch.no_grad():
        for layer, alpha in zip(layers, alphas, strict=True):
            mask = layer.weight_mask()
            if alpha == 0 or layer.weight.grad is None or mask is None:
                continue
            layer.weight.grad.add_(layer.weight * mask, alpha=strength * float(alpha))
