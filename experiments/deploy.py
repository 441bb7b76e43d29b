"""Bake a scheme into a model and write it in a format a serving stack reads.

    nmsearch deploy RUN_DIR|scheme.json [--model TASK|module:callable] [--checkpoint FILE]
                    --format safetensors|onnx|torch --out PATH [--hardware NAME] [--dtype fp16]

* ``safetensors``: the finalized weights (pruned entries are zeros) with the scheme JSON in the
  file's metadata (key ``nmsearch.scheme``); :func:`load_safetensors` reads both back.
* ``onnx``: the finalized model exported with ``torch.onnx`` (batch dimension dynamic), run with
  onnxruntime on CPU and compared with PyTorch's outputs, and every weight N:M pattern checked in
  the exported initializers along K (the input channels), as TensorRT's ``--sparsity=enable``
  wants them. Activation N:M is exported as explicit ops (TopK, ScatterElements, Mul) and row
  masks as a constant Mul after the conv.
* ``torch``: checked by converting the model's 2:4-compatible Linear weights to
  ``torch.sparse.to_sparse_semi_structured`` tensors (fp16, CUDA compute capability >= 8.0; not
  those the cost model runs dense at the deployment batch, unless ``--convert-all``) and comparing
  outputs; the file holds the finalized weights, the scheme JSON and the layers left dense as plain
  tensors and strings, which ``torch.load(..., weights_only=True)`` reads without running code
  (:func:`load_torch`; :func:`to_semi_structured` converts again after loading).

The model: with a run directory (or a ``scheme.json`` written by a search, which records the run
config) and no ``--model``, the run's task rebuilds the very model the search scored (pre-trained
weights from the cache, then the run's fidelity: BatchNorm re-estimation, fine-tuning or full
training). ``--model`` names a task (a file of ``conf/task``, e.g. ``digits``: its pre-trained
weights) or ``module:callable`` returning an ``nn.Module``; ``--checkpoint`` loads a state dict
(``.pt`` or ``.safetensors``) into it first.

Every deploy prints a per-layer report: the format each layer runs in and whether the hardware
profile's sparse tensor cores accelerate it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import logging
import os
import pickle
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from evaluators import AccuracyEvaluator, HardwareCostModel, HardwareProfile, Trainer, load_profile
from evaluators.cost import PLANS
from evaluators.hardware import runs_on
from evaluators.task import Task
from experiments.config import EvaluatorConfig, SearchConfig
from experiments.search import build_space
from experiments.tasks import instantiate_task
from nmsearch import config_dir
from search_space import (
    DENSE,
    NMPattern,
    NMSearchError,
    RowPattern,
    Scheme,
    SearchSpace,
    SparseLayerMixin,
    atomic_write,
    prunable_modules,
    set_submodule,
    weight_column_norms,
)

FORMATS = ("safetensors", "onnx", "torch")
SUFFIXES = {"safetensors": ".safetensors", "onnx": ".onnx", "torch": ".pt"}
METADATA_KEY = "nmsearch.scheme"
KEEP_DENSE_KEY = "nmsearch.keep_dense"  # torch files: layers deploy left dense, with the reason
SEMI_STRUCTURED = NMPattern(2, 4)  # the one sparse format torch and TensorRT run (fp16/bf16/int8)
CHECK_BATCH = 64  # inputs the ONNX round trip is checked on
ACTIVATION_NOTES = {  # where a layer's activation N:M mask is computed, per format
    "safetensors": "activation mask not in the weights: the scheme (metadata) says where to apply it",
    "onnx": "activation mask computed in the graph, dense GEMM",
    "torch": "activation mask computed by the nmsearch wrapper, dense GEMM",
}


class DeployError(NMSearchError):
    """A deploy that cannot be done as asked (bad input, unsupported model or format)."""


class MissingDependencyError(DeployError):
    """An optional package a format needs is not installed."""


def require(module: str, what: str) -> ModuleType:
    """Import an optional dependency of the ``deploy`` extra.

    Args:
        module: the module to import, e.g. ``"onnxruntime"``.
        what: what needs it, for the message (e.g. ``"--format onnx"``).

    Returns:
        The module.

    Raises:
        MissingDependencyError: it is not installed (the message says what to pip install).
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.partition(".")[0]  # safetensors.torch -> safetensors
        raise MissingDependencyError(f"{what} needs the package {package!r}: pip install 'nmsearch[deploy]'") from None


# -- the model ---------------------------------------------------------------------------------
@dataclass
class Deployable:
    """A model with a scheme baked in (weight masks are zeros in the weights) and inputs to check it on."""

    model: nn.Module
    scheme: Scheme
    inputs: Tensor
    source: str
    accuracy: float | None = None  # of ``model`` on the run's split, when a task is known
    space: SearchSpace | None = None  # the dense model's layers, for the cost model's per-layer verdict


