import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from evaluators.accuracy import AccuracyEvaluator
from evaluators.fidelity import is_pretrained_task
from evaluators.task import Task, TaskError, TrainingSchedule, check_task
from evaluators.training import Trainer
from experiments.tasks import TASKS, UnknownTaskError, get_task, instantiate_task
from experiments.tasks.datasets import DatasetError, random_hflip, random_shift, stratified_split
from experiments.tasks.example_user_task import BreastCancerTask
from search_space import Scheme, SearchSpace

TASK_DIR = Path(__file__).resolve().parents[2] / "conf" / "task"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NMSEARCH_CACHE_DIR", str(tmp_path / "cache"))


# -- registry and Hydra configs ----------------------------------------------------------------
def test_registry_builds_every_task_and_reports_unknown_names() -> None:
    assert sorted(TASKS) == ["cifar10", "digits", "minilm", "synthetic"]
    for name in TASKS:
        task = get_task(name)
        assert (is_pretrained_task(task) or isinstance(task, Task)) and task.name == name
    message = r"unknown task 'digts' \(did you mean 'digits'\?\); known tasks: cifar10, digits, minilm, synthetic"
    with pytest.raises(UnknownTaskError, match=message):
        get_task("digts")


def test_overrides_and_their_errors() -> None:
    task = get_task("synthetic", seed=3, schedule={"epochs": 9})
    assert task.seed == 3 and task.schedule.epochs == 9 and task.schedule.lr == get_task("synthetic").schedule.lr
    with pytest.raises(TaskError, match="task 'digits' has no field 'chanels'"):
        get_task("digits", chanels=(8, 8, 8))
    with pytest.raises(TaskError, match="schedule has no field 'epoch'"):
        get_task("digits", schedule={"epoch": 3})


