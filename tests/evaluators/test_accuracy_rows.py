import pytest

from evaluators.accuracy import AccuracyConfig, AccuracyEvaluator
from evaluators.task import TaskError
from evaluators.training import Trainer
from experiments.tasks import get_task
from search_space import DEFAULT_TARGETS, RecipeConfig, Scheme, SearchSpace, row_masked_layers
from search_space.rows import candidate_seed


@pytest.fixture
def trainer(tmp_path):
    return Trainer(get_task("synthetic"), cache_dir=tmp_path, progress=False)


def rows_space(trainer: Trainer) -> SearchSpace:
    return SearchSpace.from_model(
        trainer.fresh_model(), trainer.task.example_inputs(), targets=(*DEFAULT_TARGETS, "rows")
    )


def test_oneshot_rows_selects_masks_then_reestimates_batchnorm(trainer) -> None:
    space = rows_space(trainer)
    accuracy = AccuracyEvaluator(trainer, space, AccuracyConfig(row_candidates=3))
    scheme = Scheme.uniform_rows(space, 0.3)
    model = accuracy.sparse_model(scheme)
    layers = row_masked_layers(model)
    assert list(layers) == ["features.0", "features.3"]
    scores = layers["features.0"].row_scores
    assert scores is layers["features.3"].row_scores and scores.input_size == (8, 8)
    assert scores.seed in {candidate_seed(trainer.seed, i) for i in range(3)}
    scheme.verify(model)
    first, second = accuracy.evaluate(scheme), accuracy.evaluate(scheme)
    assert first.values == second.values and 0 < first.values["accuracy"] <= 1
    dense = accuracy.evaluate(Scheme.dense(space))
    assert first.info["loss"] > dense.info["loss"]


def test_finetune_ramps_rows_over_the_training_steps(trainer, monkeypatch) -> None:
    space = rows_space(trainer)
    recipes = []
    fit = Trainer.fit

    def spy(self, model, **kwargs):
        recipes.append(kwargs.get("recipe"))
        return fit(self, model, **kwargs)

    monkeypatch.setattr(Trainer, "fit", spy)
    config = AccuracyConfig("finetune", finetune_epochs=2, recipe=RecipeConfig(estimator="ste"))
    model = AccuracyEvaluator(trainer, space, config).sparse_model(space.scheme({"features.3": "w2:4+r0.2"}))
    steps = 2 * len(trainer.task.loader("train", shuffle=True, augment=True, seed=trainer.seed))
    assert recipes[-1].total_steps == steps and recipes[-1].estimator == "ste"
    assert model.features[3].row_sparsity == 0.2  # the ramp ended at the target
    fixed = RecipeConfig(estimator="ste", total_steps=5)
    AccuracyEvaluator(trainer, space, AccuracyConfig("finetune", recipe=fixed)).sparse_model(
        Scheme.uniform_rows(space, 0.1)
    )
    assert recipes[-1] == fixed  # a ramp the user set is kept
    AccuracyEvaluator(trainer, space, AccuracyConfig("finetune", recipe=RecipeConfig())).sparse_model(
        Scheme.uniform(space, "weights", 2, 4)
    )
    assert recipes[-1].total_steps is None  # N:M schemes train exactly as before


def test_row_candidates_must_be_positive() -> None:
    with pytest.raises(TaskError, match="row_candidates must be >= 1"):
        AccuracyConfig(row_candidates=0)
