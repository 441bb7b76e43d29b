"""Distillation: the label-free training loss of the strategies that train (Gumbel, DominoSearch).

With ``train_loss=distill`` a strategy trains the sparse *student* to reproduce the frozen dense
*teacher* (the pre-trained model: a copy in eval mode, run once per batch under ``no_grad``) on
the same unlabeled batch, in the metric family of :mod:`evaluators.fidelity` (the same
definitions, :func:`~evaluators.fidelity.metric_tensor`):

* ``kl`` -- ``T^2 KL(softmax(teacher / T) || softmax(student / T))`` (logits; the ``T^2`` of
  Hinton et al. keeps the gradient's scale as ``T`` changes);
* ``cosine`` -- ``1 - mean cosine`` of output rows (embeddings);
* ``relative_error`` -- the relative MSE ``||student - teacher||^2 / ||teacher||^2``.

Each is 0, with a zero gradient, when the student equals the teacher. The metric is the fidelity
evaluator's ``evaluator.metric`` when the search scores with one, else ``kl`` (a labelled task's
model is a classifier).

:func:`training_source` finds what a strategy trains from in its evaluator: the trainer of an
:class:`~evaluators.AccuracyEvaluator` part (a labelled task) or the ``source`` of a
:class:`~evaluators.FidelityEvaluator` part (a pre-trained task's ``training_batches(seed)``,
or a labelled task's trainer). :meth:`TrainingSource.training` resolves ``train_loss``
(``auto``: ``task`` with labels, else ``distill``) and refuses ``task`` without labels, in one
line, before any work.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from evaluators.accuracy import FIDELITY_METRICS, AccuracyEvaluator
from evaluators.composite import find_part_or_none
from evaluators.fidelity import FidelityEvaluator, is_pretrained_task, metric_tensor
from evaluators.task import TrainingSchedule
from evaluators.training import LossFn, Trainer
from search_space import NMSearchError
from search_space.oneshot import Inputs, call_model, move_inputs

__all__ = [
    "PRETRAINED_SCHEDULE",
    "TRAIN_LOSSES",
    "DistillationLoss",
    "TeacherBatches",
    "Training",
    "TrainingSource",
    "check_train_loss",
    "distillation_loss",
    "frozen_teacher",
    "training_source",
]

TRAIN_LOSSES = ("auto", "task", "distill")

# A pre-trained task without a schedule of its own: AdamW at a fine-tuning rate for transformers.
PRETRAINED_SCHEDULE = TrainingSchedule(optimizer="adamw", lr=1e-5, finetune_lr=1e-5, weight_decay=0.01)


def distillation_loss(student: Tensor, teacher: Tensor, metric: str = "kl", temperature: float = 1.0) -> Tensor:
    """How far the student's outputs are from the teacher's (module docstring), differentiable in ``student``.

    Args:
        student: Outputs of the sparse model.
        teacher: Outputs of the dense model for the same inputs (same shape).
        metric: ``kl``, ``cosine`` or ``relative_error``.
        temperature: ``T`` of ``kl`` (> 0).

    Returns:
        A scalar tensor >= 0; 0 when ``student == teacher``.

    Raises:
        NMSearchError: An unknown metric, or outputs of different shapes.
    """
    if student.shape != teacher.shape:
        raise NMSearchError(
            f"the student's outputs have shape {tuple(student.shape)}, the teacher's {tuple(teacher.shape)}: "
            "distillation compares outputs of the same shape"
        )
    if metric == "kl":
        return temperature**2 * metric_tensor("kl", teacher, student, temperature)
    if metric == "cosine":
        return 1.0 - metric_tensor("cosine", teacher, student)
    return metric_tensor(metric, teacher, student) ** 2  # an unknown metric raises here


@dataclass(frozen=True)
class DistillationLoss:
    """``loss(student_outputs, teacher_outputs)``: :func:`distillation_loss` as a training loss
    (the ``loss_fn`` of :func:`~evaluators.training.train_one_epoch` over :class:`TeacherBatches`).

    Raises:
        NMSearchError: An unknown metric or a temperature <= 0.
    """

    metric: str = "kl"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.metric not in FIDELITY_METRICS:
            raise NMSearchError(f"distillation metric {self.metric!r} is not one of {', '.join(FIDELITY_METRICS)}")
        if not self.temperature > 0:
            raise NMSearchError(f"distill_temperature must be > 0, got {self.temperature}")

    def __call__(self, student: Tensor, teacher: Tensor) -> Tensor:
        return distillation_loss(student.float(), teacher.float(), self.metric, self.temperature)


def frozen_teacher(model: nn.Module) -> nn.Module:
    """``model`` as a teacher: eval mode (no dropout; BatchNorm running statistics), no gradients.

    Args:
        model: A copy of the dense model (it is changed in place).

    Returns:
        The same module.
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


