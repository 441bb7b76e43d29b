"""Data-parallel training across the processes of ``torchrun`` (or SLURM's ``srun``).

``torchrun --nproc-per-node N -m experiments.search strategy=gumbel ...`` starts N processes;
:func:`init_from_env` joins them into one process group (NCCL on GPUs, gloo on CPUs) and pins
each to its GPU (``LOCAL_RANK``). Training code then stays the same:
:func:`~evaluators.training.train_one_epoch` gives each rank its share of every global batch
(:func:`shard`) and averages the gradients of every parameter its optimizer holds
(:func:`average_gradients`: model weights and a supernet's architecture logits alike), so N ranks
take the same steps as one process on the same global batch. Only rank 0 writes files
(:func:`is_main`).

Named variant of PyTorch's ``DistributedSampler`` + ``set_epoch``: our tasks yield batches, not
datasets, so each *global batch* is split across ranks (contiguous slices); the shuffled order
comes from the same per-epoch seed on every rank, which is what ``set_epoch`` provides. The
global batch, and so the result, equals the single-process run.

BatchNorm: each rank normalises over its own slice (statistics are not synchronised), so a
model with BatchNorm trains slightly differently from one process; ``SyncBatchNorm`` needs
CUDA/NCCL (convert with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` on GPUs). Running
statistics are averaged across ranks after each epoch (:func:`average_buffers`), so every rank
evaluates the same model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from search_space import NMSearchError

__all__ = [
    "average_buffers",
    "average_gradients",
    "barrier",
    "check_same_config",
    "init_from_env",
    "is_distributed",
    "is_main",
    "rank",
    "shard",
    "shutdown",
    "sum_across",
    "world_size",
]


def is_distributed() -> bool:
    """Whether this process is one rank of a process group of more than one."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and without a process group): the one process that writes files."""
    return rank() == 0


def init_from_env(device: str | None = None) -> str | None:
    """Join the process group ``torchrun`` / ``srun`` describe in the environment.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` (or SLURM's ``SLURM_NTASKS``, ``SLURM_PROCID``,
    ``SLURM_LOCALID``; ``MASTER_ADDR`` / ``MASTER_PORT`` must then be set). Does nothing for a
    single process.

    Args:
        device: the configured device (``None``: CUDA when available); decides the backend.

    Returns:
        The device this rank uses (``cuda:LOCAL_RANK`` on GPUs), or ``device`` unchanged when not
        distributed.

    Raises:
        NMSearchError: a GPU device asked for but fewer GPUs than local ranks.
    """
    environ = os.environ
    if "WORLD_SIZE" not in environ and "SLURM_NTASKS" in environ and "MASTER_ADDR" in environ:
        environ["WORLD_SIZE"], environ["RANK"] = environ["SLURM_NTASKS"], environ["SLURM_PROCID"]
        environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    if int(environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return device
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if gpu:
        if local_rank >= torch.cuda.device_count():
            raise NMSearchError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                "use --nproc-per-node <= GPUs, or device=cpu"
            )
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if gpu else "gloo")
    return device if gpu else (device or "cpu")


def check_same_config(config: Any, what: str = "config") -> None:
    """Refuse to go on when the ranks were started with different configurations.

    Args:
        config: anything JSON-serialisable (``str`` for the rest) that must agree.
        what: how the message names it.

    Raises:
        NMSearchError: on every rank, naming the ranks that differ from rank 0.
    """
    if not is_distributed():
        return
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
    digests: list[str | None] = [None] * world_size()
    dist.all_gather_object(digests, digest)
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise NMSearchError(
            f"torchrun ranks disagree on the {what}: rank(s) {', '.join(map(str, differing))} differ from rank 0 "
            f"({', '.join(f'{r}:{d}' for r, d in enumerate(digests))}); start every rank with the same arguments"
        )


def shard(batches: Iterable[tuple[Any, Tensor]]) -> Iterator[tuple[Any, Tensor, int]]:
    """This rank's slice of every global batch, with the global batch size.

    Args:
        batches: the same global batches, in the same order, on every rank.

    Returns:
        ``(inputs, targets, global_batch_size)`` per batch; all of the batch without a group.
    """
    world, me = world_size(), rank()
    for inputs, targets in batches:
        total = len(targets)
        if world == 1:
            yield inputs, targets, total
            continue
        bounds = [total * r // world for r in range(world + 1)]
        yield _rows(inputs, bounds[me], bounds[me + 1]), targets[bounds[me] : bounds[me + 1]], total


def _rows(inputs: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a batch of inputs: a tensor, or every tensor of a tuple or dict of them."""
    if isinstance(inputs, Mapping):
        return {key: _rows(value, start, stop) for key, value in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(_rows(value, start, stop) for value in inputs)
    return inputs[start:stop] if isinstance(inputs, Tensor) else inputs


def average_gradients(optimizer: torch.optim.Optimizer, local: int, total: int) -> None:
    """Turn each rank's gradient of its mean loss over ``local`` samples into the gradient of the
    mean loss over the ``total`` samples of the global batch (``sum_r g_r local_r / total``).
    Terms that do not depend on the batch (a regulariser) come out unchanged."""
    if not is_distributed():
        return
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]) * (local / total)
    dist.all_reduce(flat)  # one collective for all parameters
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_across(*values: float, device: torch.device | str = "cpu") -> list[float]:
    """The sum over ranks of each value (the values themselves without a group)."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def average_buffers(model: nn.Module) -> None:
    """Average BatchNorm running statistics over the ranks (other buffers, such as masks, are
    equal on every rank and stay untouched)."""
    if not is_distributed():
        return
    for norm in model.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.track_running_stats:
            for buffer in (norm.running_mean, norm.running_var):
                dist.all_reduce(buffer)
                buffer /= world_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (at the end of a torchrun job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
