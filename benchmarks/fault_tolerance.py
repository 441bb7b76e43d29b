"""Fault table: workers of a shared Optuna study killed with SIGKILL mid-trial.

    python benchmarks/fault_tolerance.py [--out docs/guides/fault_tolerance.csv]

Scenarios (toy evaluator of the tests, so the numbers are about the storage, not the model):
``sqlite kill -9 x3``: one worker of a 60-trial search on SQLite killed at 5, 25 and 45 started
evaluations and restarted at once each time (inside the 60 s heartbeat grace period);
``journal`` / ``postgresql``: 4 workers, 200-trial shared budget, 0 or 2 of them killed (declared
to run on other machines, so only the heartbeat, 20 s grace, tells they died). The PostgreSQL
rows start a throwaway server (Debian's postgresql package) and skip without one.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from tests.postgres import PostgresUnavailable, create_database, postgres_server
from tests.strategies.faults import kill_and_resume, many_workers

COLUMNS = {
    "launched": "trials launched",
    "finished": "finished",
    "interrupted": "failed (worker killed)",
    "re_enqueued": "re-enqueued",
    "lost": "lost",
    "scored_twice": "scored twice",
    "running": "left RUNNING",
    "skipped": "skipped (budget full)",
}


def _row(name: str, counts: dict, seconds: float) -> dict:
    return {"scenario": name, **{label: counts[key] for key, label in COLUMNS.items()}, "wall_s": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the table as CSV")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        _, counts = kill_and_resume(f"sqlite:///{tmp}/optuna.db", Path(tmp), (5, 25, 45), 60)
        rows.append(_row("sqlite, 1 worker, kill -9 at 3 points, 60 trials", counts, time.perf_counter() - start))
    for kill in (0, 2):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            _, counts, _ = many_workers(f"journal:{tmp}/study.journal", Path(tmp), kill)
            rows.append(_row(f"journal, 4 workers, {kill} killed, 200 trials", counts, time.perf_counter() - start))
    try:
        with postgres_server() as server:
            for kill in (0, 2):
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    _, counts, _ = many_workers(create_database(server), Path(tmp), kill)
                    name = f"postgresql, 4 workers, {kill} killed, 200 trials"
                    rows.append(_row(name, counts, time.perf_counter() - start))
    except PostgresUnavailable as error:
        print(f"PostgreSQL rows skipped: {error}")
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False))
    if args.out:
        table.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
