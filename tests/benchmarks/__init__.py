"""Tests of the scripts in benchmarks/ (run as ``python benchmarks/NAME.py``, so they import their
sibling scripts by bare name)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def benchmark_modules(*names: str) -> tuple[ModuleType, ...]:
    """Import benchmark scripts as their command line does: with ``benchmarks/`` on ``sys.path``."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return tuple(importlib.import_module(name) for name in names)
    finally:
        sys.path.remove(str(BENCHMARKS))