class TeacherBatches:
    """``(inputs, teacher_outputs)`` for every batch of ``batches``: the teacher runs once per batch,
    under ``no_grad``, on ``device``; the batches' own targets (labels or none) are dropped.

    Args:
        teacher: The frozen dense model (:func:`frozen_teacher`).
        batches: A sized, re-iterable collection of ``(inputs, targets)`` pairs.
        outputs: ``outputs(model, inputs) -> Tensor``, the tensor compared (the student's forward too).
        device: Where the teacher runs and the inputs go.
    """

    def __init__(
        self,
        teacher: nn.Module,
        batches: Iterable[tuple[Inputs, Any]],
        outputs: Callable[[nn.Module, Inputs], Tensor],
        device: torch.device | str,
    ) -> None:
        self.teacher, self.batches, self.outputs, self.device = teacher, batches, outputs, device

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[Inputs, Tensor]]:
        for inputs, _ in self.batches:
            inputs = move_inputs(inputs, self.device)
            with torch.no_grad():
                target = self.outputs(self.teacher, inputs).detach()
            yield inputs, target


@dataclass
class Training:
    """How a strategy trains: the loss on ``(outputs, targets)`` and what the targets are.

    Attributes:
        loss: The label loss the strategy gave, or a :class:`DistillationLoss`.
        distill: Whether the targets are the teacher's outputs.
        forward: ``forward(model, inputs) -> outputs`` (for :func:`~evaluators.training.train_one_epoch`).
        device: Where the teacher runs.
        teacher: The frozen dense model when distilling.
    """

    loss: LossFn
    distill: bool
    forward: Callable[[nn.Module, Inputs], Tensor]
    device: torch.device
    teacher: nn.Module | None = None

    def batches(self, batches: Iterable[tuple[Inputs, Any]]) -> Iterable[tuple[Inputs, Any]]:
        """The training batches with their targets: as they are (labels), or the teacher's outputs.

        Args:
            batches: ``(inputs, labels or None)`` pairs, sized and re-iterable.

        Returns:
            ``batches``, or :class:`TeacherBatches` over them.
        """
        if self.teacher is None:
            return batches
        return TeacherBatches(self.teacher, batches, self.forward, self.device)


