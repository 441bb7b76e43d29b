"""The main job: ``python -m experiments.search [key=value ...]`` (``-m`` for sweeps).

Builds the task's model, its search space, the evaluator (accuracy + hardware cost) and the
strategy from the Hydra config, runs the search and writes into the run directory:
``trials.csv``, ``pareto.csv``, ``pareto.png``, ``scheme.json`` (the knee, or the best point
under ``select.constraints``), ``schemes/`` (one JSON per Pareto point), ``result.json``, the
strategy's own files (``optuna.db``, logs) and ``config.yaml`` (the resolved config).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import evaluators
from evaluators import (
    COST_METRICS,
    AccuracyEvaluator,
    CompositeEvaluator,
    Constraint,
    CostEvaluator,
    CostModelConfig,
    Evaluator,
    HardwareCostModel,
    MeasuredCostModel,
    Trainer,
    build_evaluator,
    distributed,
    find_part,
)
from evaluators.distill import check_train_loss
from evaluators.fidelity import FidelityConfig, FidelityEvaluator, is_pretrained_task
from evaluators.training import resolve_device
from experiments.config import EvaluatorConfig, register_configs
from experiments.errors import USAGE, error_line, run_cli
from experiments.report import plot_result, summary
from experiments.runs import claim_run_dir, defining_config
from experiments.tasks import instantiate_task
from nmsearch import CONFIG_PACKAGE
from search_space import (
    NMSearchError,
    RecipeConfig,
    Scheme,
    SearchSpace,
    atomic_write,
    atomic_write_text,
    check_writable_dir,
)
from strategies import SearchResult, Strategy

register_configs()
log = logging.getLogger(__name__)

# strategies whose every step is the same on all ranks, so their training can be data-parallel
DATA_PARALLEL_STRATEGIES = ("gumbel", "uniform")


@dataclass
class Job:
    """Everything a search needs, built from one config."""

    space: SearchSpace
    evaluator: Evaluator
    strategy: Strategy
    hardware: str


def cost_objectives(cfg: DictConfig) -> list[str]:
    """The cost metrics among ``cfg.objectives`` (which must start with ``accuracy``)."""
    objectives = list(cfg.objectives)
    if "accuracy" not in objectives:
        raise NMSearchError(f"objectives must include 'accuracy' (got {objectives}); add cost metrics after it")
    cost_metrics = [o for o in objectives if o != "accuracy"]
    unknown = [m for m in cost_metrics if m not in COST_METRICS]
    if unknown or not cost_metrics:
        raise NMSearchError(
            f"objectives: {unknown[0] if unknown else 'no cost metric'!r} — choose from {', '.join(COST_METRICS)}"
        )
    return cost_metrics


def build_cost_model(cfg: DictConfig) -> HardwareCostModel:
    """The run's cost model (``cfg.hardware``, ``cfg.evaluator.dtype`` / ``batch_size``)."""
    hardware = OmegaConf.to_container(cfg.hardware, resolve=True)
    return evaluators.build_cost_model(hardware, CostModelConfig(cfg.evaluator.dtype, cfg.evaluator.batch_size))


def build_space(cfg: DictConfig, task: Any = None) -> tuple[Trainer, SearchSpace]:
    """The task's trainer (nothing is trained yet) and the search space of its model."""
    task = task if task is not None else instantiate_task(cfg.task)
    trainer = Trainer(task, seed=cfg.seed, device=cfg.device, cache_dir=cfg.cache_dir, progress=cfg.progress)
    space_cfg = OmegaConf.to_container(cfg.space, resolve=True)
    space = SearchSpace.from_model(trainer.fresh_model(), task.example_inputs(), **space_cfg)
    return trainer, space