def load_scheme(source: str | os.PathLike) -> tuple[Scheme, dict[str, Any] | None]:
    """The scheme of a run directory (its ``scheme.json``) or a scheme file, and the run config if recorded.

    Args:
        source: a run directory of ``nmsearch search`` or a scheme JSON file.

    Returns:
        The scheme and the run's resolved config (``config.yaml`` of the run directory, or the
        ``provenance.config`` a search writes into ``scheme.json``), or ``None``.

    Raises:
        DeployError: ``source`` is neither; SchemeError: the scheme file is invalid.
    """
    path = Path(source)
    if path.is_dir():
        if not (path / "scheme.json").is_file():
            raise DeployError(f"'{path}' has no scheme.json; pass a run directory of nmsearch search or a scheme file")
        scheme = Scheme.load(path / "scheme.json")
        config_path = path / "config.yaml"
        config = OmegaConf.to_container(OmegaConf.load(config_path)) if config_path.is_file() else None
        return scheme, config or scheme.provenance.get("config")
    if not path.is_file():
        raise DeployError(f"'{path}' does not exist; pass a run directory or a scheme JSON file")
    scheme = Scheme.load(path)
    config = scheme.provenance.get("config")
    return scheme, dict(config) if isinstance(config, dict) else None


def _task_config_path(name: str) -> Path:
    path = config_dir() / "task" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (config_dir() / "task").glob("*.yaml"))
        raise DeployError(f"--model {name!r} is neither a task ({', '.join(known)}) nor module:callable")
    return path


