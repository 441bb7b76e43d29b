import math
from pathlib import Path

import pytest
import torch
from torch import nn

from evaluators.accuracy import AccuracyConfig, AccuracyEvaluator
from evaluators.base import MAXIMIZE, MINIMIZE, Evaluation, Evaluator, Objective
from evaluators.composite import (
    DEFAULT_COST_METRICS,
    DEFAULT_HARDWARE,
    CompositeEvaluator,
    CostModelConfig,
    find_part,
    find_part_or_none,
)
from evaluators.cost import COST_METRICS, CostEvaluator, HardwareCostModel
from experiments.tasks import get_task
from search_space import NMSearchError, Scheme, SearchSpace


class Fixed:
    """An evaluator returning preset values (or a failure) for any scheme."""

    def __init__(self, values, *, failed=False, reason="", info=None, duration=1.0, direction=MINIMIZE):
        self._objectives = tuple(Objective(name, direction) for name in values)
        self.result = Evaluation(values, failed=failed, reason=reason, info=info or {}, duration_s=duration)

    @property
    def objectives(self):
        return self._objectives

    def evaluate(self, scheme):
        return self.result


@pytest.fixture
def scheme():
    space = SearchSpace.from_model(nn.Sequential(nn.Linear(16, 16)), torch.randn(1, 16))
    return Scheme.dense(space)


def test_objectives_values_info_and_durations_combine_in_order(scheme) -> None:
    composite = CompositeEvaluator(
        Fixed({"accuracy": 0.9}, direction=MAXIMIZE, info={"loss": 0.3, "note": "a"}, duration=2.0),
        Fixed({"latency_ms": 1.5, "bytes_mb": 4.0}, info={"note": "b"}, duration=0.5),
        Fixed({"energy_mj": 0.2}, duration=0.25),
    )
    assert isinstance(composite, Evaluator)
    assert [(o.name, o.direction) for o in composite.objectives] == [
        ("accuracy", MAXIMIZE),
        ("latency_ms", MINIMIZE),
        ("bytes_mb", MINIMIZE),
        ("energy_mj", MINIMIZE),
    ]
    result = composite.evaluate(scheme)
    assert dict(result.values) == {"accuracy": 0.9, "latency_ms": 1.5, "bytes_mb": 4.0, "energy_mj": 0.2}
    assert not result.failed and result.duration_s == 2.75
    assert dict(result.info) == {"loss": 0.3, "note": "a", "Fixed.note": "b"}


def test_any_failed_part_fails_the_whole(scheme) -> None:
    diverged = Evaluation.failure((Objective("accuracy", MAXIMIZE),), "training diverged")
    broken = Fixed({"accuracy": 0.0}, direction=MAXIMIZE)
    broken.result = diverged
    composite = CompositeEvaluator(broken, Fixed({"latency_ms": 1.0}), Fixed({"params": 3.0}, failed=True))
    result = composite.evaluate(scheme)
    assert result.failed and result.reason == "training diverged; Fixed failed"
    assert math.isnan(result.values["accuracy"]) and result.values["latency_ms"] == 1.0


def test_bad_combinations_are_refused(scheme) -> None:
    with pytest.raises(NMSearchError, match="at least one"):
        CompositeEvaluator()
    with pytest.raises(NMSearchError, match="objective 'latency_ms' is reported by more than one"):
        CompositeEvaluator(Fixed({"latency_ms": 1.0}), Fixed({"latency_ms": 2.0}))
    liar = Fixed({"latency_ms": 1.0})
    liar.result = Evaluation({"other": 1.0})
    with pytest.raises(NMSearchError, match="no value for objective 'latency_ms'"):
        CompositeEvaluator(liar).evaluate(scheme)


def test_for_task_scores_accuracy_and_hardware_cost_over_one_space(tmp_path) -> None:
    composite = CompositeEvaluator.for_task(get_task("synthetic"), "a100", metrics=COST_METRICS, cache_dir=tmp_path)
    accuracy, cost = composite.parts
    assert isinstance(accuracy, AccuracyEvaluator) and isinstance(cost, CostEvaluator)
    assert cost.space is accuracy.space
    assert [o.name for o in composite.objectives] == ["accuracy", *COST_METRICS]
    assert [o.direction for o in composite.objectives] == [MAXIMIZE] + [MINIMIZE] * len(COST_METRICS)
    scheme = Scheme.uniform(accuracy.space, "weights", 2, 4)
    result = composite.evaluate(scheme)
    assert result.values["accuracy"] == accuracy.evaluate(scheme).values["accuracy"]
    assert {m: result.values[m] for m in COST_METRICS} == dict(cost.evaluate(scheme).values)
    assert result.info["fidelity"] == "oneshot" and "loss" in result.info


def test_for_task_options_reach_the_parts(tmp_path) -> None:
    composite = CompositeEvaluator.for_task(
        get_task("synthetic"),
        "a100",
        accuracy=AccuracyConfig(fidelity="finetune"),
        metrics=["latency_ms"],
        batch_size=8,
        cache_dir=tmp_path,
    )
    accuracy, cost = composite.parts
    assert accuracy.config.fidelity == "finetune"
    assert [o.name for o in composite.objectives] == ["accuracy", "latency_ms"]
    one = CostEvaluator(accuracy.space, HardwareCostModel.from_profile("a100", batch_size=1), ["latency_ms"])
    scheme = Scheme.dense(accuracy.space)
    assert cost.evaluate(scheme).values["latency_ms"] > one.evaluate(scheme).values["latency_ms"]


def test_one_assembly_with_the_entry_points_defaults(tmp_path) -> None:
    import yaml

    config = yaml.safe_load((Path(__file__).parents[2] / "conf" / "config.yaml").read_text())
    defaults = {k: v for d in config["defaults"] if isinstance(d, dict) for k, v in d.items()}
    assert defaults["hardware"] == DEFAULT_HARDWARE
    assert ["accuracy", *DEFAULT_COST_METRICS] == config["objectives"]
    composite = CompositeEvaluator.for_task(get_task("synthetic"), cache_dir=tmp_path)
    cost = find_part(composite, CostEvaluator)
    assert cost.cost_model.profile == HardwareCostModel.from_profile(DEFAULT_HARDWARE).profile
    assert [o.name for o in composite.objectives] == ["accuracy", *DEFAULT_COST_METRICS]
    assert find_part(composite, AccuracyEvaluator) is composite.parts[0]
    with pytest.raises(NMSearchError, match="its evaluator must include an AccuracyEvaluator; got CostEvaluator"):
        find_part(cost, AccuracyEvaluator, purpose="this strategy trains the model")
    assert find_part_or_none(cost, AccuracyEvaluator) is None
    with pytest.raises(NMSearchError, match="batch_size must be a positive integer"):
        CostModelConfig(batch_size=0)
