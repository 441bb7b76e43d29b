"""Run directories: what defines a run's results, refusing to mix configs, and finding finished runs.

A run directory records, when its search starts, the part of the config that defines its results
(``run.json``). Starting again in that directory resumes only with the same defining config;
otherwise the start is refused in one line naming the differing keys, before any work
(``force_new=true`` moves the old files aside and starts over; a new ``hydra.run.dir`` keeps both).

Defining keys: ``task``, ``space``, ``evaluator``, ``hardware``, ``recipe``, ``objectives``,
``seed`` and ``strategy`` (its type and settings). Not defining (free to change on resume):
the budget and run-time settings in :data:`OPERATIONAL_STRATEGY_KEYS` (``n_trials``: resuming with
a larger budget extends the search), ``select`` (which front point becomes ``scheme.json``),
``device``, ``cache_dir``, ``progress`` and ``force_new``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from search_space import NMSearchError, atomic_write_text
from strategies import SearchResult
from strategies.base import RESULT_FILE

__all__ = [
    "DEFINING_KEYS",
    "OPERATIONAL_STRATEGY_KEYS",
    "RUN_RECORD",
    "Run",
    "RunDirError",
    "claim_run_dir",
    "defining_config",
    "find_runs",
    "load_run",
]

RUN_RECORD = "run.json"
DEFINING_KEYS = ("task", "space", "evaluator", "hardware", "recipe", "objectives", "seed", "strategy")
OPERATIONAL_STRATEGY_KEYS = (
    "n_trials",
    "timeout_s",
    "worker_index",
    "heartbeat_interval_s",
    "grace_period_s",
    "max_retry",
    "show_progress_bar",
)
# What a search writes into its run directory (moved aside together by force_new).
RUN_FILES = (
    RUN_RECORD,
    RESULT_FILE,
    "trials.csv",
    "pareto.csv",
    "pareto.png",
    "scheme.json",
    "schemes",
    "config.yaml",
    "optuna.db",
    "optuna.db-wal",
    "optuna.db-shm",
    "gumbel",
    "gumbel_log.csv",
    "gumbel_probs.csv",
    "domino_log.csv",
    "domino_scheme.json",
    "domino.json",
)


class RunDirError(NMSearchError):
    """A run directory that holds another search, or cannot be used."""


def defining_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a resolved search config that defines its results (see the module doc).

    Args:
        config: The resolved config as plain containers (``OmegaConf.to_container(cfg, resolve=True)``).

    Returns:
        Its :data:`DEFINING_KEYS`, without the strategy's operational keys.
    """
    defining = {key: config.get(key) for key in DEFINING_KEYS}
    strategy = dict(defining.get("strategy") or {})
    defining["strategy"] = {k: v for k, v in strategy.items() if k not in OPERATIONAL_STRATEGY_KEYS}
    return json.loads(json.dumps(defining, default=str))  # plain JSON values, as the record holds them


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat or {prefix: {}}
    return {prefix: value}


def _short(value: Any) -> str:
    text = json.dumps(value) if value is not None else "absent"
    return text if len(text) <= 30 else text[:27] + "..."


