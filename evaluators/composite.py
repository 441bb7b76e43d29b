"""Several evaluators as one: accuracy and hardware cost scored together for a strategy.

Objectives are concatenated in order (names must be distinct), values merged, the evaluation
fails when any part fails (reasons joined), and durations are summed. Only the
:class:`~evaluators.base.Evaluator` protocol of the parts is used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from evaluators.accuracy import AccuracyConfig, AccuracyEvaluator
from evaluators.base import Evaluation, Evaluator, Objective
from evaluators.task import Task
from evaluators.training import Trainer
from search_space import NMSearchError, Scheme, SearchSpace


class CompositeEvaluator:
    """Combines ``evaluators`` (any number, at least one) into one :class:`~evaluators.base.Evaluator`.

    ``info`` keys of later parts that an earlier part already used are stored as
    ``"<PartClass>.<key>"`` rather than overwriting.
    """

    def __init__(self, *evaluators: Evaluator) -> None:
        if not evaluators:
            raise NMSearchError("CompositeEvaluator needs at least one evaluator")
        names = [objective.name for evaluator in evaluators for objective in evaluator.objectives]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise NMSearchError(f"objective {duplicates[0]!r} is reported by more than one evaluator")
        self.parts: tuple[Evaluator, ...] = evaluators
        self._objectives = tuple(objective for evaluator in evaluators for objective in evaluator.objectives)

    @property
    def objectives(self) -> tuple[Objective, ...]:
        return self._objectives

    def evaluate(self, scheme: Scheme) -> Evaluation:
        values: dict[str, float] = {}
        info: dict[str, object] = {}
        reasons: list[str] = []
        duration = 0.0
        for part in self.parts:
            result = part.evaluate(scheme)
            missing = [o.name for o in part.objectives if o.name not in result.values]
            if missing:
                raise NMSearchError(f"{type(part).__name__} returned no value for objective {missing[0]!r}")
            values.update({o.name: result.values[o.name] for o in part.objectives})
            for key, value in result.info.items():
                info[f"{type(part).__name__}.{key}" if key in info else key] = value
            if result.failed:
                reasons.append(result.reason or f"{type(part).__name__} failed")
            duration += result.duration_s
        return Evaluation(values, failed=bool(reasons), reason="; ".join(reasons), info=info, duration_s=duration)

    @classmethod
    def for_task(
        cls,
        task: Task,
        hardware: str = "a100",
        *,
        accuracy: AccuracyConfig | None = None,
        metrics: Sequence[str] | None = None,
        dtype: str = "fp16",
        batch_size: int = 1,
        space: SearchSpace | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = False,
    ) -> CompositeEvaluator:
        """Accuracy on ``task`` (``accuracy`` config, oneshot by default) plus the cost model's
        ``metrics`` (default: all of them) on the ``hardware`` profile, over one search space."""
        # Imported here so that this module depends on the cost model only when asked to build one.
        from evaluators.cost import COST_METRICS, CostEvaluator, HardwareCostModel

        trainer = Trainer(task, seed=seed, device=device, cache_dir=cache_dir, progress=progress)
        accuracy_evaluator = AccuracyEvaluator(trainer, space, accuracy)
        cost_model = HardwareCostModel.from_profile(hardware, dtype=dtype, batch_size=batch_size)
        cost = CostEvaluator(accuracy_evaluator.space, cost_model, tuple(metrics or COST_METRICS))
        return cls(accuracy_evaluator, cost)
