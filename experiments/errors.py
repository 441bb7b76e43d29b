"""One line instead of a traceback for every failure a user can fix (bad input, files, disks).

Entry points run their body through :func:`run_cli`: an :class:`~search_space.NMSearchError`
prints its message; a file-system error prints what could not be written or read and the real
reason (``no space left on device``, ``read-only file system``); an Optuna storage error is
traced to its cause, since Optuna's own message blames "invalid data, e.g. exceeding max length"
for a full disk. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Callable
from typing import NoReturn

from optuna.exceptions import StorageInternalError

from search_space import NMSearchError
from search_space.io import os_error_reason

__all__ = ["INTERRUPTED", "USAGE", "OneLineParser", "error_line", "run_cli"]

USAGE = 2  # exit status for bad input or an environment the run cannot use
INTERRUPTED = 130  # Ctrl-C, as shells report it

_SQLITE_CAUSES = {
    "disk is full": "no space left on device",
    "readonly database": "the database file or its folder is read-only",
    "unable to open database file": "the database file cannot be created or opened (folder missing or read-only?)",
    "database is locked": "another process holds the database lock; retry, or use a Journal storage for many workers",
    "disk i/o error": "disk I/O error",
}


def _causes(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def error_line(error: BaseException) -> str | None:
    """The one-line message for ``error``, or ``None`` when it is a bug (keep the traceback).

    Args:
        error: What an entry point raised.

    Returns:
        A single line without a trailing period, or ``None``.
    """
    if isinstance(error, NMSearchError):
        return " ".join(str(error).split("\n"))
    if isinstance(error, OSError):
        where = f" '{error.filename}'" if error.filename else ""
        return f"cannot access{where}: {os_error_reason(error)}"
    if isinstance(error, StorageInternalError | sqlite3.Error) or any(
        isinstance(e, sqlite3.Error) for e in _causes(error)
    ):
        text = " ".join(str(e) for e in _causes(error)).lower()
        reason = next((why for key, why in _SQLITE_CAUSES.items() if key in text), None)
        if reason is not None:
            return f"the Optuna storage could not be written: {reason}"
        return None
    return None


def run_cli(prog: str, body: Callable[[], int | None], *, on_interrupt: str = "") -> int:
    """Run ``body``; print a fixable failure as ``prog: message`` on stderr and return its exit status.

    Args:
        prog: The program name that prefixes messages (``"nmsearch export"``).
        body: The entry point's work; returns an exit status (``None`` means 0).
        on_interrupt: What to tell the user after Ctrl-C (e.g. how to resume).

    Returns:
        ``body``'s status, :data:`USAGE` for a reported failure, :data:`INTERRUPTED` on Ctrl-C.

    Raises:
        Exception: Any error of ``body`` that :func:`error_line` does not turn into one line (a
            bug), unchanged, with its traceback.
    """
    try:
        return body() or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted" + (f"; {on_interrupt}" if on_interrupt else ""), file=sys.stderr)
        return INTERRUPTED
    except Exception as error:
        line = error_line(error)
        if line is None:
            raise
        print(f"{prog}: {line}", file=sys.stderr)
        return USAGE


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``prog: message; see --help``), exit 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: message; see --help`` on stderr and exit with :data:`USAGE`.

        Args:
            message: argparse's description of the usage error.

        Raises:
            SystemExit: Always, with status :data:`USAGE`.
        """
        print(f"{self.prog}: {message}; see --help", file=sys.stderr)
        sys.exit(USAGE)
