"""The task interface evaluators need: a model factory, batches per split and a training schedule.

Any object with these members is a :class:`Task` (``experiments/tasks`` holds the built-in ones):

* ``name`` -- a short label (file names, logs);
* ``schedule`` -- a :class:`TrainingSchedule`;
* ``build_model()`` -- a freshly initialised dense model (seeded by the caller);
* ``loader(split, *, shuffle=False, augment=False, seed=0)`` -- a sized iterable of
  ``(inputs, targets)`` batches of ``"train"``, ``"val"`` or ``"test"``, in an order fixed by
  ``seed`` when shuffled;
* ``example_inputs()`` -- a small batch for :meth:`search_space.SearchSpace.from_model`;
* ``config()`` -- a JSON-able dict naming everything that changes the pre-trained model (model,
  data, schedule); its hash keys the pre-training cache.

:class:`TensorTask` implements the interface for data that fits in memory as tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from search_space import NMSearchError

SPLITS = ("train", "val", "test")
OPTIMIZERS = ("sgd", "adamw")


class TaskError(NMSearchError):
    """A task, schedule or split that cannot be used."""


@dataclass(frozen=True)
class TrainingSchedule:
    """How a task's model is trained: dense pre-training and, with ``finetune_lr``, sparse fine-tuning.

    The learning rate warms up linearly for ``warmup_epochs``, then follows a cosine to zero.

    Attributes:
        epochs: Pre-training epochs (and ``full`` evaluations).
        batch_size: Training batch size.
        eval_batch_size: Evaluation batch size.
        optimizer: ``"sgd"`` (Nesterov when momentum > 0) or ``"adamw"``.
        lr: Pre-training learning rate.
        momentum: SGD momentum.
        weight_decay: Weight decay.
        warmup_epochs: Linear learning-rate warm-up.
        label_smoothing: Of the cross-entropy loss, in [0, 1).
        finetune_lr: Learning rate of ``finetune`` evaluations and DominoSearch.

    Raises:
        TaskError: If a value is out of range or the optimizer unknown.
    """

    epochs: int = 30
    batch_size: int = 64
    eval_batch_size: int = 512
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    finetune_lr: float = 0.01

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise TaskError(f"schedule.optimizer = {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise TaskError(f"schedule.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "finetune_lr"):
            if not getattr(self, name) > 0:
                raise TaskError(f"schedule.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 1:
            raise TaskError(f"schedule.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or self.momentum < 0:
            raise TaskError("schedule.warmup_epochs, weight_decay and momentum must be >= 0")

    def pretraining_config(self) -> dict[str, Any]:
        """The fields dense pre-training depends on (the pre-training cache key): not
        ``finetune_lr`` (sparse fine-tuning only) nor ``eval_batch_size`` (evaluation only)."""
        skip = ("finetune_lr", "eval_batch_size")
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


Batch = tuple[Tensor, Tensor]


class Batches(Protocol):
    """A sized, re-iterable collection of ``(inputs, targets)`` batches (a ``DataLoader`` is one)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...


@runtime_checkable
class Task(Protocol):
    """What evaluators need from a task. Any object with these six members is one; nothing to inherit."""

    @property
    def name(self) -> str:
        """A short label (cache file names, logs)."""
        ...

    @property
    def schedule(self) -> TrainingSchedule:
        """How the task's model is trained."""
        ...

    def build_model(self) -> nn.Module:
        """A freshly initialised dense model (the trainer seeds torch before calling it)."""
        ...

    def loader(self, split: str, *, shuffle: bool = False, augment: bool = False, seed: int = 0) -> Batches:
        """Batches of one split.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            shuffle: Shuffle (training); the order is fixed by ``seed``.
            augment: Apply training augmentation.
            seed: Seeds the order and the augmentation.

        Returns:
            A sized, re-iterable collection of ``(inputs, targets)`` batches.
        """
        ...

    def example_inputs(self) -> Tensor:
        """A small batch for ``SearchSpace.from_model``."""
        ...

    def config(self) -> dict[str, Any]:
        """A JSON-able dict of everything that changes the pre-trained model; its hash keys the cache."""
        ...


def check_task(task: object) -> Task:
    """Check an object against the :class:`Task` interface.

    Args:
        task: Any object.

    Returns:
        ``task`` itself.

    Raises:
        TaskError: If a member is missing or ``schedule`` is not a :class:`TrainingSchedule`.
    """
    members = ("name", "schedule", "build_model", "loader", "example_inputs", "config")
    missing = [member for member in members if not hasattr(task, member)]
    if missing:
        raise TaskError(
            f"{type(task).__name__} is not a task: it lacks {', '.join(missing)} "
            "(see evaluators.task.Task; subclass evaluators.TensorTask for in-memory data)"
        )
    if not isinstance(task.schedule, TrainingSchedule):
        raise TaskError(f"task {task.name!r}: schedule must be a TrainingSchedule, got {type(task.schedule).__name__}")
    return task


