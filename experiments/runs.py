"""Finding and labelling finished runs (single runs and Hydra multirun folders)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from search_space import NMSearchError
from strategies import SearchResult
from strategies.base import RESULT_FILE


@dataclass
class Run:
    path: Path
    result: SearchResult
    label: str
    hardware: str


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Every finished run at or below ``paths`` (a run directory, or a multirun folder of them)."""
    runs = []
    for root in map(Path, paths):
        if not root.is_dir():
            raise NMSearchError(f"'{root}' is not a directory")
        found = sorted({p.parent for p in root.rglob(RESULT_FILE)})
        if not found:
            raise NMSearchError(
                f"'{root}' holds no finished search (no {RESULT_FILE} below it); point to a run or multirun directory"
            )
        runs += [load_run(path, root) for path in found]
    return runs


def load_run(path: Path, root: Path | None = None) -> Run:
    result = SearchResult.load(path)
    hardware = ""
    config_path = path / "config.yaml"
    if config_path.is_file():
        config = yaml.safe_load(config_path.read_text()) or {}
        hardware = str((config.get("hardware") or {}).get("name", ""))
    relative = path.relative_to(root) if root is not None and path != root else Path(path.name)
    label = " ".join(part for part in (result.strategy, hardware, str(relative) if root is not None else "") if part)
    return Run(path, result, label, hardware)
