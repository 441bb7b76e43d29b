import hashlib
import itertools
import json
import logging
import math

import pytest
import torch
from torch import nn

from evaluators.task import TaskError, TensorBatches, TrainingSchedule
from evaluators.training import (
    Trainer,
    TrainingDivergedError,
    default_cache_dir,
    epoch_seed,
    evaluate_model,
    make_optimizer,
    reestimate_batchnorm,
    train_one_epoch,
    warmup_cosine,
)
from experiments.tasks import get_task
from search_space import RecipeConfig, Scheme, SearchSpace


@pytest.fixture
def task():
    return get_task("synthetic")


@pytest.fixture
def trainer(task, tmp_path):
    return Trainer(task, cache_dir=tmp_path, progress=False)


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- batches ---------------------------------------------------------------------------------
def test_tensor_batches_are_reproducible_per_seed_and_cover_every_sample() -> None:
    inputs, targets = torch.arange(10).float().unsqueeze(1), torch.arange(10)
    ordered = TensorBatches(inputs, targets, 4)
    assert len(ordered) == 3 and torch.cat([y for _, y in ordered]).tolist() == list(range(10))
    shuffled = TensorBatches(inputs, targets, 4, shuffle=True, seed=1)
    first, again = [y.tolist() for _, y in shuffled], [y.tolist() for _, y in shuffled]
    assert first == again and len(shuffled) == 2 and all(len(b) == 4 for b in first)  # last partial batch dropped
    other = [y.tolist() for _, y in TensorBatches(inputs, targets, 4, shuffle=True, seed=2)]
    assert other != first
    assert epoch_seed(0, 1) != epoch_seed(1, 0)


# -- loop pieces -----------------------------------------------------------------------------
def test_train_one_epoch_calls_the_hook_and_loss_per_step() -> None:
    model = nn.Linear(4, 3)
    batches = TensorBatches(torch.randn(20, 4), torch.randint(0, 3, (20,)), 5)
    steps, losses = [], []

    def loss_fn(outputs, targets):
        loss = nn.functional.cross_entropy(outputs, targets)
        losses.append(loss.item())
        return loss

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    stats = train_one_epoch(model, batches, optimizer, loss_fn=loss_fn, before_step=steps.append, start_step=7)
    assert steps == [7, 8, 9, 10] and stats.end_step == 11 and stats.samples == 20
    assert stats.loss == pytest.approx(sum(losses) / 4)
    assert not torch.equal(before, model.weight)


def test_non_finite_loss_raises_diverged() -> None:
    model = nn.Linear(4, 3)
    batches = TensorBatches(torch.randn(20, 4), torch.randint(0, 3, (20,)), 5)
    calls = []

    def loss_fn(outputs, targets):
        calls.append(1)
        loss = nn.functional.cross_entropy(outputs, targets)
        return loss * math.inf if len(calls) == 2 else loss

    with pytest.raises(TrainingDivergedError, match="at step 1"):
        train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=loss_fn)


def test_evaluate_model_reports_top1_and_mean_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 0.5]])
    targets = torch.tensor([0, 1, 1, 1])
    model = nn.Embedding.from_pretrained(logits)  # input i -> logits[i]
    result = evaluate_model(model, TensorBatches(torch.arange(4), targets, 3))
    assert result.accuracy == 0.75 and result.samples == 4
    assert result.loss == pytest.approx(nn.functional.cross_entropy(logits, targets).item())
    assert model.training


def test_reestimate_batchnorm_averages_the_batches_and_restores_state() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3)).eval()
    data = torch.randn(40, 3) * 3 + 1
    batches = TensorBatches(data, torch.zeros(40, dtype=torch.long), 10)
    reestimate_batchnorm(model, batches, num_batches=2)
    norm = model[0]
    expected_mean = torch.stack([data[:10].mean(0), data[10:20].mean(0)]).mean(0)
    expected_var = torch.stack([data[:10].var(0), data[10:20].var(0)]).mean(0)
    torch.testing.assert_close(norm.running_mean, expected_mean)
    torch.testing.assert_close(norm.running_var, expected_var)
    assert norm.momentum == 0.1 and not model.training and int(norm.num_batches_tracked) == 2


