"""How good a candidate is: accuracy, hardware cost and Pareto analysis."""

from evaluators.base import (
    MAXIMIZE,
    MINIMIZE,
    Evaluation,
    Evaluator,
    Objective,
    objective_names,
    select_objectives,
)

__all__ = [
    "MAXIMIZE",
    "MINIMIZE",
    "Evaluation",
    "Evaluator",
    "Objective",
    "objective_names",
    "select_objectives",
]
