"""Differentiable (Gumbel-softmax) search over weights / activations / both and N:M per layer.

The seed method (Akiva-Hochman et al., ECCVW 2022) as a supernet: every searchable layer gets one
logit per option of the space, trained by its own Adam on held-out training batches while the
weights train on the rest (FBNet's alternation: per epoch, weights first, then logits; the first
``warmup_fraction`` of the epochs train weights only). Straight-through hard Gumbel samples pick
an option per layer and step; the temperature anneals.

Options share the layer's weight tensor. Options with the same *activation* choice differ only in
the weight mask, so each such group is one GEMM with a soft mask ``sum_o g_o E_o`` (the weight
mixture is one mask, not one GEMM per option). Computing every group gives the exact
straight-through gradient for every logit; ``active_groups=2`` (default) computes the sampled
group plus one other drawn by probability (ProxylessNAS' two-path idea), which bounds a step at
about two GEMMs per layer.

The loss adds the cost model's differentiable expected cost ``E[cost] = sum p(option) cost``:
``additive`` ``CE + lambda E[cost]/cost_dense`` (ProxylessNAS), ``fbnet`` ``CE alpha log(LAT)^beta``
with ``LAT = 100 E[cost]/cost_dense`` (so a dense model sits at FBNet's scale of ~100), or
``budget`` ``CE + lambda max(0, E[cost]/cost_dense - budget)^2`` steering to a fraction of dense.
The result is the argmax scheme (and optionally the best of k samples), scored by the evaluator
like any candidate; ``lambdas`` (or ``budgets``) run one search each and trace a front.
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

from evaluators import CostEvaluator, CostTable, Evaluator, HardwareCostModel, Objective, find_part_or_none
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
from strategies.base import (
    COMPLETE,
    Candidate,
    Choice,
    SearchResult,
    StrategyBase,
    accuracy_part,
    load_checkpoint,
    save_checkpoint,
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

    def __init__(self, activation: NMPattern | None, members: list[int], weights: list[NMPattern | None]) -> None:
        self.activation = activation
        self.members = members  # option indices
        self.weights = weights  # each member's weight pattern


class GumbelLayer(nn.Module):
    """A searchable layer in the supernet: the wrapped layer plus its options and logits.

    The logits are a plain tensor attribute, not a registered parameter, so they stay out of
    ``model.parameters()`` and are trained by the architecture optimizer alone.
    """

    def __init__(self, layer: SparseLayerMixin, options: Sequence[Option], logits: Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.options = tuple(options)
        self.logits = logits
        by_activation: dict[NMPattern | None, _Group] = {}
        for index, option in enumerate(self.options):
            group = by_activation.setdefault(option.activation, _Group(option.activation, [], []))
            group.members.append(index)
            group.weights.append(option.weight)
        self.groups = list(by_activation.values())
        self.weight_patterns = list(dict.fromkeys(o.weight for o in self.options))
        self.tau = 1.0
        self.active_groups: int | None = 2
        self.train_logits = False
        self.srste_lambda = 0.0
        self.regulariser: Tensor | None = None

    def sample(self) -> Tensor:
        logits = self.logits if self.train_logits else self.logits.detach()
        return F.gumbel_softmax(logits, tau=self.tau, hard=True)

    def _weight_masks(self) -> dict[NMPattern | None, Tensor]:
        w = self.layer.weight.detach()
        scores = w.abs()
        return {p: nm_mask(scores, p.n, p.m, dim=1, dtype=w.dtype) if p else None for p in self.weight_patterns}

    def _active(self, gates: Tensor) -> list[_Group]:
        chosen = int(gates.detach().argmax())
        first = next(g for g in self.groups if chosen in g.members)
        if self.active_groups is None or self.active_groups >= len(self.groups):
            return self.groups
        others = [g for g in self.groups if g is not first]
        probs = torch.stack([self.logits.detach().softmax(-1)[g.members].sum() for g in others])
        picks = torch.multinomial(probs + 1e-12, min(self.active_groups - 1, len(others)), replacement=False)
        return [first, *(others[int(i)] for i in picks)]

    def forward(self, x: Tensor) -> Tensor:
        gates = self.sample()
        masks = self._weight_masks()
        weight = self.layer.weight
        out = None
        for group in self._active(gates):
            member_gates = gates[group.members]
            share = member_gates.sum()  # 1 for the sampled group, 0 otherwise (forward value)
            soft = sum(
                (gate * masks[p] if p else gate for gate, p in zip(member_gates, group.weights, strict=True)),
                start=torch.zeros((), dtype=weight.dtype),
            )
            # Forward: W * soft. Backward: the weights get the straight-through gradient of the
            # sampled group only (``share``), the gates get <grad, W * E_o> for every member.
            effective = share * weight + weight.detach() * (soft - share)
            mask = self.layer.input_mask(x, group.activation) if group.activation else None
            if isinstance(group.activation, RowPattern):
                # Row masks select output positions; skipped rows output zero, bias included.
                y = self._gemm(x, effective) + share * self._bias_view(x)
                y = y * mask if mask is not None else y
            else:
                y = self._gemm(x * mask if mask is not None else x, effective) + share * self._bias_view(x)
            out = y if out is None else out + y
        chosen = int(gates.detach().argmax())
        chosen_weight = self.options[chosen].weight
        if self.srste_lambda and chosen_weight is not None and torch.is_grad_enabled():
            # SR-STE as a loss term: its gradient is srste_lambda * (1 - E) * W.
            pruned = weight * (1 - masks[chosen_weight])
            term = 0.5 * self.srste_lambda * pruned.pow(2).sum()
            self.regulariser = term if self.regulariser is None else self.regulariser + term
        return out

    def _bias_view(self, x: Tensor) -> Tensor | float:
        bias = self.layer.bias
        if bias is None:
            return 0.0
        return bias.view(1, -1, 1, 1) if isinstance(self.layer, nn.Conv2d) else bias

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
    scored by the evaluator."""

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
    active_groups: int | None = 2
    samples: int = 0
    hardware: str | None = None
    seed: int = 0
    name: str = "gumbel"

    def _validate(self, space: SearchSpace) -> list[float]:
        if self.loss not in LOSS_FORMS:
            raise NMSearchError(f"gumbel.loss = {self.loss!r} is not one of {', '.join(LOSS_FORMS)}")
        if self.tau_schedule not in TEMPERATURE_SCHEDULES:
            raise NMSearchError(f"gumbel.tau_schedule must be one of {', '.join(TEMPERATURE_SCHEDULES)}")
        if self.epochs < 1 or not 0 <= self.warmup_fraction < 1:
            raise NMSearchError("gumbel.epochs must be >= 1 and warmup_fraction in [0, 1)")
        if self.active_groups is not None and self.active_groups < 1:
            raise NMSearchError(f"gumbel.active_groups must be >= 1 or null (all), got {self.active_groups}")
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
        settings = self._validate(space)
        trainer = accuracy_part(evaluator).trainer
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
        for setting in settings:
            run = _SupernetRun(self, space, trainer, table, dense_cost, setting, run_dir)
            logits = run.train()
            logs.append(run.log.assign(setting=setting))
            probs.append(run.probabilities.assign(setting=setting))
            for label, scheme in self._schemes(space, logits, setting).items():
                start = time.perf_counter()
                evaluation = evaluator.evaluate(scheme)
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
        generator = torch.Generator().manual_seed(self.seed)
        for i in range(self.samples):
            choice = {
                name: space.options[name][int(torch.multinomial(logits[name].softmax(-1), 1, generator=generator))]
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
        trainer: Any,
        table: CostTable,
        dense_cost: float,
        setting: float,
        run_dir: str | os.PathLike | None,
    ) -> None:
        self.strategy, self.space, self.trainer, self.table = strategy, space, trainer, table
        self.dense_cost, self.setting = dense_cost, setting
        key = json.dumps({"config": asdict(strategy), "setting": setting, "fingerprint": space.fingerprint},
                         sort_keys=True, default=str)  # fmt: skip
        self.checkpoint = (
            Path(run_dir) / "gumbel" / f"run-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt" if run_dir else None
        )
        self.log = pd.DataFrame()
        self.probabilities = pd.DataFrame()
        self.final_ratio = math.nan
        valid = torch.from_numpy(space.option_valid_mask())
        self.valid = valid
        self.searchable_rows = [space.layer_names.index(n) for n in space.searchable]

    def _probabilities(self, logits: dict[str, Tensor]) -> Tensor:
        """``(layers, max_options)`` option probabilities; fixed layers are dense with certainty."""
        rows = []
        for name in self.space.layer_names:
            row = torch.zeros(self.space.max_options)
            if name in logits:
                row = torch.cat([logits[name].softmax(-1), torch.zeros(self.space.max_options - len(logits[name]))])
            else:
                row = row.index_fill(0, torch.tensor([0]), 1.0)
            rows.append(row)
        return torch.stack(rows)

    def train(self) -> dict[str, Tensor]:
        strategy, trainer, space = self.strategy, self.trainer, self.space
        seed_everything(strategy.seed)
        model = trainer.pretrained().to(trainer.device)
        logits = {name: torch.zeros(len(space.options[name]), requires_grad=True) for name in space.searchable}
        layers = build_supernet(model, space, logits, strategy.seed)
        for layer in layers.values():
            layer.active_groups = strategy.active_groups
            layer.srste_lambda = strategy.recipe.srste_lambda if strategy.recipe.estimator == "srste" else 0.0
        schedule = trainer.task.schedule
        weights = make_optimizer(model.parameters(), schedule, strategy.weight_lr or schedule.finetune_lr)
        arch = torch.optim.Adam(list(logits.values()), lr=strategy.arch_lr)
        start, rows, prob_rows = 0, [], []
        state = load_checkpoint(self.checkpoint) if self.checkpoint is not None else None
        if state is not None:
            model.load_state_dict(state["model"])
            with torch.no_grad():
                for name, value in state["logits"].items():
                    logits[name].copy_(value)
            weights.load_state_dict(state["weights"])
            arch.load_state_dict(state["arch"])
            torch.set_rng_state(state["rng"])
            start, rows, prob_rows = state["epoch"] + 1, state["rows"], state["prob_rows"]
        loader = trainer.task.loader("train", shuffle=True, seed=strategy.seed)  # a fixed 80/20 batch split
        warmup = math.ceil(strategy.warmup_fraction * strategy.epochs)

        def weight_loss(outputs: Tensor, targets: Tensor) -> Tensor:
            loss = F.cross_entropy(outputs, targets)
            terms = [layer.regulariser for layer in layers.values() if layer.regulariser is not None]
            for layer in layers.values():
                layer.regulariser = None
            return loss + sum(terms) if terms else loss

        def arch_loss(outputs: Tensor, targets: Tensor) -> Tensor:
            for layer in layers.values():
                layer.regulariser = None
            ratio = self.table.expected(self._probabilities(logits), strategy.cost_metric) / self.dense_cost
            return architecture_loss(
                F.cross_entropy(outputs, targets), ratio, strategy.loss, self.setting,
                alpha=strategy.fbnet_alpha, beta=strategy.fbnet_beta, budget_weight=strategy.budget_weight,
            )  # fmt: skip

        for epoch in range(start, strategy.epochs):
            tau = temperature(epoch, strategy.epochs, strategy.tau_start, strategy.tau_decay,
                              strategy.tau_schedule, strategy.tau_end)  # fmt: skip
            for layer in layers.values():
                layer.tau, layer.train_logits = tau, False
            stats = train_one_epoch(model, _EveryNth(loader, arch=False), weights, loss_fn=weight_loss,
                                    device=trainer.device, description=f"supernet weights {epoch}")  # fmt: skip
            row = {"epoch": epoch, "tau": tau, "weight_loss": stats.loss, "weight_accuracy": stats.accuracy}
            if epoch >= warmup:
                for layer in layers.values():
                    layer.train_logits = True
                for p in model.parameters():
                    p.requires_grad_(False)
                arch_stats = train_one_epoch(model, _EveryNth(loader, arch=True), arch, loss_fn=arch_loss,
                                             device=trainer.device, description=f"supernet logits {epoch}")  # fmt: skip
                for p in model.parameters():
                    p.requires_grad_(True)
                row.update(arch_loss=arch_stats.loss, arch_accuracy=arch_stats.accuracy)
            with torch.no_grad():
                probs = self._probabilities(logits)
                ratio = float(self.table.expected(probs, strategy.cost_metric)) / self.dense_cost
            row["expected_cost_ratio"] = ratio
            rows.append(row)
            for name in space.searchable:
                p = logits[name].detach().softmax(-1)
                for option, value in zip(space.options[name], p.tolist(), strict=True):
                    prob_rows.append({"epoch": epoch, "layer": name, "option": option.name, "probability": value})
            if self.checkpoint is not None:
                state = {
                    "epoch": epoch, "model": model.state_dict(), "logits": {k: v.detach() for k, v in logits.items()},
                    "weights": weights.state_dict(), "arch": arch.state_dict(), "rng": torch.get_rng_state(),
                    "rows": rows, "prob_rows": prob_rows,
                }  # fmt: skip
                save_checkpoint(self.checkpoint, state)
        self.log = pd.DataFrame(rows)
        self.probabilities = pd.DataFrame(prob_rows)
        with torch.no_grad():
            self.final_ratio = (
                float(self.table.expected(self._probabilities(logits), strategy.cost_metric)) / self.dense_cost
            )
        return {name: value.detach() for name, value in logits.items()}
