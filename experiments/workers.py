"""One Optuna worker per GPU of a node, all on one study:

    python -m experiments.workers --run-dir runs/big [--devices 0,1,2,3] [--per-device 1]
        [--storage URL] -- strategy=optuna strategy.n_trials=400 task=cifar10 ...

Each worker is a process of the main job (``python -m experiments.search``) that sees only its
device: ``CUDA_VISIBLE_DEVICES`` names it (so the worker uses ``cuda:0``, and CUDA never touches
another GPU) and ``LOCAL_RANK`` is its slot. Workers get ``strategy.worker_index`` 0..N-1 (distinct
seeds; worker 0 queues the warm start), one shared storage (default: a Journal file in the run
directory; pass ``--storage postgresql://...`` to add workers on other nodes) and their own output
folder ``RUN_DIR/worker_I``. Devices come from ``--devices``, else ``$NMSEARCH_DEVICES``, else
``$CUDA_VISIBLE_DEVICES``, else every GPU torch sees; ``cpu`` entries run CPU workers. The study's
progress: ``python -m experiments.status RUN_DIR/worker_0``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from joblib import Parallel, delayed

from search_space import NMSearchError

__all__ = ["WorkerPlan", "devices_from_env", "main", "plan_workers", "run_workers"]

DEVICES_ENV = "NMSEARCH_DEVICES"


@dataclass(frozen=True)
class WorkerPlan:
    """One worker process: its command line, the environment entries it adds, its output folder."""

    index: int
    device: str
    command: list[str]
    env: dict[str, str]
    run_dir: Path


def devices_from_env(environ: dict[str, str] | None = None) -> list[str]:
    """The devices to use: ``$NMSEARCH_DEVICES``, else ``$CUDA_VISIBLE_DEVICES``, else every GPU
    torch sees (comma-separated GPU ids or ``cpu``).

    Args:
        environ: the environment to read (default ``os.environ``).

    Returns:
        Device names; empty when there is none.
    """
    environ = dict(os.environ if environ is None else environ)
    for name in (DEVICES_ENV, "CUDA_VISIBLE_DEVICES"):
        listed = [d.strip() for d in environ.get(name, "").split(",") if d.strip()]
        if listed:
            return listed
    import torch  # only here: the launcher itself must not initialise CUDA

    return [str(i) for i in range(torch.cuda.device_count())]


def plan_workers(
    devices: Sequence[str],
    run_dir: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    per_device: int = 1,
    storage: str | None = None,
    module: str = "experiments.search",
) -> list[WorkerPlan]:
    """The worker processes for ``devices`` (``per_device`` on each).

    Args:
        devices: GPU ids (as ``CUDA_VISIBLE_DEVICES`` names them) or ``cpu``.
        run_dir: the folder holding the shared storage and one ``worker_I`` folder per worker.
        overrides: Hydra overrides for every worker (the search to run).
        per_device: workers sharing each device.
        storage: the shared Optuna storage (default ``journal:RUN_DIR/optuna.journal``).
        module: the Python module each worker runs.

    Returns:
        One plan per worker.

    Raises:
        NMSearchError: no device, ``per_device`` < 1, or overrides the launcher sets itself.
    """
    if not devices:
        raise NMSearchError("no device to run workers on: no GPU is visible; pass --devices (e.g. cpu,cpu)")
    if per_device < 1:
        raise NMSearchError(f"--per-device must be >= 1, got {per_device}")
    owned = ("strategy.worker_index", "strategy.storage", "hydra.run.dir", "device")
    clashing = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in owned]
    if clashing:
        raise NMSearchError(f"{', '.join(clashing)}: the launcher sets {', '.join(owned)} per worker; drop them")
    run_dir = Path(run_dir).resolve()
    storage = storage or f"journal:{run_dir / 'optuna.journal'}"
    plans = []
    for index in range(len(devices) * per_device):
        device = devices[index // per_device]
        gpu = device != "cpu"
        out = run_dir / f"worker_{index}"
        command = [
            sys.executable, "-m", module, *overrides,
            f"strategy.worker_index={index}", f"strategy.storage={_quoted(storage)}", f"hydra.run.dir={_quoted(out)}",
            f"device={'cuda:0' if gpu else 'cpu'}",
        ]  # fmt: skip
        env = {"CUDA_VISIBLE_DEVICES": device if gpu else "", "LOCAL_RANK": str(index)}
        plans.append(WorkerPlan(index, device, command, env, out))
    return plans


def _quoted(value: object) -> str:
    """A Hydra override value as a quoted string (URLs hold '=', '?', '@' the grammar would parse)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _run(plan: WorkerPlan) -> int:
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    with open(plan.run_dir / "worker.log", "w") as log:
        return subprocess.run(
            plan.command, env={**os.environ, **plan.env}, stdout=log, stderr=subprocess.STDOUT
        ).returncode


def run_workers(plans: Sequence[WorkerPlan]) -> list[int]:
    """Run the workers in parallel (joblib threads, each waiting on its process) and wait for all.

    Args:
        plans: from :func:`plan_workers`.

    Returns:
        The exit status of each worker; its output is in ``RUN_DIR/worker_I/worker.log``.
    """
    return Parallel(n_jobs=len(plans), backend="threading")(delayed(_run)(plan) for plan in plans)


def main(argv: Sequence[str] | None = None) -> int:
    """``workers --run-dir DIR [--devices ...] [--per-device N] [--storage URL] -- OVERRIDES``.

    Args:
        argv: the command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0 when every worker succeeded, 1 when one failed, 2 on bad input.
    """
    parser = argparse.ArgumentParser(prog="nmsearch workers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--devices", default=None, help="comma-separated GPU ids or cpu (default: all GPUs)")
    parser.add_argument("--per-device", type=int, default=1)
    parser.add_argument("--storage", default=None, help="shared Optuna storage (default: a Journal file)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every worker (after --)")
    args = parser.parse_args(argv)
    try:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else devices_from_env()
        plans = plan_workers(devices, args.run_dir, args.overrides, per_device=args.per_device, storage=args.storage)
    except NMSearchError as error:
        print(f"nmsearch: {error}", file=sys.stderr)
        return 2
    codes = run_workers(plans)
    for plan, code in zip(plans, codes, strict=True):
        state = "ok" if code == 0 else f"failed (exit {code}), see {plan.run_dir / 'worker.log'}"
        print(f"worker {plan.index} on {plan.device}: {state}")
    return 0 if not any(codes) else 1


if __name__ == "__main__":
    sys.exit(main())
