"""Run many ``python -m experiments.search`` invocations in one process (imports paid once).

    python -m tests.experiments.cli_driver CASES.json RESULTS.json

``CASES.json``: ``{name: [arg, ...]}``; ``RESULTS.json``: ``{name: {"code": int, "stderr": str}}``.
A case that escapes as an exception is recorded with code ``"exception"`` and its traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
import traceback


def run_case(args: list[str]) -> dict:
    sys.argv = ["experiments.search", *args]
    err = io.StringIO()
    code: int | str = 0
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_module("experiments.search", run_name="__main__", alter_sys=True)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # recorded for the test to fail on
            traceback.print_exc()
            code = "exception"
    return {"code": code, "stderr": err.getvalue()}


if __name__ == "__main__":
    cases_path, results_path = sys.argv[1:3]  # run_case replaces sys.argv
    with open(cases_path) as handle:
        cases = json.load(handle)
    results = {name: run_case(args) for name, args in cases.items()}
    with open(results_path, "w") as handle:
        json.dump(results, handle)
