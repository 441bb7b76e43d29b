"""Merge finished runs (single runs and multirun folders) into one table and one figure.

    python -m experiments.compare DIR [DIR ...] [--out compare] [--x latency_ms]

Writes ``compare.csv`` (every candidate of every run, with its run label), ``summary.csv``
(per run: candidates, front size, hypervolume against one shared reference point, best
accuracy, knee) and ``compare.png`` (every run's front overlaid, accuracy against ``--x``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from evaluators.pareto import hypervolume, plot_pareto, reference_point
from experiments.errors import OneLineParser, run_cli
from experiments.runs import Run, find_runs
from search_space import NMSearchError, atomic_write, atomic_write_text, check_writable_dir


def common_objectives(runs: list[Run]) -> list:
    """The objectives every run has, in the first run's order.

    Args:
        runs: Finished runs.

    Returns:
        The shared objectives.

    Raises:
        NMSearchError: If they share fewer than two.
    """
    names = [o.name for o in runs[0].result.objectives]
    shared = [
        o for o in runs[0].result.objectives if all(o.name in {p.name for p in r.result.objectives} for r in runs)
    ]
    if len(shared) < 2:
        raise NMSearchError(
            f"the runs share fewer than two objectives ({', '.join(names)} vs others): nothing to compare"
        )
    return shared


def compare(runs: list[Run], x_name: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, plt.Figure]:
    """Merge runs into one table, a summary per run and one figure of their fronts.

    Args:
        runs: Finished runs (see :func:`experiments.runs.find_runs`).
        x_name: The objective on the figure's x axis; default the first shared one other than
            the y axis (``accuracy``, else the first shared objective).

    Returns:
        ``(merged, summary, figure)``: every candidate with its run's label; per run its
        strategy, hardware, counts, hypervolume against one shared reference point, best
        accuracy and knee; the fronts of the y objective against the x one.

    Raises:
        NMSearchError: If the runs share fewer than two objectives or ``x_name`` is not one of them.
    """
    objectives = common_objectives(runs)
    frames = {run.label: run.result.completed for run in runs}
    reference = reference_point(list(frames.values()), objectives)
    rows = []
    for run in runs:
        result = run.result
        front = result.front
        values = front[[o.name for o in objectives]].to_numpy(dtype=float)
        knee = result.trials.set_index("trial").loc[result.knee()] if not front.empty else None
        rows.append(
            {
                "run": run.label,
                "strategy": result.strategy,
                "hardware": run.hardware,
                "candidates": len(result.trials),
                "completed": len(result.completed),
                "front": len(front),
                "hypervolume": hypervolume(values, [o.direction for o in objectives], reference),
                "best_accuracy": float(front["accuracy"].max()) if "accuracy" in front else float("nan"),
                **{f"knee_{o.name}": float(knee[o.name]) if knee is not None else float("nan") for o in objectives},
                "path": str(run.path),
            }
        )
    summary = pd.DataFrame(rows)
    merged = pd.concat([run.result.trials.assign(run=run.label) for run in runs], ignore_index=True)
    y = next((o for o in objectives if o.name == "accuracy"), objectives[0])
    xs = [o for o in objectives if o is not y]
    x = next((o for o in xs if o.name == x_name), None) if x_name else xs[0]
    if x is None:
        raise NMSearchError(f"--x {x_name!r} is not an objective shared by the runs: {', '.join(o.name for o in xs)}")
    ax = plot_pareto(frames, x, y, title=f"{len(runs)} runs: fronts of {y.name} against {x.name}")
    ax.legend(fontsize=7)
    return merged, summary, ax.figure


def main(argv: list[str] | None = None) -> int:
    """``nmsearch compare DIR... [--out compare] [--x METRIC]``.

    Args:
        argv: Command-line arguments; default ``sys.argv[1:]``.

    Returns:
        The exit status: 0, or 2 after a one-line error.
    """
    parser = OneLineParser(
        prog="nmsearch compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("compare"))
    parser.add_argument("--x", help="cost objective on the x axis (default: the first one)")
    args = parser.parse_args(argv)

    def body() -> int:
        check_writable_dir(args.out, "--out folder", "choose another --out", min_free_mb=1)
        runs = find_runs(args.dirs)
        merged, summary, figure = compare(runs, args.x)
        atomic_write_text(args.out / "compare.csv", merged.to_csv(index=False))
        atomic_write_text(args.out / "summary.csv", summary.to_csv(index=False))
        atomic_write(
            args.out / "compare.png", lambda handle: figure.savefig(handle, format="png", dpi=120, bbox_inches="tight")
        )
        plt.close(figure)
        shown = summary.drop(columns=["path"])
        print(shown.to_markdown(index=False, floatfmt=".4g"))
        print(f"written: {args.out / 'compare.csv'}, {args.out / 'summary.csv'}, {args.out / 'compare.png'}")
        return 0

    return run_cli("nmsearch compare", body)


if __name__ == "__main__":
    sys.exit(main())
