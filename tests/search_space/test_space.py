from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from experiments.models import resnet18
from search_space import (
    DENSE,
    NMSearchError,
    Option,
    Scheme,
    SchemeError,
    SchemeMismatchError,
    SearchSpace,
    sparsify,
)


@pytest.fixture(scope="module")
def resnet_space() -> SearchSpace:
    torch.manual_seed(0)
    return SearchSpace.from_model(resnet18(1000, "imagenet"), torch.randn(1, 3, 224, 224))


class SharedMLP(nn.Module):
    """Uses ``hidden`` twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.hidden = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = torch.relu(self.hidden(h))
        return self.out(torch.relu(self.hidden(h)))


def test_resnet18_discovery_matches_reference_totals(resnet_space: SearchSpace) -> None:
    frame = resnet_space.to_frame()
    assert len(frame) == 21 and resnet_space.skipped == ()
    assert frame["macs"].sum() == pytest.approx(1.82e9, rel=0.01)
    assert frame["params"].sum() == pytest.approx(11.68e6, rel=0.01)  # conv + fc weights (BN excluded)
    stem = resnet_space.info("conv1")
    assert (stem.tokens, stem.reduction, stem.outputs, stem.groups) == (112 * 112, 3 * 7 * 7, 64, 1)
    assert stem.input_shape == (1, 3, 224, 224) and stem.output_shape == (1, 64, 112, 112)
    assert resnet_space.options["conv1"] == (DENSE,)  # 3 input channels: no M in 4, 8 divides them
    down = resnet_space.info("layers.1.0.downsample.0")
    assert (down.tokens, down.reduction, down.outputs) == (28 * 28, 64, 128)
    fc = resnet_space.info("fc")
    assert (fc.kind, fc.tokens, fc.reduction, fc.outputs, fc.macs) == ("linear", 1, 512, 1000, 512_000)
    assert len(resnet_space.options["fc"]) == 13  # dense + {w, a, both} x {2:4, 1:4, 2:8, 1:8}
    assert resnet_space.searchable == resnet_space.layer_names[1:]
    assert resnet_space.size == 13**20
    assert resnet_space.log10_size == pytest.approx(20 * np.log10(13))
    assert resnet_space.example_batch_size == 1
    # execution order: the stem first, the classifier last
    assert resnet_space.layer_names[0] == "conv1" and resnet_space.layer_names[-1] == "fc"


def test_options_frame_and_untied_both() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    tied = SearchSpace.from_model(model, torch.randn(2, 8))
    assert tied.option_names("0") == [
        "dense", "w2:4", "w1:4", "w2:8", "w1:8", "a2:4", "a1:4", "a2:8", "a1:8",
        "w2:4+a2:4", "w1:4+a1:4", "w2:8+a2:8", "w1:8+a1:8",
    ]  # fmt: skip
    untied = SearchSpace.from_model(model, torch.randn(2, 8), tie_both=False)
    assert len(untied.options["0"]) == 1 + 4 + 4 + 16
    assert "w2:4+a1:8" in untied.option_names("0")
    frame = tied.options_frame()
    assert list(frame.columns) == ["layer", "index", "option", "target", "weights", "activations"]
    assert frame.loc[frame.option == "w1:8+a1:8", "target"].item() == "both"
    only_weights = SearchSpace.from_model(model, torch.randn(2, 8), ratios=["2:4", "4:16"], targets=["weights"])
    assert only_weights.option_names("0") == ["dense", "w2:4"]  # 8 features: 16 does not divide


def test_include_exclude_and_keep_first_last(resnet_space: SearchSpace) -> None:
    model = resnet18(10, "cifar")
    x = torch.randn(2, 3, 32, 32)
    space = SearchSpace.from_model(model, x, exclude=["*.downsample.*", nn.Linear])
    assert space.options["fc"] == (DENSE,) and "excluded by 'Linear'" in space.info("fc").note
    assert space.options["layers.1.0.downsample.0"] == (DENSE,)
    assert len(space.options["layers.1.0.conv1"]) == 13
    included = SearchSpace.from_model(model, x, include=["layers.3.*"])
    assert set(included.searchable) == {n for n in included.layer_names if n.startswith("layers.3.")}
    edges = SearchSpace.from_model(model, x, keep_first_last_dense=True)
    assert edges.options["fc"] == (DENSE,) and "last layer kept dense" in edges.info("fc").note
    assert edges.info("conv1").note == "first layer kept dense"
    assert len(edges.layers) == len(space.layers)  # fixed layers stay modelled: their cost counts


def test_shared_layers_sum_their_calls() -> None:
    space = SearchSpace.from_model(SharedMLP(), torch.randn(5, 12))
    hidden = space.info("hidden")
    assert hidden.calls == 2 and hidden.tokens == 10 and hidden.macs == 2 * 5 * 16 * 16
    assert space.layer_names == ["inp", "hidden", "out"]


def test_transformer_reports_functional_weights_as_skipped() -> None:
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    space = SearchSpace.from_model(layer, torch.randn(2, 5, 32))
    assert space.layer_names == ["linear1", "linear2"]
    assert {s.name for s in space.skipped} == {"self_attn.in_proj_weight", "self_attn.out_proj"}
    assert all("functionally" in s.reason for s in space.skipped)
    linear1 = space.info("linear1")
    assert linear1.input_shape == (2, 5, 32) and linear1.tokens == 10 and linear1.macs == 10 * 32 * 64


def test_grouped_and_depthwise_convs() -> None:
    model = nn.Sequential(nn.Conv2d(16, 16, 3, groups=16), nn.Conv2d(16, 32, 3, groups=2))
    space = SearchSpace.from_model(model, torch.randn(1, 16, 9, 9))
    assert space.options["0"] == (DENSE,)
    grouped = space.info("1")
    assert (grouped.channels, grouped.reduction, grouped.outputs, grouped.groups) == (8, 72, 16, 2)
    assert grouped.macs == 2 * (5 * 5) * 72 * 16
    assert "w1:8" in space.option_names("1") and "w1:16" not in space.option_names("1")


def test_example_inputs_as_tuple_and_dict() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(y)

    model = TwoInputs()
    assert SearchSpace.from_model(model, (torch.randn(1, 8), torch.randn(1, 8))).layer_names == ["a", "b"]
    assert SearchSpace.from_model(model, {"x": torch.randn(1, 8), "y": torch.randn(1, 8)}).layer_names == ["a", "b"]
    # CPU inputs follow the model to its device (here "meta"; on a GPU machine, a model moved to CUDA)
    on_cpu = SearchSpace.from_model(model, {"x": torch.randn(1, 8), "y": torch.randn(1, 8)})
    moved = SearchSpace.from_model(model.to("meta"), {"x": torch.randn(1, 8), "y": torch.randn(1, 8)})
    assert moved.fingerprint == on_cpu.fingerprint


def test_spaces_without_layers_are_refused() -> None:
    with pytest.raises(NMSearchError, match="no Conv2d or Linear layers"):
        SearchSpace.from_model(nn.Sequential(nn.ReLU()), torch.randn(2, 3))

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    with pytest.raises(NMSearchError, match="nothing to search over"):
        SearchSpace.from_model(Unused(), torch.randn(2, 4))
    with pytest.raises(NMSearchError, match=r"the model itself is a Linear.*nn.Sequential\(model\)"):
        SearchSpace.from_model(nn.Linear(8, 8), torch.randn(1, 8))
    with pytest.raises(NMSearchError, match=r"space\.targets"):
        SearchSpace.from_model(nn.Sequential(nn.Linear(8, 8)), torch.randn(1, 8), targets=["weights", "bias"])


def test_encode_decode_round_trip(resnet_space: SearchSpace) -> None:
    for seed in range(5):
        scheme = Scheme.random(resnet_space, seed)
        vector = resnet_space.encode(scheme)
        assert vector.shape == (21,) and vector[0] == 0
        assert resnet_space.decode(vector) == scheme
    assert Scheme.random(resnet_space, 3) == Scheme.random(resnet_space, 3)
    many = resnet_space.encode_many([Scheme.dense(resnet_space), Scheme.random(resnet_space, 1)])
    assert many.shape == (2, 21) and not many[0].any()
    mask = resnet_space.option_valid_mask()
    assert mask.shape == (21, 13) and mask[0].sum() == 1 and mask[1:].all()
    assert resnet_space.scheme({"fc": "w2:4"}).choices["fc"] == "w2:4"


def test_encoding_errors_name_the_layer_and_the_fix(resnet_space: SearchSpace) -> None:
    with pytest.raises(
        SchemeMismatchError, match=r"option 'w2:4' is not available for layer 'conv1' .*available: dense"
    ):
        resnet_space.scheme({"conv1": "w2:4"})
    with pytest.raises(SchemeMismatchError, match=r"'layer4\.0\.conv1' is not in the search space \(did you mean"):
        resnet_space.scheme({"layer4.0.conv1": "w2:4"})
    with pytest.raises(SchemeMismatchError, match="expected 21 option indices"):
        resnet_space.decode([0, 1])
    with pytest.raises(SchemeMismatchError, match="has 13 options, got index 13"):
        resnet_space.decode([0] + [13] * 20)
    other = SearchSpace.from_model(resnet18(10, "cifar"), torch.randn(1, 3, 32, 32))
    with pytest.raises(SchemeMismatchError, match="made for another model"):
        resnet_space.encode(Scheme.dense(other))


def test_uniform_scheme_leaves_ineligible_layers_dense(resnet_space: SearchSpace) -> None:
    scheme = Scheme.uniform(resnet_space, "weights", 1, 8)
    assert scheme["conv1"] == DENSE
    assert all(scheme[n] == Option(weight=Option.parse("w1:8").weight) for n in resnet_space.layer_names[1:])
    assert Scheme.uniform(resnet_space, "both", 2, 4)["fc"].name == "w2:4+a2:4"
    with pytest.raises(NMSearchError, match="uniform target"):
        Scheme.uniform(resnet_space, "bias", 2, 4)


def test_wrapped_models_are_discovered_like_dense_ones() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    x = torch.randn(2, 8)
    dense = SearchSpace.from_model(model, x)
    model[0] = sparsify(model[0], "2:4", name="0")
    sparse = SearchSpace.from_model(model, x)
    assert sparse.fingerprint == dense.fingerprint
    assert sparse.info("0").module_type == "Linear" and sparse.to_frame().equals(dense.to_frame())


def test_uniform_refuses_an_option_the_space_does_not_offer(resnet_space: SearchSpace) -> None:
    with pytest.raises(SchemeError, match=r"'w4:8' is offered on no layer.*it offers: .*w2:4"):
        resnet_space.uniform("weights", 4, 8)
    weights_only = SearchSpace.from_model(resnet18(10, "cifar"), torch.randn(1, 3, 32, 32), targets=["weights"])
    with pytest.raises(SchemeError, match="'a2:4' is offered on no layer"):
        weights_only.uniform("activations", 2, 4)
    with pytest.raises(SchemeError, match=r"'r0\.3' is offered on no layer"):
        weights_only.uniform_rows(0.3)
    assert "activations 2:4" not in weights_only.uniform_schemes()


def test_constructors_live_on_the_space_and_scheme_aliases_match(resnet_space: SearchSpace) -> None:
    assert resnet_space.dense() == Scheme.dense(resnet_space)
    assert resnet_space.uniform("weights", 2, 4) == Scheme.uniform(resnet_space, "weights", 2, 4)
    assert resnet_space.random(3) == Scheme.random(resnet_space, 3)
    assert resnet_space.random(3).provenance["strategy"] == "random"


def test_scheme_module_does_not_import_the_space_or_surgery_at_module_level() -> None:
    import ast

    import search_space.scheme

    tree = ast.parse(Path(search_space.scheme.__file__).read_text())
    imported = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert imported.isdisjoint({"search_space.space", "search_space.surgery"})
