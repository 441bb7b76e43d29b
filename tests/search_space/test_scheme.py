import copy
import json
import os
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn

from experiments.models import resnet18
from search_space import (
    DENSE,
    IneligibleLayerError,
    NMPattern,
    Option,
    Scheme,
    SchemeError,
    SchemeMismatchError,
    SearchSpace,
    SparseLayerMixin,
    model_fingerprint,
)
from search_space import scheme as scheme_module


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


MODELS = {
    "mlp": (mlp, (4, 16)),
    "resnet18": (lambda: resnet18(1000, "imagenet"), (2, 3, 64, 64)),
    "transformer": (lambda: nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0), (2, 5, 32)),
}


def test_option_names_round_trip() -> None:
    for name in ["dense", "w2:4", "a1:8", "w2:4+a2:4", "w1:8+a2:8"]:
        assert Option.parse(name).name == name
    assert Option.parse("w2:4+a2:4").target == "both" and Option.parse("a2:8").target == "activations"
    assert Option(NMPattern(4, 4), None) == DENSE  # N == M is dense
    for bad in ["", "w", "x2:4", "w2:4a", "w5:4", "weights"]:
        with pytest.raises(SchemeError if bad != "w5:4" else ValueError):
            Option.parse(bad)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_round_trip_save_load_apply_finalize_verify(model_name: str, tmp_path: Path) -> None:
    make, shape = MODELS[model_name]
    model = make().eval()
    x = torch.randn(shape)
    space = SearchSpace.from_model(model, x)
    expected = model(x)

    dense = Scheme.dense(space)
    dense_model = dense.apply(model)
    assert torch.equal(dense_model(x), expected)  # the dense scheme reproduces the outputs exactly

    scheme = Scheme.random(space, seed=7).with_metadata(hardware="a100", metrics={"accuracy": 0.9})
    path = scheme.save(tmp_path / "scheme.json")
    loaded = Scheme.load(path)
    assert loaded == scheme and loaded.fingerprint == space.fingerprint and loaded.hardware == "a100"
    assert dict(loaded.metrics) == {"accuracy": 0.9}
    assert loaded.provenance["strategy"] == "random" and loaded.provenance["seed"] == 7
    assert loaded.provenance["nmsearch_version"] and loaded.provenance["created_utc"].endswith("Z")

    sparse = loaded.apply(model)
    assert sparse is not model and not any(isinstance(m, SparseLayerMixin) for m in model.modules())
    out = sparse(x)
    assert out.shape == expected.shape
    loaded.finalize(sparse)
    report = loaded.verify(sparse)
    assert report["weights_ok"].all() and report["activations_ok"].all()
    torch.testing.assert_close(sparse(x), out)  # baking the masks does not change the outputs
    for name, option in loaded:
        module = sparse.get_submodule(name)
        assert isinstance(module, SparseLayerMixin) == (option.activation is not None)
        if option.weight:
            groups = module.weight.detach().unflatten(1, (-1, option.weight.m))
            assert ((groups != 0).sum(2) <= option.weight.n).all()
    assert model_fingerprint(sparse) == space.fingerprint


def test_json_file_follows_the_shipped_schema(tmp_path: Path) -> None:
    space = SearchSpace.from_model(mlp(), torch.randn(2, 16))
    data = json.loads(Scheme.uniform(space, "both", 2, 4).save(tmp_path / "s.json").read_text())
    schema = json.loads((Path(scheme_module.__file__).parent / "scheme.schema.json").read_text())
    jsonschema.validate(data, schema)
    assert data["format"] == "nmsearch.scheme" and data["version"] == 1
    assert data["layers"][0] == {
        "name": "0", "target": "both", "weights": {"n": 2, "m": 4}, "activations": {"n": 2, "m": 4}, "shape": [32, 16]
    }  # fmt: skip


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    space = SearchSpace.from_model(mlp(), torch.randn(2, 16))
    path = Scheme.dense(space).save(tmp_path / "s.json")
    before = path.read_text()

    def broken_replace(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        Scheme.uniform(space, "weights", 1, 8).save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temporary file left behind


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _valid() -> dict:
    return {
        "format": "nmsearch.scheme",
        "version": 1,
        "layers": [{"name": "0", "target": "weights", "weights": {"n": 2, "m": 4}, "activations": None}],
    }


@pytest.mark.parametrize(
    "mutate,fragment",
    [
        (lambda d: "{not json", "is not valid JSON: line 1 column 2"),
        (lambda d: {**d, "format": "asp.mask"}, "not an nmsearch scheme"),
        (lambda d: {**d, "version": 2}, "version 2 is newer than this nmsearch reads"),
        (lambda d: {k: v for k, v in d.items() if k != "layers"}, "top level: 'layers' is a required property"),
        (lambda d: {**d, "layers": [{**d["layers"][0], "weights": {"n": 0, "m": 4}}]}, r"layers\[0\]\.weights"),
        (lambda d: {**d, "layers": [{**d["layers"][0], "weights": {"n": 5, "m": 4}}]}, "N must not exceed M"),
        (lambda d: {**d, "layers": [{**d["layers"][0], "target": "both"}]}, "make it 'weights'"),
        (lambda d: {**d, "layers": [d["layers"][0], d["layers"][0]]}, "appears more than once"),
        (lambda d: {**d, "extra": 1}, "Additional properties"),
    ],
)
def test_malformed_files_give_one_clear_error(tmp_path: Path, mutate, fragment: str) -> None:
    path = _write(tmp_path, mutate(_valid()))
    with pytest.raises(SchemeError, match=fragment) as info:
        Scheme.load(path)
    assert str(path) in str(info.value) or "appears more than once" in fragment
    assert "\n" not in str(info.value)
    with pytest.raises(SchemeError, match="cannot be read"):
        Scheme.load(tmp_path / "missing.json")


def test_mismatched_models_are_refused_and_left_untouched() -> None:
    model = mlp()
    state = copy.deepcopy(model.state_dict())
    space = SearchSpace.from_model(model, torch.randn(2, 16))
    with pytest.raises(SchemeMismatchError, match=r"'10' is not a Conv2d/Linear layer of the model \(did you mean '0'"):
        Scheme.from_choices({"10": "w2:4"}).apply(model, inplace=True)
    with pytest.raises(SchemeMismatchError, match="is a ReLU, not a Conv2d/Linear"):
        Scheme.from_choices({"3": "w2:4"}).apply(model, inplace=True)
    wider = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    scheme = Scheme.uniform(space, "weights", 2, 4)
    with pytest.raises(
        SchemeMismatchError, match=r"layer '0' was chosen for weight shape \(32, 16\), the model's is \(64, 16\)"
    ):
        scheme.apply(wider)
    by_name = Scheme.from_choices({"0": "w2:4"}, fingerprint=scheme.fingerprint)
    with pytest.raises(SchemeMismatchError, match="pass strict=False"):
        by_name.apply(wider)
    assert isinstance(by_name.apply(wider, strict=False)[0], SparseLayerMixin)
    # eligible in the scheme, ineligible for this layer: validated before anything changes
    bad = Scheme.from_choices({"0": "w1:4", "2": "w1:4", "4": "w2:8+a1:3"})
    with pytest.raises(IneligibleLayerError, match=r"layer '4': in_features = 32 is not divisible by M=3;"):
        bad.apply(model, inplace=True)
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model) and all(
        torch.equal(state[k], v) for k, v in model.state_dict().items()
    )