def test_warmup_cosine_schedule() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine(optimizer, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:])) and lrs[-1] < 0.05


# -- trainer ---------------------------------------------------------------------------------
def test_pretraining_is_deterministic_and_learns(task, tmp_path) -> None:
    a = Trainer(task, cache_dir=tmp_path / "a", progress=False)
    b = Trainer(task, cache_dir=tmp_path / "b", progress=False)
    model = a.pretrained()
    assert states_equal(model, b.pretrained())
    assert a.evaluate(model, "val").accuracy > 0.8  # 4 classes: chance is 0.25
    other_seed = Trainer(task, seed=1, cache_dir=tmp_path / "a", progress=False)
    assert other_seed.checkpoint_path != a.checkpoint_path
    assert not states_equal(model, other_seed.pretrained())


def test_pretrained_checkpoint_is_cached_and_reused(trainer, task, tmp_path, monkeypatch) -> None:
    model = trainer.pretrained()
    meta = json.loads(trainer.checkpoint_path.with_suffix(".json").read_text())
    assert meta["task"] == task.config() and len(meta["sha256"]) == 64 and meta["val_accuracy"] > 0.8
    assert trainer.checkpoint_path.parent == tmp_path / "pretrained"

    def no_training(*args, **kwargs):
        raise AssertionError("the cached checkpoint should have been used")

    monkeypatch.setattr(Trainer, "fit", no_training)
    fresh = Trainer(task, cache_dir=tmp_path, progress=False)
    assert states_equal(model, fresh.pretrained())
    with torch.no_grad():  # callers get copies: changing one does not touch the next
        model.classifier.weight.zero_()
    assert not states_equal(model, fresh.pretrained())


def test_cache_key_follows_the_task_config(task, tmp_path) -> None:
    trainer = Trainer(task, cache_dir=tmp_path, progress=False)
    longer = Trainer(get_task("synthetic", schedule={"epochs": 5}), cache_dir=tmp_path, progress=False)
    assert trainer.checkpoint_path != longer.checkpoint_path
    same = Trainer(get_task("synthetic"), cache_dir=tmp_path, progress=False)
    assert same.checkpoint_path == trainer.checkpoint_path


