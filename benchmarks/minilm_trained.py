"""all-MiniLM-L6-v2: the strategies that train the model (Gumbel, DominoSearch) on the MiniLM benchmark's evaluator.

    python benchmarks/minilm_trained.py {gumbel,domino} --seed K --out runs/seedK [--cost-batch 256] [--ratios 2:4]
        [--train-sequences 40] [--train-batch-size 4] [--set FIELD=VALUE ...]

The search trains on the task's unlabeled windows with the distillation loss (``train_loss=auto``:
``1 - cosine`` to the frozen dense model, :mod:`evaluators.distill`); every scheme it returns is
scored by the evaluator and cost of ``benchmarks/minilm.py`` (:class:`minilm.Bench`: SparseGPT
one-shot, independent calibration, embedding cosine on the held-out sentences; modelled latency
on ``--profile`` at fp16 and ``--cost-batch`` sequences of 128 tokens), and so is the uniform
baseline. ``--set`` overrides fields of the strategy (:class:`~strategies.GumbelStrategy` or
:class:`~strategies.DominoStrategy`; values are Python literals, other text a string, e.g.
``--set "lambdas=[0.3, 1, 3]" target=latency_ms``).
Each strategy gives a front: Gumbel one argmax scheme per ``lambdas`` entry, DominoSearch every
committed scheme on its way to the target (``score_intermediate``).

Writes ``OUT/minilm_front_<strategy>.csv`` (rows as ``minilm_front.csv``: the strategy's points and
the uniform schemes; ``search_s`` is the search's wall time, training and scoring, ``load`` the load
average at its end), which ``benchmarks/minilm_quality.py OUT`` aggregates with the other
strategies, and ``OUT/minilm_<strategy>_log.csv`` (the supernet's epochs or Domino's decisions).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minilm import Bench, add_saving, load, score, setup  # noqa: E402

from search_space import NMSearchError  # noqa: E402
from search_space.io import atomic_write_text, check_writable_dir  # noqa: E402
from strategies import DominoStrategy, GumbelStrategy  # noqa: E402
from strategies.base import StrategyBase  # noqa: E402

STRATEGIES: dict[str, type[StrategyBase]] = {"gumbel": GumbelStrategy, "domino": DominoStrategy}
LOG_TABLES = {"gumbel": "gumbel_log", "domino": "domino_log"}
# Fixed by this benchmark: the front it reports, and the seed of --seed.
FIXED = {"gumbel": {"seed", "train_loss"}, "domino": {"seed", "train_loss", "score_intermediate"}}


def make_strategy(name: str, seed: int, overrides: Sequence[str]) -> StrategyBase:
    """The strategy ``name`` with ``FIELD=VALUE`` overrides (Python literals, other text a string),
    the distillation loss and ``seed``.

    Args:
        name: ``gumbel`` or ``domino``.
        seed: The strategy's seed.
        overrides: ``FIELD=VALUE`` strings.

    Returns:
        The strategy (DominoSearch with ``score_intermediate``: its front).

    Raises:
        NMSearchError: An unknown strategy, a malformed or unknown override, or a value of the wrong type.
    """
    if name not in STRATEGIES:
        raise NMSearchError(f"strategy {name!r} is not one of {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    known = {f.name for f in dataclasses.fields(cls)} - FIXED[name] - {"name"}
    fields: dict[str, Any] = {}
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise NMSearchError(f"--set takes FIELD=VALUE, got {override!r}")
        if key not in known:
            raise NMSearchError(
                f"--set {key}: not a field of {name} this benchmark lets you set ({', '.join(sorted(known))})"
            )
        try:
            fields[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            fields[key] = text  # a plain word: a string field (target=latency_ms)
    fields.update(seed=seed, train_loss="distill")
    if name == "domino":
        fields["score_intermediate"] = True
    return cls(**fields)


def run(bench: Bench, strategy: StrategyBase, out: Path) -> pd.DataFrame:
    """Search with ``strategy`` on ``bench``'s evaluator; write and return the front file's rows.

    Args:
        bench: The model, space and cost (:func:`minilm.setup`).
        strategy: A :class:`~strategies.GumbelStrategy` or :class:`~strategies.DominoStrategy`.
        out: The run directory (created).

    Returns:
        One row per scheme the search returned (``kind`` = the strategy's name) and per uniform scheme.
    """
    out.mkdir(parents=True, exist_ok=True)
    scorer = bench.evaluator("sparsegpt", "independent")
    start = time.perf_counter()
    result = strategy.search(bench.space, scorer)
    search_s = time.perf_counter() - start
    rows = [score(scorer, scheme, label, "uniform") for label, scheme in bench.space.uniform_schemes().items()]
    for row in result.completed.to_dict("records"):
        # Gumbel: one scheme per lambda (or budget); DominoSearch: one per commit, in order.
        label = f"{row['info.pick']} {row['info.setting']:g}" if "info.setting" in row else f"commit {row['trial']}"
        rows.append(
            {
                "kind": strategy.name,
                "label": f"{strategy.name} {label}",
                "cosine": row["accuracy"],
                "neighbors@10": row.get("info.neighbors@10"),
                "latency_ms": row["latency_ms"],
                "summary": row["summary"],
                "search_s": search_s,
                "load": load(),
            }
        )
    frame = add_saving(pd.DataFrame(rows).drop(columns="scheme", errors="ignore"))
    log = result.tables.get(LOG_TABLES[strategy.name])
    if log is not None:
        atomic_write_text(out / f"minilm_{strategy.name}_log.csv", log.to_csv(index=False))
    atomic_write_text(out / f"minilm_front_{strategy.name}.csv", frame.to_csv(index=False))
    return frame


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("strategy", choices=sorted(STRATEGIES))
    parser.add_argument(
        "--seed", type=int, default=0, help="the strategy's seed (and the order of the training windows)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="run directory (e.g. the seed's benchmarks/minilm.py --out)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--ratios", nargs="+", help="N:M ratios of the weights-only space (default: the space's)")
    parser.add_argument("--profile", default="a100", help="hardware profile of the modelled latency")
    parser.add_argument(
        "--cost-batch", type=int, help="128-token sequences the cost model prices (default: the task's)"
    )
    parser.add_argument("--train-sequences", type=int, default=40, help="unlabeled 128-token training windows")
    parser.add_argument("--train-batch-size", type=int, default=4, help="windows per training step")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="strategy fields (Python literals; other text is a string)")  # fmt: skip
    args = parser.parse_args(argv)
    for flag in ("cost_batch", "train_sequences", "train_batch_size", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    try:
        strategy = make_strategy(args.strategy, args.seed, args.overrides)
        check_writable_dir(args.out, "--out", "choose another --out")
    except NMSearchError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    from experiments.tasks.minilm import MiniLMTask

    task = MiniLMTask(train_sequences=args.train_sequences, train_batch_size=args.train_batch_size)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"minilm {args.strategy} seed {args.seed} {started}: {args.threads} threads, load {load():.1f}")
    bench = setup(task, args.ratios, args.profile, args.cost_batch)
    try:
        frame = run(bench, strategy, args.out)
    except NMSearchError as error:
        sys.exit(f"minilm_trained: {error}")
    points = frame[frame["kind"] == args.strategy]
    print(points[["label", "cosine", "latency_ms", "saving_vs_uniform_2:4", "summary"]].to_markdown(index=False))
    done = time.strftime("%H:%M UTC", time.gmtime())
    print(f"search {points['search_s'].iloc[0]:.0f}s wall; done {done}, load {load():.1f}")


if __name__ == "__main__":
    main()