@pytest.mark.parametrize("path", sorted(TASK_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_task_yaml_instantiates_to_a_task(path: Path, tmp_path) -> None:
    config = OmegaConf.load(path)
    if "task" in config:  # a global-package task file (minilm) that also picks other groups
        config = config.task
    task = instantiate(config)
    json.dumps(task.config())  # the cache key must be computable
    if is_pretrained_task(task):  # pre-trained: no training schedule
        assert task == get_task(path.stem)
        return
    assert check_task(task) is task and isinstance(task.schedule, TrainingSchedule)
    if path.stem in TASKS:  # the YAML spells out the Python defaults
        assert task == get_task(path.stem)
    assert not (tmp_path / "cache").exists()  # instantiating loads no data (CIFAR-10 is not downloaded)


def test_task_yamls_cover_the_registry_and_the_user_example() -> None:
    assert {p.stem for p in TASK_DIR.glob("*.yaml")} == {*TASKS, "example_user"}


def test_instantiate_task_refuses_non_tasks() -> None:
    with pytest.raises(TaskError, match="cannot instantiate the task config"):
        instantiate_task({"_target_": "experiments.tasks.no_such_module.Task"})
    with pytest.raises(TaskError, match="dict is not a task: it lacks name, schedule, build_model"):
        instantiate_task({"_target_": "builtins.dict"})
    assert isinstance(instantiate_task(OmegaConf.load(TASK_DIR / "synthetic.yaml")), Task)


# -- digits ----------------------------------------------------------------------------------
def test_digits_split_is_fixed_stratified_and_disjoint() -> None:
    task = get_task("digits")
    splits = task.splits
    sizes = {name: len(y) for name, (_, y) in splits.items()}
    assert sizes == {"train": 1077, "val": 360, "test": 360}
    for _, labels in splits.values():
        counts = np.bincount(labels.numpy(), minlength=10) / len(labels)
        assert np.abs(counts - 0.1).max() < 0.01
    flat = {name: {tuple(x.flatten().tolist()) for x in images} for name, (images, _) in splits.items()}
    assert len(flat["test"] & flat["train"]) < 5  # the data set has a few duplicate images
    again = get_task("digits").splits
    assert all(torch.equal(splits[n][0], again[n][0]) for n in splits)
    assert not torch.equal(get_task("digits", seed=1).splits["test"][1], splits["test"][1])


def test_digits_model_layers_are_searchable_at_every_ratio() -> None:
    task = get_task("digits")
    space = SearchSpace.from_model(task.build_model(), task.example_inputs())
    assert space.layer_names == ["features.0.0", "features.1.0", "features.3.0", "classifier.1", "classifier.3"]
    assert space.searchable == space.layer_names[1:]  # the 1-channel stem stays dense
    assert all(space.info(name).channels % 16 == 0 for name in space.searchable)
    assert all(len(space.options[name]) == 13 for name in space.searchable)


def test_digits_loaders() -> None:
    task = get_task("digits")
    inputs, targets = next(iter(task.loader("train", shuffle=True, augment=True, seed=0)))
    assert inputs.shape == (32, 1, 8, 8) and inputs.dtype == torch.float32 and targets.dtype == torch.long
    assert inputs.min() >= 0 and inputs.max() <= 1
    assert len(task.loader("test")) == 1
    with pytest.raises(TaskError, match="unknown split 'valid'"):
        task.loader("valid")


# -- augmentation and splits -----------------------------------------------------------------
def test_random_shift_translates_with_zero_fill() -> None:
    images = torch.zeros(64, 1, 5, 5)
    images[:, 0, 2, 2] = 1.0
    shifted = random_shift(images, 1, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    positions = shifted[:, 0].flatten(1).argmax(1)
    rows, cols = positions // 5, positions % 5
    assert set(rows.tolist()) == {1, 2, 3} and set(cols.tolist()) == {1, 2, 3}
    assert torch.all(shifted.sum((1, 2, 3)) == 1)
    assert torch.equal(random_shift(images, 1, torch.Generator().manual_seed(0)), shifted)
    assert random_shift(images, 0, torch.Generator()) is images
    border = random_shift(torch.ones(64, 1, 4, 4), 2, torch.Generator().manual_seed(1))
    assert border.sum() < 64 * 16  # zeros come in at the border


def test_random_hflip_mirrors_about_half() -> None:
    images = torch.arange(4.0).repeat(200, 1, 1, 1)
    flipped = random_hflip(images, torch.Generator().manual_seed(0))
    mirrored = (flipped[:, 0, 0, 0] == 3).float().mean()
    assert 0.35 < mirrored < 0.65 and torch.equal(flipped[flipped[:, 0, 0, 0] == 3][0, 0, 0], images[0, 0, 0].flip(0))


def test_stratified_split_validation() -> None:
    with pytest.raises(DatasetError, match="must be > 0 and sum to < 1"):
        stratified_split(np.arange(10) % 2, 0.5, 0.5, 0)


# -- synthetic and user tasks ------------------------------------------------------------------
def test_synthetic_task_is_small_and_reproducible() -> None:
    task = get_task("synthetic")
    splits = task.splits
    assert {n: tuple(x.shape) for n, (x, _) in splits.items()} == {
        "train": (256, 3, 8, 8),
        "val": (128, 3, 8, 8),
        "test": (128, 3, 8, 8),
    }
    assert torch.equal(get_task("synthetic").splits["val"][0], splits["val"][0])


def test_example_user_task_runs_through_the_evaluator(tmp_path) -> None:
    task = dataclasses.replace(BreastCancerTask(), schedule=TrainingSchedule(epochs=2, batch_size=32))
    assert isinstance(task, Task) and task.config()["hidden"] == 64
    loader = task.loader("train", shuffle=True, seed=4)
    assert isinstance(loader, DataLoader)
    assert [y.tolist() for _, y in loader] == [y.tolist() for _, y in task.loader("train", shuffle=True, seed=4)]
    trainer = Trainer(task, cache_dir=tmp_path, progress=False)
    accuracy = AccuracyEvaluator(trainer)
    assert accuracy.space.searchable == ["2", "4"]  # 30 input features: the first layer stays dense
    result = accuracy.evaluate(Scheme.uniform(accuracy.space, "weights", 2, 4))
    assert not result.failed and result.values["accuracy"] > 0.8  # two classes, 63% majority


def test_tensor_task_config_skips_location_fields_and_checks_splits() -> None:
    cifar = get_task("cifar10", data_dir="/somewhere", download=False)
    assert cifar.config() == get_task("cifar10").config()
    assert "data_dir" not in cifar.config() and cifar.config()["md5"] == "c58f30108f718f92721af3b95e74349a"
    assert get_task("cifar10", model="resnet18").config() != cifar.config()


def test_check_task_names_what_is_missing() -> None:
    class Half:
        name = "half"

        def build_model(self):
            return torch.nn.Linear(2, 2)

    with pytest.raises(TaskError, match="Half is not a task: it lacks schedule, loader, example_inputs, config"):
        check_task(Half())