def check_split(split: str) -> None:
    """Check a split name.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.

    Raises:
        TaskError: If it is none of them.
    """
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


class TensorBatches:
    """Batches of in-memory tensors.

    Iterating twice gives the same batches: a shuffled order and random augmentations are drawn
    from a generator seeded with ``seed``. Shuffled loaders drop a last incomplete batch (a
    one-sample batch breaks BatchNorm in training mode).

    Args:
        inputs: All inputs of the split, raw.
        targets: Their class labels.
        batch_size: Samples per batch.
        shuffle: Shuffle (and drop the last incomplete batch).
        seed: Seeds the order and ``prepare``'s randomness.
        prepare: ``prepare(inputs, generator)`` turns each raw batch into model inputs.
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        prepare: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    ) -> None:
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.prepare = prepare

    def __len__(self) -> int:
        count = len(self.targets)
        if self.shuffle and count > self.batch_size:
            return count // self.batch_size
        return -(-count // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(self.seed)
        count = len(self.targets)
        order = torch.randperm(count, generator=generator) if self.shuffle else torch.arange(count)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            inputs = self.inputs[index]
            yield (self.prepare(inputs, generator) if self.prepare else inputs), self.targets[index]


@dataclass(frozen=True)
class TensorTask:
    """A task whose splits fit in memory.

    Subclass it as a frozen dataclass and implement :meth:`load_splits` and :meth:`build_model`;
    override :meth:`prepare` to normalise or augment. Every dataclass field enters :meth:`config`
    (the pre-training cache key) unless declared with ``field(metadata={"cache_key": False})``
    (e.g. where the data lives, not what it is). Data are loaded on first use, not when the task
    is constructed.

    Attributes:
        name: A short label (a class attribute).
        seed: Seeds the data split of subclasses that draw one.
        schedule: How the model is trained.
    """

    name: ClassVar[str] = "tensor"
    seed: int = 0
    schedule: TrainingSchedule = field(default_factory=TrainingSchedule)

    def load_splits(self) -> Mapping[str, tuple[Tensor, Tensor]]:
        """Load the data.

        Returns:
            ``{"train": (inputs, targets), "val": ..., "test": ...}``, raw (before :meth:`prepare`).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement load_splits()")

    def build_model(self) -> nn.Module:
        """A freshly initialised dense model; subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_model()")

    def prepare(self, inputs: Tensor, augment: bool, generator: torch.Generator) -> Tensor:
        """Turn a raw batch into model inputs; default: as float.

        Args:
            inputs: A raw batch from :meth:`load_splits`.
            augment: Whether to augment (training batches only).
            generator: The source of randomness, seeded by the loader.

        Returns:
            The model inputs.
        """
        return inputs.float()

    @cached_property
    def splits(self) -> Mapping[str, tuple[Tensor, Tensor]]:
        """The loaded splits, checked (loaded once, on first use).

        Raises:
            TaskError: If a split is missing, empty, or its inputs and targets differ in length.
        """
        splits = self.load_splits()
        missing = [split for split in SPLITS if split not in splits]
        if missing:
            raise TaskError(f"task {self.name!r}: load_splits() returned no {', '.join(missing)} split")
        for split, (inputs, targets) in splits.items():
            if len(inputs) != len(targets) or len(targets) == 0:
                raise TaskError(
                    f"task {self.name!r}: split {split!r} has {len(inputs)} inputs and {len(targets)} targets"
                )
        return splits

    def loader(self, split: str, *, shuffle: bool = False, augment: bool = False, seed: int = 0) -> TensorBatches:
        """Batches of one split (see :meth:`Task.loader`).

        Raises:
            TaskError: If ``split`` is unknown or the splits are invalid.
        """
        check_split(split)
        inputs, targets = self.splits[split]
        batch_size = self.schedule.batch_size if shuffle else self.schedule.eval_batch_size
        return TensorBatches(
            inputs,
            targets,
            batch_size,
            shuffle=shuffle,
            seed=seed,
            prepare=lambda raw, generator: self.prepare(raw, augment, generator),
        )

    def example_inputs(self) -> Tensor:
        """Two validation inputs, prepared as for evaluation."""
        inputs, _ = self.splits["val"]
        return self.prepare(inputs[:2], False, torch.Generator().manual_seed(0))

    def config(self) -> dict[str, Any]:
        """The class's qualified name and every cache-key field: keys the pre-training cache."""
        values = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("cache_key", True):
                value = getattr(self, f.name)
                values[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return {"task": f"{type(self).__module__}.{type(self).__qualname__}", **values}