@pytest.mark.parametrize(
    "damage",
    ["flip_byte", "truncate", "drop_meta", "bad_meta", "garbage_payload"],
)
def test_corrupt_cache_entry_is_rebuilt_not_used(task, tmp_path, caplog, damage) -> None:
    model = Trainer(task, cache_dir=tmp_path, progress=False).pretrained()
    path = Trainer(task, cache_dir=tmp_path, progress=False).checkpoint_path
    meta = path.with_suffix(".json")
    payload = path.read_bytes()
    if damage == "flip_byte":
        path.write_bytes(payload[:-20] + bytes([payload[-20] ^ 0xFF]) + payload[-19:])
    elif damage == "truncate":
        path.write_bytes(payload[: len(payload) // 2])
    elif damage == "drop_meta":
        meta.unlink()
    elif damage == "bad_meta":
        meta.write_text("{not json")
    else:  # garbage whose sha256 is recorded: torch.load itself must fail
        path.write_bytes(b"not a checkpoint")
        meta.write_text(json.dumps({"sha256": hashlib.sha256(b"not a checkpoint").hexdigest()}))
    with caplog.at_level(logging.WARNING, logger="evaluators.training"):
        rebuilt = Trainer(task, cache_dir=tmp_path, progress=False).pretrained()
    assert "corrupt" in caplog.text and str(path) in caplog.text
    assert states_equal(model, rebuilt)
    assert path.read_bytes() == payload  # rewritten intact


def test_checkpoint_of_another_model_is_rebuilt(task, tmp_path, caplog) -> None:
    trainer = Trainer(task, cache_dir=tmp_path, progress=False)
    trainer.pretrained()
    wider = get_task("synthetic", width=32)
    impostor = Trainer(wider, cache_dir=tmp_path, progress=False)
    # Same cache entry, other architecture (as when model code changes but the config does not).
    impostor.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    trainer.checkpoint_path.rename(impostor.checkpoint_path)
    trainer.checkpoint_path.with_suffix(".json").rename(impostor.checkpoint_path.with_suffix(".json"))
    with caplog.at_level(logging.WARNING, logger="evaluators.training"):
        model = impostor.pretrained()
    assert "corrupt" in caplog.text and model.classifier.in_features == 32


def test_cache_dir_defaults_to_the_environment_variable(task, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NMSEARCH_CACHE_DIR", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    assert Trainer(task, progress=False).checkpoint_path.is_relative_to(tmp_path / "env")
    monkeypatch.delenv("NMSEARCH_CACHE_DIR")
    assert default_cache_dir().parts[-2:] == (".cache", "nmsearch")


def test_fit_with_a_recipe_trains_the_sparse_layers(trainer) -> None:
    model = trainer.pretrained()
    space = SearchSpace.from_model(model, trainer.task.example_inputs())
    scheme = Scheme.uniform(space, "weights", 2, 4)
    sparse = scheme.apply(model)
    before = sparse.features[3].weight.detach().clone()
    result = trainer.fit(sparse, epochs=1, lr=0.01, recipe=RecipeConfig(estimator="srste"))
    assert result.steps == len(trainer.task.loader("train", shuffle=True)) and result.recipe is not None
    assert not torch.equal(before, sparse.features[3].weight)
    assert not result.recipe.sad_history().empty
    scheme.verify(scheme.finalize(sparse))


def test_progress_bars_can_be_turned_off(task, tmp_path, capsys) -> None:
    Trainer(task, cache_dir=tmp_path / "quiet", progress=False).pretrained()
    assert capsys.readouterr().err == ""
    Trainer(task, cache_dir=tmp_path / "loud", progress=True).pretrained()
    assert "epoch" in capsys.readouterr().err


def test_diverging_pretraining_raises_with_the_task_name(tmp_path) -> None:
    task = get_task("synthetic", schedule={"lr": 1e30})
    with pytest.raises(TrainingDivergedError, match="pre-training of task 'synthetic' diverged"):
        Trainer(task, cache_dir=tmp_path, progress=False).pretrained()
    assert not list(tmp_path.rglob("*.pt"))


def test_schedule_validation() -> None:
    with pytest.raises(ValueError, match=r"schedule\.optimizer"):
        TrainingSchedule(optimizer="lbfgs")
    with pytest.raises(ValueError, match=r"schedule\.epochs"):
        TrainingSchedule(epochs=0)
    with pytest.raises(ValueError, match=r"schedule\.finetune_lr"):
        TrainingSchedule(finetune_lr=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trainer_uses_cuda_when_present(task, tmp_path) -> None:
    trainer = Trainer(task, cache_dir=tmp_path, progress=False)
    assert trainer.device.type == "cuda"
    assert next(trainer.pretrained().parameters()).is_cuda


def test_an_empty_training_loader_is_a_task_error() -> None:
    model = nn.Linear(4, 3)
    with pytest.raises(TaskError, match="yielded no batches"):
        train_one_epoch(model, [], torch.optim.SGD(model.parameters(), lr=0.1))


def test_optimizers_follow_the_schedule() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer(params, TrainingSchedule(momentum=0.9, weight_decay=1e-4), lr=0.3)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["lr"] == 0.3
    adamw = make_optimizer(params, TrainingSchedule(optimizer="adamw", weight_decay=0.01), lr=1e-3)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.01
