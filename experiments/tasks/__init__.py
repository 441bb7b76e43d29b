"""Built-in tasks by name (``get_task``) and tasks of your own from a Hydra config (``instantiate_task``).

* ``digits``    -- scikit-learn's bundled 8x8 digits and a small CNN (the default; no download);
* ``cifar10``   -- CIFAR-10 (downloaded with md5 verification) with ResNet-20 or CIFAR ResNet-18;
* ``synthetic`` -- noisy prototypes and a tiny CNN, for fast tests;
* ``minilm``    -- the pre-trained sentence encoder all-MiniLM-L6-v2, label-free (one-shot pruning
  scored by embedding fidelity; needs ``pip install 'nmsearch[transformers]'``).

A task of your own is any object with the :class:`evaluators.task.Task` interface; name its
factory with ``_target_`` in a Hydra config (see ``example_user_task.py`` and
``conf/task/example_user.yaml``).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from evaluators.fidelity import PretrainedTask, is_pretrained_task
from evaluators.task import Task, TaskError, TrainingSchedule, check_task
from experiments.tasks.cifar10 import Cifar10Task
from experiments.tasks.datasets import ChecksumError, DatasetError
from experiments.tasks.digits import DigitsTask
from experiments.tasks.minilm import MiniLMTask
from experiments.tasks.synthetic import SyntheticTask

TASKS: dict[str, type] = {task.name: task for task in (DigitsTask, Cifar10Task, SyntheticTask, MiniLMTask)}
DEFAULT_TASK = "digits"


class UnknownTaskError(TaskError):
    """A task name that is not registered."""


def get_task(name: str = DEFAULT_TASK, **overrides: Any) -> Task:
    """A built-in task with fields overridden, e.g. ``get_task("digits", seed=1)``.

    Args:
        name: ``"digits"``, ``"cifar10"``, ``"synthetic"`` or ``"minilm"``.
        **overrides: Task fields. ``schedule`` may be a :class:`~evaluators.task.TrainingSchedule`
            or a mapping of the fields to change in the task's default schedule, e.g.
            ``schedule={"epochs": 5}``.

    Returns:
        The task.

    Raises:
        UnknownTaskError: If ``name`` is not a built-in task (the message suggests the closest).
        TaskError: If a field or schedule field is unknown or invalid.
    """
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownTaskError(
            f"unknown task {name!r}{hint}; known tasks: {', '.join(sorted(TASKS))} "
            "(a task of your own: a Hydra config with _target_, see conf/task/example_user.yaml)"
        )
    task_type = TASKS[name]
    fields = {f.name: f for f in dataclasses.fields(task_type)}
    unknown = sorted(set(overrides) - fields.keys())
    if unknown:
        raise TaskError(f"task {name!r} has no field {unknown[0]!r}; its fields: {', '.join(fields)}")
    schedule = overrides.get("schedule")
    if schedule is not None and "schedule" not in fields:
        raise TaskError(f"task {name!r} is not trained: it has no schedule")
    if isinstance(schedule, Mapping):
        valid = [f.name for f in dataclasses.fields(TrainingSchedule)]
        wrong = sorted(set(schedule) - set(valid))
        if wrong:
            raise TaskError(f"schedule has no field {wrong[0]!r}; its fields: {', '.join(valid)}")
        overrides["schedule"] = dataclasses.replace(fields["schedule"].default, **schedule)
    return task_type(**overrides)


def instantiate_task(config: Any) -> Task | PretrainedTask:
    """A task from a Hydra config, checked against the Task interface.

    A label-free :class:`~evaluators.fidelity.PretrainedTask` is recognised and returned as is.

    Args:
        config: A mapping or OmegaConf node with ``_target_`` (a class or factory) and its arguments.

    Returns:
        The task (a :class:`~evaluators.task.Task` or a
        :class:`~evaluators.fidelity.PretrainedTask`).

    Raises:
        TaskError: If the config cannot be instantiated or the object is not a task.
    """
    try:
        task = instantiate(config, _convert_="all")
    except InstantiationException as error:
        first_line = str(error).strip().splitlines()[0]
        raise TaskError(f"cannot instantiate the task config: {first_line}") from error
    return task if is_pretrained_task(task) else check_task(task)


__all__ = [
    "DEFAULT_TASK",
    "TASKS",
    "ChecksumError",
    "Cifar10Task",
    "DatasetError",
    "DigitsTask",
    "MiniLMTask",
    "SyntheticTask",
    "UnknownTaskError",
    "get_task",
    "instantiate_task",
]
