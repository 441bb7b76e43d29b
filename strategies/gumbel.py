"""Differentiable (Gumbel-softmax) search over weights / activations / both and N:M per layer.

The seed method (Akiva-Hochman et al., ECCVW 2022) as a supernet: every searchable layer gets one
logit per option of the space, trained by its own Adam on held-out training batches while the
weights train on the rest (FBNet's alternation: per epoch, weights first, then logits; the first
``warmup_fraction`` of the epochs train weights only).

``estimator`` decides how the logits get their gradient, for the loss and the cost term alike:

* ``proxylessnas`` (default): each step draws one option per layer from ``p = softmax(logits)``; the
  loss reaches the logits through ``p`` (ProxylessNAS' straight-through gate) and so does the cost
  ``E_p[cost]``. No temperature is involved, so the loss/cost gradient ratio cannot drift.
* ``fbnet``: the Gumbel-softmax sample ``y = softmax((logits + g) / tau)`` gates the options and the
  cost is priced with the same ``y`` (FBNet), so both gradients pass the same ``tau``-relaxation.
  ``sampling="hard"`` runs the straight-through one-hot of ``y``: the forward choice is
  ``argmax(logits + g)`` whatever ``tau``, which shapes only the gradient; ``sampling="soft"`` runs the
  mixture ``sum_o y_o option_o`` itself, where ``tau`` anneals it from a blend to a single option.

Options share the layer's weight tensor. Options with the same *activation* choice differ only in
the weight mask, so each such group is one GEMM with a soft mask ``sum_o g_o E_o``. A weight step
computes the sampled option alone (one GEMM). A logit step computes the sampled group and
``active_groups - 1`` others drawn uniformly, whose gate gradients are divided by their inclusion
probability and centred on the sampled option's (a control variate): an unbiased estimate of the
gradient that computes every group (``active_groups=None``).

The loss adds the cost model's expected cost ratio ``r = E[cost]/cost_dense`` (expected over the
gates above): ``additive`` ``CE + lambda r`` (ProxylessNAS), ``fbnet`` ``CE alpha log(100 r)^beta``
(so a dense model sits at FBNet's scale of ~100), or ``budget`` ``CE + lambda max(0, r - budget)^2``
steering to a fraction of dense; with ``train_loss=distill`` the distillation loss of
:mod:`evaluators.distill` (against the frozen dense model, no labels) stands in for ``CE``. The
result is the argmax scheme (and optionally the best of k samples), scored by the evaluator like
any candidate; ``lambdas`` (or ``budgets``) run one search each and trace a front.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evaluators import (
    CostEvaluator,
    CostTable,
    Evaluator,
    HardwareCostModel,
    Objective,
    check_evaluator,
    distributed,
    evaluate_safely,
    find_part_or_none,
)
from evaluators.distill import Training, TrainingSource, training_source
from evaluators.task import Batch
from evaluators.training import make_optimizer, seed_everything, train_one_epoch
from search_space import (
    NMPattern,
    NMSearchError,
    Option,
    RecipeConfig,
    RowPattern,
    Scheme,
    SearchSpace,
    SparseLayerMixin,
    nm_mask,
    set_submodule,
    share_row_scores,
    sparsify,
)
from search_space.layers import _MaskedWeight
from strategies.base import (
    COMPLETE,
    Candidate,
    Choice,
    SearchResult,
    StrategyBase,
    TrainLoss,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

LOSS_FORMS = ("additive", "fbnet", "budget")
TEMPERATURE_SCHEDULES = ("exponential", "linear")


class LossForm(Choice):
    """How the architecture loss combines accuracy and cost (:func:`architecture_loss`)."""

    additive = "additive"
    fbnet = "fbnet"
    budget = "budget"


class TemperatureSchedule(Choice):
    """How the Gumbel temperature falls over the epochs (:func:`temperature`)."""

    exponential = "exponential"
    linear = "linear"

    @classmethod
    def invalid(cls, label: str, value: object) -> str:
        return f"gumbel.tau_schedule must be one of {cls.values()}, got {value!r}"


class Estimator(Choice):
    """How the logits get their gradient, for the loss and the cost term alike."""

    proxylessnas = "proxylessnas"  # both through p = softmax(logits)
    fbnet = "fbnet"  # both through the tau-relaxed Gumbel-softmax sample


class Sampling(Choice):
    """What a forward pass computes: one sampled option (hard) or the relaxed mixture (soft, fbnet)."""

    hard = "hard"
    soft = "soft"


PROXYLESSNAS, FBNET = Estimator.proxylessnas, Estimator.fbnet
HARD, SOFT = Sampling.hard, Sampling.soft


ARCH_SHARE = 5  # every 5th training batch trains the logits (80/20 split, as FBNet)


def temperature(epoch: int, epochs: int, start: float, decay: float, schedule: str, end: float) -> float:
    """FBNet's ``start * decay^epoch`` (``exponential``) or a straight line from ``start`` to ``end``."""
    if schedule == "exponential":
        return start * decay**epoch
    return start + (end - start) * epoch / max(1, epochs - 1)


