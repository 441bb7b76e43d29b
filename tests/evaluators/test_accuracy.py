import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from evaluators.accuracy import AccuracyConfig, AccuracyEvaluator, NoSearchableLayersError
from evaluators.base import MAXIMIZE, Evaluator
from evaluators.task import TaskError, TensorTask
from evaluators.training import Trainer
from experiments.tasks import get_task
from search_space import RecipeConfig, Scheme, SchemeMismatchError, SearchSpace


@pytest.fixture
def trainer(tmp_path):
    return Trainer(get_task("synthetic"), cache_dir=tmp_path, progress=False)


def evaluator(trainer, **config) -> AccuracyEvaluator:
    return AccuracyEvaluator(trainer, config=AccuracyConfig(**config))


def test_protocol_and_objective(trainer) -> None:
    accuracy = evaluator(trainer)
    assert isinstance(accuracy, Evaluator)
    assert [(o.name, o.direction) for o in accuracy.objectives] == [("accuracy", MAXIMIZE)]
    assert accuracy.space.searchable == ["features.3", "classifier"]


def test_oneshot_masks_the_pretrained_model_without_training(trainer) -> None:
    accuracy = evaluator(trainer)
    pretrained = trainer.pretrained()
    dense = accuracy.evaluate(Scheme.dense(accuracy.space))
    assert dense.values["accuracy"] == pytest.approx(trainer.evaluate(pretrained, "val").accuracy, abs=0.05)
    assert set(dense.info) >= {"loss", "fidelity", "split"} and dense.info["fidelity"] == "oneshot"
    scheme = Scheme.uniform(accuracy.space, "weights", 1, 8)
    model = accuracy.sparse_model(scheme)
    scheme.verify(model)
    # Only BatchNorm statistics moved: every weight is the pre-trained one.
    for name, tensor in pretrained.state_dict().items():
        if "running" not in name and "num_batches" not in name:
            torch.testing.assert_close(model.state_dict()[name], tensor)
    assert not torch.equal(model.features[1].running_mean, pretrained.features[1].running_mean)
    assert accuracy.evaluate(scheme).values["accuracy"] < dense.values["accuracy"]


def test_evaluations_are_deterministic(trainer) -> None:
    scheme = Scheme.uniform(evaluator(trainer).space, "both", 2, 4)
    for fidelity in ("oneshot", "finetune"):
        first = evaluator(trainer, fidelity=fidelity).evaluate(scheme)
        second = evaluator(trainer, fidelity=fidelity).evaluate(scheme)
        assert first.values == second.values and first.info["loss"] == second.info["loss"]


def test_finetune_trains_the_masked_pretrained_model_with_the_recipe(trainer, monkeypatch) -> None:
    accuracy = evaluator(trainer, fidelity="finetune", finetune_epochs=2, recipe=RecipeConfig(estimator="ste"))
    pretrained = trainer.pretrained()
    calls = []
    fit = Trainer.fit

    def spy(self, model, **kwargs):
        calls.append(kwargs)
        return fit(self, model, **kwargs)

    monkeypatch.setattr(Trainer, "fit", spy)
    scheme = Scheme.uniform(accuracy.space, "weights", 2, 4)
    model = accuracy.sparse_model(scheme)
    assert calls == [
        {
            "epochs": 2,
            "lr": trainer.schedule.finetune_lr,
            "recipe": RecipeConfig(estimator="ste"),
            "description": "finetune",
        }
    ]
    assert not torch.equal(model.classifier.weight, pretrained.classifier.weight)
    scheme.verify(scheme.finalize(model))


def test_full_trains_a_fresh_model_for_the_whole_schedule(trainer, monkeypatch) -> None:
    def no_pretraining(self):
        raise AssertionError("full fidelity must not start from the pre-trained model")

    monkeypatch.setattr(Trainer, "pretrained", no_pretraining)
    accuracy = evaluator(trainer, fidelity="full")
    result = accuracy.evaluate(Scheme.uniform(accuracy.space, "weights", 2, 4))
    assert not result.failed and result.values["accuracy"] > 0.5  # 4 classes


def test_divergence_is_a_failed_evaluation_not_an_exception(tmp_path) -> None:
    trainer = Trainer(get_task("synthetic", schedule={"finetune_lr": 1e30}), cache_dir=tmp_path, progress=False)
    accuracy = evaluator(trainer, fidelity="finetune")
    result = accuracy.evaluate(Scheme.uniform(accuracy.space, "weights", 2, 4))
    assert result.failed and "diverged" in result.reason and math.isnan(result.values["accuracy"])
    assert result.duration_s > 0


def test_test_split_for_final_reporting(trainer) -> None:
    accuracy = evaluator(trainer)
    scheme = Scheme.uniform(accuracy.space, "weights", 2, 4)
    val, test = accuracy.evaluate(scheme), accuracy.evaluate_on(scheme, "test")
    assert val.info["split"] == "val" and test.info["split"] == "test"
    assert test.values["accuracy"] == trainer.evaluate(accuracy.sparse_model(scheme), "test").accuracy


def test_bad_configuration_and_foreign_schemes(trainer) -> None:
    with pytest.raises(TaskError, match="fidelity = 'fast' is not one of oneshot, finetune, full"):
        AccuracyConfig(fidelity="fast")
    with pytest.raises(TaskError, match="split"):
        AccuracyConfig(split="holdout")
    accuracy = evaluator(trainer)
    other = SearchSpace.from_model(nn.Sequential(nn.Linear(16, 16)), torch.randn(1, 16))
    with pytest.raises(SchemeMismatchError):
        accuracy.evaluate(Scheme.uniform(other, "weights", 2, 4))


@dataclass(frozen=True)
class NarrowTask(TensorTask):
    name: ClassVar[str] = "narrow"

    def load_splits(self):
        data = (torch.randn(8, 6), torch.arange(8) % 2)
        return {"train": data, "val": data, "test": data}

    def build_model(self):
        return nn.Sequential(nn.Linear(6, 2))


def test_model_without_searchable_layers_is_refused(tmp_path) -> None:
    trainer = Trainer(NarrowTask(), cache_dir=tmp_path, progress=False)
    with pytest.raises(NoSearchableLayersError, match=r"task 'narrow': no layer .* \(layers: '0' \(6 channels\)\)"):
        AccuracyEvaluator(trainer)


def test_digits_end_to_end_pretraining_and_oneshot(tmp_path) -> None:
    """The real default task: pre-train the CNN, then score uniform 2:4 weights one-shot."""
    trainer = Trainer(get_task("digits"), cache_dir=tmp_path, progress=False)
    accuracy = evaluator(trainer)
    dense = trainer.evaluate(trainer.pretrained(), "val").accuracy
    assert dense > 0.97
    assert all(accuracy.space.info(name).channels % 16 == 0 for name in accuracy.space.searchable)
    sparse = accuracy.evaluate(Scheme.uniform(accuracy.space, "weights", 2, 4))
    assert not sparse.failed and dense - 0.05 < sparse.values["accuracy"] <= 1.0