def build_fidelity(cfg: DictConfig, task: Any, evaluator_cfg: EvaluatorConfig) -> tuple[SearchSpace, FidelityEvaluator]:
    """The search space and label-free fidelity evaluator: of a pre-trained task (``task=minilm``), or
    of a trained task's pre-trained model when ``evaluator.metric`` is set (held out: ``evaluator.split``)."""
    fidelity = FidelityConfig(
        oneshot=evaluator_cfg.oneshot,
        calibration_mode=evaluator_cfg.calibration_mode,
        metric=evaluator_cfg.metric or "cosine",
    )
    space_cfg = OmegaConf.to_container(cfg.space, resolve=True)
    if is_pretrained_task(task):
        device = resolve_device(cfg.device or None)
        model = task.build_model().to(device)
        space = SearchSpace.from_model(model, task.example_inputs(), **space_cfg)
        return space, FidelityEvaluator.for_task(task, space, fidelity, model=model)
    trainer, space = build_space(cfg, task)
    accuracy = AccuracyEvaluator(trainer, space, evaluator_cfg.accuracy)
    heldout = [inputs.to(trainer.device) for inputs, _ in task.loader(evaluator_cfg.split)]
    model, calibration = trainer.pretrained(), accuracy.calibration_inputs()
    evaluator = FidelityEvaluator(model, space, calibration, heldout, fidelity, source=trainer)
    return space, evaluator


def build(cfg: DictConfig) -> Job:
    """Task, space, evaluator and strategy from a composed config; every input is validated
    here, before any training or search starts."""
    cost_metrics = cost_objectives(cfg)
    recipe: RecipeConfig = OmegaConf.to_object(cfg.recipe)
    strategy = OmegaConf.to_object(cfg.strategy)
    fields = {f.name for f in dataclasses.fields(strategy)}
    if "recipe" in fields:
        strategy = dataclasses.replace(strategy, recipe=recipe)
    if "objectives" in fields:
        strategy = dataclasses.replace(strategy, objectives=list(cfg.objectives))
    evaluator_cfg: EvaluatorConfig = OmegaConf.to_object(cfg.evaluator)
    hardware = OmegaConf.to_container(cfg.hardware, resolve=True)
    task = instantiate_task(cfg.task)
    if hasattr(strategy, "train_loss"):  # a strategy that trains: labels it asks for must exist
        check_train_loss(strategy.train_loss, not is_pretrained_task(task), getattr(task, "name", "task"))
    if is_pretrained_task(task) or evaluator_cfg.metric:
        cost_model = build_cost_model(cfg)  # a bad profile fails before the model is loaded
        space, fidelity = build_fidelity(cfg, task, evaluator_cfg)
        evaluator = CompositeEvaluator(fidelity, CostEvaluator(space, cost_model, cost_metrics))
        return Job(space, evaluator, strategy, cost_model.profile.name)
    trainer, space = build_space(cfg, task)
    evaluator = build_evaluator(
        trainer,
        space,
        accuracy=evaluator_cfg.accuracy,
        cost=evaluator_cfg.cost,
        hardware=hardware,
        metrics=cost_metrics,
    )
    return Job(space, evaluator, strategy, find_part(evaluator, CostEvaluator).cost_model.profile.name)


def chosen_trial(result: SearchResult, cfg: DictConfig) -> int:
    """``scheme.json``'s trial: by ``select`` (the rules of :meth:`SearchResult.select`), else the knee."""
    if cfg.select.constraints or cfg.select.objective:
        return result.select(list(cfg.select.constraints), cfg.select.objective)
    return result.knee()


def write_outputs(result: SearchResult, job: Job, cfg: DictConfig, out: Path) -> tuple[int, Scheme]:
    """Save the result and pick ``scheme.json``; returns the chosen trial and its scheme."""
    result.save(out)
    trial = chosen_trial(result, cfg)
    row = result.trials.set_index("trial").loc[trial]
    metrics = {o.name: float(row[o.name]) for o in result.objectives}
    resolved = OmegaConf.to_container(cfg, resolve=True)
    scheme = result.schemes[trial].with_metadata(
        hardware=job.hardware,
        metrics=metrics,
        provenance={
            **result.schemes[trial].provenance,
            "strategy": result.strategy,
            "trial": trial,
            "seed": cfg.seed,
            "config": resolved,
        },
    )
    scheme.save(out / "scheme.json")
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    figure = plot_result(
        result,
        f"{result.strategy} on {cfg.task.get('_target_', 'task').rsplit('.', 1)[-1]}, {job.hardware}",
        chosen=trial,
        space=job.space,
    )
    atomic_write(out / "pareto.png", lambda handle: figure.savefig(handle, format="png", dpi=120, bbox_inches="tight"))
    plt.close(figure)
    return trial, scheme


