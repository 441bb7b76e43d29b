"""How good a candidate is: accuracy, hardware cost and Pareto analysis."""
