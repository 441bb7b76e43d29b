"""Structured configs for the Hydra app: a typo in any key fails when the config is composed.

Groups (``conf/``): ``task`` (a ``_target_``, so user tasks plug in), ``space``, ``strategy`` (the
strategy dataclasses themselves are the schemas), ``evaluator``, ``hardware`` (a profile file of
``conf/hardware``, validated by :func:`evaluators.load_profile`) and ``recipe``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from evaluators import AccuracyConfig, CostModelConfig
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


@dataclass(frozen=True)
class EvaluatorConfig(AccuracyConfig, CostModelConfig):
    """The ``evaluator`` group: the keys of :class:`evaluators.AccuracyConfig` and of
    :class:`evaluators.CostModelConfig`, inherited (not copied), so the schema cannot drift from
    them. ``evaluator.recipe`` is ``${recipe}`` (set in :func:`register_configs`): one recipe."""

    def __post_init__(self) -> None:
        AccuracyConfig.__post_init__(self)
        CostModelConfig.__post_init__(self)

    @property
    def accuracy(self) -> AccuracyConfig:
        """The accuracy part, as an :class:`evaluators.AccuracyConfig`."""
        return AccuracyConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AccuracyConfig)})

    @property
    def cost(self) -> CostModelConfig:
        """The cost-model part, as an :class:`evaluators.CostModelConfig`."""
        return CostModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(CostModelConfig)})


@dataclass
class SelectConfig:
    """Which Pareto point becomes ``scheme.json``: among those meeting ``constraints`` (e.g.
    ``latency_ms<=0.02``), the best by ``objective``; by default the cheapest (primary cost) under
    an accuracy floor, else the most accurate (see ``SearchResult.select``); the knee without both."""

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
    force_new: bool = False  # start over in a run directory that holds another search (see experiments.runs)


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (``conf/config.yaml`` and the group files extend them)."""
    store = ConfigStore.instance()
    schema = OmegaConf.structured(SearchConfig)
    # AccuracyConfig is frozen (a value for the evaluator), which OmegaConf turns into a read-only
    # node; composing must still merge the group files and command-line overrides into it.
    OmegaConf.set_readonly(schema.evaluator, False)
    schema.evaluator.recipe = "${recipe}"  # one recipe per job: the evaluator trains with the recipe group
    store.store(name="search_schema", node=schema)
    for name, schema in STRATEGIES.items():
        store.store(group="strategy", name=f"{name}_schema", node=schema)