def check_selection(cfg: DictConfig) -> None:
    """``select.constraints`` / ``select.objective`` are applied after the search: check them before it."""
    objectives = list(cfg.objectives)
    known = [*objectives, *(f"info.{m}" for m in COST_METRICS if m not in objectives)]
    for text in cfg.select.constraints:
        constraint = Constraint.parse(text)
        if constraint.metric not in known:
            raise NMSearchError(
                f"select.constraints: {str(text)!r} bounds {constraint.metric!r}, which the results will not have; "
                f"use one of {', '.join(known)}"
            )
    if cfg.select.objective is not None and cfg.select.objective not in objectives:
        raise NMSearchError(
            f"select.objective {cfg.select.objective!r} is not optimised; choose one of {', '.join(objectives)}"
        )


def run(cfg: DictConfig, out: Path) -> SearchResult:
    """Validate everything, then search and write the run directory ``out``. Under ``torchrun``
    (see :mod:`evaluators.distributed`) every rank trains its share and rank 0 alone writes."""
    device = distributed.init_from_env(cfg.device)
    distributed.check_same_config(OmegaConf.to_container(cfg, resolve=True))
    if distributed.is_distributed():
        cfg.device = device
    defining = defining_config(OmegaConf.to_container(cfg, resolve=True))
    claim_run_dir(out, defining, force_new=cfg.force_new, write=False)  # refuse a mixed run before any work
    check_writable_dir(out, "run directory", "set hydra.run.dir to a writable folder")
    check_selection(cfg)
    job = build(cfg)
    if distributed.is_distributed() and job.strategy.name not in DATA_PARALLEL_STRATEGIES:
        raise NMSearchError(
            f"strategy {job.strategy.name!r} does not run under torchrun (only {', '.join(DATA_PARALLEL_STRATEGIES)} "
            "train data-parallel); run Optuna workers with python -m experiments.workers instead"
        )
    cost_model = find_part(job.evaluator, CostEvaluator).cost_model
    if isinstance(cost_model, MeasuredCostModel) and distributed.is_main():
        print(cost_model.coverage(job.space).summary())
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        if claim_run_dir(out, defining, force_new=cfg.force_new) == "replaced":
            log.warning("%s held a search with another config: its files moved to %s/replaced-*", out, out)
    result = job.strategy.search(job.space, job.evaluator, run_dir=out)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        trial, _ = write_outputs(result, job, cfg, out)
        print(summary(result, trial, out))
    return result


@hydra.main(config_path=f"pkg://{CONFIG_PACKAGE}", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> Any:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(HydraConfig.get().runtime.output_dir)

    def body() -> int:
        try:
            run(cfg, out)
        finally:
            distributed.shutdown()
        return 0

    status = run_cli("nmsearch", body, on_interrupt=f"run it again with hydra.run.dir={out} to resume")
    if status:
        sys.exit(status)


def config_error_line(error: Exception) -> str:
    """A Hydra / OmegaConf composition error (a typo in a key, an unknown group option) as one line."""
    if isinstance(error, OverrideParseException):
        override = str(error).strip().splitlines()[0].split(": ", 1)[-1]
        return (
            f"cannot parse the override {override}: quote values holding <, >, = or spaces, "
            "e.g. \"select.constraints=['latency_ms<=0.1']\""
        )
    first = [str(e).strip().splitlines()[0].rstrip(".") for e in (error, error.__cause__) if e and str(e).strip()]
    line = ": ".join(dict.fromkeys(first))
    options = [o for o in getattr(error, "options", None) or [] if not o.endswith("_schema")]
    return f"{line}; available: {', '.join(options)}" if options else line


def cli() -> None:
    """Hydra reports configuration errors over several lines; print them as one, exit 2."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let composition errors reach us instead of Hydra's report
    try:
        main()
    except (HydraException, OmegaConfBaseException) as error:
        print(f"nmsearch: {config_error_line(error)}", file=sys.stderr)
        sys.exit(USAGE)
    except OSError as error:  # Hydra creating the run directory or writing its .hydra files
        print(f"nmsearch: {error_line(error)}; set hydra.run.dir to a writable folder", file=sys.stderr)
        sys.exit(USAGE)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    cli()