def architecture_loss(
    ce: Tensor, ratio: Tensor, form: str, setting: float, *, alpha: float, beta: float, budget_weight: float
) -> Tensor:
    """Cross-entropy combined with ``ratio = E[cost] / cost_dense``.

    ``additive``: ``ce + setting * ratio``; ``fbnet``: ``ce * alpha * log(100 ratio)^beta``;
    ``budget``: ``ce + budget_weight * max(0, ratio - setting)^2``.
    """
    if form == "additive":
        return ce + setting * ratio
    if form == "budget":
        return ce + budget_weight * torch.clamp(ratio - setting, min=0.0) ** 2
    return ce * alpha * torch.log(100.0 * ratio) ** beta


class _Group:
    """Options of one layer that share an activation choice: one GEMM with a soft weight mask."""

    def __init__(
        self, index: int, activation: NMPattern | None, members: list[int], weights: list[NMPattern | None]
    ) -> None:
        self.index = index  # position in GumbelLayer.groups
        self.activation = activation
        self.members = members  # option indices
        self.weights = weights  # each member's weight pattern
        self.start = 0  # where the members sit in GumbelLayer's group-ordered gates


class _StraightThrough(torch.autograd.Function):
    """``hard + p - p.detach()`` as one node: the one-hot of ``index`` forward, the identity to ``p``
    backward (the same values and gradient as the three-op form)."""

    @staticmethod
    def forward(ctx: Any, p: Tensor, index: int) -> Tensor:
        hard = torch.zeros_like(p)
        hard[index] = 1.0
        return hard

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _GateGradients(torch.autograd.Function):
    """The identity on a layer's output that adds the gates' gradients of groups it did not compute.

    A group whose gates are all 0 in the forward pass (every unsampled group of a hard sample) outputs
    exactly 0 and passes exactly 0 back to its input: all it contributes is its gates' gradient
    ``<dL/dy, f_o>``, reached through the GEMM's weight gradient alone. So its forward GEMM and its
    input-gradient GEMM are skipped; backward runs only ``dL/dW_eff`` (and ``dL/dshare`` through the
    bias). It also carries the zero-valued control variate of :meth:`GumbelLayer._baseline`.

    Inputs: the output of the computed groups, the layer, the baseline scalar (or ``None``), then per
    skipped group its masked input, effective weight and share.
    """

    @staticmethod
    def forward(ctx: Any, out: Tensor, layer: GumbelLayer, baseline: Tensor | None, *skipped: Tensor) -> Tensor:
        ctx.layer = layer
        ctx.shapes = [w.shape for w in skipped[1::3]]
        ctx.baseline = baseline is not None
        ctx.save_for_backward(out if ctx.baseline else None, *skipped[0::3])
        return out.clone()  # a new tensor, not a view: later in-place ops on it stay legal

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        out, *inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads: list[Tensor | None] = [grad, None, None]
        if ctx.baseline and needs[2]:
            grads[2] = (grad * out).sum()
        bias = ctx.layer.layer.bias
        for i, (x, shape) in enumerate(zip(inputs, ctx.shapes, strict=True)):
            need_weight, need_share = needs[4 + 3 * i], needs[5 + 3 * i] and bias is not None
            grad_weight, grad_bias = ctx.layer._weight_gradient(x, grad, shape, need_weight, need_share)
            grads += [None, grad_weight, (grad_bias * bias.detach()).sum() if need_share else None]
        return tuple(grads)


