"""Pick a point of a finished run's Pareto front and write its scheme.

    python -m experiments.export RUN_DIR [--knee | --max-latency MS | --min-accuracy A |
                                          --constraint "bytes_mb<=0.03" ...] [--objective NAME] --out scheme.json

Without a choice the knee is written. With bounds, the best front point meeting all of them
(by ``--objective``, default the first objective: accuracy) is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.runs import load_run
from search_space import NMSearchError, Scheme
from strategies.base import RESULT_FILE


def export(
    run_dir: Path, out: Path, constraints: list[str], objective: str | None = None, knee: bool = False
) -> tuple[int, Scheme]:
    if not (run_dir / RESULT_FILE).is_file() and any(run_dir.rglob(RESULT_FILE)):
        raise NMSearchError(f"'{run_dir}' is a folder of runs (a multirun); pass one of its run directories")
    run = load_run(run_dir)
    result = run.result
    trial = result.knee() if knee or not constraints else result.select(constraints, objective)
    row = result.trials.set_index("trial").loc[trial]
    metrics = {o.name: float(row[o.name]) for o in result.objectives}
    scheme = result.schemes[trial]
    scheme = scheme.with_metadata(
        hardware=scheme.hardware or run.hardware or None,
        metrics=metrics,
        provenance={**scheme.provenance, "strategy": result.strategy, "trial": trial, "exported_from": str(run_dir)},
    )
    scheme.save(out)
    return trial, scheme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--knee", action="store_true", help="the knee of the front (default)")
    choice.add_argument("--max-latency", type=float, metavar="MS", help="latency_ms <= MS")
    choice.add_argument("--min-accuracy", type=float, metavar="A", help="accuracy >= A (a fraction)")
    parser.add_argument("--constraint", action="append", default=[], metavar="EXPR", help="e.g. 'bytes_mb<=0.03'")
    parser.add_argument("--objective", help="what 'best' means among the points meeting the bounds")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    constraints = list(args.constraint)
    if args.max_latency is not None:
        constraints.append(f"latency_ms<={args.max_latency}")
    if args.min_accuracy is not None:
        constraints.append(f"accuracy>={args.min_accuracy}")
    if args.knee and constraints:
        parser.error("--knee cannot be combined with bounds")
    try:
        trial, scheme = export(args.run_dir, args.out, constraints, args.objective, args.knee)
    except NMSearchError as error:
        print(f"nmsearch export: {error}", file=sys.stderr)
        return 2
    values = ", ".join(f"{k}={v:.4g}" for k, v in scheme.metrics.items())
    print(f"trial {trial} ({values}; {scheme.summary()}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
