"""nmsearch: layer-wise search for N:M structured sparsity — the documented import namespace.

``from nmsearch import SearchSpace, Scheme, OptunaStrategy, deploy`` gives the public API of the
distribution's packages (``search_space``, ``strategies``, ``evaluators``, ``experiments``),
imported on first use so that ``import nmsearch`` (and the ``nmsearch`` command's ``--help``)
stays fast. The configs and hardware profiles are the package data of ``nmsearch.conf``.

Those packages keep their generic top-level names (the repository's layout), so importing
``nmsearch`` first checks that each of them is this distribution's and not another project's
package of the same name shadowing it (:class:`ShadowedPackageError`, one line).
"""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import sys
from pathlib import Path
from typing import Any

TOP_LEVEL_PACKAGES = ("search_space", "strategies", "evaluators", "experiments")
CONFIG_PACKAGE = "nmsearch.conf"  # Hydra: config_path="pkg://nmsearch.conf"


class ShadowedPackageError(ImportError):
    """Another project's package resolves under one of nmsearch's top-level package names."""


def check_top_level_packages() -> None:
    """Raise unless every top-level package of the distribution resolves beside ``nmsearch`` itself.

    The packages are located (``importlib.util.find_spec``), not imported, so a foreign package's
    code never runs.

    Raises:
        ShadowedPackageError: a package resolves elsewhere (or not at all).
    """
    root = Path(__file__).resolve().parents[1]
    for name in TOP_LEVEL_PACKAGES:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin != root / name / "__init__.py":
            found = f"resolves to {origin.parent}" if origin is not None else "cannot be found"
            raise ShadowedPackageError(
                f"nmsearch: its package {name!r} {found}, not {root / name}: another project's {name!r} "
                "shadows it (an earlier sys.path entry or PYTHONPATH); install nmsearch in its own "
                "virtual environment or remove that package"
            )


def _one_line_hook(previous: Any) -> Any:
    """An excepthook printing an uncaught :class:`ShadowedPackageError` as its one line (the
    ``nmsearch`` command imports this package before its own error handling can run)."""

    def hook(kind: type[BaseException], error: BaseException, traceback: Any) -> None:
        if issubclass(kind, ShadowedPackageError):
            print(error, file=sys.stderr)
        else:
            previous(kind, error, traceback)

    return hook


try:
    check_top_level_packages()
except ShadowedPackageError:
    sys.excepthook = _one_line_hook(sys.excepthook)
    raise


def config_dir() -> Path:
    """The shipped configs (``conf/`` of the repository), located through the package ``nmsearch.conf``.

    Returns:
        The folder holding ``config.yaml`` and the config groups (``hardware/``, ``task/``, ...).

    Raises:
        ShadowedPackageError: the installation lacks its configs (a broken or partial install).
    """
    try:
        return Path(str(importlib.resources.files(CONFIG_PACKAGE)))
    except ModuleNotFoundError:
        raise ShadowedPackageError(
            f"nmsearch: its configs (package {CONFIG_PACKAGE!r}) are not installed; reinstall nmsearch"
        ) from None


# Public name -> the module it comes from (imported on first access, PEP 562).
_EXPORTS = {
    **dict.fromkeys(
        (
            "DENSE",
            "NMPattern",
            "NMSearchError",
            "Option",
            "Recipe",
            "RecipeConfig",
            "RowPattern",
            "Scheme",
            "SchemeError",
            "SchemeMismatchError",
            "SearchSpace",
            "SparseConv2d",
            "SparseLinear",
            "nm_mask",
            "sparsify",
        ),
        "search_space",
    ),
    **dict.fromkeys(
        (
            "DominoStrategy",
            "GumbelStrategy",
            "OptunaStrategy",
            "RandomStrategy",
            "SearchResult",
            "Strategy",
            "UniformStrategy",
        ),
        "strategies",
    ),
    **dict.fromkeys(
        (
            "AccuracyConfig",
            "AccuracyEvaluator",
            "CompositeEvaluator",
            "CostEvaluator",
            "HardwareCostModel",
            "HardwareProfile",
            "Task",
            "TensorTask",
            "Trainer",
            "TrainingSchedule",
            "available_profiles",
            "load_profile",
        ),
        "evaluators",
    ),
    **dict.fromkeys(("get_task", "instantiate_task"), "experiments.tasks"),
    **dict.fromkeys(("DeployResult", "deploy", "load_model", "load_safetensors", "load_torch"), "experiments.deploy"),
}

__all__ = [
    "CONFIG_PACKAGE",
    "TOP_LEVEL_PACKAGES",
    "ShadowedPackageError",
    "check_top_level_packages",
    "config_dir",
    *sorted(_EXPORTS),
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nmsearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