class GumbelLayer(nn.Module):
    """A searchable layer in the supernet: the wrapped layer plus its options and logits.

    The logits are a plain tensor attribute, not a registered parameter, so they stay out of
    ``model.parameters()`` and are trained by the architecture optimizer alone. Each forward pass
    draws gates (:meth:`sample`) and keeps them in ``gates`` for the cost term of the same step.

    A weight step (logits not training, hard sampling) computes the sampled option alone: one GEMM
    with the straight-through (SR-STE) masked weight. A logit step computes the sampled activation
    group and ``active_groups - 1`` others drawn uniformly, each scaled by the inverse of its
    inclusion probability in the gate gradient (Horvitz-Thompson), so the logit gradient is an
    unbiased estimate of the one computing every group. A computed group whose gates are all 0 in
    the forward pass (the unsampled ones of a hard sample) contributes only its gates' gradient, so
    it runs no forward GEMM, only a weight-gradient GEMM in backward (:class:`_GateGradients`).
    """

    def __init__(self, layer: SparseLayerMixin, options: Sequence[Option], logits: Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.options = tuple(options)
        self.logits = logits
        by_activation: dict[NMPattern | None, _Group] = {}
        for index, option in enumerate(self.options):
            group = by_activation.get(option.activation)
            if group is None:
                group = by_activation[option.activation] = _Group(len(by_activation), option.activation, [], [])
            group.members.append(index)
            group.weights.append(option.weight)
        self.groups = list(by_activation.values())
        self.group_of = {index: group for group in self.groups for index in group.members}
        order = [index for group in self.groups for index in group.members]
        for group in self.groups:
            group.start = order.index(group.members[0])
        # The gates in group order: one gather per step, then each group's gates are a slice.
        self._order = torch.tensor(order)
        self.weight_patterns = list(dict.fromkeys(o.weight for o in self.options))
        self.tau = 1.0
        self.active_groups: int | None = 2
        self.estimator = PROXYLESSNAS
        self.sampling = HARD
        self.train_logits = False
        self.srste_lambda = 0.0
        self.regulariser: Tensor | None = None
        self.gates: Tensor | None = None
        self._drawn: tuple[Tensor, int] | None = None
        self._masks: tuple[tuple[int, int], dict[NMPattern | None, Tensor]] | None = None
        self._stacks: dict[str, list[Tensor]] = {}
        self._coefficients: dict[tuple, Tensor] = {}

    def sample(self) -> Tensor:
        """Gates over the options for one forward pass.

        ``proxylessnas``: a one-hot draw from ``p = softmax(logits)`` whose gradient flows through
        ``p`` (``one_hot + p - p.detach()``); no temperature. ``fbnet``: the Gumbel-softmax relaxation
        ``y = softmax((logits + g) / tau)``, as is (``soft``) or straight-through one-hot of its argmax
        (``hard``: the forward choice is ``argmax(logits + g)`` whatever ``tau``; tau shapes only the
        gradient).
        """
        logits = self.logits if self.train_logits else self.logits.detach()
        if self.estimator == PROXYLESSNAS:
            p = logits.softmax(-1)
            # torch.multinomial(p, 1)'s own algorithm, argmax(p / q) with q ~ Exp(1) drawn from the same
            # generator (the same index, the same random stream), without its validity checks' syncs: a
            # NaN logit shows in the next logit step's loss (its cost term goes through every p).
            index = int((p.detach() / torch.empty_like(p).exponential_()).argmax())
            return self._record(_StraightThrough.apply(p, index) if p.requires_grad else self._one_hot(p, index), index)
        noise = -torch.empty_like(logits).exponential_().log()
        soft = ((logits + noise) / self.tau).softmax(-1)
        if self.sampling == SOFT:
            return soft
        index = int(soft.detach().argmax())
        return self._record(_StraightThrough.apply(soft, index) if soft.requires_grad else self._one_hot(soft, index),
                            index)  # fmt: skip

    @staticmethod
    def _one_hot(like: Tensor, index: int) -> Tensor:
        hard = torch.zeros_like(like, requires_grad=False)
        hard[index] = 1.0
        return hard

    def _record(self, gates: Tensor, index: int) -> Tensor:
        """Remember a one-hot draw, so ``forward`` knows its index without reading the gates back."""
        self._drawn = (gates, index)
        return gates

    def cost_gates(self) -> Tensor:
        """What the cost term weighs the options' costs by, so it is differentiated like the loss: the
        last forward pass's gates (``fbnet``), or ``p = softmax(logits)`` (``proxylessnas``)."""
        if self.estimator == FBNET:
            if self.gates is None:
                raise RuntimeError("cost_gates() needs a forward pass first (the fbnet cost uses its gates)")
            return self.gates
        return (self.logits if self.train_logits else self.logits.detach()).softmax(-1)

    def _weight_masks(self) -> dict[NMPattern | None, Tensor]:
        """Every option's weight mask, cached while the weights do not change (a whole logit epoch)."""
        w = self.layer.weight
        key = (w._version, w.data_ptr())
        if self._masks is None or self._masks[0] != key:
            scores = w.detach().abs()
            masks = {p: nm_mask(scores, p.n, p.m, dim=1, dtype=w.dtype) if p else None for p in self.weight_patterns}
            self._masks = (key, masks)
            self._stacks = {}
        return self._masks[1]

    def _stack(self, group: _Group, weighted: bool) -> Tensor:
        """A group's members' masks ``E_o`` (or masked weights ``W * E_o``) as the rows of a matrix, built
        once per weight version: a group's soft mask (or soft-masked frozen weight) is one product with
        its gates."""
        kind = "weighted" if weighted else "masks"
        stacks = self._stacks.get(kind)
        if stacks is None:
            masks, w = self._weight_masks(), self.layer.weight.detach()
            if weighted:
                rows = [[w if p is None else w * masks[p] for p in g.weights] for g in self.groups]
            else:
                ones = torch.ones_like(w)
                rows = [[ones if p is None else masks[p] for p in g.weights] for g in self.groups]
            stacks = [torch.stack(r).flatten(1) for r in rows]
            self._stacks[kind] = stacks
        return stacks[group.index]

    def _computed(self, chosen: int) -> list[tuple[_Group, float]]:
        """The groups a logit step computes, each with its gate-gradient scale (1 / inclusion probability)."""
        first = self.group_of[chosen]
        if self.active_groups is None or self.active_groups >= len(self.groups):
            return [(group, 1.0) for group in self.groups]
        others = [g for g in self.groups if g is not first]
        draws = self.active_groups - 1
        picks = torch.randperm(len(others))[:draws].tolist()
        return [(first, 1.0), *((others[i], len(others) / draws) for i in picks)]

    def forward(self, x: Tensor) -> Tensor:
        gates = self.sample()
        self.gates = gates
        drawn, self._drawn = self._drawn, None
        one_hot = drawn is not None and drawn[0] is gates
        chosen = drawn[1] if one_hot else int(gates.detach().argmax())
        if self.sampling == HARD and not (self.train_logits and torch.is_grad_enabled()):
            return self._sampled(x, chosen)
        masks = self._weight_masks()
        weight = self.layer.weight
        trains_weight = torch.is_grad_enabled() and weight.requires_grad
        computed = self._computed(chosen)
        if one_hot:  # forward gates are 1 at the draw, 0 elsewhere
            zero = {group.index for group, _ in computed} - {self.group_of[chosen].index}
        else:
            values = gates.detach().tolist()
            zero = {group.index for group, _ in computed if not any(values[m] for m in group.members)}
        if self._order.device != gates.device:  # the layer may be built on the CPU, then moved
            self._order = self._order.to(gates.device)
        ordered = gates.index_select(0, self._order)
        out, skipped = None, []
        for group, scale in computed:
            member_gates = ordered.narrow(0, group.start, len(group.members))
            if scale != 1.0:
                member_gates = member_gates * scale
            share = member_gates.sum()  # hard: 1 for the sampled group, 0 otherwise (forward value)
            if trains_weight:
                soft = (member_gates.to(weight.dtype) @ self._stack(group, False)).view(weight.shape)
                # Forward: W * soft. Backward: the weights get the straight-through gradient scaled by the
                # group's share, the gates get <grad, W * E_o> for every member.
                effective = share * weight + weight.detach() * (soft - share)
            else:  # frozen weights (a logit step): sum_o g_o (W * E_o), the same value and gate gradient
                effective = (member_gates.to(weight.dtype) @ self._stack(group, True)).view(weight.shape)
            if group.index in zero and not isinstance(group.activation, RowPattern):
                skipped.append((group, effective, share))
                continue
            y = self._apply(x, group.activation, effective, share)
            out = y if out is None else out + y
        if out is None:  # every computed gate is 0: compute one group for the output's value
            group, effective, share = skipped.pop(0)
            out = self._apply(x, group.activation, effective, share)
        baseline = self._baseline(gates, computed) if len(computed) < len(self.groups) else None
        if torch.is_grad_enabled() and (skipped or baseline is not None):
            inputs = []
            for group, effective, share in skipped:
                mask = self.layer.input_mask(x, group.activation) if group.activation else None
                inputs += [x * mask if mask is not None else x, effective, share]
            out = _GateGradients.apply(out, self, baseline, *inputs)
        chosen_weight = self.options[chosen].weight
        if self.srste_lambda and chosen_weight is not None and trains_weight:
            # SR-STE as a loss term: its gradient is srste_lambda * (1 - E) * W.
            pruned = weight * (1 - masks[chosen_weight])
            term = 0.5 * self.srste_lambda * pruned.pow(2).sum()
            self.regulariser = term if self.regulariser is None else self.regulariser + term
        return out

    def _baseline(self, gates: Tensor, computed: list[tuple[_Group, float]]) -> Tensor | None:
        """The scalar whose gradient gives the gates a control variate for the estimated gradients.

        A gate's gradient is ``v_o = <dL/dout, f_o>``; the logits get ``J^T v`` with ``J`` the Jacobian of
        a softmax, so adding a constant ``b`` to every ``v_o`` changes nothing (``J^T 1 = 0``). With ``b``
        the sampled option's own ``v`` (known exactly: ``out`` is its output), the estimate becomes
        ``b + (v_o - b) / pi_o`` for the computed options and ``b`` for the others: still unbiased, with
        the variance of ``v_o - b`` instead of ``v_o`` (options differ little from the sampled one).
        :class:`_GateGradients` gives this scalar the gradient ``<dL/dout, out>`` (a zero-valued term
        ``scalar * out.detach()``), so the gates get ``b`` times their coefficients.
        """
        if not gates.requires_grad:
            return None
        key = (tuple((group.index, scale) for group, scale in computed), gates.dtype, gates.device)
        coefficients = self._coefficients.get(key)
        if coefficients is None:
            coefficients = torch.ones(len(self.options), dtype=gates.dtype, device=gates.device)
            for group, scale in computed:
                coefficients[group.members] = 1.0 - scale
            self._coefficients[key] = coefficients
        return torch.dot(gates, coefficients)

    def _weight_gradient(
        self, x: Tensor, grad: Tensor, shape: torch.Size, weight: bool, bias: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        """``dL/dW`` of ``y = gemm(x, W)`` for an output gradient ``grad`` (no input gradient), and the
        output gradient summed per output channel (a bias's gradient), each only if asked for."""
        layer = self.layer
        if isinstance(layer, nn.Conv2d):
            padding = layer.padding
            if layer.padding_mode != "zeros" or isinstance(padding, str):  # as _conv_forward: pad, then conv
                mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
                x, padding = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode), (0, 0)
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad, x, grad.new_empty(1).expand(shape), [shape[0]] if bias else None, layer.stride, padding,
                layer.dilation, False, [0, 0], layer.groups, [False, weight, bias],
            )  # fmt: skip
            return grad_weight, grad_bias
        rows = grad.reshape(-1, grad.shape[-1])
        grad_weight = rows.T @ x.reshape(-1, x.shape[-1]) if weight else None
        return grad_weight, rows.sum(0) if bias else None

    def _sampled(self, x: Tensor, chosen: int) -> Tensor:
        """The sampled option alone: ``W * E`` forward, the dense (SR-STE) gradient to ``W``."""
        option = self.options[chosen]
        weight = self.layer.weight
        if option.weight is not None:
            w = weight.detach()
            key = (w._version, w.data_ptr())
            mask = self._masks[1][option.weight] if self._masks is not None and self._masks[0] == key else None
            if mask is None:
                mask = nm_mask(w.abs(), option.weight.n, option.weight.m, dim=1, dtype=w.dtype)
            if torch.is_grad_enabled() and weight.requires_grad:
                weight = _MaskedWeight.apply(weight, mask, 0.0, self.srste_lambda, False)
            else:
                weight = weight * mask
        return self._apply(x, option.activation, weight, 1.0)

    def _apply(
        self, x: Tensor, activation: NMPattern | RowPattern | None, weight: Tensor, share: Tensor | float
    ) -> Tensor:
        mask = self.layer.input_mask(x, activation) if activation else None
        if isinstance(activation, RowPattern):
            # Row masks select output positions; skipped rows output zero, bias included.
            y = self._add_bias(self._gemm(x, weight), share)
            return y * mask if mask is not None else y
        return self._add_bias(self._gemm(x * mask if mask is not None else x, weight), share)

    def _add_bias(self, y: Tensor, share: Tensor | float) -> Tensor:
        """``y + share * bias`` (nothing to add without a bias)."""
        bias = self.layer.bias
        if bias is None:
            return y
        if not (isinstance(share, float) and share == 1.0):
            bias = share * bias
        return y + (bias.view(1, -1, 1, 1) if isinstance(self.layer, nn.Conv2d) else bias)

    def _gemm(self, x: Tensor, weight: Tensor) -> Tensor:
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, weight, None)
        return F.linear(x, weight)


