"""The ``nmsearch`` command: one subcommand per entry point of ``experiments``.

    nmsearch search [key=value ...]                  the main job (Hydra overrides, -m for sweeps)
    nmsearch export RUN_DIR --out scheme.json ...    pick a Pareto point of a finished run
    nmsearch compare DIR [DIR ...]                   merge runs into one table and figure
    nmsearch deploy RUN_DIR|scheme.json --format F   safetensors / ONNX / torch 2:4 for serving
    nmsearch profile --out TABLE [key=value ...]     measured latency table of this device

Each subcommand is the entry function of its module (imported only when it runs), called as
``python -m experiments.<name>`` calls it: it reads ``sys.argv`` and returns an exit status (or
exits). Adding a subcommand is one line in ``COMMANDS``.
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple

PROG = "nmsearch"


class Command(NamedTuple):
    module: str
    function: str  # reads sys.argv[1:], returns the exit status (None: 0) or raises SystemExit
    summary: str


COMMANDS: dict[str, Command] = {
    "search": Command(
        "experiments.search", "cli", "run a search; Hydra overrides pass through (key=value, -m, --help)"
    ),
    "export": Command("experiments.export", "main", "write one Pareto point of a finished run as scheme.json"),
    "compare": Command("experiments.compare", "main", "merge finished runs into one table and one figure"),
    "deploy": Command("experiments.deploy", "main", "bake a scheme into a model: safetensors, ONNX or torch 2:4"),
    "status": Command("experiments.status", "main", "progress of a search across its workers: counts and front so far"),
    "workers": Command("experiments.workers", "main", "start one Optuna worker per device on this node"),
    "profile": Command("experiments.profile", "main", "time every (layer, option) on this device: a latency table"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [ARGS ...]   ({PROG} COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``nmsearch COMMAND ARGS``.

    Args:
        argv: the arguments after the program name (default ``sys.argv[1:]``).

    Returns:
        The subcommand's exit status (2 for an unknown command).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"{PROG}: unknown command {name!r}; choose from {', '.join(COMMANDS)} ({PROG} --help)", file=sys.stderr)
        return 2
    command = COMMANDS[name]
    try:
        function = getattr(importlib.import_module(command.module), command.function)
    except ImportError as error:  # a shadowed package (one line already) or a missing dependency
        line = str(error).splitlines()[0]
        print(line if line.startswith(PROG) else f"{PROG} {name}: {line}", file=sys.stderr)
        return 2
    # argparse and Hydra name the program after argv[0]: "nmsearch deploy", not "deploy.py".
    sys.argv = [f"{PROG} {name}", *rest]
    return int(function() or 0)


if __name__ == "__main__":
    sys.exit(main())
