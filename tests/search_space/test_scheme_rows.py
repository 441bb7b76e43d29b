import json
from pathlib import Path

import pytest
import torch
from torch import nn

from search_space import (
    DEFAULT_TARGETS,
    IneligibleLayerError,
    InvalidSparsityError,
    NMPattern,
    Option,
    RowPattern,
    Scheme,
    SchemeError,
    SchemeMismatchError,
    SearchSpace,
    row_masked_layers,
)


def model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=4, padding=1),  # 1x1 output: a row mask would skip nothing
        nn.Flatten(),
        nn.Linear(16, 4),
    )


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace.from_model(model(), torch.randn(2, 3, 8, 8), targets=(*DEFAULT_TARGETS, "rows"))


def test_option_names_round_trip() -> None:
    for name in ("r0.2", "w2:4+r0.2", "w1:8+r0.125", "a2:4", "w2:4+a2:4", "dense"):
        assert Option.parse(name).name == name
    rows = Option.parse("w2:4+r0.3")
    assert rows == Option(NMPattern(2, 4), RowPattern(0.3)) and rows.rows == RowPattern(0.3)
    assert rows.target == "both" and Option.parse("r0.3").target == "activations"
    assert Option.parse("a2:4").rows is None
    assert Option.parse("r0.3").to_json() == {
        "target": "activations",
        "weights": None,
        "activations": {"pattern": "rows", "sparsity": 0.3},
    }
    assert Option.parse("a2:4").to_json()["activations"] == {"n": 2, "m": 4}  # unchanged for N:M


@pytest.mark.parametrize(
    ("name", "fragment"), [("r1.5", "strictly between 0 and 1"), ("r0", "strictly between"), ("x0.2", "unknown option")]
)
def test_bad_option_names(name: str, fragment: str) -> None:
    with pytest.raises(SchemeError, match=fragment):
        Option.parse(name)


def test_default_space_has_no_rows() -> None:
    default = SearchSpace.from_model(model(), torch.randn(2, 3, 8, 8))
    assert not any(option.rows for options in default.options.values() for option in options)
    assert not any(label.startswith("rows") for label in default.uniform_schemes())


def test_rows_options_on_convs_only(space: SearchSpace) -> None:
    names = space.option_names("2")
    for expected in ("r0.1", "r0.2", "r0.3", "w2:4+r0.2", "w1:8+r0.3"):
        assert expected in names
    assert "r0.2" in space.option_names("0")  # the 3-channel stem: no N:M, but rows
    assert not any("r" in n for n in space.option_names("6"))  # Linear
    assert not any("r" in n for n in space.option_names("4"))  # a 1x1 output skips nothing
    only_rows = SearchSpace.from_model(model(), torch.randn(2, 3, 8, 8), targets=["rows"], row_sparsities=[0.5])
    assert only_rows.option_names("2") == ["dense", "r0.5"]


def test_rows_on_linear_or_without_the_target_is_a_clear_error(space: SearchSpace) -> None:
    with pytest.raises(SchemeMismatchError, match=r"layer '6': row masks apply to Conv2d layers only, '6' is a Linear"):
        space.scheme({"6": "r0.2"})
    default = SearchSpace.from_model(model(), torch.randn(2, 3, 8, 8))
    with pytest.raises(SchemeMismatchError, match="the space has no 'rows' target"):
        default.scheme({"2": "r0.2"})
    with pytest.raises(SchemeMismatchError, match="available: dense"):
        space.scheme({"2": "r0.25"})


def test_uniform_rows_schemes_and_encoding(space: SearchSpace) -> None:
    uniform = space.uniform_schemes()
    assert [label for label in uniform if label.startswith("rows")] == ["rows 0.1", "rows 0.2", "rows 0.3"]
    scheme = uniform["rows 0.2"]
    assert scheme.choices == {"0": "r0.2", "2": "r0.2", "4": "dense", "6": "dense"}
    assert scheme.provenance["target"] == "rows" and scheme.has_rows
    assert space.decode(space.encode(scheme)) == scheme
    mixed = space.scheme({"2": "w2:4+r0.1"})
    assert space.decode(space.encode(mixed)) == mixed
    with pytest.raises(InvalidSparsityError, match="strictly between 0 and 1"):
        Scheme.uniform_rows(space, 1.2)