def build_supernet(
    model: nn.Module, space: SearchSpace, logits: dict[str, Tensor], seed: int = 0
) -> dict[str, GumbelLayer]:
    """Replace every searchable layer of ``model`` (in place) by a :class:`GumbelLayer`."""
    layers = {}
    for name in space.searchable:
        module = model.get_submodule(name)
        dense = module.to_dense() if isinstance(module, SparseLayerMixin) else module
        layers[name] = GumbelLayer(sparsify(dense, name=name), space.options[name], logits[name])
        set_submodule(model, name, layers[name])
    if any(isinstance(o.activation, RowPattern) for options in space.options.values() for o in options):
        share_row_scores(model, seed)  # one field for every layer, so their row masks agree
    return layers


class _EveryNth:
    """The batches of a loader whose index is (or is not) a multiple of ``ARCH_SHARE`` minus one:
    a fixed 80/20 split of the training batches without holding them in memory."""

    def __init__(self, batches: Any, arch: bool) -> None:
        self.batches, self.arch = batches, arch

    def __len__(self) -> int:
        total = len(self.batches)
        arch = total // ARCH_SHARE
        return arch if self.arch else total - arch

    def __iter__(self) -> Iterator[Batch]:
        for index, batch in enumerate(self.batches):
            if (index % ARCH_SHARE == ARCH_SHARE - 1) == self.arch:
                yield batch