def config_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two defining configs, in a stable order.

    Args:
        recorded: The defining config recorded in a run directory.
        current: The defining config of the run about to start.

    Returns:
        The differing keys (present in one config only counts as differing), shallow keys and
        ``.name`` keys first.
    """
    old, new = _flatten(recorded), _flatten(current)
    keys = [key for key in dict.fromkeys([*old, *new]) if old.get(key, "<absent>") != new.get(key, "<absent>")]
    # shallow keys and names (hardware.name, strategy.name) before deep details
    return sorted(keys, key=lambda key: (key.count("."), not key.endswith(".name")))


def _recorded_config(run_dir: Path) -> dict[str, Any] | None:
    """The defining config of the search already in ``run_dir`` (``None``: none there yet)."""
    record = run_dir / RUN_RECORD
    if record.is_file():
        try:
            return json.loads(record.read_text())["defining"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise RunDirError(
                f"'{record}' is corrupt: it cannot tell which config this run directory holds; "
                "use a new hydra.run.dir, or force_new=true to start over there"
            ) from None
    legacy = run_dir / "config.yaml"  # runs written before run.json existed
    if legacy.is_file() and (run_dir / RESULT_FILE).is_file():
        try:
            return defining_config(yaml.safe_load(legacy.read_text()) or {})
        except (yaml.YAMLError, AttributeError, UnicodeDecodeError):
            return None
    return None


def claim_run_dir(run_dir: Path, defining: Mapping[str, Any], *, force_new: bool = False, write: bool = True) -> str:
    """Check that ``run_dir`` is empty of searches or holds this one, and record it there.

    Args:
        run_dir: The run directory.
        defining: :func:`defining_config` of the search about to start.
        force_new: Move another search's files aside (into ``replaced-<time>/``) and start over.
        write: Record ``defining`` (``False``: only check, before the rest is validated).

    Returns:
        ``"new"``, ``"resume"`` or ``"replaced"``.

    Raises:
        RunDirError: the directory holds a search with another defining config (naming the
            differing keys), or its record is corrupt.
    """
    recorded = _recorded_config(run_dir)
    state = "new" if recorded is None else "resume"
    if recorded is not None and recorded != dict(defining):
        if not force_new:
            differing = config_differences(recorded, defining)
            old, new = _flatten(recorded), _flatten(defining)
            shown = ", ".join(
                f"{key} ({_short(old.get(key))} -> {_short(new.get(key))})" if i < 3 else key
                for i, key in enumerate(differing[:6])
            ) + (f" and {len(differing) - 6} more" if len(differing) > 6 else "")
            raise RunDirError(
                f"'{run_dir}' holds a search with another config (differs in {shown}): resume with the same "
                "config, use a new hydra.run.dir, or add force_new=true to start over there"
            )
        state = "replaced"
        if write:
            _move_aside(run_dir)
    elif recorded is None and any((run_dir / name).exists() for name in ("optuna.db", "gumbel")):
        if not force_new:  # an interrupted search of an older version, or of unknown config
            raise RunDirError(
                f"'{run_dir}' holds an unfinished search without a {RUN_RECORD} (its config is unknown): "
                "use a new hydra.run.dir, or add force_new=true to start over there"
            )
        state = "replaced"
        if write:
            _move_aside(run_dir)
    if write and (state != "resume" or not (run_dir / RUN_RECORD).is_file()):
        record = {"defining": dict(defining), "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_text(run_dir / RUN_RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return state


def _move_aside(run_dir: Path) -> Path:
    """Move the run's files into ``run_dir/replaced-<UTC time>/`` (nothing is deleted)."""
    target = run_dir / time.strftime("replaced-%Y%m%dT%H%M%S", time.gmtime())
    suffix = 0
    while target.exists():
        suffix += 1
        target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
    target.mkdir(parents=True)
    for name in RUN_FILES:
        if (run_dir / name).exists():
            (run_dir / name).rename(target / name)
    return target


@dataclass
class Run:
    """A finished search found on disk.

    Attributes:
        path: Its run directory.
        result: Its trials, front and metadata.
        label: Strategy, hardware and relative path, for legends and tables.
        hardware: The hardware profile's name (empty when unknown).
    """

    path: Path
    result: SearchResult
    label: str
    hardware: str


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Find every finished run at or below some folders.

    Args:
        paths: Run directories, or multirun folders holding them.

    Returns:
        The runs, in path order.

    Raises:
        NMSearchError: If a path is not a directory or holds no finished search.
    """
    runs = []
    for root in map(Path, paths):
        if not root.is_dir():
            raise NMSearchError(f"'{root}' is not a directory")
        found = sorted({p.parent for p in root.rglob(RESULT_FILE) if "replaced-" not in str(p.relative_to(root))})
        if not found:
            raise NMSearchError(
                f"'{root}' holds no finished search (no {RESULT_FILE} below it); point to a run or multirun directory"
            )
        runs += [load_run(path, root) for path in found]
    return runs


def load_run(path: Path, root: Path | None = None) -> Run:
    """Load one finished run directory.

    Args:
        path: The run directory (holding ``result.json`` and ``trials.csv``).
        root: The folder it was found under, to label it by its relative path.

    Returns:
        The run, labelled by strategy, hardware (from ``config.yaml``) and its place under ``root``.

    Raises:
        NMSearchError: If ``path`` holds no finished search, its result files are malformed or
            its ``config.yaml`` is not valid YAML.
    """
    result = SearchResult.load(path)
    hardware = ""
    config_path = path / "config.yaml"
    if config_path.is_file():
        try:
            config = yaml.safe_load(config_path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise NMSearchError(f"'{config_path}' is not valid YAML ({str(error).splitlines()[0]})") from None
        hardware = str(((config if isinstance(config, dict) else {}).get("hardware") or {}).get("name", ""))
    relative = path.relative_to(root) if root is not None and path != root else Path(path.name)
    label = " ".join(part for part in (result.strategy, hardware, str(relative) if root is not None else "") if part)
    return Run(path, result, label, hardware)