def _load_checkpoint(model: nn.Module, checkpoint: Path) -> None:
    if not checkpoint.is_file():
        raise DeployError(f"checkpoint '{checkpoint}' does not exist")
    try:
        if checkpoint.suffix == ".safetensors":
            state = require("safetensors.torch", "a .safetensors checkpoint").load_file(str(checkpoint))
        else:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except MissingDependencyError:
        raise
    except Exception as error:  # any unreadable file is one line for the user
        raise DeployError(f"checkpoint '{checkpoint}' cannot be read: {str(error).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DeployError(f"checkpoint '{checkpoint}' is not a state dict (a mapping of names to tensors)")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        detail = " ".join(str(error).split("\n\t")[1:2]).strip() or str(error).splitlines()[0]
        raise DeployError(f"checkpoint '{checkpoint}' does not fit the model: {detail}") from None


def load_model(
    model: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[nn.Module, Tensor, Task | None]:
    """A dense model named on the command line, with inputs to check exports on.

    Args:
        model: a task name (a file of ``conf/task``, e.g. ``"digits"``) or ``"module:callable"``
            (called without arguments, it returns an ``nn.Module``).
        checkpoint: a state dict (``.pt`` / ``.safetensors``) loaded into the model. Without it, a
            task's model gets its pre-trained weights (trained once and cached, see
            :class:`~evaluators.Trainer`); a callable's model keeps the weights it was built with.
        input_shape: the input shape for ``module:callable`` models (a task knows its inputs).
        seed: the task's pre-training seed.
        cache_dir: where pre-trained weights are cached (default ``$NMSEARCH_CACHE_DIR``).

    Returns:
        The model (eval mode, CPU), a batch of inputs for it and the task (``None`` for a callable).

    Raises:
        DeployError: the name, the callable, the checkpoint or the input shape is unusable.
    """
    task: Task | None = None
    if ":" in model:
        module_name, _, attr = model.partition(":")
        try:
            factory: Callable[[], Any] = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise DeployError(f"--model {model!r}: {str(error).splitlines()[0]}") from None
        try:
            built = factory()
        except Exception as error:  # the user's factory: its failure is one line here
            raise DeployError(
                f"--model {model!r} raised {type(error).__name__}: {str(error).splitlines()[0]}"
            ) from None
        if not isinstance(built, nn.Module):
            raise DeployError(f"--model {model!r} returned a {type(built).__name__}, not a torch.nn.Module")
        if not input_shape:
            raise DeployError(f"--model {model!r} needs --input-shape (e.g. 1,3,32,32) to check the export")
        inputs = torch.randn(CHECK_BATCH, *input_shape[1:], generator=torch.Generator().manual_seed(seed))
    else:
        task = instantiate_task(OmegaConf.load(_task_config_path(model)))
        trainer = Trainer(task, seed=seed, device="cpu", cache_dir=cache_dir, progress=False)
        built = trainer.fresh_model() if checkpoint is not None else trainer.pretrained()
        inputs = _task_inputs(task)
    if checkpoint is not None:
        _load_checkpoint(built, Path(checkpoint))
    return built.cpu().eval(), inputs, task


def _task_inputs(task: Task) -> Tensor:
    inputs, _ = next(iter(task.loader("val")))
    return inputs[:CHECK_BATCH]


def bake(model: nn.Module, scheme: Scheme) -> nn.Module:
    """``scheme`` applied to a copy of ``model`` (magnitude masks) and finalized, then verified.

    Args:
        model: the dense model (left untouched).
        scheme: the per-layer choices.

    Returns:
        The sparse copy in eval mode: weight masks baked in as zeros; layers with activation
        sparsity keep a masking wrapper.

    Raises:
        SchemeMismatchError: the scheme was made for another model.
    """
    sparse = scheme.finalize(scheme.apply(model))
    scheme.verify(sparse)
    return sparse.eval()


def searched_model(config: dict[str, Any], scheme: Scheme) -> Deployable:
    """The model a search scored for ``scheme``, rebuilt from the run's resolved config.

    The run's task and seed give the pre-trained weights (cached by the search); the run's
    fidelity then re-estimates BatchNorm, fine-tunes or trains as the search did. Weight masks
    are baked in and the model is evaluated on the run's split.

    Args:
        config: The run's resolved config (its ``config.yaml``).
        scheme: The scheme to rebuild the model for.

    Returns:
        The finalized model (on the CPU) with the task's example inputs and its accuracy on
        the run's split.

    Raises:
        DeployError: the config lacks what is needed.
        SchemeMismatchError: the scheme is not of this run's model.
    """
    evaluator = dict(config.get("evaluator") or {})
    evaluator.setdefault("recipe", config.get("recipe") or {})  # runs from before evaluator.recipe
    schema = OmegaConf.structured(SearchConfig)
    OmegaConf.set_readonly(schema.evaluator, False)  # frozen AccuracyConfig: merged into, as register_configs does
    try:
        cfg = OmegaConf.merge(schema, {**{k: v for k, v in config.items() if k != "strategy"}, "evaluator": evaluator})
        evaluator_cfg: EvaluatorConfig = OmegaConf.to_object(cfg.evaluator)
    except Exception as error:  # an edited or foreign config.yaml
        raise DeployError(f"the run config cannot be read: {str(error).splitlines()[0]}") from None
    trainer, space = build_space(cfg)
    accuracy = AccuracyEvaluator(trainer, space, evaluator_cfg.accuracy)
    model = scheme.finalize(accuracy.sparse_model(scheme)).eval()
    scheme.verify(model)
    result = trainer.evaluate(model, evaluator_cfg.split)
    return Deployable(
        model.cpu(),
        scheme,
        _task_inputs(trainer.task),
        f"task {trainer.task.name} ({evaluator_cfg.fidelity})",
        result.accuracy,
        space,
    )


# -- export modules ----------------------------------------------------------------------------
def _input_nm(x: Tensor, n: int, m: int, dim: int, scale: Tensor | None) -> Tensor:
    """``x`` with all but the ``n`` largest of every ``m`` entries along ``dim`` zeroed, in ops ONNX has
    (TopK keeps the lower index among equal scores, as :func:`search_space.nm_mask` does)."""
    dim = dim % x.dim()
    scores = x.abs()
    if scale is not None:
        shape = [1] * x.dim()
        shape[dim] = -1
        scores = scores * scale.view(shape)
    groups = scores.unflatten(dim, (-1, m))
    index = groups.topk(n, dim=dim + 1).indices
    keep = torch.zeros_like(groups).scatter(dim + 1, index, 1.0)
    return x * keep.flatten(dim, dim + 1)


class _ExportLayer:
    """A dense Conv2d / Linear (same parameter names) whose input is N:M-masked or output row-masked."""

    input_nm: tuple[int, int, int] | None
    input_scale: Tensor | None
    row_keep: Tensor | None

    def forward(self, x: Tensor) -> Tensor:
        if self.input_nm is not None:
            x = _input_nm(x, *self.input_nm, self.input_scale)
        out = super().forward(x)  # type: ignore[misc]
        return out if self.row_keep is None else out * self.row_keep


class _ExportConv2d(_ExportLayer, nn.Conv2d):
    pass


class _ExportLinear(_ExportLayer, nn.Linear):
    pass


def _export_layer(layer: SparseLayerMixin, row_keep: Tensor | None) -> nn.Module:
    dense = layer.to_dense()
    base = _ExportConv2d if isinstance(dense, nn.Conv2d) else _ExportLinear
    exported = base.__new__(base)
    exported.__dict__.update({k: copy.copy(v) if isinstance(v, dict | set) else v for k, v in dense.__dict__.items()})
    pattern = layer.activation_pattern
    exported.input_nm = (pattern.n, pattern.m, layer.input_dim) if isinstance(pattern, NMPattern) else None
    scale = None
    if exported.input_nm is not None and layer.activation_score == "weight":
        scale = weight_column_norms(layer.weight, layer.groups).detach()
    exported.register_buffer("input_scale", scale, persistent=False)
    exported.register_buffer("row_keep", row_keep, persistent=False)
    return exported


def exportable(model: nn.Module, inputs: Tensor) -> nn.Module:
    """A copy of a finalized model that ``torch.export`` can trace: every layer still masking
    activations becomes a plain Conv2d / Linear subclass doing the same in traceable ops.

    Args:
        model: a finalized model (see :func:`bake`), left untouched.
        inputs: example inputs; row masks are fixed for their spatial size (one forward pass).

    Returns:
        The copy, in eval mode, with gradients off.

    Raises:
        DeployError: If a layer still masks its weights at run time (the model is not finalized).
    """
    model = copy.deepcopy(model)
    layers = {name: m for name, m in prunable_modules(model).items() if isinstance(m, SparseLayerMixin)}
    unbaked = [name for name, layer in layers.items() if layer.weight_pattern is not None]
    if unbaked:
        raise DeployError(f"layer {unbaked[0]!r} still masks its weights at run time; finalize the model (bake) first")
    row_keep: dict[str, Tensor | None] = {}

    def record(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(layer: nn.Module, args: tuple) -> None:
            mask = layer.input_mask(args[0])  # the kept output positions for this input size
            row_keep[name] = None if mask is None else mask.to(args[0].dtype)

        return hook

    rows = [
        layers[n].register_forward_pre_hook(record(n))
        for n in layers
        if isinstance(layers[n].activation_pattern, RowPattern)
    ]
    if rows:
        with torch.no_grad():
            model(inputs)
        for handle in rows:
            handle.remove()
    for name, layer in layers.items():
        set_submodule(model, name, _export_layer(layer, row_keep.get(name)))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


# -- formats -----------------------------------------------------------------------------------
def _write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``out``, renamed over it only when it returns (a path,
    not a handle as :func:`search_space.atomic_write` gives: ``torch.onnx.export`` and the check read it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _finalized_state(model: nn.Module, scheme: Scheme) -> dict[str, Tensor]:
    """The model's state dict on the CPU, every weight checked against its N:M pattern along K."""
    state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in model.state_dict().items()}
    for name, option in scheme.layers:
        if option.weight is not None:
            _check_nm(name, state[f"{name}.weight"], option.weight, "the weight")
    return state


def save_safetensors(model: nn.Module, scheme: Scheme, out: str | os.PathLike) -> None:
    """Write the model's state dict (weights with the N:M zeros) with the scheme JSON as metadata.

    Args:
        model: the finalized model (see :func:`bake`).
        scheme: its scheme, stored under the metadata key :data:`METADATA_KEY`.
        out: the ``.safetensors`` file (written atomically).

    Raises:
        DeployError: a weight breaks its N:M pattern along the input channels.
        MissingDependencyError: safetensors is not installed.
    """
    safetensors_torch = require("safetensors.torch", "--format safetensors")
    state = _finalized_state(model, scheme)
    payload = safetensors_torch.save(state, metadata={METADATA_KEY: json.dumps(scheme.to_json()), "format": "pt"})
    atomic_write(out, lambda handle: handle.write(payload))


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], Scheme]:
    """The state dict and the scheme of a file written by ``--format safetensors``.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        The tensors by name and the scheme from the metadata.

    Raises:
        DeployError: the file carries no nmsearch scheme; MissingDependencyError: no safetensors.
    """
    safetensors = require("safetensors", "reading a .safetensors file")
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (no __iter__)
    if METADATA_KEY not in metadata:
        raise DeployError(f"'{path}' has no {METADATA_KEY!r} metadata: it was not written by nmsearch deploy")
    return state, Scheme.from_json(json.loads(metadata[METADATA_KEY]), f"metadata of '{path}'")


def save_torch(
    model: nn.Module, scheme: Scheme, out: str | os.PathLike, keep_dense: Mapping[str, str] | None = None
) -> None:
    """Write the model's state dict (weights with the N:M zeros) and the scheme JSON as a torch file
    that ``torch.load(..., weights_only=True)`` reads: tensors and strings, no pickled code.

    Args:
        model: the finalized model (see :func:`bake`).
        scheme: its scheme, stored under :data:`METADATA_KEY`.
        out: the ``.pt`` file (written atomically).
        keep_dense: 2:4-eligible layers :func:`to_semi_structured` leaves dense, with the reason
            (stored under :data:`KEEP_DENSE_KEY`).

    Raises:
        DeployError: a weight breaks its N:M pattern along the input channels.
    """
    payload = {
        "state_dict": _finalized_state(model, scheme),
        METADATA_KEY: json.dumps(scheme.to_json()),
        KEEP_DENSE_KEY: json.dumps(dict(keep_dense or {})),
    }
    _write_atomically(Path(out), lambda tmp: torch.save(payload, tmp))


def load_torch(path: str | os.PathLike) -> tuple[dict[str, Tensor], Scheme, dict[str, str]]:
    """The state dict, the scheme and the layers kept dense of a file written by ``--format torch``,
    read with ``weights_only=True``.

    Args:
        path: the ``.pt`` file.

    Returns:
        The tensors by name, the scheme, and ``{layer: reason}`` of the 2:4-eligible layers deploy
        left dense. ``bake(model, scheme).load_state_dict(state)`` rebuilds the finalized model;
        ``to_semi_structured(model, scheme, keep_dense=keep_dense)`` converts as deploy did (CUDA sm80+).

    Raises:
        DeployError: the file is not a torch file of nmsearch deploy (or holds anything but tensors and strings).
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as error:
        first = str(error).splitlines()[0]
        raise DeployError(f"'{path}' cannot be read as a weights-only torch file: {first}") from None
    if not isinstance(payload, dict) or METADATA_KEY not in payload or "state_dict" not in payload:
        raise DeployError(f"'{path}' has no {METADATA_KEY!r} entry: not written by nmsearch deploy --format torch")
    scheme = Scheme.from_json(json.loads(payload[METADATA_KEY]), f"'{path}'")
    return payload["state_dict"], scheme, json.loads(payload.get(KEEP_DENSE_KEY, "{}"))


@dataclass
class OnnxCheck:
    """How the exported graph compared with PyTorch, and the N:M patterns found in it."""

    max_abs_error: float
    tolerance: float
    samples: int
    nm_layers: dict[str, str] = field(default_factory=dict)  # layer -> pattern found in its initializer
    activation_ops: list[str] = field(default_factory=list)


def _export_error(error: Exception) -> str:
    """The reason torch.onnx gives, without its multi-paragraph advice."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line.split(">: ", 1)[1] for line in lines if line.startswith("<class ") and ">: " in line]
    return (reasons[-1] if reasons else (lines[0] if lines else type(error).__name__))[:300]


def _check_nm(layer: str, weight: Tensor, pattern: NMPattern, what: str) -> int:
    """The most non-zeros in a group of M consecutive input channels (K, dim 1) of a weight; raises
    :class:`DeployError` above N."""
    found = int((weight.unflatten(1, (-1, pattern.m)) != 0).sum(2).max())
    if found > pattern.n:
        raise DeployError(
            f"layer {layer!r}: {what} has {found} non-zeros in a group of {pattern.m} input channels, "
            f"the scheme allows {pattern.n}"
        )
    return found


def save_onnx(
    model: nn.Module, scheme: Scheme, inputs: Tensor, out: str | os.PathLike, *, rtol: float = 1e-4
) -> OnnxCheck:
    """Export with ``torch.onnx``, check the file (:func:`check_onnx`), then move it to ``out``.

    Args:
        model: the finalized model (see :func:`bake`).
        scheme: its scheme.
        inputs: a batch to compare outputs on (the exported batch dimension is dynamic).
        rtol: allowed max |onnx - torch| relative to max(1, max |torch|).

    Returns:
        The check's numbers.

    Raises:
        DeployError: the model cannot be exported, or the check fails (nothing is written).
        MissingDependencyError: onnx / onnxruntime / onnxscript are not installed.
    """
    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module, "--format onnx")
    graph_model = exportable(model, inputs)
    checks: list[OnnxCheck] = []

    def write(tmp: Path) -> None:
        try:
            with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), _quiet_torch_logs():
                torch.onnx.export(
                    graph_model,
                    (inputs,),
                    str(tmp),
                    dynamo=True,
                    dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
                    external_data=False,
                    verbose=False,
                )
        except Exception as error:  # torch.export / ONNX translation: unsupported ops
            raise DeployError(f"the model cannot be exported to ONNX: {_export_error(error)}") from None
        checks.append(check_onnx(tmp, model, scheme, inputs, rtol=rtol))

    _write_atomically(Path(out), write)
    return checks[0]