def test_json_round_trip_with_rows(space: SearchSpace, tmp_path: Path) -> None:
    scheme = space.scheme({"0": "r0.1", "2": "w2:4+r0.3"})
    path = scheme.save(tmp_path / "rows.json")
    data = json.loads(path.read_text())
    assert data["layers"][1]["activations"] == {"pattern": "rows", "sparsity": 0.3}
    loaded = Scheme.load(path)
    assert loaded == scheme and loaded["2"].rows == RowPattern(0.3)
    sparse = loaded.apply(model())
    assert list(row_masked_layers(sparse)) == ["0", "2"]
    loaded.verify(sparse)


def _file(tmp_path: Path, activations: object, target: str = "activations") -> Path:
    data = {
        "format": "nmsearch.scheme",
        "version": 1,
        "layers": [{"name": "2", "target": target, "weights": None, "activations": activations}],
    }
    path = tmp_path / "scheme.json"
    path.write_text(json.dumps(data))
    return path


def test_files_without_a_pattern_field_still_load(tmp_path: Path) -> None:
    assert Scheme.load(_file(tmp_path, {"n": 2, "m": 4}))["2"] == Option(activation=NMPattern(2, 4))
    assert Scheme.load(_file(tmp_path, {"pattern": "nm", "n": 1, "m": 8}))["2"] == Option(activation=NMPattern(1, 8))


@pytest.mark.parametrize(
    ("activations", "target", "fragment"),
    [
        (
            {"pattern": "diagonal", "sparsity": 0.2},
            "activations",
            r"layers\[0\]\.activations\.pattern: 'diagonal' is not one of \['nm', 'rows'\]",
        ),
        (
            {"pattern": "rows", "sparsity": 1.0},
            "activations",
            r"activations\.sparsity: 1\.0 is greater than or equal to the maximum of 1",
        ),
        ({"pattern": "rows"}, "activations", "'sparsity' is a required property"),
        ({"pattern": "rows", "sparsity": 0.2, "n": 2}, "activations", "'n' was unexpected"),
        ({"pattern": "rows", "sparsity": 0.2}, "weights", "make it 'activations'"),
    ],
)
def test_malformed_rows_entries_give_one_clear_error(
    tmp_path: Path, activations: dict, target: str, fragment: str
) -> None:
    path = _file(tmp_path, activations, target)
    with pytest.raises(SchemeError, match=fragment) as info:
        Scheme.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_rows_have_no_domino_form_and_frames_show_them(space: SearchSpace) -> None:
    scheme = space.scheme({"2": "w2:4+r0.2"})
    with pytest.raises(SchemeError, match="weight N:M only"):
        scheme.to_domino()
    frame = scheme.to_frame().set_index("layer")
    assert frame.loc["2", "activations"] == "r0.2" and frame.loc["2", "target"] == "both"
    options = space.options_frame()
    assert set(options.loc[options.option == "w2:4+r0.2", "activations"]) == {"r0.2"}


def test_apply_rows_is_deterministic_and_all_or_nothing(space: SearchSpace) -> None:
    scheme = space.scheme({"0": "r0.3", "2": "r0.3"})
    x = torch.randn(1, 3, 8, 8)
    first, second = scheme.apply(model(), row_seed=1), scheme.apply(model(), row_seed=1)
    first(x), second(x)
    for name in ("0", "2"):
        h = torch.randn(1, 16 if name == "2" else 3, 8, 8)
        assert torch.equal(first.get_submodule(name).input_mask(h), second.get_submodule(name).input_mask(h))
    bad = Scheme.from_choices({"0": "r0.2", "6": "r0.2"})
    untouched = model()
    with pytest.raises(IneligibleLayerError, match="Linear layers are not eligible"):
        bad.apply(untouched, inplace=True)
    assert not row_masked_layers(untouched)