def test_multihead_attention_projection_cannot_be_applied() -> None:
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    with pytest.raises(SchemeMismatchError, match=r"used functionally by nn\.MultiheadAttention"):
        Scheme.from_choices({"self_attn.out_proj": "w2:4"}).apply(layer)


def test_apply_in_place_and_reapply_dense() -> None:
    model = mlp()
    space = SearchSpace.from_model(model, torch.randn(2, 16))
    scheme = Scheme.uniform(space, "activations", 2, 8)
    assert scheme.apply(model, inplace=True) is model
    assert isinstance(model[0], SparseLayerMixin)
    Scheme.dense(space).apply(model, inplace=True)  # back to plain modules
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model)


def test_verify_catches_weights_that_break_the_pattern() -> None:
    model = mlp()
    space = SearchSpace.from_model(model, torch.randn(2, 16))
    scheme = Scheme.uniform(space, "weights", 1, 4)
    sparse = scheme.finalize(scheme.apply(model))
    with torch.no_grad():
        sparse[2].weight.fill_(1.0)
    with pytest.raises(
        SchemeMismatchError, match=r"'2' has 4 non-zeros in a group of 4 \(and 0 more\)|'2' has 4 non-zeros"
    ):
        scheme.verify(sparse)
    with pytest.raises(SchemeMismatchError, match="masks activations dense, expected 2:4"):
        Scheme.uniform(space, "activations", 2, 4).verify(mlp())


def test_domino_interop() -> None:
    space = SearchSpace.from_model(mlp(), torch.randn(2, 16))
    scheme = space.scheme({"0": "w2:8", "2": "w1:8"})
    assert scheme.to_domino() == {"0": [2, 8], "2": [1, 8]}
    back = Scheme.from_domino({"0": [2, 8], "2": [1, 8], "4": [8, 8]})
    assert back.choices == {"0": "w2:8", "2": "w1:8", "4": "dense"}
    assert back.provenance["strategy"] == "domino"
    assert space.encode(back).tolist() == space.encode(scheme).tolist()
    with pytest.raises(SchemeError, match="weight N:M only"):
        space.scheme({"0": "a2:4"}).to_domino()
    with pytest.raises(SchemeError, match=r"must be \[N, M\]"):
        Scheme.from_domino({"0": 2})


def test_equality_ignores_metadata_and_schemes_are_hashable() -> None:
    a = Scheme.from_choices({"0": "w2:4"}, metrics={"accuracy": 1.0})
    b = Scheme.from_choices({"0": "w2:4"}, hardware="orin")
    assert a == b and len({a, b}) == 1
    with pytest.raises(TypeError):
        a.metrics["accuracy"] = 0.0  # type: ignore[index]
    assert a.to_frame().to_dict("records") == [{"layer": "0", "target": "weights", "weights": "2:4", "activations": ""}]


def test_atomic_files_get_the_usual_permissions(tmp_path: Path) -> None:
    from search_space import atomic_write_text

    path = atomic_write_text(tmp_path / "a.txt", "x")
    reference = tmp_path / "b.txt"
    reference.write_text("x")
    assert path.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777
