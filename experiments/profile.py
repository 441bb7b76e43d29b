"""Measure a latency table on this device: ``python -m experiments.profile --out TABLE [overrides]``.

Times every (layer, option) of a task's search space (``task=``, ``space=``, ``evaluator.dtype=``,
``evaluator.batch_size=`` and ``device=`` are the search's Hydra overrides) as nmsearch deploys it:
dense; N:M weights finalized (zeros baked into the dense weights, ``Scheme.finalize``; on CUDA
sm80+ in fp16/bf16, Linear weights whose pattern runs as 2:4 are converted with
``torch.sparse.to_sparse_semi_structured``); activation masks as the sparse wrapper (mask + GEMM);
row masks as the row-skipping conv (``skip_masked_rows``). Each option is deployed on every layer
offering it and its layers are timed *inside whole forward passes* at the configured batch (a clock
read in a forward pre-hook and a forward hook; warm-up passes first; CUDA synchronised), so each
layer meets the caches and inputs it has in the network -- a layer timed alone on a repeated input
runs warm in cache and the sum of such times under-predicts the network (by 23-56% on this
project's CPU). The table keeps the median, IQR and fastest pass. The rest of the network
(``<rest>``: normalisation, activations, pooling, residual adds) is the dense network's whole
passes, timed without hooks, less its layers' times.

The table (:class:`~evaluators.measured.LatencyTable`) is rewritten atomically after every entry;
run the same command again after an interruption and only the missing entries are timed. At the
end an additivity check times a few whole schemes (dense, uniform, random) end to end against the
table's prediction (``<rest>`` plus the layers), printed and stored in the header; an error above
20% is a warning. Search with the table: ``hardware=measured hardware.measured=TABLE``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.benchmark import Timer

from evaluators.hardware import load_profile
from evaluators.measured import FORMAT, FORMAT_VERSION, REST, TABLE_COLUMNS, LatencyTable, MeasuredTableError
from experiments.errors import OneLineParser, run_cli
from search_space import (
    DENSE,
    NMPattern,
    NMSearchError,
    Option,
    RowSkippingConv2d,
    Scheme,
    SearchSpace,
    SparseLayerMixin,
    prunable_modules,
    skip_masked_rows,
)

__all__ = [
    "ADDITIVITY_WARNING",
    "ProfileSettings",
    "additivity",
    "additivity_schemes",
    "deploy",
    "main",
    "measure_scheme",
    "profile_model",
    "time_call",
    "time_layers_in_network",
]

ADDITIVITY_WARNING = 0.20  # |table prediction / measured - 1| above this is reported as a warning
TORCH_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Shipped roofline profiles by CUDA device name (first match); the CPU profile for CPUs.
CUDA_PROFILES = (
    ("H200", "h200"),
    ("H100 PCIe", "h100_pcie"),
    ("H100", "h100_sxm"),
    ("A100", "a100"),
    ("L4", "l4"),
    ("4090", "rtx4090"),
    ("3060", "rtx3060"),
    ("Orin", "orin"),
)
CPU_PROFILE = "cpu_x86_avx2"
SEMI_STRUCTURED = NMPattern(2, 4)
CLOCKS = ("wall", "cpu")
BLOCK_S = 1e-3  # target seconds of one timed block
MIN_BLOCKS = 10
_TINY_S = 1e-9  # the floor of a timed entry (<rest>, a layer less the hooks' cost): table entries are positive


@dataclass(frozen=True)
class ProfileSettings:
    """How a table is measured.

    Attributes:
        batch_size: the deployment batch (the search's ``evaluator.batch_size``).
        dtype: ``fp32``, ``tf32``, ``fp16`` or ``bf16`` (the search's ``evaluator.dtype``).
        fallback: the roofline profile recorded for entries a search needs but the table lacks
            (default: the shipped profile of this device).
        min_run_time: seconds of timed runs per entry (``Timer.blocked_autorange``).
        warmup: untimed calls before each measurement.
        device: where to time (default: CUDA when available).
        clock: ``wall`` (default: what a deployment sees) or ``cpu``: the profiling thread's CPU
            time (CPU device, one torch thread), which leaves out the time other jobs take the
            core -- for a shared machine, where wall-clock blocks are preempted.
    """

    batch_size: int = 1
    dtype: str = "fp32"
    fallback: str | None = None
    min_run_time: float = 0.2
    warmup: int = 3
    device: str | None = None
    clock: str = "wall"

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS:
            raise NMSearchError(f"clock must be one of {', '.join(CLOCKS)}, got {self.clock!r}")
        if self.clock == "cpu" and self.torch_device.type != "cpu":
            raise NMSearchError("clock 'cpu' (thread CPU time) times CPU devices only; use clock 'wall' on CUDA")
        if self.dtype not in TORCH_DTYPES:
            raise NMSearchError(
                f"cannot time dtype {self.dtype!r} in eager torch; choose one of {', '.join(TORCH_DTYPES)}"
            )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise NMSearchError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if not self.min_run_time > 0 or self.warmup < 0:
            raise NMSearchError("min_run_time must be > 0 and warmup >= 0")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_name(device: torch.device) -> str:
    """The device's name: the CUDA device name, or the CPU's model and torch thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {torch.get_num_threads()} threads"


def default_fallback(device: torch.device) -> str:
    """The shipped roofline profile of ``device``.

    Raises:
        NMSearchError: a CUDA device no shipped profile describes.
    """
    if device.type != "cuda":
        return CPU_PROFILE
    name = torch.cuda.get_device_name(device)
    for key, profile in CUDA_PROFILES:
        if key.lower() in name.lower():
            return profile
    raise NMSearchError(f"no shipped profile describes {name}; pass --fallback <profile of conf/hardware>")


def batch_of(example: Tensor, batch_size: int) -> Tensor:
    """``batch_size`` inputs cycled from the example inputs."""
    return example[torch.arange(batch_size) % example.shape[0]]


def _semi_structured(module: nn.Module, option: Option, dtype: str, device: torch.device) -> bool:
    """Convert a finalized Linear's weight to the 2:4 semi-structured format when the device runs it
    (CUDA sm80+, fp16/bf16, a pattern that runs as 2:4); True if converted."""
    from evaluators.hardware import runs_on

    if not (
        device.type == "cuda"
        and type(module) is nn.Linear
        and dtype in ("fp16", "bf16")
        and option.weight is not None
        and runs_on(option.weight, SEMI_STRUCTURED)
        and torch.cuda.get_device_capability(device) >= (8, 0)
    ):
        return False
    try:
        sparse = torch.sparse.to_sparse_semi_structured(module.weight.detach())
    except (RuntimeError, ValueError) as error:  # shapes the kernels do not take stay dense
        warnings.warn(f"2:4 semi-structured refused ({str(error).splitlines()[0]}); timing it dense", stacklevel=2)
        return False
    module.weight = nn.Parameter(sparse, requires_grad=False)
    return True


def deploy(model: nn.Module, scheme: Scheme, *, dtype: str = "fp32") -> tuple[nn.Module, dict[str, str]]:
    """``model`` as nmsearch deploys ``scheme`` on the model's device, and the kernel each layer runs.

    Args:
        model: the dense model (left untouched), on its device and dtype.
        scheme: the per-layer options.
        dtype: the dtype name (decides whether 2:4 semi-structured kernels apply on CUDA).

    Returns:
        The deployed copy (eval mode) and ``{layer: kernel}``.
    """
    deployed = scheme.finalize(scheme.apply(model))
    if scheme.has_rows:
        deployed = skip_masked_rows(deployed, inplace=True)
    device = next(model.parameters()).device
    modules = prunable_modules(deployed)
    kernels = {}
    for name, option in scheme:
        module = modules.get(name, deployed.get_submodule(name))
        if isinstance(module, RowSkippingConv2d):
            kernels[name] = "row-skipping conv"
        elif isinstance(module, SparseLayerMixin):
            kernels[name] = "activation mask + dense GEMM"
        elif _semi_structured(module, option, dtype, device):
            kernels[name] = "2:4 semi-structured"
        elif option.weight is not None:
            kernels[name] = "finalized weights, dense GEMM"
        else:
            kernels[name] = "dense"
    return deployed.eval(), kernels


def time_call(fn: Callable[[], object], settings: ProfileSettings) -> tuple[float, float, float, int]:
    """(median s, IQR s, fastest block s, timed blocks) of one call of ``fn``.

    After ``settings.warmup`` untimed calls, blocks of about :data:`BLOCK_S` seconds (at least one
    call each) are timed with ``torch.utils.benchmark.Timer`` (which synchronises CUDA), or with
    the thread's CPU time for ``clock="cpu"`` (one torch thread: the kernels run on it), until
    ``settings.min_run_time`` has passed and at least :data:`MIN_BLOCKS` blocks are in. Short
    blocks: on a shared machine a preempted block is an outlier the median and minimum discard,
    not a bias spread over every block.
    """
    cpu_clock = _check_clock(settings)
    with torch.no_grad():
        for _ in range(settings.warmup):
            fn()
        if cpu_clock:
            block = _cpu_block(fn)
        else:
            timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            block = lambda number: timer.timeit(number).mean  # noqa: E731
        number = max(1, int(BLOCK_S / max(block(1), 1e-7)))
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < MIN_BLOCKS or time.perf_counter() - start < settings.min_run_time:
            times.append(block(number))
    return _statistics(times)


def _cpu_block(fn: Callable[[], object]) -> Callable[[int], float]:
    """Thread CPU seconds per call of ``fn`` over ``number`` calls."""

    def block(number: int) -> float:
        start = time.thread_time()
        for _ in range(number):
            fn()
        return (time.thread_time() - start) / number

    return block


class _LayerTimer:
    """Times named modules inside whole forward passes: a clock read in a pre-hook and in a hook
    around each (CUDA synchronised), so every layer runs with the caches and inputs it has in the
    deployed network, not warm on a repeated input of its own."""

    def __init__(self, modules: dict[str, nn.Module], clock: Callable[[], float], cuda: bool) -> None:
        self.samples: dict[str, list[float]] = {name: [] for name in modules}
        self._clock, self._cuda = clock, cuda
        self._started: dict[str, float] = {}
        self._handles = [
            handle
            for name, module in modules.items()
            for handle in (
                module.register_forward_pre_hook(lambda _m, _a, name=name: self._start(name)),
                module.register_forward_hook(lambda _m, _a, _o, name=name: self._stop(name)),
            )
        ]

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return self._clock()

    def _start(self, name: str) -> None:
        self._started[name] = self._now()

    def _stop(self, name: str) -> None:
        self.samples[name].append(self._now() - self._started.pop(name))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def time_layers_in_network(
    model: nn.Module, x: Tensor, names: Sequence[str], settings: ProfileSettings
) -> dict[str, tuple[float, float, float, int]]:
    """(median s, IQR s, fastest call s, timed calls) of each named layer inside whole forward passes.

    After ``settings.warmup`` untimed passes, ``model(x)`` runs until ``settings.min_run_time`` has
    passed and at least :data:`MIN_BLOCKS` passes are in; each layer is timed in every pass, between
    a forward pre-hook and a forward hook (wall clock, or the thread's CPU time for
    ``clock="cpu"``; CUDA synchronised at both ends), less what the hooks measure around a module
    that does nothing (their own cost).

    Args:
        model: the deployed model, on the settings' device and dtype.
        x: its input batch.
        names: the layers to time (module names of ``model``).
        settings: timing settings.

    Returns:
        ``{name: (median, IQR, fastest, passes)}``.
    """
    cpu_clock = _check_clock(settings)
    clock, cuda = (time.thread_time if cpu_clock else time.perf_counter), settings.torch_device.type == "cuda"
    overhead = _hook_overhead(clock, cuda)
    modules = dict(model.named_modules())
    timer = _LayerTimer({name: modules[name] for name in names}, clock, cuda)
    try:
        with torch.no_grad():
            for _ in range(settings.warmup):
                model(x)
            for samples in timer.samples.values():
                samples.clear()
            start = time.perf_counter()
            passes = 0
            while passes < MIN_BLOCKS or time.perf_counter() - start < settings.min_run_time:
                model(x)
                passes += 1
    finally:
        timer.remove()
    return {name: _statistics([max(t - overhead, _TINY_S) for t in samples]) for name, samples in timer.samples.items()}


def _hook_overhead(clock: Callable[[], float], cuda: bool, calls: int = 200) -> float:
    """Median time the hooks measure around a module that does nothing (``nn.Identity``): the
    hooked call's own cost, taken off every layer's samples so small layers are not inflated."""
    probe = nn.Identity()
    timer = _LayerTimer({"probe": probe}, clock, cuda)
    x = torch.zeros(())
    try:
        for _ in range(calls):
            probe(x)
    finally:
        timer.remove()
    return float(np.median(timer.samples["probe"]))


def _statistics(times: Sequence[float]) -> tuple[float, float, float, int]:
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return float(median), float(q3 - q1), min(times), len(times)


def _check_clock(settings: ProfileSettings) -> bool:
    """Whether the thread's CPU time is the clock (which needs one torch thread: the kernels run on it)."""
    if settings.clock != "cpu":
        return False
    if torch.get_num_threads() != 1:
        raise NMSearchError("clock 'cpu' needs one torch thread (torch.set_num_threads(1) / --threads 1)")
    return True


def _header(model: nn.Module, space: SearchSpace, settings: ProfileSettings, fallback: str, label: str) -> dict:
    device = settings.torch_device
    entries = sum(len(space.options[name]) for name in space.layer_names) + 1
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "dtype": settings.dtype,
        "batch_size": settings.batch_size,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "fingerprint": space.fingerprint,
        "model": label or type(model).__name__,
        "fallback": fallback,
        "min_run_time_s": settings.min_run_time,
        "clock": settings.clock,
        "entries": entries,
        "complete": False,
    }


def _resume(path: Path, header: dict) -> pd.DataFrame:
    """The rows of an earlier run of the same profile at ``path`` (none if there is no file)."""
    if not path.exists():
        return pd.DataFrame(columns=list(TABLE_COLUMNS))
    old = LatencyTable.read(path)
    old.check(fingerprint=header["fingerprint"], dtype=header["dtype"], batch_size=header["batch_size"])
    for key in ("device", "torch", "clock"):
        had = old.header.get(key, "wall")  # tables before the clock key were wall-clock
        if had != header[key]:
            raise MeasuredTableError(
                f"latency table {path} was measured with {key} {had!r}, this run has {header[key]!r}; "
                "choose another --out to start a new table"
            )
    return old.rows


def profile_model(
    model: nn.Module,
    example_inputs: Tensor,
    space: SearchSpace,
    path: str | os.PathLike,
    settings: ProfileSettings | None = None,
    *,
    label: str = "",
    log: Callable[[str], None] | None = None,
) -> LatencyTable:
    """Time every (layer, option) of ``space`` and the rest of the network; resume an earlier table.

    Args:
        model: the dense model of ``space`` (copied to the settings' device and dtype).
        example_inputs: inputs (any batch; cycled to ``settings.batch_size``).
        space: the search space whose options are timed.
        path: the table file; rows already there (same model, device, torch, dtype, batch) are kept.
        settings: batch, dtype, timing (default :class:`ProfileSettings`).
        label: the model's name in the header.
        log: called with a line per timed entry (default: silent).

    Returns:
        The complete table (also written to ``path``).

    Raises:
        NMSearchError: a fallback profile without the dtype, a table at ``path`` for another model,
            device, torch, dtype or batch, or a corrupt one.
    """
    settings = settings or ProfileSettings()
    device = settings.torch_device
    fallback = settings.fallback or default_fallback(device)
    load_profile(fallback).dtype(settings.dtype)  # before any timing: the search must be able to fall back
    header = _header(model, space, settings, fallback, label)
    path = Path(path)
    rows = _resume(path, header)
    done = set(zip(rows["layer"], rows["option"], strict=True))
    records = rows.to_dict("records")
    if settings.dtype == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dense = copy.deepcopy(model).to(device=device, dtype=TORCH_DTYPES[settings.dtype]).eval()
    x = batch_of(example_inputs, settings.batch_size).to(device=device, dtype=TORCH_DTYPES[settings.dtype])

    def save() -> None:
        LatencyTable(header, pd.DataFrame(records, columns=list(TABLE_COLUMNS))).write(path)

    def record(layer: str, option: str, kernel: str, timing: tuple[float, float, float, int]) -> None:
        median, iqr, fastest, runs = timing
        records.append(
            {"layer": layer, "option": option, "median_ms": median * 1e3, "iqr_ms": iqr * 1e3}
            | {"min_ms": fastest * 1e3, "runs": runs, "kernel": kernel}
        )
        save()
        if log:
            timing_text = f"{median * 1e3:9.4f} ms  IQR {iqr * 1e3:.4f}  min {fastest * 1e3:.4f}"
            log(f"{layer:<24} {option:<12} {timing_text}  {kernel}")

    # One deployment per option (every layer offering it), its layers timed inside whole passes.
    options = list(dict.fromkeys([DENSE, *(o for name in space.layer_names for o in space.options[name])]))
    for option in options:
        names = [n for n in space.layer_names if option in space.options[n] and (n, option.name) not in done]
        rest_missing = option == DENSE and (REST, DENSE.name) not in done
        if not names and not rest_missing:
            continue
        scheme = space.dense() if rest_missing else space.scheme({n: option for n in names})
        deployed, kernels = deploy(dense, scheme, dtype=settings.dtype)
        timed = list(space.layer_names) if rest_missing else names
        timings = time_layers_in_network(deployed, x, timed, settings)
        if rest_missing:
            # <rest>: whole passes without the hooks, less the layers' time inside passes
            median, iqr, fastest, runs = time_call(lambda model=deployed: model(x), settings)
            layers_median = sum(timings[n][0] for n in timed)
            layers_fastest = sum(timings[n][2] for n in timed)
            rest_median = max(median - layers_median, _TINY_S)  # hooks' overhead can exceed a tiny rest
            rest = (rest_median, iqr, min(max(fastest - layers_fastest, _TINY_S), rest_median), runs)
            record(REST, DENSE.name, "non-searchable layers", rest)
        for name in names:
            record(name, option.name, kernels[name], timings[name])
    header["complete"] = True
    header["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    save()
    return LatencyTable.read(path)


def measure_scheme(
    model: nn.Module, scheme: Scheme, example_inputs: Tensor, settings: ProfileSettings
) -> tuple[float, float, float]:
    """End-to-end (median ms, IQR ms, fastest block ms) of ``model`` deployed with ``scheme``.

    Args:
        model: the dense model.
        scheme: the scheme to deploy.
        example_inputs: inputs (cycled to the settings' batch).
        settings: device, dtype, batch and timing.

    Returns:
        Median, IQR and fastest block in milliseconds.
    """
    device, dtype = settings.torch_device, TORCH_DTYPES[settings.dtype]
    dense = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    x = batch_of(example_inputs, settings.batch_size).to(device=device, dtype=dtype)
    deployed, _ = deploy(dense, scheme, dtype=settings.dtype)
    median, iqr, fastest, _ = time_call(lambda: deployed(x), settings)
    return median * 1e3, iqr * 1e3, fastest * 1e3


def additivity_schemes(space: SearchSpace, random: int = 3, seed: int = 0) -> dict[str, Scheme]:
    """Dense, the non-dense option offered on the most layers everywhere it is, and ``random`` random schemes."""
    counts: dict[Option, int] = {}
    for name in space.layer_names:
        for option in space.options[name]:
            if option != DENSE:
                counts[option] = counts.get(option, 0) + 1
    schemes = {"dense": space.dense()}
    if counts:
        option = max(counts, key=counts.__getitem__)
        schemes[f"uniform {option.name}"] = space.scheme(
            {n: option for n in space.layer_names if option in space.options[n]}
        )
    for index in range(random):
        schemes[f"random {seed + index}"] = space.random(seed + index)
    return schemes


def additivity(
    table: LatencyTable,
    model: nn.Module,
    example_inputs: Tensor,
    schemes: dict[str, Scheme],
    settings: ProfileSettings,
) -> pd.DataFrame:
    """The table's prediction of whole schemes (``<rest>`` + the layers) against their end-to-end time.

    Args:
        table: the measured table (with its ``<rest>`` row).
        model: the dense model it was measured on.
        example_inputs: inputs (cycled to the settings' batch).
        schemes: ``{label: scheme}`` (e.g. :func:`additivity_schemes`).
        settings: the table's device, dtype, batch and timing.

    Returns:
        ``scheme, predicted_ms, measured_ms, iqr_ms, error`` (``predicted / measured - 1``), both
        sides the table's :attr:`~evaluators.measured.LatencyTable.statistic`; a warning is issued
        for every ``|error|`` above :data:`ADDITIVITY_WARNING`.
    """
    rows = []
    for label, scheme in schemes.items():
        median, iqr, fastest = measure_scheme(model, scheme, example_inputs, settings)
        measured = fastest if table.statistic == "min" else median
        predicted = table.predict(scheme)
        rows.append(
            {"scheme": label, "predicted_ms": predicted, "measured_ms": measured, "iqr_ms": iqr}
            | {"error": predicted / measured - 1}
        )
        if abs(predicted / measured - 1) > ADDITIVITY_WARNING:
            warnings.warn(
                f"additivity: {label}: the table predicts {predicted:.3f} ms, measured end to end "
                f"{measured:.3f} ms ({predicted / measured - 1:+.0%}); layer latencies do not add up here",
                stacklevel=2,
            )
    return pd.DataFrame(rows)


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="nmsearch profile",
        description="Measure every (layer, option) latency of a task's search space on this device.",
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides of the search: task=..., space=..., evaluator.dtype=..."
    )
    parser.add_argument("--out", required=True, type=Path, help="the table file (resumed if it exists)")
    parser.add_argument("--fallback", help="roofline profile for entries the table lacks (default: this device's)")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="timed seconds per entry (default 0.2)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before each entry (default 3)")
    parser.add_argument(
        "--clock", choices=CLOCKS, default="wall", help="wall (default) or cpu: thread CPU time, for a shared CPU"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--random", type=int, default=3, help="random schemes in the additivity check (default 3)")
    parser.add_argument(
        "--statistic", choices=("median", "min"), default="median", help="the additivity check's statistic"
    )
    parser.add_argument("--no-additivity", action="store_true", help="skip the end-to-end additivity check")
    return parser


def _compose(overrides: list[str]):  # noqa: ANN202 -- a DictConfig
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from experiments.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    from nmsearch import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    """``nmsearch profile``: measure the table, then the additivity check.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on bad input (one line on stderr), 130 on Ctrl-C (rerun to resume).
    """
    args = _parser().parse_args(argv)
    return run_cli("nmsearch profile", lambda: _profile(args), on_interrupt="run the same command again to resume")


def _profile(args: argparse.Namespace) -> None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from experiments.search import build_space, config_error_line

    if args.threads < 1:
        raise NMSearchError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    try:
        cfg = _compose(list(args.overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise NMSearchError(config_error_line(error)) from None
    settings = ProfileSettings(
        batch_size=cfg.evaluator.batch_size,
        dtype=cfg.evaluator.dtype,
        fallback=args.fallback,
        min_run_time=args.min_run_time,
        warmup=args.warmup,
        device=cfg.device,
        clock=args.clock,
    )
    load_profile(settings.fallback or default_fallback(settings.torch_device)).dtype(settings.dtype)
    trainer, space = build_space(cfg)
    model, example = trainer.fresh_model(), trainer.task.example_inputs()
    label = str(cfg.task.get("_target_", "task")).rsplit(".", 1)[-1]
    print(f"profiling {space} on {device_name(settings.torch_device)}; {settings.dtype}, batch {settings.batch_size}")
    print(f"load average {os.getloadavg()}; writing {args.out} (rerun the same command to resume)")
    table = dataclasses.replace(
        profile_model(model, example, space, args.out, settings, label=label, log=print), statistic=args.statistic
    )
    print(f"{len(table.rows)} entries in {args.out}")
    if not args.no_additivity:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            frame = additivity(table, model, example, additivity_schemes(space, args.random), settings)
        print("additivity (table prediction = <rest> + layers, against the whole scheme timed end to end):")
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        for warning in caught:
            print(f"warning: {warning.message}", file=sys.stderr)
        header = dict(table.header) | {"additivity": frame.round(6).to_dict("records")}
        LatencyTable(header, table.rows).write(args.out)


if __name__ == "__main__":
    sys.exit(main())
