"""Training pieces shared by evaluators and strategies, and a :class:`Trainer` bound to one task.

* :func:`train_one_epoch` -- one pass over batches with any loss callable and a per-step hook
  (``Recipe.step`` for N:M recipes, a temperature or architecture update for a supernet);
* :func:`evaluate_model` -- top-1 accuracy and mean cross-entropy;
* :func:`reestimate_batchnorm` -- recompute BatchNorm running statistics after masking;
* :class:`Trainer` -- dense pre-training cached on disk (keyed by a hash of the task config and
  seed, written atomically, verified by sha256 when read), sparse fine-tuning with a recipe,
  and evaluation on a split. Deterministic under its seed; uses CUDA when present.

Under ``torchrun`` all of these run data-parallel once :func:`evaluators.distributed.init_from_env`
has joined the process group: same steps and results as one process, rank 0 writes the cache.

A non-finite training loss raises :class:`TrainingDivergedError`; evaluators turn it into a
failed evaluation.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from evaluators import distributed
from evaluators.task import Batch, Task, TaskError, TrainingSchedule, check_split, check_task
from search_space import Recipe, RecipeConfig, atomic_write, atomic_write_text, check_writable_dir
from search_space.oneshot import call_model, move_inputs

logger = logging.getLogger(__name__)

CACHE_ENV = "NMSEARCH_CACHE_DIR"
CACHE_FORMAT = 2  # bump when the checkpoint layout or pre-training procedure changes

LossFn = Callable[[Tensor, Tensor], Tensor]


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


def default_cache_dir() -> Path:
    """``$NMSEARCH_CACHE_DIR``, else ``~/.cache/nmsearch``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nmsearch").expanduser()


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a torch device, refused when this machine cannot run on it.

    Args:
        device: A torch device or its name (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``);
            ``None`` picks :func:`default_device`.

    Returns:
        The device.

    Raises:
        TaskError: If ``device`` is an unknown device string, or a CUDA / MPS device this torch build or machine
            does not have.
    """
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise TaskError(
            f"device={device!r} is not a torch device ({str(error).splitlines()[0]}); use cpu, cuda, cuda:N or null"
        ) from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise TaskError(f"device={device!r}, but {why} (torch {torch.__version__}): use device=cpu or device=null")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise TaskError(f"device={device!r}, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise TaskError(f"device={device!r}, but MPS is not available here: use device=cpu or device=null")
    return resolved


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices).

    Args:
        seed: The seed (NumPy gets it modulo 2**32).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """A data-order seed per (run seed, epoch) that does not collide across run seeds.

    Args:
        seed: The run seed.
        epoch: The epoch index.

    Returns:
        A 32-bit seed derived with :class:`numpy.random.SeedSequence`.
    """
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


@dataclass(frozen=True)
class EpochStats:
    """Mean training loss and accuracy of one epoch; ``end_step`` is the next global step."""

    loss: float
    accuracy: float
    samples: int
    end_step: int


@dataclass(frozen=True)
class EvalResult:
    """Top-1 accuracy (a fraction) and mean cross-entropy over a split."""

    accuracy: float
    loss: float
    samples: int


@dataclass(frozen=True)
class FitResult:
    """What :meth:`Trainer.fit` did; ``recipe`` holds the SAD history when a recipe ran."""

    epochs: int
    steps: int
    train_loss: float
    train_accuracy: float
    recipe: Recipe | None = None


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: LossFn = F.cross_entropy,
    before_step: Callable[[int], None] | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    start_step: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    description: str = "train",
    forward: Callable[[nn.Module, Any], Tensor] = call_model,
) -> EpochStats:
    """Train one epoch: per batch ``before_step(global_step)``, forward, ``loss_fn(outputs, targets)``,
    backward, optimizer step, then ``scheduler.step()``.

    Args:
        model: The model, put in training mode.
        batches: ``(inputs, targets)`` pairs; inputs a tensor, a tuple of positional arguments or a
            dict of keyword ones; targets class labels, or any per-sample tensor ``loss_fn`` compares
            the outputs with (a teacher's outputs, :mod:`evaluators.distill`).
        optimizer: Steps the model's parameters.
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar; default cross-entropy.
        before_step: Called with the global step before each forward (e.g. ``Recipe.step``, a
            temperature update).
        scheduler: Stepped after every optimizer step.
        start_step: The global step of the first batch.
        device: Where batches are moved.
        progress: Show a tqdm bar.
        description: The bar's label.
        forward: ``forward(model, inputs)`` -> the outputs ``loss_fn`` takes (default ``model(inputs)``,
            ``model(*inputs)`` or ``model(**inputs)``).

    Returns:
        The epoch's mean loss and accuracy (NaN when the targets are not class labels) and the next
        global step.

    Raises:
        TrainingDivergedError: If the loss becomes NaN or infinite.
    """
    model.train()
    step, total_loss, correct, samples, labels = start_step, 0.0, 0, 0, True
    bar = tqdm(batches, desc=description, leave=False, disable=not progress, dynamic_ncols=True)
    # Under torchrun each rank takes its slice of every global batch and the gradients of all
    # the optimizer's parameters are averaged: the same steps as one process (evaluators.distributed).
    for inputs, targets, total in distributed.shard(bar):
        inputs, targets = move_inputs(inputs, device), targets.to(device, non_blocking=True)
        if before_step is not None:
            before_step(step)
        outputs = forward(model, inputs)
        loss = loss_fn(outputs, targets)
        value = loss.item()
        if distributed.is_distributed():  # the global batch's mean loss: the same decision on every rank
            (value,) = distributed.sum_across(value * len(targets) / total, device=device)
        if not math.isfinite(value):
            raise TrainingDivergedError(f"training loss became {value} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(optimizer, len(targets), total)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += value * total
        labels = labels and not targets.is_floating_point()
        if labels:
            correct += int((outputs.detach().argmax(1) == targets).sum())
        samples += total
        step += 1
        bar.set_postfix(loss=f"{value:.3f}", refresh=False)
    if samples == 0:
        raise TaskError("the training loader yielded no batches (is the training split smaller than a batch?)")
    (correct,) = distributed.sum_across(correct, device=device)
    return EpochStats(total_loss / samples, correct / samples if labels else math.nan, samples, step)


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
    description: str = "eval",
) -> EvalResult:
    """Top-1 accuracy and mean cross-entropy of a model in eval mode (its mode is restored).

    Args:
        model: The model.
        batches: ``(inputs, targets)`` pairs.
        device: Where batches are moved.
        progress: Show a tqdm bar.
        description: The bar's label.

    Returns:
        Accuracy (a fraction), mean loss and the number of samples.
    """
    was_training = model.training
    model.eval()
    total_loss, correct, samples = 0.0, 0, 0
    try:
        for inputs, targets, _ in distributed.shard(tqdm(batches, desc=description, leave=False, disable=not progress)):
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            outputs = model(inputs)
            total_loss += float(F.cross_entropy(outputs.float(), targets, reduction="sum"))
            correct += int((outputs.argmax(1) == targets).sum())
            samples += len(targets)
    finally:
        model.train(was_training)
    correct, total_loss, samples = distributed.sum_across(correct, total_loss, samples, device=device)
    return EvalResult(int(correct) / max(samples, 1), total_loss / max(samples, 1), int(samples))


@torch.no_grad()
def reestimate_batchnorm(
    model: nn.Module, batches: Iterable[Batch], num_batches: int, *, device: torch.device | str = "cpu"
) -> None:
    """Replace every BatchNorm's running statistics by their plain average over training-mode passes.

    Masking shifts each layer's output distribution, so a masked pre-trained model needs new
    statistics. The model's mode is restored.

    Args:
        model: The model; its BatchNorm statistics are overwritten in place (nothing else changes).
        batches: ``(inputs, targets)`` pairs (targets unused).
        num_batches: How many batches to average; 0 leaves the statistics as they are.
        device: Where batches are moved.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or num_batches < 1:
        return
    momenta = [norm.momentum for norm in norms]
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    try:
        for index, (inputs, _) in enumerate(batches):
            if index == num_batches:
                break
            model(inputs.to(device, non_blocking=True))
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(was_training)


def make_optimizer(parameters: Iterable[nn.Parameter], schedule: TrainingSchedule, lr: float) -> torch.optim.Optimizer:
    """The task's optimizer.

    Args:
        parameters: What it trains.
        schedule: Gives the optimizer (``sgd``: Nesterov when momentum > 0; ``adamw``), momentum
            and weight decay.
        lr: The learning rate (pre-training, fine-tuning and searches use different ones).

    Returns:
        A ``torch.optim.SGD`` or ``torch.optim.AdamW``.
    """
    if schedule.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=schedule.weight_decay)
    return torch.optim.SGD(
        parameters,
        lr=lr,
        momentum=schedule.momentum,
        weight_decay=schedule.weight_decay,
        nesterov=schedule.momentum > 0,
    )


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then a cosine from the base learning rate to zero.

    Args:
        optimizer: The optimizer whose learning rate is scheduled.
        total_steps: Length of the schedule in optimizer steps.
        warmup_steps: Steps of the linear warm-up.

    Returns:
        A ``LambdaLR`` to step once per optimizer step.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    """Trains and evaluates the models of one task under one seed.

    ``pretrained()`` trains the dense model with the task's schedule once and caches the weights
    under ``cache_dir/pretrained`` (default :func:`default_cache_dir`), keyed by a hash of
    ``task.config()`` (its schedule reduced to what pre-training uses) and the seed, so trials
    and runs reuse them. A cache entry whose payload does not match its recorded sha256, or that
    torch cannot load into the model, is rebuilt. An unavailable ``device`` or an unwritable
    cache (when the entry must be trained) is refused at construction, before any training.

    Args:
        task: The task (checked against the :class:`~evaluators.task.Task` interface).
        seed: Seeds model initialisation, data order and augmentation.
        device: Where models train; default CUDA when available (with deterministic cuDNN).
        cache_dir: The pre-training cache; default ``$NMSEARCH_CACHE_DIR``, else ``~/.cache/nmsearch``.
        progress: Show tqdm bars.

    Raises:
        TaskError: If ``task`` lacks a member of the interface or ``device`` is not available.
        search_space.io.OutputDirError: If the cache entry must be trained but its folder is not writable.
    """

    def __init__(
        self,
        task: Task,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        self.task = check_task(task)
        self.seed = seed
        self.device = resolve_device(device)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        if not self.checkpoint_path.exists():  # pre-training will write it: fail now, not after training
            where = "cache_dir=... or NMSEARCH_CACHE_DIR" if cache_dir is None else "cache_dir=..."
            check_writable_dir(
                self.checkpoint_path.parent, "pre-training cache", f"point {where} to a writable folder", min_free_mb=0
            )
        self.progress = progress
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        self._pretrained_state: dict[str, Tensor] | None = None

    @property
    def schedule(self) -> TrainingSchedule:
        """The task's training schedule."""
        return self.task.schedule

    # -- models ----------------------------------------------------------------------------
    def fresh_model(self) -> nn.Module:
        """A newly initialised dense model (same weights for the same seed).

        Returns:
            The task's model, seeded with the trainer's seed, on the trainer's device.
        """
        seed_everything(self.seed)
        return self.task.build_model().to(self.device)

    def pretrained(self) -> nn.Module:
        """A fresh copy of the dense pre-trained model, trained once, then read from the cache.

        Returns:
            The model in eval mode on the trainer's device.

        Raises:
            TrainingDivergedError: If pre-training diverges.
        """
        if self._pretrained_state is None:
            cached = self._read_cache()
            (found,) = distributed.sum_across(float(cached is not None), device=self.device)
            # under torchrun every rank must take the same path (pre-training is collective)
            usable = cached is not None and found == distributed.world_size()
            self._pretrained_state = cached if usable else self._pretrain_and_cache()
        model = self.fresh_model()
        model.load_state_dict(self._pretrained_state)
        return model.eval()

    # -- training --------------------------------------------------------------------------
    def fit(
        self,
        model: nn.Module,
        *,
        epochs: int,
        lr: float,
        recipe: RecipeConfig | None = None,
        warmup_epochs: float = 0.0,
        loss_fn: LossFn | None = None,
        description: str = "train",
    ) -> FitResult:
        """Train a model in place with the task's optimizer and a cosine learning rate.

        Args:
            model: The model (moved to the trainer's device).
            epochs: Epochs over the shuffled, augmented training split.
            lr: The base learning rate.
            recipe: With a recipe, a :class:`~search_space.Recipe` drives the model's sparse layers
                (``recipe.step(global_step)`` before every forward).
            warmup_epochs: Linear learning-rate warm-up, in epochs.
            loss_fn: Default cross-entropy with the schedule's label smoothing.
            description: Label of progress bars and error messages.

        Returns:
            Epochs, steps, the last epoch's loss and accuracy, and the recipe (its SAD history).

        Raises:
            TrainingDivergedError: If the loss becomes NaN or infinite.
        """
        model.to(self.device)
        loss_fn = loss_fn or nn.CrossEntropyLoss(label_smoothing=self.schedule.label_smoothing)
        steps_per_epoch = len(self.task.loader("train", shuffle=True, augment=True, seed=self.seed))
        optimizer = make_optimizer(model.parameters(), self.schedule, lr)
        scheduler = warmup_cosine(optimizer, epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch))
        driver = Recipe(model, recipe) if recipe is not None else None
        seed_everything(self.seed)
        step, stats = 0, None
        bar = tqdm(range(epochs), desc=f"{self.task.name} {description}", disable=not self.progress, leave=False)
        for epoch in bar:
            batches = self.task.loader("train", shuffle=True, augment=True, seed=epoch_seed(self.seed, epoch))
            try:
                stats = train_one_epoch(
                    model,
                    batches,
                    optimizer,
                    loss_fn=loss_fn,
                    before_step=driver.step if driver is not None else None,
                    scheduler=scheduler,
                    start_step=step,
                    device=self.device,
                    progress=self.progress,
                    description=f"epoch {epoch + 1}/{epochs}",
                )
            except TrainingDivergedError as error:
                raise TrainingDivergedError(f"{description} of task {self.task.name!r} diverged: {error}") from None
            step = stats.end_step
            distributed.average_buffers(model)
            bar.set_postfix(loss=f"{stats.loss:.3f}", acc=f"{stats.accuracy:.3f}", refresh=False)
        loss, accuracy = (stats.loss, stats.accuracy) if stats is not None else (math.nan, math.nan)
        return FitResult(epochs, step, loss, accuracy, driver)

    def evaluate(self, model: nn.Module, split: str = "val") -> EvalResult:
        """Top-1 accuracy and mean cross-entropy on a split.

        Args:
            model: The model.
            split: ``"train"``, ``"val"`` or ``"test"``.

        Returns:
            Accuracy (a fraction), mean loss and the number of samples.

        Raises:
            TaskError: If ``split`` is not a split name.
        """
        check_split(split)
        return evaluate_model(
            model, self.task.loader(split), device=self.device, progress=self.progress, description=f"eval {split}"
        )

    def reestimate_batchnorm(self, model: nn.Module, num_batches: int) -> None:
        """Re-estimate BatchNorm statistics on shuffled, un-augmented training batches.

        Args:
            model: The model, modified in place.
            num_batches: How many batches (see :func:`reestimate_batchnorm`).
        """
        batches = self.task.loader("train", shuffle=True, augment=False, seed=self.seed)
        reestimate_batchnorm(model, batches, num_batches, device=self.device)

    # -- pre-training cache ----------------------------------------------------------------
    @property
    def cache_key(self) -> str:
        """Hash of what pre-training depends on: names the cached weights.

        That is ``task.config()`` without its schedule, the schedule's pre-training fields
        (fine-tuning fields do not change the pre-trained weights), the seed and the cache format.
        """
        # Only what pre-training uses: the schedule's fine-tuning fields do not change its weights.
        task = {k: v for k, v in self.task.config().items() if k != "schedule"}
        identity = {
            "format": CACHE_FORMAT,
            "task": task,
            "schedule": self.schedule.pretraining_config(),
            "seed": self.seed,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def checkpoint_path(self) -> Path:
        """The cached weights; a ``.json`` beside them records the config, sha256 and dense metrics."""
        return self.cache_dir / "pretrained" / f"{self.task.name}-{self.cache_key}.pt"

    def _read_cache(self) -> dict[str, Tensor] | None:
        path, meta_path = self.checkpoint_path, self.checkpoint_path.with_suffix(".json")
        if not path.exists() and not meta_path.exists():
            return None
        try:
            recorded = json.loads(meta_path.read_text())["sha256"]
            payload = path.read_bytes()
            if hashlib.sha256(payload).hexdigest() != recorded:
                raise ValueError("payload sha256 does not match the recorded one")
            state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
            self.fresh_model().load_state_dict(state)
        except Exception as error:  # any unreadable entry is rebuilt, never used
            logger.warning("pre-training cache entry %s is corrupt (%s); training it again", path, error)
            return None
        return state

    def _pretrain_and_cache(self) -> dict[str, Tensor]:
        start = time.perf_counter()
        model = self.fresh_model()
        fit = self.fit(
            model,
            epochs=self.schedule.epochs,
            lr=self.schedule.lr,
            warmup_epochs=self.schedule.warmup_epochs,
            description="pre-training",
        )
        seconds = time.perf_counter() - start
        val = self.evaluate(model, "val")
        state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        if not distributed.is_main():
            return state  # rank 0 alone writes the cache
        atomic_write(self.checkpoint_path, lambda handle: handle.write(payload))
        meta: dict[str, Any] = {
            "sha256": hashlib.sha256(payload).hexdigest(),
            "key": self.cache_key,
            "seed": self.seed,
            "task": self.task.config(),
            "train_seconds": round(seconds, 3),
            "train_loss": fit.train_loss,
            "val_accuracy": val.accuracy,
            "val_loss": val.loss,
            "device": str(self.device),
            "torch": torch.__version__,
            "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        atomic_write_text(self.checkpoint_path.with_suffix(".json"), json.dumps(meta, indent=2, default=str) + "\n")
        logger.info("pre-trained %s in %.1f s: val accuracy %.4f", self.task.name, seconds, val.accuracy)
        return state
