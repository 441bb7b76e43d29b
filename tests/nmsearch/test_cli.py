"""The nmsearch command: dispatch, --help of every subcommand, Hydra overrides passed to search."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nmsearch.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_every_command(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS)
    assert main([]) == 2


def test_unknown_command_is_one_line(capsys) -> None:
    assert main(["deplyo"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "nmsearch: unknown command 'deplyo'; choose from search, export, compare, deploy, status, workers, profile "
        "(nmsearch --help)\n"
    )


@pytest.mark.parametrize("name", ["export", "compare", "deploy", "profile"])
def test_subcommand_help_names_the_command(name: str, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() sets argv[0] for argparse's usage line
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: nmsearch {name} ")


def nmsearch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "nmsearch.cli", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # two processes importing the whole stack (~20-40 s on a loaded 2-core machine)
def test_search_passes_hydra_overrides_from_any_directory(tmp_path: Path) -> None:
    helped = nmsearch("search", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "hardware: a100, " in helped.stdout  # config groups found via the package
    wrong = nmsearch("search", "strategy=optuan", cwd=tmp_path)
    assert wrong.returncode == 2
    assert wrong.stderr.startswith("nmsearch: ") and "available: domino, gumbel, optuna" in wrong.stderr
    assert wrong.stderr.count("\n") == 1 and not list(tmp_path.iterdir())
