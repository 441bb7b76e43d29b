"""Discovery and surgery on small Hugging Face models (BERT, GPT-2, ViT) built from tiny configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search_space import SearchSpace
from search_space.layers import SparseConv1D, weight_group_dim
from search_space.oneshot import oneshot_prune

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _tokens(batch: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32,
    )  # fmt: skip
    return transformers.BertModel(config).eval()


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def test_bert_from_keyword_inputs() -> None:
    model = _bert()
    inputs = _tokens()
    space = SearchSpace.from_model(model, inputs)
    skipped = {s.name: s.reason for s in space.skipped}
    assert "embeddings.word_embeddings" in skipped and "lookup" in skipped["embeddings.word_embeddings"]
    names = space.layer_names
    assert "encoder.layer.0.attention.self.query" in names and "pooler.dense" in names
    assert space.info("encoder.layer.0.intermediate.dense").tokens == 16  # 2 x 8 tokens
    scheme = space.uniform("weights", 2, 4)
    sparse = scheme.apply(model)
    scheme.verify(sparse)
    with torch.no_grad():
        assert torch.isfinite(sparse(**inputs).last_hidden_state).all()
    scheme.verify(scheme.finalize(sparse))


def test_gpt2_conv1d_is_a_transposed_linear_and_tied_head_is_skipped() -> None:
    model = _gpt2()
    inputs = _tokens(4, 16)
    space = SearchSpace.from_model(model, inputs)
    skipped = {s.name: s.reason for s in space.skipped}
    assert "tied" in skipped["lm_head"] and "transformer.wte.weight" in skipped["lm_head"]
    info = space.info("transformer.h.0.attn.c_attn")
    assert (info.module_type, info.kind, info.channels, info.outputs) == ("Conv1D", "linear", 32, 96)
    assert space.info("transformer.h.0.mlp.c_proj").channels == 128
    conv1d = model.transformer.h[0].attn.c_attn
    scheme = space.uniform("weights", 2, 4)
    sparse = scheme.apply(model)
    layer = sparse.transformer.h[0].attn.c_attn
    assert isinstance(layer, SparseConv1D) and weight_group_dim(layer) == 0
    assert set(sparse.state_dict()) == set(model.state_dict())  # same keys and shapes as the dense model
    x = torch.randn(3, 32)
    expected = x @ (conv1d.weight * layer.weight_mask()) + conv1d.bias
    torch.testing.assert_close(layer(x), expected)
    # groups of M run along the stored weight's first dimension (K = in_features)
    assert int((layer.weight_mask().unflatten(0, (-1, 4)).sum(1) != 2).sum()) == 0
    scheme.verify(sparse)
    finalized = scheme.finalize(sparse)
    assert type(finalized.transformer.h[0].attn.c_attn) is type(conv1d)
    scheme.verify(finalized)
    both = space.uniform("both", 2, 4).apply(model)
    with torch.no_grad():
        assert torch.isfinite(both(**inputs).logits).all()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_gpt2_one_shot(method: str) -> None:
    model = _gpt2()
    space = SearchSpace.from_model(model, _tokens())
    scheme = space.uniform("weights", 2, 4)
    calibration = _tokens(16, 16)  # 256 tokens >= 128 columns of the widest layer
    pruned = oneshot_prune(model, scheme, calibration, method)
    scheme.verify(scheme.finalize(pruned))
    with torch.no_grad():
        dense, sparse = model(**calibration).logits, pruned(**calibration).logits
    magnitude = scheme.apply(model)
    with torch.no_grad():
        by_magnitude = magnitude(**calibration).logits
    assert (sparse - dense).norm() < (by_magnitude - dense).norm()


def test_vit_patch_conv_stays_dense() -> None:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    model = transformers.ViTModel(config).eval()
    space = SearchSpace.from_model(model, torch.randn(2, 3, 16, 16))
    patch = "embeddings.patch_embeddings.projection"
    assert space.info(patch).kind == "conv2d" and space.option_names(patch) == ["dense"]  # 3 input channels
    assert sum(".0." in name for name in space.searchable) == 6  # q, k, v, output and the two MLP Linears
    scheme = space.uniform("weights", 2, 4)
    scheme.verify(scheme.apply(model))


def test_positional_tuple_inputs() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x) * scale)

    space = SearchSpace.from_model(TwoInputs(), (torch.randn(3, 8), torch.tensor(2.0)))
    assert space.layer_names == ["a", "b"] and space.example_batch_size == 3
