"""Accuracy of a scheme at one of three fidelities, as an :class:`~evaluators.base.Evaluator`.

* ``oneshot``  -- mask the pre-trained dense model (``scheme.apply``; with ``oneshot=wanda`` or
  ``sparsegpt`` pruned by that method on ``calibration_samples`` training inputs, see
  :mod:`search_space.oneshot`), re-estimate BatchNorm statistics on a few training batches,
  evaluate. No training: milliseconds to seconds.
* ``finetune`` -- the masked (one-shot pruned) pre-trained model trained for ``finetune_epochs`` with the recipe
  at the schedule's ``finetune_lr``.
* ``full``     -- a freshly initialised model, masked from the first step, trained with the
  recipe for the task's whole schedule (the SR-STE setting); independent of pre-training.

A scheme with row masks (``r0.2``) first keeps the best of ``row_candidates`` random masks on a
training batch (:func:`~search_space.select_row_masks`); training fidelities ramp their sparsity
(power 2, from 10% to 90% of the steps, set by the recipe).

The objective is ``accuracy`` (top-1 fraction, maximised) on the validation split; the test
split is kept for final reporting through :meth:`AccuracyEvaluator.evaluate_on`. Every
evaluation re-seeds, so the same scheme always gets the same score.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from evaluators.base import MAXIMIZE, Evaluation, Objective
from evaluators.task import SPLITS, TaskError
from evaluators.training import Trainer, TrainingDivergedError, seed_everything
from search_space import DEFAULT_ROW_CANDIDATES, RecipeConfig, Scheme, SearchSpace, select_row_masks
from search_space.oneshot import CALIBRATION_MODES, ONESHOT_METHODS, OneShotPruner

# The label-free objectives of evaluators.fidelity (kept here so this module does not import it).
FIDELITY_METRICS = ("cosine", "kl", "relative_error")

FIDELITIES = ("oneshot", "finetune", "full")


class NoSearchableLayersError(TaskError):
    """A model none of whose layers can be made N:M sparse."""


@dataclass(frozen=True)
class AccuracyConfig:
    """How :class:`AccuracyEvaluator` scores a scheme. Every field has a Hydra key of the same name.

    Attributes:
        fidelity: ``"oneshot"``, ``"finetune"`` or ``"full"``.
        finetune_epochs: Epochs of a ``finetune`` evaluation (>= 1).
        recipe: The training recipe of ``finetune`` and ``full``.
        bn_batches: Training batches that re-estimate BatchNorm statistics (``oneshot``, >= 0).
        split: The split ``evaluate`` scores: ``"val"`` during a search.
        row_candidates: Random row masks compared per scheme with row masks (>= 1).
        oneshot: How the pre-trained model is pruned for the ``oneshot`` and ``finetune``
            fidelities: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"`` (:mod:`search_space.oneshot`).
        calibration_mode: The calibration of ``wanda`` and ``sparsegpt`` (one of
            :data:`search_space.oneshot.CALIBRATION_MODES`).
        calibration_samples: Training inputs the calibration runs on (>= 1).
        metric: ``"cosine"``, ``"kl"`` or ``"relative_error"`` makes the Hydra app score schemes
            label-free with :class:`~evaluators.fidelity.FidelityEvaluator` instead; ``None``
            keeps labelled accuracy.

    Raises:
        TaskError: If a choice is unknown or a count out of range.
    """

    fidelity: str = "oneshot"
    finetune_epochs: int = 1
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    bn_batches: int = 8
    split: str = "val"
    row_candidates: int = DEFAULT_ROW_CANDIDATES
    oneshot: str = "magnitude"
    calibration_mode: str = "independent"
    calibration_samples: int = 512
    metric: str | None = None

    def __post_init__(self) -> None:
        if self.oneshot not in ONESHOT_METHODS:
            raise TaskError(f"evaluator.oneshot = {self.oneshot!r} is not one of {', '.join(ONESHOT_METHODS)}")
        if self.calibration_mode not in CALIBRATION_MODES:
            raise TaskError(
                f"evaluator.calibration_mode = {self.calibration_mode!r} is not one of {', '.join(CALIBRATION_MODES)}"
            )
        if self.metric is not None and self.metric not in FIDELITY_METRICS:
            raise TaskError(
                f"evaluator.metric = {self.metric!r} is not one of {', '.join(FIDELITY_METRICS)} (or null: accuracy)"
            )
        if self.calibration_samples < 1:
            raise TaskError(f"evaluator.calibration_samples must be >= 1, got {self.calibration_samples}")
        if self.fidelity not in FIDELITIES:
            raise TaskError(f"accuracy.fidelity = {self.fidelity!r} is not one of {', '.join(FIDELITIES)}")
        if self.split not in SPLITS:
            raise TaskError(f"accuracy.split = {self.split!r} is not one of {', '.join(SPLITS)}")
        if self.finetune_epochs < 1 or self.bn_batches < 0:
            raise TaskError("accuracy.finetune_epochs must be >= 1 and accuracy.bn_batches >= 0")
        if self.row_candidates < 1:
            raise TaskError(f"accuracy.row_candidates must be >= 1, got {self.row_candidates}")


class AccuracyEvaluator:
    """Scores schemes of a search space by the accuracy of the sparse model.

    Args:
        trainer: Trains and evaluates the task's models (and holds the pre-training cache).
        space: The search space; default discovered from the task's model and example inputs.
        config: The fidelity and its settings; default ``AccuracyConfig()`` (``oneshot``).

    Raises:
        NoSearchableLayersError: If no layer of the model can be made N:M sparse.
    """

    objectives = (Objective("accuracy", MAXIMIZE),)

    def __init__(
        self, trainer: Trainer, space: SearchSpace | None = None, config: AccuracyConfig | None = None
    ) -> None:
        self.trainer = trainer
        self.config = config or AccuracyConfig()
        task = trainer.task
        if space is None:
            space = SearchSpace.from_model(trainer.fresh_model(), task.example_inputs())
        if not space.searchable:
            layers = ", ".join(f"{info.name!r} ({info.channels} channels)" for info in space.layers[:4])
            more = ", ..." if len(space.layers) > 4 else ""
            ratios = ", ".join(map(str, space.ratios))
            raise NoSearchableLayersError(
                f"task {task.name!r}: no layer of the model can be made N:M sparse at {ratios} "
                f"(layers: {layers}{more}); searchable layers need input channels divisible by M"
            )
        self.space = space
        self._pruner: OneShotPruner | None = None

    def evaluate(self, scheme: Scheme) -> Evaluation:
        """Accuracy on the configured split (validation by default).

        Args:
            scheme: A scheme of this evaluator's space.

        Returns:
            ``{"accuracy": fraction}`` with ``loss``, ``fidelity``, ``split`` and ``samples`` in
            ``info``; a failed evaluation when training diverges or runs out of GPU memory.

        Raises:
            SchemeError: If the scheme does not belong to this space.
        """
        return self.evaluate_on(scheme, self.config.split)

    def evaluate_on(self, scheme: Scheme, split: str) -> Evaluation:
        """Accuracy on a given split; ``evaluate_on(scheme, "test")`` is the final report of a chosen scheme.

        Args:
            scheme: A scheme of this evaluator's space.
            split: ``"train"``, ``"val"`` or ``"test"``.

        Returns:
            As :meth:`evaluate`, on ``split``.

        Raises:
            SchemeError: If the scheme does not belong to this space.
        """
        start = time.perf_counter()
        info = {"fidelity": self.config.fidelity, "split": split}
        try:
            model = self.sparse_model(scheme)
        except TrainingDivergedError as error:
            return Evaluation.failure(self.objectives, str(error), info=info, duration_s=time.perf_counter() - start)
        except torch.cuda.OutOfMemoryError:
            reason = f"out of GPU memory while training at fidelity {self.config.fidelity!r}"
            return Evaluation.failure(self.objectives, reason, info=info, duration_s=time.perf_counter() - start)
        result = self.trainer.evaluate(model, split)
        duration = time.perf_counter() - start
        info.update(loss=result.loss, samples=result.samples)
        if not math.isfinite(result.loss):
            reason = f"{split} loss is {result.loss} at fidelity {self.config.fidelity!r}"
            return Evaluation.failure(self.objectives, reason, info=info, duration_s=duration)
        return Evaluation({"accuracy": result.accuracy}, info=info, duration_s=duration)

    def sparse_model(self, scheme: Scheme) -> nn.Module:
        """The model a scheme gets at this fidelity (weight masks not yet baked in: see ``Scheme.finalize``).

        Args:
            scheme: A scheme of this evaluator's space.

        Returns:
            The sparse model, masked (and trained, for ``finetune`` / ``full``), on the trainer's device.

        Raises:
            SchemeError: If the scheme does not belong to this space.
            TrainingDivergedError: If training diverges.
        """
        self.space.check(scheme)
        trainer, config, schedule = self.trainer, self.config, self.trainer.schedule
        seed_everything(trainer.seed)
        if config.fidelity == "full":
            model = scheme.apply(trainer.fresh_model(), inplace=True)
            self._select_row_masks(scheme, model)
            trainer.fit(
                model,
                epochs=schedule.epochs,
                lr=schedule.lr,
                recipe=self._recipe(scheme, schedule.epochs),
                warmup_epochs=schedule.warmup_epochs,
                description="full training",
            )
            return model
        model = self._masked_pretrained(scheme)
        self._select_row_masks(scheme, model)
        if config.fidelity == "oneshot":
            trainer.reestimate_batchnorm(model, config.bn_batches)
        else:
            trainer.fit(
                model,
                epochs=config.finetune_epochs,
                lr=schedule.finetune_lr,
                recipe=self._recipe(scheme, config.finetune_epochs),
                description="finetune",
            )
        return model

    def _masked_pretrained(self, scheme: Scheme) -> nn.Module:
        """The pre-trained model under ``scheme``, pruned by the configured one-shot method."""
        if self.config.oneshot == "magnitude":  # the sparse wrappers' own masks
            return self.scheme_model(scheme)
        if self._pruner is None:
            self._pruner = OneShotPruner(
                self.trainer.pretrained(),
                self.calibration_inputs(),
                self.config.oneshot,
                mode=self.config.calibration_mode,
            )
        return self._pruner.prune(scheme)

    def scheme_model(self, scheme: Scheme) -> nn.Module:
        """``scheme`` applied to a fresh copy of the pre-trained model (magnitude masks).

        Args:
            scheme: The scheme to apply.

        Returns:
            The sparse model, on the trainer's device.
        """
        return scheme.apply(self.trainer.pretrained(), inplace=True)

    def calibration_inputs(self) -> torch.Tensor:
        """``calibration_samples`` training inputs (no augmentation) for the one-shot methods.

        Returns:
            The first ``calibration_samples`` inputs of the shuffled training split (all of them
            if the split is smaller), concatenated on the trainer's device.
        """
        trainer, wanted = self.trainer, self.config.calibration_samples
        batches, count = [], 0
        for inputs, _ in trainer.task.loader("train", shuffle=True, augment=False, seed=trainer.seed):
            batches.append(inputs)
            count += len(inputs)
            if count >= wanted:
                break
        return torch.cat(batches)[:wanted].to(trainer.device)

    def _select_row_masks(self, scheme: Scheme, model: nn.Module) -> None:
        """Keep the best of ``row_candidates`` random row masks on one training batch."""
        if not scheme.has_rows:
            return
        trainer = self.trainer
        inputs, targets = next(iter(trainer.task.loader("train", shuffle=True, augment=False, seed=trainer.seed)))
        select_row_masks(
            model,
            inputs.to(trainer.device),
            targets.to(trainer.device),
            candidates=self.config.row_candidates,
            seed=trainer.seed,
        )

    def _recipe(self, scheme: Scheme, epochs: int) -> RecipeConfig:
        """The configured recipe; with row masks, their ramp laid over the training steps (unless set)."""
        recipe = self.config.recipe
        if not scheme.has_rows or recipe.total_steps is not None:
            return recipe
        trainer = self.trainer
        steps_per_epoch = len(trainer.task.loader("train", shuffle=True, augment=True, seed=trainer.seed))
        return replace(recipe, total_steps=epochs * steps_per_epoch)
