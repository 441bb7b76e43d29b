"""Structured configs for the Hydra app: a typo in any key fails when the config is composed.

Groups (``conf/``): ``task`` (a ``_target_``, so user tasks plug in), ``space``, ``strategy`` (the
strategy dataclasses themselves are the schemas), ``evaluator``, ``hardware`` (a profile file of
``conf/hardware``, validated by :func:`evaluators.load_profile`) and ``recipe``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from search_space import DEFAULT_RATIOS, DEFAULT_TARGETS, RecipeConfig
from search_space.space import DEFAULT_ROW_SPARSITIES
from strategies import DominoStrategy, GumbelStrategy, OptunaStrategy, RandomStrategy, UniformStrategy

STRATEGIES = {
    "optuna": OptunaStrategy,
    "gumbel": GumbelStrategy,
    "domino": DominoStrategy,
    "uniform": UniformStrategy,
    "random": RandomStrategy,
}


@dataclass
class SpaceConfig:
    """Arguments of :meth:`search_space.SearchSpace.from_model`."""

    ratios: list[str] = field(default_factory=lambda: list(DEFAULT_RATIOS))
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    tie_both: bool = True
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    keep_first_last_dense: bool = False
    row_sparsities: list[float] = field(default_factory=lambda: list(DEFAULT_ROW_SPARSITIES))


@dataclass
class EvaluatorConfig:
    """Accuracy fidelity (see :class:`evaluators.AccuracyConfig`) and how the cost model runs."""

    fidelity: str = "oneshot"
    finetune_epochs: int = 1
    bn_batches: int = 8
    split: str = "val"
    dtype: str = "fp16"
    batch_size: int = 1


@dataclass
class SelectConfig:
    """Which Pareto point becomes ``scheme.json``: the best by ``objective`` (default: the first
    objective) among those meeting ``constraints`` (e.g. ``latency_ms<=0.02``); the knee without."""

    constraints: list[str] = field(default_factory=list)
    objective: str | None = None


@dataclass
class SearchConfig:
    task: Any = MISSING
    space: SpaceConfig = field(default_factory=SpaceConfig)
    strategy: Any = MISSING
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    hardware: Any = MISSING
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    objectives: list[str] = field(default_factory=lambda: ["accuracy", "latency_ms", "bytes_mb"])
    select: SelectConfig = field(default_factory=SelectConfig)
    seed: int = 0
    device: str | None = None
    cache_dir: str | None = None
    progress: bool = False


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (``conf/config.yaml`` and the group files extend them)."""
    store = ConfigStore.instance()
    store.store(name="search_schema", node=SearchConfig)
    for name, schema in STRATEGIES.items():
        store.store(group="strategy", name=f"{name}_schema", node=schema)
