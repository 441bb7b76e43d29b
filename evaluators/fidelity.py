"""Label-free fidelity: how closely a one-shot pruned model reproduces its dense self.

A scheme is pruned one-shot (:class:`~search_space.oneshot.OneShotPruner`: magnitude, Wanda or
SparseGPT) and run on held-out inputs; its outputs are compared with the dense model's:

* ``cosine`` -- mean cosine similarity of output rows (sentence embeddings, features);
* ``kl`` -- mean ``KL(dense || sparse)`` of softmax logits (classifiers, language models);
* ``relative_error`` -- ``||sparse - dense|| / ||dense||`` over all outputs.

The configured ``metric`` becomes the evaluator's single objective, named ``accuracy`` (the
quality slot every strategy and the Hydra app optimise) and maximised: ``cosine`` as is,
``kl`` and ``relative_error`` as ``exp(-value)`` -- 1 for a perfect copy, falling
monotonically. Every metric that applies is also reported raw in ``info``, plus
``neighbors@10``: the mean overlap of each held-out sample's 10 nearest neighbours (by cosine)
under the dense and the sparse outputs (for embeddings).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evaluators.accuracy import FIDELITY_METRICS
from evaluators.base import MAXIMIZE, Evaluation, Objective
from search_space import NMSearchError, Scheme, SearchSpace
from search_space.oneshot import CALIBRATION_MODES, ONESHOT_METHODS, Inputs, OneShotPruner, call_model, move_inputs

__all__ = [
    "FIDELITY_METRICS",
    "FidelityConfig",
    "FidelityEvaluator",
    "PretrainedTask",
    "cosine_similarity",
    "default_outputs",
    "fidelity_metrics",
    "is_pretrained_task",
    "kl_divergence",
    "metric_tensor",
    "neighbor_agreement",
    "relative_error",
]

NEIGHBORS = 10


def metric_tensor(metric: str, dense: Tensor, sparse: Tensor, temperature: float = 1.0) -> Tensor:
    """The differentiable value of a fidelity metric: the one definition the evaluator's floats
    (:func:`cosine_similarity`, :func:`kl_divergence`, :func:`relative_error`) and the distillation
    loss (:mod:`evaluators.distill`) share.

    Args:
        metric: ``"cosine"`` (mean cosine similarity of rows, last dimension = features), ``"kl"``
            (mean ``KL(softmax(dense / T) || softmax(sparse / T))`` over rows, in nats) or
            ``"relative_error"`` (``||sparse - dense|| / ||dense||`` over all outputs).
        dense: Outputs of the dense model (the reference).
        sparse: Outputs of the sparse model for the same inputs (same shape).
        temperature: ``T`` of ``kl`` (the others ignore it).

    Returns:
        A scalar tensor in the inputs' dtype, differentiable in both.

    Raises:
        NMSearchError: An unknown metric.
    """
    if metric == "cosine":
        return F.cosine_similarity(sparse.flatten(0, -2), dense.flatten(0, -2), dim=-1).mean()
    if metric == "kl":
        p = F.log_softmax(dense.flatten(0, -2) / temperature, dim=-1)
        q = F.log_softmax(sparse.flatten(0, -2) / temperature, dim=-1)
        return F.kl_div(q, p, log_target=True, reduction="batchmean")
    if metric == "relative_error":
        return (sparse - dense).norm() / dense.norm().clamp_min(1e-30)
    raise NMSearchError(f"unknown fidelity metric {metric!r}: use one of {', '.join(FIDELITY_METRICS)}")


def cosine_similarity(dense: Tensor, sparse: Tensor) -> float:
    """Mean cosine similarity of corresponding rows (last dimension = features).

    Args:
        dense: Outputs of the dense model.
        sparse: Outputs of the sparse model for the same inputs (same shape).

    Returns:
        The mean over rows, in [-1, 1]; 1 when every row points the same way.
    """
    return float(metric_tensor("cosine", dense.double(), sparse.double()))


def kl_divergence(dense_logits: Tensor, sparse_logits: Tensor) -> float:
    """Mean ``KL(softmax(dense) || softmax(sparse))`` over rows, in nats.

    Args:
        dense_logits: Logits of the dense model (last dimension = classes).
        sparse_logits: Logits of the sparse model for the same inputs (same shape).

    Returns:
        The mean divergence over rows (>= 0; 0 when the distributions match).
    """
    return float(metric_tensor("kl", dense_logits.double(), sparse_logits.double()))


def relative_error(dense: Tensor, sparse: Tensor) -> float:
    """``||sparse - dense|| / ||dense||`` (Frobenius norms over all outputs).

    Args:
        dense: Outputs of the dense model.
        sparse: Outputs of the sparse model for the same inputs (same shape).

    Returns:
        The relative error (>= 0; 0 when the outputs are equal).
    """
    return float(metric_tensor("relative_error", dense.double(), sparse.double()))


def neighbor_agreement(dense: Tensor, sparse: Tensor, k: int = NEIGHBORS) -> float:
    """Mean share of each row's ``k`` nearest rows (cosine, itself excluded) that both outputs agree on.

    Args:
        dense: ``(samples, features)`` reference outputs.
        sparse: outputs of the same samples from the sparse model.
        k: neighbours per sample (at most ``samples - 1``).

    Returns:
        A fraction in [0, 1]; 1 when every neighbour list is the same set.

    Raises:
        NMSearchError: fewer than ``k + 1`` samples.
    """
    if dense.shape[0] <= k:
        raise NMSearchError(f"top-{k} neighbour agreement needs more than {k} samples, got {dense.shape[0]}")

    def neighbours(x: Tensor) -> Tensor:
        x = F.normalize(x.flatten(1).double(), dim=-1)
        similarity = x @ x.T
        similarity.fill_diagonal_(-math.inf)
        return similarity.topk(k, dim=1).indices

    a, b = neighbours(dense), neighbours(sparse)
    hits = (a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum(1)
    return float(hits.double().mean() / k)


def fidelity_metrics(dense: Tensor, sparse: Tensor) -> dict[str, float]:
    """Every metric that applies to outputs of this shape.

    ``kl`` is always computed (any last dimension is a distribution's logits in principle);
    ``neighbors@10`` only for 2-D outputs of more than 10 rows.

    Args:
        dense: Outputs of the dense model.
        sparse: Outputs of the sparse model for the same inputs (same shape).

    Returns:
        ``{"cosine", "kl", "relative_error"[, "neighbors@10"]: value}``.
    """
    values = {
        "cosine": cosine_similarity(dense, sparse),
        "kl": kl_divergence(dense, sparse),
        "relative_error": relative_error(dense, sparse),
    }
    if dense.dim() == 2 and dense.shape[0] > NEIGHBORS:
        values[f"neighbors@{NEIGHBORS}"] = neighbor_agreement(dense, sparse)
    return values


def default_outputs(model: nn.Module, inputs: Inputs) -> Tensor:
    """The tensor to compare from ``model(inputs)``.

    Args:
        model: The model.
        inputs: Its inputs (a tensor, a tuple of positional arguments or a mapping of keyword ones).

    Returns:
        The output itself; of a mapping or model output its ``sentence_embedding``, ``logits``,
        ``pooler_output`` or ``last_hidden_state`` (the first present); of a tuple its first item.

    Raises:
        NMSearchError: If the output is a mapping without any of those keys, or not a tensor.
    """
    out: Any = call_model(model, inputs)
    if isinstance(out, dict) or hasattr(out, "keys"):
        for key in ("sentence_embedding", "logits", "pooler_output", "last_hidden_state"):
            if key in out and out[key] is not None:
                return out[key]
        raise NMSearchError(
            f"model output has keys {', '.join(map(str, out.keys()))}: pass outputs=... to say which tensor to compare"
        )
    if isinstance(out, tuple | list):
        out = out[0]
    if not isinstance(out, Tensor):
        raise NMSearchError(f"model output is a {type(out).__name__}: pass outputs=... to say which tensor to compare")
    return out


@runtime_checkable
class PretrainedTask(Protocol):
    """A label-free task around a pre-trained model (``experiments/tasks/minilm.py`` is one):
    no training, no labels; a search scores schemes with :class:`FidelityEvaluator`."""

    @property
    def name(self) -> str:
        """The task's name (in run records and reports)."""
        ...

    def build_model(self) -> nn.Module:
        """The dense pre-trained model, freshly loaded."""
        ...

    def example_inputs(self) -> Inputs:
        """A batch the search space is discovered on and the cost model sizes layers with."""
        ...

    def calibration_inputs(self) -> Inputs:
        """The inputs the one-shot methods calibrate on."""
        ...

    def heldout_batches(self) -> list[Inputs]:
        """The inputs fidelity is measured on (disjoint from the calibration inputs)."""
        ...

    def outputs(self, model: nn.Module, batch: Inputs) -> Tensor:
        """The tensor compared between the dense and the sparse model.

        Args:
            model: The dense or the sparse model.
            batch: One of :meth:`heldout_batches`.

        Returns:
            The outputs to compare (e.g. sentence embeddings).
        """
        ...

    def config(self) -> dict[str, Any]:
        """The task's settings as a JSON-able dict (recorded with a run)."""
        ...


def is_pretrained_task(task: object) -> bool:
    """Whether ``task`` has the :class:`PretrainedTask` members (calibration and held-out inputs).

    Args:
        task: Any object.

    Returns:
        True if it has ``build_model``, ``calibration_inputs``, ``heldout_batches`` and ``outputs``.
    """
    return all(hasattr(task, member) for member in ("build_model", "calibration_inputs", "heldout_batches", "outputs"))


@dataclass(frozen=True)
class FidelityConfig:
    """How :class:`FidelityEvaluator` prunes and scores. Hydra keys: ``evaluator.oneshot``,
    ``evaluator.calibration_mode``, ``evaluator.metric``."""

    oneshot: str = "sparsegpt"
    calibration_mode: str = "independent"
    metric: str = "cosine"
    blocksize: int = 128
    dampening: float = 0.01

    def __post_init__(self) -> None:
        if self.oneshot not in ONESHOT_METHODS:
            raise NMSearchError(f"evaluator.oneshot = {self.oneshot!r} is not one of {', '.join(ONESHOT_METHODS)}")
        if self.calibration_mode not in CALIBRATION_MODES:
            raise NMSearchError(
                f"evaluator.calibration_mode = {self.calibration_mode!r} is not one of {', '.join(CALIBRATION_MODES)}"
            )
        if self.metric not in FIDELITY_METRICS:
            raise NMSearchError(f"evaluator.metric = {self.metric!r} is not one of {', '.join(FIDELITY_METRICS)}")


class FidelityEvaluator:
    """Scores schemes of ``space`` by how closely the one-shot pruned model matches the dense one.

    Args:
        model: the pre-trained dense model (never modified).
        space: the search space of ``model``.
        calibration: one batch of calibration inputs for the one-shot method.
        heldout: held-out batches the outputs are compared on (disjoint from ``calibration``).
        config: method, calibration mode and metric.
        outputs: ``outputs(model, batch) -> Tensor``, the tensor compared (default
            :func:`default_outputs`); e.g. mean-pooled sentence embeddings.
        source: what strategies that train the model (Gumbel, DominoSearch) take their data from
            (:func:`evaluators.distill.training_source`): a :class:`PretrainedTask` (set by
            :meth:`for_task`) or the :class:`~evaluators.Trainer` of a labelled task; ``None``: none.

    Raises:
        NMSearchError: no held-out batch.
    """

    objectives = (Objective("accuracy", MAXIMIZE),)

    def __init__(
        self,
        model: nn.Module,
        space: SearchSpace,
        calibration: Inputs | None,
        heldout: Sequence[Inputs],
        config: FidelityConfig | None = None,
        *,
        outputs: Callable[[nn.Module, Inputs], Tensor] = default_outputs,
        source: object | None = None,
    ) -> None:
        if not heldout:
            raise NMSearchError("the fidelity evaluator needs at least one held-out batch")
        self.model, self.space, self.heldout = model, space, list(heldout)
        self.config = config or FidelityConfig()
        self.outputs, self.source = outputs, source
        self.pruner = OneShotPruner(
            model,
            calibration,
            self.config.oneshot,
            mode=self.config.calibration_mode,
            blocksize=self.config.blocksize,
            dampening=self.config.dampening,
        )
        self._dense = self._outputs(model)

    @classmethod
    def for_task(
        cls,
        task: PretrainedTask,
        space: SearchSpace | None = None,
        config: FidelityConfig | None = None,
        *,
        model: nn.Module | None = None,
    ) -> FidelityEvaluator:
        """The evaluator of a :class:`PretrainedTask`: its model, calibration and held-out inputs.

        Args:
            task: the task.
            space: the search space (discovered from ``task.example_inputs()`` when ``None``).
            config: method, calibration mode and metric.
            model: the task's model when already built (it is not modified).

        Returns:
            The evaluator.
        """
        model = model if model is not None else task.build_model()
        space = space if space is not None else SearchSpace.from_model(model, task.example_inputs())
        return cls(
            model, space, task.calibration_inputs(), task.heldout_batches(), config, outputs=task.outputs, source=task
        )

    def with_space(self, space: SearchSpace) -> FidelityEvaluator:
        """This evaluator scoring the schemes of another space of the same model (e.g. DominoSearch's
        per-layer N:M space); the one-shot pruner and the dense outputs are shared, so scores agree.

        Args:
            space: A search space of the evaluator's model.

        Returns:
            A shallow copy with ``space``.
        """
        evaluator = copy.copy(self)
        evaluator.space = space
        return evaluator

    def _outputs(self, model: nn.Module) -> Tensor:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                chunks = [self.outputs(model, move_inputs(batch, device)).float().cpu() for batch in self.heldout]
        finally:
            model.train(was_training)
        return torch.cat(chunks)

    def sparse_model(self, scheme: Scheme, mode: str | None = None) -> nn.Module:
        """The one-shot pruned model for ``scheme``.

        Args:
            scheme: A scheme of the evaluator's space.
            mode: The calibration mode; default the evaluator's. ``"sequential"`` for export when
                the search used the ``independent`` variant.

        Returns:
            The pruned model.

        Raises:
            SchemeMismatchError: If ``scheme`` is not a scheme of the evaluator's space.
        """
        self.space.check(scheme)
        if mode is None or mode == self.pruner.mode:
            return self.pruner.prune(scheme)
        return OneShotPruner(
            self.model,
            self.pruner.calibration,
            self.config.oneshot,
            mode=mode,
            blocksize=self.config.blocksize,
            dampening=self.config.dampening,
            cache_mb=0,
        ).prune(scheme)

    def evaluate(self, scheme: Scheme, mode: str | None = None) -> Evaluation:
        """Fidelity of ``scheme``'s one-shot model on the held-out batches.

        Args:
            scheme: A scheme of the evaluator's space.
            mode: The calibration mode; default the evaluator's.

        Returns:
            The ``accuracy`` objective: the cosine similarity, or ``exp(-value)`` of the other
            metrics; every metric in ``info``. A failed evaluation when pruning runs out of GPU
            memory or the metric is not finite.

        Raises:
            SchemeMismatchError: If ``scheme`` is not a scheme of the evaluator's space.
        """
        start = time.perf_counter()
        info: dict[str, Any] = {"oneshot": self.config.oneshot, "calibration_mode": mode or self.pruner.mode}
        try:
            sparse = self._outputs(self.sparse_model(scheme, mode))
        except torch.cuda.OutOfMemoryError:
            reason = f"out of GPU memory while pruning with {self.config.oneshot!r}"
            return Evaluation.failure(self.objectives, reason, info=info, duration_s=time.perf_counter() - start)
        values = fidelity_metrics(self._dense, sparse)
        info.update(values)
        duration = time.perf_counter() - start
        raw = values[self.config.metric]
        if not math.isfinite(raw):
            reason = f"{self.config.metric} is {raw}: the pruned model's outputs are not finite"
            return Evaluation.failure(self.objectives, reason, info=info, duration_s=duration)
        score = raw if self.config.metric == "cosine" else math.exp(-raw)
        return Evaluation({"accuracy": score}, info=info, duration_s=duration)
