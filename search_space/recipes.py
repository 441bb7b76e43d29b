"""Gradient recipes for N:M training, configured by one dataclass and driven by ``step()``.

* ``ste``     -- forward ``W * E``, dense gradient to ``W`` (straight-through).
* ``srste``   -- SR-STE (Zhou et al. 2021): adds ``srste_lambda * (1 - E) * W`` to the gradient.
* ``fixed``   -- one-shot mask (NVIDIA ASP): pruned once when masking starts, gradient masked.
* ``decay="mask"``      -- pruning mask decay: forward ``W * (E + beta(t) (1 - E))``, STE
  backward, beta linear ``max(0, 1 - alpha t)`` or exponential ``exp(-alpha t)`` (then 0).
* ``decay="structure"`` -- sparse structure decay: N shrinks over equal time frames
  (stepwise ``7:8 -> 4:8 -> 2:8 -> 1:8``, or geometric ``8:64 -> 4:32 -> 2:16 -> 1:8``),
  then the binary target mask for the final fine-tune.

``t`` counts steps after ``warmup_steps`` dense steps. SR-STE with a decay is refused, as in
Google's praxis: its regulariser pulls pruned weights to zero while the decay still uses them.

Row masks (:mod:`search_space.rows`) ramp their sparsity polynomially from 0 to the target between
``row_ramp_start`` and ``row_ramp_end`` (fractions of ``total_steps``), as in Grimaldi et al. 2023.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd
from torch import nn

from search_space.layers import ESTIMATORS, MaskState, SparseLayerMixin, sparse_layers
from search_space.patterns import NMPattern, NMSearchError
from search_space.rows import RowPattern

DECAYS = ("none", "mask", "structure")
MASK_DECAY_SCHEDULES = ("linear", "exp")
STRUCTURE_DECAY_MODES = ("stepwise", "geometric")

# Exponential mask decay ends at beta = 1% when alpha is derived from decay_steps.
_EXP_DECAY_END = 0.01


class RecipeConfigError(NMSearchError):
    """A recipe configuration that cannot work."""


@dataclass
class RecipeConfig:
    """How masked weights are trained. Every field has a Hydra key of the same name (``recipe.*``).

    Attributes:
        estimator: ``"ste"``, ``"srste"`` or ``"fixed"``.
        srste_lambda: SR-STE's lambda_w (>= 0).
        decay: ``"none"``, ``"mask"`` or ``"structure"`` (with ``estimator="ste"`` only).
        warmup_steps: Dense steps (weights and activations) before masking starts.
        decay_steps: Length of the decay after the warm-up.
        mask_decay_schedule: ``"linear"`` (``max(0, 1 - alpha t)``) or ``"exp"`` (``exp(-alpha t)``).
        mask_decay_alpha: The decay rate; ``None`` derives it from ``decay_steps``.
        structure_decay_mode: ``"stepwise"`` (N shrinks at fixed M) or ``"geometric"`` (fixed density).
        structure_decay_max_scale: Largest geometric scale, a power of two.
        total_steps: Training length for the row-mask ramp; ``None`` applies the target at once.
        row_ramp_start: Fraction of ``total_steps`` where the row ramp starts.
        row_ramp_end: Fraction of ``total_steps`` where it reaches the target.
        row_ramp_power: Exponent of the ramp ``target (1 - (1 - p)^power)``.

    Raises:
        RecipeConfigError: When built with an unknown choice, a negative count, SR-STE or
            ``fixed`` combined with a decay, or an invalid ramp.
    """

    estimator: str = "srste"
    srste_lambda: float = 2e-4
    decay: str = "none"
    warmup_steps: int = 0
    decay_steps: int = 1000
    mask_decay_schedule: str = "linear"
    mask_decay_alpha: float | None = None
    structure_decay_mode: str = "stepwise"
    structure_decay_max_scale: int = 8
    total_steps: int | None = None  # training length the row-mask ramp is laid over; None: no ramp
    row_ramp_start: float = 0.1
    row_ramp_end: float = 0.9
    row_ramp_power: float = 2.0

    def __post_init__(self) -> None:
        def choice(field: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, field) not in allowed:
                raise RecipeConfigError(f"recipe.{field} = {getattr(self, field)!r} is not one of {', '.join(allowed)}")

        choice("estimator", ESTIMATORS)
        choice("decay", DECAYS)
        choice("mask_decay_schedule", MASK_DECAY_SCHEDULES)
        choice("structure_decay_mode", STRUCTURE_DECAY_MODES)
        if self.decay != "none" and self.estimator != "ste":
            raise RecipeConfigError(
                f"recipe.estimator = {self.estimator!r} cannot be combined with decay = {self.decay!r}; "
                "decay recipes train with the plain STE: set estimator=ste (or decay=none)"
            )
        if self.srste_lambda < 0:
            raise RecipeConfigError(f"recipe.srste_lambda must be >= 0, got {self.srste_lambda}")
        for field in ("warmup_steps", "decay_steps"):
            if getattr(self, field) < 0:
                raise RecipeConfigError(f"recipe.{field} must be >= 0, got {getattr(self, field)}")
        if self.mask_decay_alpha is not None and self.mask_decay_alpha <= 0:
            raise RecipeConfigError(f"recipe.mask_decay_alpha must be > 0, got {self.mask_decay_alpha}")
        scale = self.structure_decay_max_scale
        if scale < 1 or scale & (scale - 1):
            raise RecipeConfigError(f"recipe.structure_decay_max_scale must be a power of two, got {scale}")
        if self.total_steps is not None and self.total_steps < 1:
            raise RecipeConfigError(f"recipe.total_steps must be >= 1 (or null), got {self.total_steps}")
        if not 0 <= self.row_ramp_start <= self.row_ramp_end <= 1:
            raise RecipeConfigError(
                "recipe.row_ramp_start and row_ramp_end must satisfy 0 <= start <= end <= 1, "
                f"got {self.row_ramp_start} and {self.row_ramp_end}"
            )
        if self.row_ramp_power <= 0:
            raise RecipeConfigError(f"recipe.row_ramp_power must be > 0, got {self.row_ramp_power}")

    @property
    def alpha(self) -> float:
        """The mask-decay rate: given, or derived so the decay spans ``decay_steps``."""
        if self.mask_decay_alpha is not None:
            return self.mask_decay_alpha
        steps = max(self.decay_steps, 1)
        if self.mask_decay_schedule == "linear":
            return 1.0 / steps
        return -math.log(_EXP_DECAY_END) / steps


def mask_decay_beta(t: int, config: RecipeConfig) -> float:
    """Weight given to pruned entries ``t`` steps after warm-up (mask decay's beta).

    Args:
        t: Steps since the warm-up ended (negative: still warming up).
        config: The recipe.

    Returns:
        1 before the decay, then beta(t) of the schedule; 0 once the decay is over.
    """
    if t < 0:
        return 1.0
    if t >= config.decay_steps and config.mask_decay_alpha is None:
        return 0.0
    if config.mask_decay_schedule == "linear":
        return max(0.0, 1.0 - config.alpha * t)
    return math.exp(-config.alpha * t)


def row_ramp_sparsity(global_step: int, target: float, config: RecipeConfig) -> float:
    """Row-mask sparsity at ``global_step`` of the ramp.

    Args:
        global_step: The optimizer step.
        target: The row mask's target sparsity.
        config: The recipe (``total_steps``, ``row_ramp_start``, ``row_ramp_end``, ``row_ramp_power``).

    Returns:
        0 before ``row_ramp_start * total_steps``, the target from ``row_ramp_end * total_steps``
        on, ``target (1 - (1 - p)^power)`` at progress ``p`` in between; the target at every step
        without ``total_steps``.
    """
    if config.total_steps is None:
        return target
    start, end = config.row_ramp_start * config.total_steps, config.row_ramp_end * config.total_steps
    if global_step >= end:
        return target
    if global_step < start:
        return 0.0
    progress = (global_step - start) / (end - start)
    return target * (1.0 - (1.0 - progress) ** config.row_ramp_power)


def structure_decay_stages(
    target: NMPattern, group_dim: int, mode: str = "stepwise", max_scale: int = 8
) -> list[tuple[int, int]]:
    """The ``(n, m)`` stages of structure decay, ending at ``target``.

    Stepwise keeps M and shrinks N: ``M-1``, then halvings of M down to the target N
    (1:8 -> 7:8, 4:8, 2:8, 1:8). Geometric keeps the density and refines the structure
    (1:8 -> 8:64, 4:32, 2:16, 1:8), starting at the largest scale ``<= max_scale`` whose
    group size divides the layer's ``group_dim``.

    Args:
        target: The final pattern.
        group_dim: The layer's grouped dimension (input channels per group).
        mode: ``"stepwise"`` or ``"geometric"``.
        max_scale: Largest geometric scale.

    Returns:
        The stages in order; the last is ``(target.n, target.m)``.
    """
    n, m = target.n, target.m
    if mode == "stepwise":
        stages = [m - 1]
        k = m // 2
        while k > n:
            stages.append(k)
            k //= 2
        stages.append(n)
        ordered = [s for i, s in enumerate(stages) if s >= n and s not in stages[:i]]
        return [(s, m) for s in ordered]
    scale = max_scale
    while scale > 1 and group_dim % (m * scale):
        scale //= 2
    stages_geo = []
    while scale >= 1:
        stages_geo.append((n * scale, m * scale))
        scale //= 2
    return stages_geo


def structure_decay_stage(t: int, stages: list[tuple[int, int]], decay_steps: int) -> tuple[int, int]:
    """The structure-decay stage at step ``t`` after warm-up.

    Args:
        t: Steps since the warm-up ended.
        stages: From :func:`structure_decay_stages`.
        decay_steps: Length of the decay; the intermediate stages share it equally.

    Returns:
        The ``(n, m)`` in force; the last stage once the decay is over.
    """
    intermediate = len(stages) - 1
    if t >= decay_steps or intermediate == 0:
        return stages[-1]
    frame = decay_steps / intermediate
    return stages[min(int(t // frame), intermediate - 1)]


class Recipe:
    """Drives every sparse layer of ``model`` through a :class:`RecipeConfig`.

    Call ``step(global_step)`` once per optimizer step, before the forward pass. It also
    records SAD (mask flips between consecutive mask updates) per layer.

    Args:
        model: A model with sparse layers (see :func:`~search_space.sparsify`, ``Scheme.apply``).
        config: The recipe; default ``RecipeConfig()`` (SR-STE).
        record_mask_flips: Record SAD history (a few tensor reads per step).
    """

    def __init__(self, model: nn.Module, config: RecipeConfig | None = None, *, record_mask_flips: bool = True) -> None:
        self.config = config or RecipeConfig()
        self.layers: dict[str, SparseLayerMixin] = dict(sparse_layers(model))
        self.record_mask_flips = record_mask_flips
        self._stages = {
            name: structure_decay_stages(
                layer.weight_pattern,
                layer.weight.shape[1],
                self.config.structure_decay_mode,
                self.config.structure_decay_max_scale,
            )
            for name, layer in self.layers.items()
            if layer.weight_pattern is not None
        }
        self._fixed = False
        self._history: list[dict] = []
        self.global_step = -1

    def phase(self, global_step: int) -> str:
        """The recipe's phase at a step.

        Args:
            global_step: The optimizer step.

        Returns:
            ``"warmup"`` (dense), ``"decay"`` (mask / structure decay running) or ``"sparse"``.
        """
        t = global_step - self.config.warmup_steps
        if t < 0:
            return "warmup"
        if self.config.decay != "none" and t < self.config.decay_steps:
            return "decay"
        return "sparse"

    def step(self, global_step: int) -> None:
        """Set every layer's mask state for this step (warm-up, decay stage, row ramp, estimator).

        With ``estimator="fixed"`` the first masked step freezes the masks and zeroes the pruned
        weights.

        Args:
            global_step: The optimizer step about to run (0-based).
        """
        self._record_flips()
        self.global_step = global_step
        config = self.config
        t = global_step - config.warmup_steps
        if t < 0:
            for layer in self.layers.values():
                layer.mask_state = MaskState(enabled=False, estimator=config.estimator)
            return
        beta = mask_decay_beta(t, config) if config.decay == "mask" else 0.0
        for name, layer in self.layers.items():
            weight_nm = None
            if config.decay == "structure" and name in self._stages:
                weight_nm = structure_decay_stage(t, self._stages[name], config.decay_steps)
            rows = layer.activation_pattern
            row_sparsity = (
                row_ramp_sparsity(global_step, rows.sparsity, config) if isinstance(rows, RowPattern) else None
            )
            layer.mask_state = MaskState(
                enabled=True,
                estimator=config.estimator,
                srste_lambda=config.srste_lambda,
                decay_beta=beta,
                weight_nm=weight_nm,
                row_sparsity=row_sparsity,
            )
        if config.estimator == "fixed" and not self._fixed:
            for layer in self.layers.values():
                layer.fix_weight_mask()
            self._fixed = True

    def _record_flips(self) -> None:
        if not self.record_mask_flips:
            return
        for name, layer in self.layers.items():
            flips, updates = layer.read_mask_flips()
            if updates:
                numel = layer.weight.numel()
                self._history.append(
                    {
                        "step": self.global_step,
                        "layer": name,
                        "updates": updates,
                        "flips": flips,
                        "flip_rate": flips / (numel * updates),
                    }
                )

    def sad_history(self) -> pd.DataFrame:
        """The SAD history.

        Returns:
            One row per layer and step with mask updates: ``step``, ``layer``, ``updates``,
            ``flips`` and ``flip_rate`` (``flips / (numel * updates)``).
        """
        self._record_flips()
        columns = ["step", "layer", "updates", "flips", "flip_rate"]
        return pd.DataFrame(self._history, columns=columns)

    def sad_frame(self) -> pd.DataFrame:
        """Per-layer totals since the layers were created (see :func:`mask_flip_frame`)."""
        return mask_flip_frame(self.layers.items())


def mask_flip_frame(layers: nn.Module | Iterable[tuple[str, SparseLayerMixin]]) -> pd.DataFrame:
    """Per-layer SAD totals since the layers were created.

    Args:
        layers: A model, or ``(name, sparse layer)`` pairs.

    Returns:
        One row per layer: ``layer``, ``numel``, ``updates``, ``flips`` and the mean ``flip_rate``
        per update.
    """
    items = sparse_layers(layers) if isinstance(layers, nn.Module) else layers
    rows = []
    for name, layer in items:
        numel = layer.weight.numel()
        flips = int(layer.mask_flips)
        updates = layer.mask_updates
        rows.append(
            {
                "layer": name,
                "numel": numel,
                "updates": updates,
                "flips": flips,
                "flip_rate": flips / (numel * updates) if updates else 0.0,
            }
        )
    return pd.DataFrame(rows, columns=["layer", "numel", "updates", "flips", "flip_rate"])
