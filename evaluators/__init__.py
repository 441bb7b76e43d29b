"""How good a candidate is: accuracy, hardware cost and Pareto analysis."""

from evaluators.accuracy import FIDELITIES, AccuracyConfig, AccuracyEvaluator, NoSearchableLayersError
from evaluators.base import (
    MAXIMIZE,
    MINIMIZE,
    Constraint,
    Evaluation,
    Evaluator,
    Objective,
    objective_names,
    select_objectives,
)
from evaluators.composite import (
    DEFAULT_COST_METRICS,
    DEFAULT_HARDWARE,
    CompositeEvaluator,
    CostModelConfig,
    build_cost_model,
    build_evaluator,
    find_part,
    find_part_or_none,
)
from evaluators.cost import COST_METRICS, CostEvaluator, CostModelError, CostReport, CostTable, HardwareCostModel
from evaluators.fidelity import FIDELITY_METRICS, FidelityConfig, FidelityEvaluator, PretrainedTask
from evaluators.hardware import HardwareProfile, HardwareProfileError, available_profiles, load_profile
from evaluators.task import Task, TaskError, TensorTask, TrainingSchedule
from evaluators.training import (
    Trainer,
    TrainingDivergedError,
    evaluate_model,
    reestimate_batchnorm,
    train_one_epoch,
)

__all__ = [
    "COST_METRICS",
    "DEFAULT_COST_METRICS",
    "DEFAULT_HARDWARE",
    "FIDELITIES",
    "FIDELITY_METRICS",
    "MAXIMIZE",
    "MINIMIZE",
    "AccuracyConfig",
    "AccuracyEvaluator",
    "CompositeEvaluator",
    "Constraint",
    "CostEvaluator",
    "CostModelConfig",
    "CostModelError",
    "CostReport",
    "CostTable",
    "Evaluation",
    "Evaluator",
    "FidelityConfig",
    "FidelityEvaluator",
    "HardwareCostModel",
    "HardwareProfile",
    "HardwareProfileError",
    "NoSearchableLayersError",
    "Objective",
    "PretrainedTask",
    "Task",
    "TaskError",
    "TensorTask",
    "Trainer",
    "TrainingDivergedError",
    "TrainingSchedule",
    "available_profiles",
    "build_cost_model",
    "build_evaluator",
    "evaluate_model",
    "find_part",
    "find_part_or_none",
    "load_profile",
    "objective_names",
    "reestimate_batchnorm",
    "select_objectives",
    "train_one_epoch",
]
