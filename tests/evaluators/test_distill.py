"""The distillation loss against the fidelity metrics, teacher batches and the training source."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evaluators import CompositeEvaluator, CostEvaluator, HardwareCostModel
from evaluators.distill import (
    DistillationLoss,
    TeacherBatches,
    TrainingSource,
    distillation_loss,
    frozen_teacher,
    training_source,
)
from evaluators.fidelity import FidelityConfig, FidelityEvaluator, cosine_similarity, kl_divergence, relative_error
from search_space import NMSearchError, SearchSpace


@pytest.mark.parametrize(
    ("metric", "temperature"), [("kl", 1.0), ("kl", 4.0), ("cosine", 1.0), ("relative_error", 1.0)]
)
def test_zero_with_zero_gradient_when_the_student_is_the_teacher(metric: str, temperature: float) -> None:
    teacher = torch.randn(6, 10)
    student = teacher.clone().requires_grad_(True)
    loss = distillation_loss(student, teacher, metric, temperature)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert student.grad is not None and float(student.grad.abs().max()) < 1e-6
    moved = (teacher + 0.3 * torch.randn(6, 10)).requires_grad_(True)
    distance = distillation_loss(moved, teacher, metric, temperature)
    distance.backward()
    assert distance.item() > 1e-4 and float(moved.grad.abs().max()) > 1e-6  # positive, and it pulls


def test_the_loss_is_the_fidelity_metric() -> None:
    teacher, student = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    assert float(distillation_loss(student, teacher, "kl")) == pytest.approx(kl_divergence(teacher, student))
    cosine = float(distillation_loss(student, teacher, "cosine"))
    assert cosine == pytest.approx(1 - cosine_similarity(teacher, student))
    relative_mse = float(distillation_loss(student, teacher, "relative_error"))
    assert relative_mse == pytest.approx(relative_error(teacher, student) ** 2)
    # T^2 KL(softmax(t/T) || softmax(s/T)): at T = 2, the divergence of the halved logits, times 4
    assert float(distillation_loss(student, teacher, "kl", 2.0)) == pytest.approx(
        4 * kl_divergence(teacher / 2, student / 2)
    )


def test_bad_settings_fail_in_one_line() -> None:
    with pytest.raises(NMSearchError, match="distill_temperature must be > 0"):
        DistillationLoss("kl", 0.0)
    with pytest.raises(NMSearchError, match="is not one of cosine, kl, relative_error"):
        DistillationLoss("top1")
    with pytest.raises(NMSearchError, match="outputs of the same shape"):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 4))


class _Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.calls = nn.Linear(4, 3), 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(input_ids * attention_mask)


def test_teacher_batches_run_the_frozen_teacher_once_per_keyword_batch() -> None:
    teacher = frozen_teacher(_Counting().train())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    batches = [({"input_ids": torch.randn(5, 4), "attention_mask": torch.ones(5, 4)}, None) for _ in range(3)]
    wrapped = TeacherBatches(teacher, batches, lambda model, inputs: model(**inputs), "cpu")
    assert len(wrapped) == 3
    pairs = list(wrapped)
    assert teacher.calls == 3
    for (_, target), (original, _) in zip(pairs, batches, strict=True):
        assert not target.requires_grad
        torch.testing.assert_close(target, teacher.linear(original["input_ids"]).detach())


def _label_free() -> tuple[FidelityEvaluator, TrainingSource]:
    from tests.strategies.toy import TinyEncoderTask

    pytest.importorskip("transformers")
    task = TinyEncoderTask()
    evaluator = FidelityEvaluator.for_task(task, config=FidelityConfig(oneshot="magnitude", metric="cosine"))
    cost = CostEvaluator(evaluator.space, HardwareCostModel.from_profile("a100"), metrics=("bytes_mb",))
    return evaluator, training_source(CompositeEvaluator(evaluator, cost))


def test_a_pretrained_task_trains_label_free_and_refuses_the_task_loss() -> None:
    evaluator, source = _label_free()
    assert not source.labelled and source.metric == "cosine" and source.schedule.optimizer == "adamw"
    assert source.pretrained() is not evaluator.model  # a copy: the evaluator's model is never trained
    training = source.training("auto", nn.functional.cross_entropy)
    assert training.distill and isinstance(training.loss, DistillationLoss) and training.loss.metric == "cosine"
    assert training.teacher is not None and not training.teacher.training
    with pytest.raises(NMSearchError, match=r"train_loss = 'task' trains on labels, but task 'tiny_encoder' has none"):
        source.training("task", nn.functional.cross_entropy)
    with pytest.raises(NMSearchError, match="train_loss = 'labels' is not one of auto, task, distill"):
        source.training("labels", nn.functional.cross_entropy)


def test_an_evaluator_without_training_data_is_refused() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    x = torch.randn(16, 8)
    space = SearchSpace.from_model(model, x[:2])
    with pytest.raises(NMSearchError, match="this strategy trains the model"):
        training_source(FidelityEvaluator(model, space, x, [x], FidelityConfig(oneshot="magnitude")))
