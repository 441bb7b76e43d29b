"""Pick a point of a finished run's Pareto front and write its scheme.

    python -m experiments.export RUN_DIR [--knee | --max-latency MS | --min-accuracy A |
                                          --constraint "bytes_mb<=0.03" ...] [--objective NAME] --out scheme.json

Which point is written:

* no bound (or ``--knee``): the knee of the front;
* a floor on accuracy (``--min-accuracy 0.97``, ``--constraint "accuracy>=0.97"``): the
  **cheapest** front point that reaches it, by the run's primary cost objective (its first
  minimised objective, e.g. ``latency_ms``);
* only cost bounds (``--max-latency``, ``--constraint "bytes_mb<=0.03"``): the **most accurate**
  front point within them;
* ``--objective NAME`` overrides both: the best point by ``NAME`` among those meeting the bounds
  (or on the whole front without bounds).

Ties go to the better value of the other objectives. See ``SearchResult.select``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.errors import OneLineParser, run_cli
from experiments.runs import load_run
from search_space import NMSearchError, Scheme, check_writable_dir
from strategies.base import RESULT_FILE


def export(
    run_dir: Path, out: Path, constraints: list[str], objective: str | None = None, knee: bool = False
) -> tuple[int, Scheme]:
    """Write the chosen front point of the run in ``run_dir`` to ``out`` (see the module doc).

    Args:
        run_dir: A finished run directory (not a multirun folder).
        out: The scheme file to write (atomically).
        constraints: Bounds such as ``"accuracy>=0.97"``.
        objective: What "best" means among the points meeting ``constraints``.
        knee: Write the knee (the default without constraints and objective).

    Returns:
        The chosen trial and the scheme written.

    Raises:
        NMSearchError: a bad run directory, result files or request, or an unwritable ``out``.
    """
    if out.is_dir():
        raise NMSearchError(f"--out '{out}' is a directory: give a file name, e.g. '{out / 'scheme.json'}'")
    check_writable_dir(
        out.parent if str(out.parent) else Path("."), "--out folder", "choose another --out", min_free_mb=1
    )
    if not (run_dir / RESULT_FILE).is_file() and run_dir.is_dir() and any(run_dir.rglob(RESULT_FILE)):
        raise NMSearchError(f"'{run_dir}' is a folder of runs (a multirun); pass one of its run directories")
    run = load_run(run_dir)
    result = run.result
    trial = result.knee() if knee or not (constraints or objective) else result.select(constraints, objective)
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
    parser = OneLineParser(
        prog="nmsearch export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--knee", action="store_true", help="the knee of the front (default)")
    choice.add_argument("--max-latency", type=float, metavar="MS", help="latency_ms <= MS: the most accurate within")
    choice.add_argument("--min-accuracy", type=float, metavar="A", help="accuracy >= A (a fraction): the cheapest")
    parser.add_argument("--constraint", action="append", default=[], metavar="EXPR", help="e.g. 'bytes_mb<=0.03'")
    parser.add_argument("--objective", help="what 'best' means among the points meeting the bounds")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    constraints = list(args.constraint)
    if args.max_latency is not None:
        constraints.append(f"latency_ms<={args.max_latency}")
    if args.min_accuracy is not None:
        if not 0 <= args.min_accuracy <= 1:
            parser.error(f"--min-accuracy is a fraction in [0, 1], got {args.min_accuracy:g} (0.97, not 97)")
        constraints.append(f"accuracy>={args.min_accuracy}")
    if args.knee and constraints:
        parser.error("--knee cannot be combined with bounds")
    if args.knee and args.objective:
        parser.error("--knee cannot be combined with --objective")

    def body() -> int:
        trial, scheme = export(args.run_dir, args.out, constraints, args.objective, args.knee)
        values = ", ".join(f"{k}={v:.4g}" for k, v in scheme.metrics.items())
        print(f"trial {trial} ({values}; {scheme.summary()}) -> {args.out}")
        return 0

    return run_cli("nmsearch export", body)


if __name__ == "__main__":
    sys.exit(main())
