"""A fast, deterministic evaluator with a real trade-off, for strategy tests (and worker subprocesses)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import torch
from torch import nn

from evaluators import Evaluation, Objective
from search_space import Scheme, SearchSpace

ROOT = Path(__file__).resolve().parents[2]


def toy_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


def toy_space() -> SearchSpace:
    return SearchSpace.from_model(toy_model(), torch.randn(4, 16))


class ToyEvaluator:
    """accuracy falls and latency drops with sparsity; activations cost more accuracy than weights.

    ``fail_when`` makes schemes whose choices contain that option name fail; ``sleep_s`` slows
    every evaluation; ``marker`` (a path) gets a line when an evaluation starts; the evaluation
    that writes line ``hang_at`` of it never returns, so a process killed once the marker has
    that many lines is surely killed inside that evaluation.
    """

    objectives = (
        Objective("accuracy", "maximize"),
        Objective("latency_ms", "minimize", "ms"),
        Objective("bytes_mb", "minimize", "MB"),
    )

    def __init__(
        self,
        space: SearchSpace,
        fail_when: str | None = None,
        sleep_s: float = 0.0,
        marker: str | None = None,
        hang_at: int | None = None,
    ):
        self.space, self.fail_when, self.sleep_s, self.marker, self.hang_at = space, fail_when, sleep_s, marker, hang_at
        self.calls = 0

    def evaluate(self, scheme: Scheme) -> Evaluation:
        self.calls += 1
        if self.marker:
            with open(self.marker, "a") as handle:
                handle.write(f"{scheme.choices}\n")
            if self.hang_at is not None and len(Path(self.marker).read_text().splitlines()) >= self.hang_at:
                while True:  # until killed
                    time.sleep(60)
        time.sleep(self.sleep_s)
        if self.fail_when and any(self.fail_when in o for o in scheme.choices.values()):
            return Evaluation.failure(self.objectives, f"diverged on {self.fail_when}")
        accuracy, latency, bytes_mb = 1.0, 0.0, 0.0
        for info in self.space.layers:
            option = scheme[info.name]
            w = option.weight.density if option.weight else 1.0
            a = option.activation.density if option.activation else 1.0
            accuracy -= 0.02 * (1 - w) + 0.05 * (1 - a) + 0.03 * (1 - w) * (1 - a)
            latency += info.macs * 1e-4 * max(w, 0.5) * (1.0 if a == 1.0 else 0.9)
            bytes_mb += (info.params * w + info.input_numel * a) * 2e-6
        return Evaluation(
            {"accuracy": accuracy, "latency_ms": latency, "bytes_mb": bytes_mb}, info={"loss": 1 - accuracy}
        )


def worker(
    storage: str,
    n_trials: int,
    index: int = 0,
    *,
    sleep_s: float = 0.0,
    marker: str | os.PathLike = "",
    run_dir: str | os.PathLike = "",
    grace_period_s: int = 3,
    env: dict[str, str] | None = None,
    hang_at: int | None = None,
) -> subprocess.Popen:
    """A worker process running an Optuna search of the toy space on ``storage`` (see ``main``;
    ``hang_at``: see :class:`ToyEvaluator`)."""
    command = [
        sys.executable, "-m", "tests.strategies.toy", storage, str(n_trials), str(index),
        "--sleep", str(sleep_s), "--marker", str(marker), "--run-dir", str(run_dir), "--grace", str(grace_period_s),
        *(["--hang-at", str(hang_at)] if hang_at is not None else []),
    ]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def main(argv: list[str] | None = None) -> None:
    """One worker: search the toy space on a shared storage; with ``--run-dir`` save the result."""
    from strategies import OptunaStrategy

    parser = argparse.ArgumentParser()
    parser.add_argument("storage")
    parser.add_argument("n_trials", type=int)
    parser.add_argument("worker", type=int)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--marker", default="")
    parser.add_argument("--run-dir", default="")
    parser.add_argument("--grace", type=int, default=3)
    parser.add_argument("--hang-at", type=int, default=None)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = toy_space()
    strategy = OptunaStrategy(
        n_trials=args.n_trials,
        storage=args.storage,
        worker_index=args.worker,
        heartbeat_interval_s=1,
        grace_period_s=args.grace,
    )
    evaluator = ToyEvaluator(space, sleep_s=args.sleep, marker=args.marker or None, hang_at=args.hang_at)
    result = strategy.search(space, evaluator)
    if args.run_dir:
        result.save(args.run_dir)


if __name__ == "__main__":
    main()


class TinyEncoderTask:
    """A label-free pre-trained task (the ``PretrainedTask`` interface, as ``task=minilm``) around a
    2-layer BERT built from a tiny config: mean-pooled sentence embeddings of random token batches.
    Needs ``transformers`` (the ``transformers`` extra)."""

    name = "tiny_encoder"

    def __init__(self, vocab: int = 50, length: int = 8, train_batches: int = 10, batch: int = 8) -> None:
        self.vocab, self.length, self.train_count, self.batch = vocab, length, train_batches, batch

    def build_model(self) -> nn.Module:
        import transformers

        from experiments.tasks.minilm import SentenceEncoder

        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=self.vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return SentenceEncoder(transformers.BertModel(config, add_pooling_layer=False)).eval()

    def _tokens(self, count: int, seed: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, self.vocab, (count, self.length), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones_like(ids)
        mask[::2, -2:] = 0  # some padding: the attention mask matters
        return {"input_ids": ids, "attention_mask": mask}

    def example_inputs(self) -> dict[str, torch.Tensor]:
        return self._tokens(4, 1)

    def calibration_inputs(self) -> dict[str, torch.Tensor]:
        return self._tokens(32, 2)

    def heldout_batches(self) -> list[dict[str, torch.Tensor]]:
        return [self._tokens(16, 3), self._tokens(16, 4)]

    def training_batches(self, seed: int = 0) -> list[dict[str, torch.Tensor]]:
        return [self._tokens(self.batch, 100 + 1000 * seed + i) for i in range(self.train_count)]

    @staticmethod
    def outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch)

    def config(self) -> dict[str, object]:
        return {"task": self.name}