def check_onnx(
    path: str | os.PathLike, model: nn.Module, scheme: Scheme, inputs: Tensor, *, rtol: float = 1e-4
) -> OnnxCheck:
    """Run an exported model with onnxruntime on CPU against ``model`` and verify each weight's N:M
    pattern in its initializer (``<layer>.weight``) along K, the input channels (dim 1).

    Args:
        path: the ONNX file.
        model: the PyTorch model it was exported from.
        scheme: the scheme the weights must satisfy.
        inputs: the batch to compare on.
        rtol: allowed max |onnx - torch| relative to max(1, max |torch|).

    Returns:
        The check's numbers.

    Raises:
        DeployError: outputs differ, an initializer is missing or breaks its pattern, or activation
            N:M did not become graph ops.
    """
    onnx = require("onnx", "--format onnx")
    onnxruntime = require("onnxruntime", "--format onnx")
    from onnx import numpy_helper

    with torch.no_grad():
        reference = model(inputs).float()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output, *_) = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
    error = float((torch.from_numpy(output).float() - reference).abs().max())
    check = OnnxCheck(error, rtol * max(1.0, float(reference.abs().max())), len(inputs))
    if not error <= check.tolerance:
        raise DeployError(
            f"onnxruntime's outputs differ from PyTorch's by {error:.3g} (allowed {check.tolerance:.3g}); "
            "the export is not faithful"
        )
    graph = onnx.load(str(path)).graph
    initializers = {init.name: init for init in graph.initializer}
    check.activation_ops = sorted({node.op_type for node in graph.node} & {"TopK", "ScatterElements"})
    modules = prunable_modules(model)
    for name, option in scheme.layers:
        if option.weight is None:
            continue
        key = f"{name}.weight"
        if key not in initializers:
            raise DeployError(f"layer {name!r}: no initializer {key!r} in the exported graph to check N:M on")
        weight = torch.from_numpy(numpy_helper.to_array(initializers[key]).copy())
        if tuple(weight.shape) != tuple(modules[name].weight.shape):
            raise DeployError(f"layer {name!r}: initializer {key!r} has shape {tuple(weight.shape)}, not the layer's")
        check.nm_layers[name] = f"{_check_nm(name, weight, option.weight, 'the exported weight')}:{option.weight.m}"
    if any(isinstance(o.activation, NMPattern) for _, o in scheme.layers) and not check.activation_ops:
        raise DeployError("activation N:M layers did not export as TopK/ScatterElements ops")
    return check


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """torch.export / torch.onnx log warnings (e.g. torchvision not installed) that concern no user."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def cuda_semi_structured_reason() -> str | None:
    """Why ``to_sparse_semi_structured`` cannot run here.

    Returns:
        The reason in a few words, or ``None`` when a CUDA GPU of compute capability >= 8.0 is visible.
    """
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"{torch.cuda.get_device_name()} has compute capability {major}.{minor} (needs >= 8.0)"
    return None


def require_semi_structured() -> None:
    """Refuse ``--format torch`` unless ``to_sparse_semi_structured`` can run here.

    Raises:
        DeployError: One line naming the reason and the formats that work here.
    """
    reason = cuda_semi_structured_reason()
    if reason:
        raise DeployError(
            f"--format torch converts 2:4 weights with to_sparse_semi_structured, which needs CUDA sm80+: {reason}; "
            "use --format onnx or safetensors here"
        )


def semi_structured_plan(
    model: nn.Module, scheme: Scheme, keep_dense: Mapping[str, str] | None = None
) -> dict[str, str | None]:
    """Per scheme layer, why its weight stays dense under ``--format torch`` (``None``: converted to 2:4).

    torch's semi-structured tensors take the weights of plain Linear layers (not Conv2d) whose N:M
    runs as 2:4 (at most 2 non-zeros in every aligned block of 4), in fp16, with both weight
    dimensions multiples of 64 (CUTLASS' minimum tile; cuSPARSELt's 16 is laxer).

    Args:
        model: The finalized model (see :func:`bake`).
        scheme: Its scheme.
        keep_dense: Eligible layers to leave dense anyway, with the reason (deploy: where the cost
            model predicts the dense kernel faster).

    Returns:
        ``{layer: reason it stays dense, or None when it is converted}`` for every scheme layer.
    """
    keep_dense = keep_dense or {}
    modules = prunable_modules(model)
    plan: dict[str, str | None] = {}
    for name, option in scheme.layers:
        module = modules[name]
        if option.weight is None:
            plan[name] = "dense weights"
        elif not runs_on(option.weight, SEMI_STRUCTURED):
            plan[name] = f"{option.weight} does not run as 2:4"
        elif isinstance(module, nn.Conv2d) or not isinstance(module, nn.Linear):
            plan[name] = "Conv2d: to_sparse_semi_structured takes Linear weights only"
        elif isinstance(module, SparseLayerMixin):
            plan[name] = "activation sparsity keeps a masking wrapper with a dense weight"
        elif any(size % 64 for size in module.weight.shape):
            plan[name] = f"weight shape {tuple(module.weight.shape)} is not a multiple of 64"
        elif name in keep_dense:
            plan[name] = keep_dense[name]
        else:
            plan[name] = None
    return plan


def to_semi_structured(
    model: nn.Module,
    scheme: Scheme,
    inputs: Tensor | None = None,
    keep_dense: Mapping[str, str] | None = None,
) -> nn.Module:
    """A fp16 CUDA copy of a finalized model with every eligible Linear weight as a 2:4 semi-structured tensor.

    Args:
        model: the finalized model (see :func:`bake`), left untouched.
        scheme: its scheme (:func:`semi_structured_plan` picks the layers).
        inputs: when given, the converted model's outputs are compared with the dense fp16 model's.
        keep_dense: eligible layers to leave dense (what :func:`load_torch` returns).

    Returns:
        The converted copy (eval mode, on the GPU).

    Raises:
        DeployError: no CUDA GPU of compute capability >= 8.0, or the outputs differ.
    """
    require_semi_structured()
    from torch.sparse import to_sparse_semi_structured

    converted = copy.deepcopy(model).half().cuda().eval()
    modules = prunable_modules(converted)
    for name, why_dense in semi_structured_plan(converted, scheme, keep_dense).items():
        if why_dense is None:
            module = modules[name]
            module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
    if inputs is not None:
        with torch.no_grad():
            x = inputs.half().cuda()
            reference = copy.deepcopy(model).half().cuda().eval()(x).float()
            error = float((converted(x).float() - reference).abs().max())
        tolerance = 1e-2 * max(1.0, float(reference.abs().max()))  # fp16 kernels sum in other orders
        if not error <= tolerance:
            raise DeployError(
                f"the 2:4 model's outputs differ from dense fp16 by {error:.3g} (allowed {tolerance:.3g})"
            )
    return converted


# -- report ------------------------------------------------------------------------------------
def modelled_layers(
    space: SearchSpace, scheme: Scheme, profile: HardwareProfile, dtype: str, batch_size: int
) -> pd.DataFrame:
    """The cost model's verdict per layer: the plan it runs ``scheme``'s option on and its speedup.

    Args:
        space: the dense model's search space (its layer shapes).
        scheme: the deployed scheme.
        profile: the target hardware.
        dtype: the dtype it runs in.
        batch_size: the deployment batch.

    Returns:
        Indexed by layer: ``plan`` (``dense``, ``sparse weights`` or ``sparse activations``) and
        ``speedup`` (the layer's dense latency over its latency with the option).
    """
    cost = HardwareCostModel.from_profile(profile, dtype=dtype, batch_size=batch_size)
    names = [name for name, _ in scheme.layers]
    # costed pair by pair: a --model space offers the default options, the scheme may hold others
    _, chosen = cost.costs(space, list(scheme.layers))
    _, dense = cost.costs(space, [(name, DENSE) for name in names])
    return pd.DataFrame(
        {"plan": [PLANS[p] for p in chosen.plan], "speedup": dense.latency_s / chosen.latency_s}, index=names
    )


def deploy_report(
    model: nn.Module,
    scheme: Scheme,
    fmt: str,
    profile: HardwareProfile | None,
    dtype: str = "fp16",
    modelled: pd.DataFrame | None = None,
    batch_size: int = 1,
    keep_dense: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Per scheme layer: its patterns, the format it runs in, and whether ``profile`` accelerates it.

    Args:
        model: the finalized model.
        scheme: its scheme.
        fmt: one of :data:`FORMATS`.
        profile: the target hardware (``None``: acceleration unknown).
        dtype: the dtype whose sparse peak counts.
        modelled: :func:`modelled_layers` at ``batch_size``; with it, ``accelerated`` follows the cost
            model's plan and speedup instead of the sparse peak.
        batch_size: the batch ``modelled`` is for.
        keep_dense: eligible layers ``--format torch`` leaves dense, with the reason.

    Returns:
        Columns ``layer, kind, weights, activations, runs_as, modelled, accelerated, note``.
    """
    plan = semi_structured_plan(model, scheme, keep_dense) if fmt == "torch" else {}
    spec = profile.dtype(dtype) if profile is not None else None
    rows = []
    for name, option in scheme.layers:
        module = prunable_modules(model)[name]
        kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
        speedup = spec.sparse_speedup(option.weight) if spec is not None and option.weight else 1.0
        note = ""
        if option.weight is None:
            runs_as = "dense"
        elif fmt == "torch":
            runs_as = "2:4 semi-structured" if plan[name] is None else "dense (zeros stored)"
            note = plan[name] or ""
        elif fmt == "onnx":
            runs_as = f"{option.weight} zeros in initializer"
            if runs_on(option.weight, SEMI_STRUCTURED):
                note = "TensorRT --sparsity=enable may pick 2:4 kernels (it times both)"
        else:
            runs_as = f"{option.weight} zeros in weights"
        if isinstance(option.activation, NMPattern):
            note = "; ".join(filter(None, [note, ACTIVATION_NOTES[fmt]]))
        elif isinstance(option.activation, RowPattern):
            note = "; ".join(filter(None, [note, "row mask: skipped outputs zeroed after a dense conv"]))
        sparse_kernel = option.weight is not None and (fmt != "torch" or plan[name] is None)
        verdict = modelled.loc[name] if modelled is not None else None
        if spec is None:
            accelerated = "unknown"
        elif verdict is None:
            accelerated = f"yes ({speedup:.2g}x peak)" if sparse_kernel and speedup > 1 else "no"
        elif sparse_kernel and verdict["plan"] == "sparse weights":
            accelerated = f"yes ({verdict['speedup']:.2f}x modelled)"
        else:
            accelerated = "no"
            if sparse_kernel and speedup > 1:  # the tensor cores take it, but not faster at this size
                converted = "converted, but " if fmt == "torch" else ""
                modelled_note = f"{converted}the cost model predicts the dense kernel faster at batch {batch_size}"
                note = "; ".join(filter(None, [note, modelled_note]))
        rows.append(
            {
                "layer": name,
                "kind": kind,
                "weights": str(option.weight or "dense"),
                "activations": str(option.activation or "dense"),
                "runs_as": runs_as,
                "modelled": "unknown" if verdict is None else f"{verdict['speedup']:.2f}x ({verdict['plan']})",
                "accelerated": accelerated,
                "note": note,
            }
        )
    return pd.DataFrame(rows)


# -- the whole deploy --------------------------------------------------------------------------
@dataclass
class DeployResult:
    """What :func:`deploy` wrote and checked."""

    out: Path
    format: str
    report: pd.DataFrame
    deployable: Deployable
    onnx: OnnxCheck | None = None
    model: nn.Module | None = None  # the converted module of --format torch


def check_out(out: Path, fmt: str, overwrite: bool = False) -> None:
    """Refuse an existing output (unless ``overwrite``) or a suffix that does not match the format.

    Args:
        out: the file deploy would write.
        fmt: the format.
        overwrite: whether an existing ``out`` may be replaced.

    Raises:
        DeployError: one line saying what is wrong.
    """
    if fmt not in FORMATS:
        raise DeployError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if out.suffix != SUFFIXES[fmt]:
        raise DeployError(f"--out '{out}' must end in {SUFFIXES[fmt]} for --format {fmt}")
    if out.exists() and not overwrite:
        raise DeployError(f"'{out}' exists; remove it, choose another --out or pass --overwrite")
    if out.is_dir():
        raise DeployError(f"'{out}' is a directory")


def deploy(
    source: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str,
    *,
    model: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    input_shape: tuple[int, ...] | None = None,
    hardware: str | None = None,
    dtype: str | None = None,
    batch_size: int | None = None,
    convert_all: bool = False,
    overwrite: bool = False,
) -> DeployResult:
    """Bake the scheme of ``source`` into its model and write ``out`` in ``fmt``.

    Args:
        source: a run directory of ``nmsearch search`` or a scheme JSON file.
        out: the file to write (``.safetensors`` / ``.onnx`` / ``.pt``).
        fmt: ``"safetensors"``, ``"onnx"`` or ``"torch"``.
        model: a task name or ``module:callable`` (see :func:`load_model`); default: the run's model.
        checkpoint: weights to load into ``model`` first.
        input_shape: inputs of a ``module:callable`` model.
        hardware: the profile the report judges acceleration on (default: the run's).
        dtype: its dtype (default: the run's, else fp16).
        batch_size: the deployment batch the report's cost model uses (default: the run's, else 1).
        convert_all: ``--format torch`` converts every eligible layer, also where the cost model
            predicts the dense kernel faster (by default those stay dense).
        overwrite: replace an existing ``out``.

    Returns:
        What was written, the per-layer report and the checks.

    Raises:
        DeployError, SchemeError, SchemeMismatchError, TaskError: one line each; nothing is written.
    """
    out = Path(out)
    check_out(out, fmt, overwrite)
    if fmt == "torch":  # before any training or export
        require_semi_structured()
    scheme, config = load_scheme(source)
    if hardware is None and config and isinstance(config.get("hardware"), dict):
        profile: HardwareProfile | None = load_profile(config["hardware"])
    else:
        profile = load_profile(hardware) if hardware else None
    run_evaluator = (config or {}).get("evaluator") or {}
    dtype = dtype or run_evaluator.get("dtype") or "fp16"
    if batch_size is None:
        batch_size = run_evaluator.get("batch_size") or 1
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DeployError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if profile is not None:
        profile.dtype(dtype)
    if model is not None:
        dense, inputs, _ = load_model(model, checkpoint, input_shape=input_shape)
        space = SearchSpace.from_model(dense, inputs)  # before baking: the dense layers' shapes
        deployable = Deployable(bake(dense, scheme), scheme, inputs, f"--model {model}", space=space)
    elif config is not None:
        if checkpoint is not None:
            raise DeployError("--checkpoint needs --model (which model to load it into)")
        deployable = searched_model(config, scheme)
    else:
        raise DeployError(f"'{source}' records no run config: name the model with --model TASK|module:callable")
    modelled = None
    if profile is not None and deployable.space is not None:
        modelled = modelled_layers(deployable.space, scheme, profile, dtype, batch_size)
    keep_dense = {}
    if modelled is not None and not convert_all:
        keep_dense = {
            name: f"the cost model predicts the dense kernel faster at batch {batch_size} (--convert-all converts it)"
            for name, option in scheme.layers
            if option.weight is not None and modelled.loc[name, "plan"] != "sparse weights"
        }
    report = deploy_report(deployable.model, scheme, fmt, profile, dtype, modelled, batch_size, keep_dense)
    result = DeployResult(out, fmt, report, deployable)
    if fmt == "safetensors":
        save_safetensors(deployable.model, scheme, out)
    elif fmt == "onnx":
        result.onnx = save_onnx(deployable.model, scheme, deployable.inputs, out)
    else:
        # The conversion checks that the 2:4 kernels reproduce the dense outputs; the file keeps the
        # finalized weights (a pickled module of tensor subclasses would need code to load).
        result.model = to_semi_structured(deployable.model, scheme, deployable.inputs, keep_dense)
        save_torch(deployable.model, scheme, out, keep_dense)
    return result


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated shape like 1,3,32,32") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every dimension must be >= 1")
    return shape