@dataclass(frozen=True)
class TrainingSource:
    """What a training strategy trains from.

    Attributes:
        name: The task's name (in messages).
        labelled: Whether the batches carry class labels.
        pretrained: A fresh copy of the dense pre-trained model on ``device``.
        loader: ``loader(seed, augment)``: the training batches, ``(inputs, labels or None)`` pairs.
        schedule: Gives the default learning rate and optimizer of the strategies.
        device: Where training runs.
        outputs: ``outputs(model, inputs) -> Tensor``, the tensor a loss takes.
        metric: The distillation metric.
        progress: Show progress bars.
    """

    name: str
    labelled: bool
    pretrained: Callable[[], nn.Module]
    loader: Callable[[int, bool], Sequence[tuple[Inputs, Any]]]
    schedule: TrainingSchedule
    device: torch.device
    outputs: Callable[[nn.Module, Inputs], Tensor]
    metric: str = "kl"
    progress: bool = False

    @classmethod
    def from_trainer(cls, trainer: Trainer, metric: str = "kl") -> TrainingSource:
        """A labelled task's training split and cached pre-trained model.

        Args:
            trainer: The task's trainer.
            metric: The distillation metric.

        Returns:
            The source.
        """
        return cls(
            name=trainer.task.name,
            labelled=True,
            pretrained=trainer.pretrained,
            loader=lambda seed, augment: trainer.task.loader("train", shuffle=True, augment=augment, seed=seed),
            schedule=trainer.schedule,
            device=trainer.device,
            outputs=call_model,
            metric=metric,
            progress=trainer.progress,
        )

    @classmethod
    def from_pretrained(cls, task: Any, model: nn.Module, metric: str) -> TrainingSource:
        """A label-free pre-trained task (``task=minilm``): its ``training_batches(seed)``.

        Args:
            task: A :class:`~evaluators.fidelity.PretrainedTask` with ``training_batches(seed)``
                (optional ``schedule``: a :class:`~evaluators.TrainingSchedule`).
            model: The dense model (copied for every :attr:`pretrained` call, never changed).
            metric: The distillation metric.

        Returns:
            The source.

        Raises:
            NMSearchError: The task has no ``training_batches``.
        """
        if not callable(getattr(task, "training_batches", None)):
            raise NMSearchError(
                f"task {task.name!r} has no training_batches(seed): a strategy that trains needs unlabeled "
                "training inputs (add the method, or search with strategy=optuna)"
            )
        device = next(model.parameters()).device
        return cls(
            name=task.name,
            labelled=False,
            pretrained=lambda: copy.deepcopy(model),
            loader=lambda seed, augment: [(inputs, None) for inputs in task.training_batches(seed)],
            schedule=getattr(task, "schedule", PRETRAINED_SCHEDULE),
            device=device,
            outputs=task.outputs,
            metric=metric,
        )

    def training(self, train_loss: str, label_loss: LossFn, temperature: float = 1.0) -> Training:
        """The loss a strategy trains with.

        Args:
            train_loss: ``task`` (``label_loss`` on the labels), ``distill`` (:class:`DistillationLoss`
                against a frozen teacher) or ``auto`` (``task`` with labels, else ``distill``).
            label_loss: The strategy's own labelled loss, ``label_loss(outputs, labels)``.
            temperature: Of the ``kl`` distillation loss.

        Returns:
            The training setup (a ``distill`` one holds the teacher: one more copy of the model).

        Raises:
            NMSearchError: ``task`` on a task without labels, or an unknown ``train_loss``.
        """
        check_train_loss(train_loss, self.labelled, self.name)
        if train_loss == "task" or (train_loss == "auto" and self.labelled):
            return Training(label_loss, False, self.outputs, self.device)
        loss = DistillationLoss(self.metric, temperature)
        return Training(loss, True, self.outputs, self.device, frozen_teacher(self.pretrained()))


def check_train_loss(train_loss: str, labelled: bool, task: str) -> None:
    """Refuse a ``train_loss`` the task cannot give (called again by :meth:`TrainingSource.training`;
    the entry point calls it before loading a model).

    Args:
        train_loss: ``auto``, ``task`` or ``distill``.
        labelled: Whether the task has labels.
        task: The task's name (for the message).

    Raises:
        NMSearchError: An unknown ``train_loss``, or ``task`` without labels.
    """
    if train_loss not in TRAIN_LOSSES:
        raise NMSearchError(f"train_loss = {train_loss!r} is not one of {', '.join(TRAIN_LOSSES)}")
    if train_loss == "task" and not labelled:
        raise NMSearchError(
            f"train_loss = 'task' trains on labels, but task {task!r} has none: "
            "set strategy.train_loss=distill (or auto)"
        )


def training_source(evaluator: Any) -> TrainingSource:
    """What a strategy that trains the model takes from ``evaluator``.

    Args:
        evaluator: An evaluator with an :class:`~evaluators.AccuracyEvaluator` part (its trainer), or a
            :class:`~evaluators.FidelityEvaluator` part whose ``source`` is a pre-trained task or a trainer.

    Returns:
        The source; its distillation metric is the fidelity part's metric, else ``kl``.

    Raises:
        NMSearchError: Neither part, or a fidelity part with no source.
    """
    fidelity = find_part_or_none(evaluator, FidelityEvaluator)
    metric = fidelity.config.metric if fidelity is not None else "kl"
    accuracy = find_part_or_none(evaluator, AccuracyEvaluator)
    if accuracy is not None:
        return TrainingSource.from_trainer(accuracy.trainer, metric)
    if fidelity is not None and isinstance(fidelity.source, Trainer):
        return TrainingSource.from_trainer(fidelity.source, metric)
    if fidelity is not None and is_pretrained_task(fidelity.source):
        return TrainingSource.from_pretrained(fidelity.source, fidelity.model, metric)
    raise NMSearchError(
        "this strategy trains the model: the evaluator must include an AccuracyEvaluator (a labelled task) or "
        "a FidelityEvaluator made by FidelityEvaluator.for_task (a pre-trained task)"
    )