@dataclass
class GumbelStrategy(StrategyBase):
    """Gumbel-softmax supernet search. ``lambdas`` (additive / fbnet) or ``budgets`` (budget
    form) run one search each; every run's argmax scheme (and ``samples`` sampled schemes) is
    scored by the evaluator.

    ``estimator`` (``proxylessnas``, default: loss and cost through ``p``, no temperature; or
    ``fbnet``: both through the tau-relaxed sample), ``sampling`` (``hard``: one option per step,
    its choice independent of tau; ``soft``: fbnet's tau-weighted mixture, every group computed) and
    ``active_groups`` (activation groups a logit step computes, >= 2, an unbiased estimate; ``None``:
    all) are described in the module docstring and ``docs/strategies/gumbel.md``.

    ``train_loss``: what the supernet's weights and logits train on (:mod:`evaluators.distill`):
    ``task`` (cross-entropy on the task's labels), ``distill`` (the frozen dense model's outputs on
    the same batch; ``distill_temperature`` for ``kl``) or ``auto`` (``task`` with labels, else ``distill``).
    """

    epochs: int = 20
    warmup_fraction: float = 0.1
    lambdas: list[float] = field(default_factory=lambda: [1.0])
    budgets: list[float] = field(default_factory=list)
    loss: LossForm = LossForm.additive
    cost_metric: str = "latency_ms"
    fbnet_alpha: float = 0.2
    fbnet_beta: float = 0.6
    budget_weight: float = 10.0
    tau_start: float = 5.0
    tau_decay: float = 0.956
    tau_schedule: TemperatureSchedule = TemperatureSchedule.exponential
    tau_end: float = 0.5
    arch_lr: float = 3e-3
    weight_lr: float | None = None
    recipe: RecipeConfig = field(default_factory=lambda: RecipeConfig(estimator="srste"))
    estimator: Estimator = Estimator.proxylessnas
    sampling: Sampling = Sampling.hard
    active_groups: int | None = 2
    samples: int = 0
    hardware: str | None = None
    train_loss: TrainLoss = TrainLoss.auto
    distill_temperature: float = 1.0
    seed: int = 0
    name: str = "gumbel"

    def _validate(self, space: SearchSpace) -> list[float]:
        if self.loss not in LOSS_FORMS:
            raise NMSearchError(f"gumbel.loss = {self.loss!r} is not one of {', '.join(LOSS_FORMS)}")
        if self.tau_schedule not in TEMPERATURE_SCHEDULES:
            raise NMSearchError(f"gumbel.tau_schedule must be one of {', '.join(TEMPERATURE_SCHEDULES)}")
        if not self.distill_temperature > 0:
            raise NMSearchError(f"gumbel.distill_temperature must be > 0, got {self.distill_temperature}")
        if self.epochs < 1 or not 0 <= self.warmup_fraction < 1:
            raise NMSearchError("gumbel.epochs must be >= 1 and warmup_fraction in [0, 1)")
        if self.sampling == SOFT and self.estimator != FBNET:
            raise NMSearchError("gumbel.sampling = 'soft' mixes options by the relaxed sample: set estimator=fbnet")
        if self.sampling == SOFT and self.active_groups is not None:
            raise NMSearchError("gumbel.sampling = 'soft' computes every option: set active_groups=null")
        if self.active_groups is not None and self.active_groups < 2:
            raise NMSearchError(
                f"gumbel.active_groups must be >= 2 or null (all), got {self.active_groups}: the other groups' "
                "gradients are estimated from the ones computed besides the sampled one"
            )
        if self.recipe.estimator not in ("ste", "srste") or self.recipe.decay != "none":
            raise NMSearchError(
                "the Gumbel supernet trains masked weights with estimator ste or srste and no decay "
                f"(got estimator={self.recipe.estimator!r}, decay={self.recipe.decay!r})"
            )
        if not space.searchable:
            raise NMSearchError("the search space has no layer with a choice: nothing to search")
        if self.loss == "budget":
            if not self.budgets:
                raise NMSearchError("gumbel.loss = 'budget' needs budgets, e.g. [0.7] (fractions of dense cost)")
            return list(self.budgets)
        if not self.lambdas:
            raise NMSearchError("gumbel.lambdas is empty: give at least one cost weight")
        negative = [v for v in self.lambdas if v < 0]
        if negative:
            raise NMSearchError(f"gumbel.lambdas must be >= 0 (a negative weight rewards cost), got {negative[0]}")
        return list(self.lambdas)

    def _cost_table(self, space: SearchSpace, evaluator: Evaluator) -> tuple[CostTable, str]:
        part = find_part_or_none(evaluator, CostEvaluator)
        if part is not None:
            table = part.table if part.space is space else part.cost_model.table(space)
            return table, part.cost_model.profile.name
        if self.hardware is None:
            raise NMSearchError(
                "the Gumbel loss needs a cost model: include a CostEvaluator in the evaluator or set gumbel.hardware"
            )
        model = HardwareCostModel.from_profile(self.hardware)
        return model.table(space), model.profile.name

    def search(
        self, space: SearchSpace, evaluator: Evaluator, *, run_dir: str | os.PathLike | None = None
    ) -> SearchResult:
        check_evaluator(evaluator)
        settings = self._validate(space)
        source = training_source(evaluator)
        training = source.training(self.train_loss, F.cross_entropy, self.distill_temperature)
        table, hardware = self._cost_table(space, evaluator)
        if self.cost_metric not in table.metrics:
            raise NMSearchError(f"gumbel.cost_metric {self.cost_metric!r} is not one of {', '.join(table.metrics)}")
        dense = np.zeros((1, len(space.layers)), dtype=np.int64)
        dense_cost = float(table.totals(dense, [self.cost_metric])[self.cost_metric][0])
        if self.loss == "budget":
            floor = _cheapest_ratio(table, space, self.cost_metric, dense_cost)
            low = [b for b in settings if b < floor]
            if low:
                raise NMSearchError(
                    f"budget {low[0]:g} of dense {self.cost_metric} is below what the space can reach "
                    f"({floor:.3f} with the cheapest option everywhere)"
                )
        candidates: list[Candidate] = []
        logs, probs = [], []
        # Resume state: per supernet run (its checkpoint name), that run's last epoch checkpoint.
        resumed = (self._take_resume() or {}).get("runs", {})
        self._progress = {"runs": {}}
        for setting in settings:
            run = _SupernetRun(self, space, source, training, table, dense_cost, setting, run_dir, resumed)
            logits = run.train()
            logs.append(run.log.assign(setting=setting))
            probs.append(run.probabilities.assign(setting=setting))
            for label, scheme in self._schemes(space, logits, setting).items():
                start = time.perf_counter()
                evaluation = evaluate_safely(evaluator, scheme)
                info = {**evaluation.info, "setting": setting, "pick": label, "expected_cost_ratio": run.final_ratio}
                candidates.append(
                    Candidate(
                        trial=len(candidates),
                        scheme=scheme,
                        evaluation=replace(evaluation, info=info),
                        state="FAIL" if evaluation.failed else COMPLETE,
                        duration_s=time.perf_counter() - start,
                    )
                )
        objectives: tuple[Objective, ...] = evaluator.objectives
        metadata = {
            "loss": self.loss,
            "train_loss": "distill" if training.distill else "task",
            "settings": settings,
            "cost_metric": self.cost_metric,
            "hardware": hardware,
            "fingerprint": space.fingerprint,
            "config": {k: v for k, v in asdict(self).items() if k != "recipe"} | {"recipe": asdict(self.recipe)},
        }
        tables = {"gumbel_log": pd.concat(logs, ignore_index=True), "gumbel_probs": pd.concat(probs, ignore_index=True)}
        return SearchResult.from_candidates(self.name, objectives, candidates, metadata, tables)

    def _schemes(self, space: SearchSpace, logits: dict[str, Tensor], setting: float) -> dict[str, Scheme]:
        provenance = {"strategy": self.name, "loss": self.loss, "setting": setting, "seed": self.seed}
        argmax = {name: space.options[name][int(logits[name].argmax())] for name in space.searchable}
        schemes = {"argmax": space.scheme(argmax, provenance={**provenance, "pick": "argmax"})}
        generator = torch.Generator().manual_seed(self.seed)  # on the CPU: the same draws on every device
        probabilities = {name: logits[name].detach().softmax(-1).cpu() for name in space.searchable}
        for i in range(self.samples):
            choice = {
                name: space.options[name][int(torch.multinomial(probabilities[name], 1, generator=generator))]
                for name in space.searchable
            }
            scheme = space.scheme(choice, provenance={**provenance, "pick": f"sample {i}"})
            if scheme not in schemes.values():
                schemes[f"sample {i}"] = scheme
        return schemes