def main(argv: list[str] | None = None) -> int:
    """``nmsearch deploy`` / ``python -m experiments.deploy``.

    Args:
        argv: Command-line arguments; default ``sys.argv[1:]``.

    Returns:
        The exit status: 0, or 2 after a one-line error.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a run directory of nmsearch search, or a scheme JSON file")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    parser.add_argument("--out", type=Path, help="the file to write (default: deployed<suffix> beside SOURCE)")
    parser.add_argument("--model", help="a task (conf/task: digits, ...) or module:callable; default: the run's")
    parser.add_argument("--checkpoint", type=Path, help="state dict (.pt / .safetensors) to load into --model")
    parser.add_argument("--input-shape", type=_shape, help="input shape of a module:callable model, e.g. 1,3,32,32")
    parser.add_argument("--hardware", help="profile for the report (conf/hardware name or .yaml); default: the run's")
    parser.add_argument("--dtype", help="the profile's dtype for the report (default: the run's, else fp16)")
    parser.add_argument(
        "--batch-size", type=int, help="deployment batch of the report's cost model (default: the run's, else 1)"
    )
    parser.add_argument(
        "--convert-all",
        action="store_true",
        help="--format torch: convert every eligible 2:4 Linear, also where the cost model predicts dense faster",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    base = args.source if args.source.is_dir() else args.source.parent
    out = args.out or base / f"deployed{SUFFIXES[args.fmt]}"
    try:
        result = deploy(
            args.source,
            out,
            args.fmt,
            model=args.model,
            checkpoint=args.checkpoint,
            input_shape=args.input_shape,
            hardware=args.hardware,
            dtype=args.dtype,
            batch_size=args.batch_size,
            convert_all=args.convert_all,
            overwrite=args.overwrite,
        )
    except NMSearchError as error:
        print(f"nmsearch deploy: {error}", file=sys.stderr)
        return 2
    print(result.report.to_markdown(index=False))
    deployable = result.deployable
    lines = [f"model: {deployable.source}; scheme: {deployable.scheme.summary()}"]
    if deployable.accuracy is not None:
        recorded = deployable.scheme.metrics.get("accuracy")
        lines.append(
            f"accuracy of the deployed model: {deployable.accuracy:.4f}"
            + (f" (the search recorded {recorded:.4f})" if recorded is not None else "")
        )
    if result.onnx is not None:
        check = result.onnx
        lines.append(
            f"onnxruntime vs PyTorch on {check.samples} inputs: max |error| {check.max_abs_error:.2e} "
            f"(allowed {check.tolerance:.1e}); N:M verified in {len(check.nm_layers)} initializers"
            + (f"; activation ops: {', '.join(check.activation_ops)}" if check.activation_ops else "")
        )
    lines.append(f"written: {result.out}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