def _cheapest_ratio(table: CostTable, space: SearchSpace, metric: str, dense_cost: float) -> float:
    index = table.metrics.index(metric)
    values = np.where(table.valid, table.values[..., index], np.inf)
    return float(values.min(axis=1).sum() / dense_cost)


class _SupernetRun:
    """One supernet training run for one cost weight (or budget), checkpointed every epoch."""

    def __init__(
        self,
        strategy: GumbelStrategy,
        space: SearchSpace,
        source: TrainingSource,
        training: Training,
        table: CostTable,
        dense_cost: float,
        setting: float,
        run_dir: str | os.PathLike | None,
        resumed: dict[str, Any],
    ) -> None:
        self.strategy, self.space, self.table = strategy, space, table
        self.source, self.training = source, training
        self.dense_cost, self.setting = dense_cost, setting
        key = json.dumps({"config": asdict(strategy), "setting": setting, "fingerprint": space.fingerprint},
                         sort_keys=True, default=str)  # fmt: skip
        self.key = f"run-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        self.checkpoint = Path(run_dir) / "gumbel" / f"{self.key}.pt" if run_dir else None
        self.resumed = resumed.get(self.key)
        self.log = pd.DataFrame()
        self.probabilities = pd.DataFrame()
        self.final_ratio = math.nan
        valid = torch.from_numpy(space.option_valid_mask())
        self.valid = valid
        self.searchable_rows = [space.layer_names.index(n) for n in space.searchable]

    def _probabilities(self, logits: dict[str, Tensor], softmax: bool = True) -> Tensor:
        """``(layers, max_options)`` option probabilities (or, ``softmax=False``, the given gates);
        fixed layers are dense with certainty."""
        # On the logits' device (the model's): the gates of an fbnet cost term live there.
        device = next(iter(logits.values())).device if logits else torch.device("cpu")
        rows = []
        for name in self.space.layer_names:
            row = torch.zeros(self.space.max_options, device=device)
            if name in logits:
                values = logits[name].softmax(-1) if softmax else logits[name]
                row = torch.cat([values, row[len(values) :]])
            else:
                row[0] = 1.0
            rows.append(row)
        return torch.stack(rows)

    def train(self) -> dict[str, Tensor]:
        strategy, source, training, space = self.strategy, self.source, self.training, self.space
        seed_everything(strategy.seed)
        model = source.pretrained().to(source.device)
        # The logits live beside the weights: every gate multiplies a weight mask or an activation.
        logits = {
            name: torch.zeros(len(space.options[name]), device=source.device, requires_grad=True)
            for name in space.searchable
        }
        layers = build_supernet(model, space, logits, strategy.seed)
        for layer in layers.values():
            layer.active_groups = strategy.active_groups
            layer.estimator, layer.sampling = strategy.estimator, strategy.sampling
            layer.srste_lambda = strategy.recipe.srste_lambda if strategy.recipe.estimator == "srste" else 0.0
        schedule = source.schedule
        weights = make_optimizer(model.parameters(), schedule, strategy.weight_lr or schedule.finetune_lr)
        arch = torch.optim.Adam(list(logits.values()), lr=strategy.arch_lr)
        start, rows, prob_rows = 0, [], []
        state = self.resumed
        if state is None and self.checkpoint is not None:
            state = load_checkpoint(self.checkpoint)
        if state is not None:
            model.load_state_dict(state["model"])
            with torch.no_grad():
                for name, value in state["logits"].items():
                    logits[name].copy_(value)
            weights.load_state_dict(state["weights"])
            arch.load_state_dict(state["arch"])
            set_rng_state(state["rng"])
            start, rows, prob_rows = state["epoch"] + 1, list(state["rows"]), list(state["prob_rows"])
        loader = source.loader(strategy.seed, False)  # a fixed 80/20 batch split
        warmup = math.ceil(strategy.warmup_fraction * strategy.epochs)

        def weight_loss(outputs: Tensor, targets: Tensor) -> Tensor:
            loss = training.loss(outputs, targets)
            terms = [layer.regulariser for layer in layers.values() if layer.regulariser is not None]
            for layer in layers.values():
                layer.regulariser = None
            return loss + sum(terms) if terms else loss

        def arch_loss(outputs: Tensor, targets: Tensor) -> Tensor:
            for layer in layers.values():
                layer.regulariser = None
            # The cost through the same gates as the loss: FBNet's relaxed sample, or ProxylessNAS' p.
            gates = self._probabilities({name: layer.cost_gates() for name, layer in layers.items()}, softmax=False)
            ratio = self.table.expected(gates, strategy.cost_metric) / self.dense_cost
            return architecture_loss(
                training.loss(outputs, targets), ratio, strategy.loss, self.setting,
                alpha=strategy.fbnet_alpha, beta=strategy.fbnet_beta, budget_weight=strategy.budget_weight,
            )  # fmt: skip

        for epoch in range(start, strategy.epochs):
            tau = temperature(epoch, strategy.epochs, strategy.tau_start, strategy.tau_decay,
                              strategy.tau_schedule, strategy.tau_end)  # fmt: skip
            for layer in layers.values():
                layer.tau, layer.train_logits = tau, False
            stats = train_one_epoch(model, training.batches(_EveryNth(loader, arch=False)), weights,
                                    loss_fn=weight_loss, device=source.device, forward=training.forward,
                                    description=f"supernet weights {epoch}")  # fmt: skip
            row = {"epoch": epoch, "tau": tau, "weight_loss": stats.loss, "weight_accuracy": stats.accuracy}
            if epoch >= warmup:
                for layer in layers.values():
                    layer.train_logits = True
                for p in model.parameters():
                    p.requires_grad_(False)
                arch_stats = train_one_epoch(model, training.batches(_EveryNth(loader, arch=True)), arch,
                                             loss_fn=arch_loss, device=source.device, forward=training.forward,
                                             description=f"supernet logits {epoch}")  # fmt: skip
                for p in model.parameters():
                    p.requires_grad_(True)
                row.update(arch_loss=arch_stats.loss, arch_accuracy=arch_stats.accuracy)
            distributed.average_buffers(model)  # BatchNorm statistics of the ranks' slices
            with torch.no_grad():
                probs = self._probabilities(logits)
                ratio = float(self.table.expected(probs, strategy.cost_metric)) / self.dense_cost
            row["expected_cost_ratio"] = ratio
            rows.append(row)
            for name in space.searchable:
                p = logits[name].detach().softmax(-1)
                for option, value in zip(space.options[name], p.tolist(), strict=True):
                    prob_rows.append({"epoch": epoch, "layer": name, "option": option.name, "probability": value})
            state = {
                "epoch": epoch, "model": model.state_dict(), "logits": {k: v.detach() for k, v in logits.items()},
                "weights": weights.state_dict(), "arch": arch.state_dict(), "rng": rng_state(),
                "rows": rows, "prob_rows": prob_rows,
            }  # fmt: skip
            strategy._record_progress(runs={**strategy._progress["runs"], self.key: state})
            if self.checkpoint is not None and distributed.is_main():  # rank 0 alone writes
                save_checkpoint(self.checkpoint, state)
        self.log = pd.DataFrame(rows)
        self.probabilities = pd.DataFrame(prob_rows)
        with torch.no_grad():
            self.final_ratio = (
                float(self.table.expected(self._probabilities(logits), strategy.cost_metric)) / self.dense_cost
            )
        return {name: value.detach() for name, value in logits.items()}
