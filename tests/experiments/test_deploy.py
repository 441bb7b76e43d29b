"""Deploy: safetensors / ONNX / torch exports of a scheme, their checks, the report and the CLI's bad-input lines."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from torch import nn

from evaluators import load_profile
from experiments.deploy import (
    KEEP_DENSE_KEY,
    METADATA_KEY,
    DeployError,
    MissingDependencyError,
    bake,
    check_onnx,
    cuda_semi_structured_reason,
    deploy,
    deploy_report,
    exportable,
    load_model,
    load_safetensors,
    load_torch,
    main,
    modelled_layers,
    save_onnx,
    save_safetensors,
    save_torch,
    semi_structured_plan,
)
from experiments.search import run
from search_space import Scheme, SchemeMismatchError, SearchSpace, model_fingerprint

onnxruntime = pytest.importorskip("onnxruntime")  # the deploy extra; CI installs it (nmsearch[test])
pytest.importorskip("safetensors")


class TinyNet(nn.Module):
    """Convs and linears whose channels suit 2:4, 1:4, 2:8 on weights and activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = torch.relu(self.fc1(x.mean((2, 3))))
        return self.head(torch.relu(self.fc2(x)))


class OtherNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(x)


class Unexportable(TinyNet):
    """A reinterpreting view (aten.view.dtype) has no ONNX translation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.view(torch.int32).float())


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


def gpu_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)).eval()


def other_net() -> nn.Module:
    return OtherNet()


INPUTS = torch.randn(16, 8, 6, 6, generator=torch.Generator().manual_seed(1))
CHOICES = {"conv1": "w2:4+r0.5", "conv2": "w1:4+a2:4", "fc1": "a2:4", "fc2": "w2:8+a1:4", "head": "w4:8"}
WEIGHTS_ONLY = {"conv1": "w2:4", "conv2": "w1:4", "fc2": "w2:8", "head": "w4:8"}


@pytest.fixture
def scheme() -> Scheme:
    model = tiny_net()
    shapes = {name: tuple(getattr(model, name).weight.shape) for name in CHOICES}
    return Scheme.from_choices(CHOICES, fingerprint=model_fingerprint(model), shapes=shapes)


def test_onnx_round_trip_matches_pytorch_and_keeps_nm_in_the_initializers(tmp_path: Path, scheme: Scheme) -> None:
    import onnx
    from onnx import numpy_helper

    model = bake(tiny_net(), scheme)
    out = tmp_path / "m.onnx"
    check = save_onnx(model, scheme, INPUTS, out)
    assert check.max_abs_error <= check.tolerance and check.samples == 16
    assert check.nm_layers == {"conv1": "2:4", "conv2": "1:4", "fc2": "2:8", "head": "4:8"}
    assert check.activation_ops == ["ScatterElements", "TopK"]
    # Another batch size (the batch dimension is dynamic), read back independently.
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    other = torch.randn(5, 8, 6, 6)
    (got,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    with torch.no_grad():
        expected = model(other).numpy()
        weights_only = bake(tiny_net(), Scheme.from_choices(WEIGHTS_ONLY))(other).numpy()
        without_rows = bake(tiny_net(), Scheme.from_choices({**CHOICES, "conv1": "w2:4"}))(other).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(got - weights_only).max() > 1e-3  # the activation masks are in the graph
    assert np.abs(got - without_rows).max() > 1e-3  # and conv1's row mask
    initializers = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    conv1 = initializers["conv1.weight"]  # (Cout, Cin, kh, kw): groups of 4 input channels
    nonzeros = (conv1.reshape(16, 2, 4, 3, 3) != 0).sum(2)
    assert nonzeros.max() == 2 and (conv1 == 0).mean() == pytest.approx(0.5)
    assert (initializers["fc1.weight"] != 0).all()  # activation-only: dense weights
    # The check fails on weights that break a (stricter) scheme, and on a different model.
    stricter = Scheme.from_choices({**CHOICES, "conv1": "w1:4"})
    with pytest.raises(DeployError, match=r"'conv1'.*2 non-zeros in a group of 4 input channels.*allows 1"):
        check_onnx(out, model, stricter, INPUTS)
    with pytest.raises(DeployError, match="onnxruntime's outputs differ from PyTorch's"):
        check_onnx(out, tiny_net(), scheme, INPUTS)


def test_export_needs_the_weight_masks_baked_in(scheme: Scheme) -> None:
    with pytest.raises(DeployError, match="layer 'conv1' still masks its weights at run time; finalize"):
        exportable(scheme.apply(tiny_net()), INPUTS)


def test_unsupported_op_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    model = Unexportable().eval()
    scheme = Scheme.from_choices({"fc2": "w2:4"})
    with pytest.raises(DeployError, match=r"cannot be exported to ONNX: .*aten.view") as error:
        save_onnx(bake(model, scheme), scheme, INPUTS, tmp_path / "m.onnx")
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


FILE_FORMATS = [
    ("m.safetensors", save_safetensors, load_safetensors),
    ("m.pt", save_torch, lambda path: load_torch(path)[:2]),
]


@pytest.mark.parametrize(("name", "save", "load"), FILE_FORMATS)
def test_file_round_trip_keeps_weights_and_scheme(tmp_path: Path, scheme: Scheme, name: str, save, load) -> None:
    model = bake(tiny_net(), scheme)
    out = tmp_path / name
    save(model, scheme, out)
    state, loaded = load(out)
    assert loaded == scheme and loaded.fingerprint == scheme.fingerprint and dict(loaded.shapes) == dict(scheme.shapes)
    expected = model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor)
    fresh = tiny_net()
    fresh.load_state_dict(state)
    for name, option in loaded:  # the zeros are in the file: N:M holds along the input channels
        if option.weight:
            groups = getattr(fresh, name).weight.unflatten(1, (-1, option.weight.m))
            assert int((groups != 0).sum(2).max()) == option.weight.n


@pytest.mark.parametrize(("name", "save", "load"), FILE_FORMATS)
def test_file_formats_refuse_weights_breaking_the_scheme(tmp_path: Path, scheme: Scheme, name: str, save, load) -> None:
    with pytest.raises(DeployError, match="'conv1': the weight has 4 non-zeros in a group of 4 input channels"):
        save(tiny_net(), scheme, tmp_path / name)  # the scheme was never baked in
    assert list(tmp_path.iterdir()) == []


def test_torch_file_loads_weights_only_and_rebuilds_the_model(tmp_path: Path, scheme: Scheme) -> None:
    model = bake(tiny_net(), scheme)
    save_torch(model, scheme, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)  # tensors and strings: no code runs
    assert set(payload) == {"state_dict", METADATA_KEY, KEEP_DENSE_KEY}
    state, loaded, keep_dense = load_torch(tmp_path / "m.pt")
    assert keep_dense == {}
    rebuilt = bake(tiny_net(), loaded)  # as the guide does before to_semi_structured
    rebuilt.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(INPUTS), model(INPUTS), rtol=0, atol=0)


def test_torch_file_of_another_kind_is_refused_in_one_line(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(DeployError, match=f"has no '{METADATA_KEY}' entry"):
        load_torch(tmp_path / "plain.pt")
    torch.save(tiny_net(), tmp_path / "module.pt")  # a pickled module: weights_only refuses its classes
    with pytest.raises(DeployError, match="cannot be read as a weights-only torch file") as error:
        load_torch(tmp_path / "module.pt")
    assert "\n" not in str(error.value)


def test_safetensors_without_scheme_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(DeployError, match=f"no '{METADATA_KEY}' metadata"):
        load_safetensors(path)


def test_missing_optional_dependency_names_the_extra(tmp_path: Path, scheme: Scheme, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r"--format onnx needs the package 'onnxruntime': pip install"):
        save_onnx(bake(tiny_net(), scheme), scheme, INPUTS, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_scheme_for_another_model_is_refused(scheme: Scheme) -> None:
    with pytest.raises(SchemeMismatchError, match="scheme layer 'conv1' is not a Conv2d/Linear layer of the model"):
        bake(OtherNet(), scheme)


def test_semi_structured_plan_says_why_a_layer_stays_dense(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Conv2d(64, 64, 1))
    model.add_module("small", nn.Linear(64, 10))
    scheme = Scheme.from_choices({"0": "w2:4", "1": "w1:8", "2": "w4:8", "3": "w2:4", "small": "w2:4"})
    plan = semi_structured_plan(model, scheme)
    assert plan["0"] is None and plan["1"] is None  # 1:8 holds <= 2 non-zeros in every block of 4
    assert plan["2"] == "4:8 does not run as 2:4"
    assert plan["3"].startswith("Conv2d")
    assert plan["small"] == "weight shape (10, 64) is not a multiple of 64"
    # deploy leaves eligible layers dense where the cost model says so; the torch file records them
    keep = {"0": "the cost model predicts the dense kernel faster at batch 1 (--convert-all converts it)"}
    kept = semi_structured_plan(model, scheme, keep)
    assert kept["0"] == keep["0"] and kept["1"] is None and kept["small"] == plan["small"]
    report = deploy_report(model, scheme, "torch", None, keep_dense=keep).set_index("layer")
    assert report.loc["0", "runs_as"] == "dense (zeros stored)" and report.loc["0", "note"] == keep["0"]
    baked = bake(nn.Sequential(nn.Linear(128, 64)), Scheme.from_choices({"0": "w2:4"}))
    save_torch(baked, Scheme.from_choices({"0": "w2:4"}), tmp_path / "m.pt", keep_dense={"0": keep["0"]})
    assert load_torch(tmp_path / "m.pt")[2] == {"0": keep["0"]}


@pytest.mark.skipif(cuda_semi_structured_reason() is None, reason="a CUDA sm80+ GPU is present")
def test_torch_format_without_sm80_is_one_line(tmp_path: Path, scheme: Scheme) -> None:
    path = tmp_path / "scheme.json"
    scheme.save(path)
    with pytest.raises(DeployError, match="needs CUDA sm80\\+: no CUDA GPU is available; use --format onnx"):
        deploy(
            path, tmp_path / "m.pt", "torch", model="tests.experiments.test_deploy:tiny_net", input_shape=(1, 8, 6, 6)
        )
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.skipif(cuda_semi_structured_reason() is not None, reason="needs a CUDA GPU of compute capability >= 8.0")
def test_torch_format_converts_2_4_linear_weights(tmp_path: Path) -> None:
    from torch.sparse import SparseSemiStructuredTensor

    scheme = Scheme.from_choices({"0": "w2:4", "2": "w4:8"})
    path = tmp_path / "scheme.json"
    scheme.save(path)
    result = deploy(path, tmp_path / "m.pt", "torch", model=f"{__name__}:gpu_net", input_shape=(1, 128))
    assert isinstance(result.model[0].weight, SparseSemiStructuredTensor)
    assert not isinstance(result.model[2].weight, SparseSemiStructuredTensor)
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    reference = bake(gpu_net(), scheme).half().cuda()(x)
    torch.testing.assert_close(result.model(x), reference, rtol=1e-2, atol=1e-2)
    state, loaded, keep_dense = load_torch(tmp_path / "m.pt")  # the file: finalized weights, read weights-only
    assert loaded == scheme and keep_dense == {}
    assert not any(isinstance(t, SparseSemiStructuredTensor) for t in state.values())
    # on the A100 profile at batch 1 the cost model keeps the 128x128 layer dense: so does deploy
    kept = deploy(path, tmp_path / "k.pt", "torch", model=f"{__name__}:gpu_net", input_shape=(1, 128), hardware="a100")
    assert not isinstance(kept.model[0].weight, SparseSemiStructuredTensor)
    assert "the cost model predicts the dense kernel faster" in load_torch(tmp_path / "k.pt")[2]["0"]
    forced = deploy(
        path, tmp_path / "f.pt", "torch", model=f"{__name__}:gpu_net", input_shape=(1, 128), hardware="a100",
        convert_all=True,
    )  # fmt: skip
    assert isinstance(forced.model[0].weight, SparseSemiStructuredTensor)
    assert "converted, but" in forced.report.set_index("layer").loc["0", "note"]


def test_report_judges_acceleration_on_the_profile(scheme: Scheme) -> None:
    model = bake(tiny_net(), scheme)
    report = deploy_report(model, scheme, "onnx", load_profile("a100")).set_index("layer")
    assert report.loc["conv1", "accelerated"].startswith("yes")
    assert report.loc["fc2", "accelerated"].startswith("yes")  # 2:8 runs as 2:4
    assert report.loc["head", "accelerated"] == "no"  # 4:8 runs dense on sparse tensor cores
    assert report.loc["fc1", "accelerated"] == "no" and "activation mask" in report.loc["fc1", "note"]
    assert (deploy_report(model, scheme, "torch", None)["accelerated"] == "unknown").all()
    torch_report = deploy_report(model, scheme, "torch", load_profile("a100")).set_index("layer")
    assert torch_report.loc["conv1", "accelerated"] == "no" and "Conv2d" in torch_report.loc["conv1", "note"]


def test_report_follows_the_cost_model_at_the_deployment_batch(tmp_path: Path) -> None:
    """A 2:4 layer the sparse tensor cores take is reported accelerated only where the cost model
    runs it on the sparse plan: on an A100, a 4096x4096 Linear at 8192 tokens, not at one."""
    model = nn.Sequential(nn.Linear(4096, 4096)).eval()
    scheme = Scheme.from_choices({"0": "w2:4"}, fingerprint=model_fingerprint(model), shapes={"0": (4096, 4096)})
    space = SearchSpace.from_model(model, torch.randn(1, 4096))
    a100 = load_profile("a100")
    for batch, plan in ((1, "dense"), (8192, "sparse weights")):
        modelled = modelled_layers(space, scheme, a100, "fp16", batch)
        assert modelled.loc["0", "plan"] == plan
        report = deploy_report(bake(model, scheme), scheme, "onnx", a100, "fp16", modelled, batch).set_index("layer")
        row = report.loc["0"]
        if batch == 1:
            assert row["accelerated"] == "no" and row["modelled"] == "1.00x (dense)"
            assert "the cost model predicts the dense kernel faster at batch 1" in row["note"]
        else:
            speedup = modelled.loc["0", "speedup"]
            assert 1.2 < speedup < 2 and row["accelerated"] == f"yes ({speedup:.2f}x modelled)"
    # the command line: --batch-size sets the batch, a bad one is one line
    path = tmp_path / "scheme.json"
    scheme.save(path)
    with pytest.raises(DeployError, match="--batch-size must be a positive integer"):
        deploy(path, tmp_path / "m.safetensors", "safetensors", model=f"{__name__}:big_linear", batch_size=0)
    result = deploy(
        path, tmp_path / "m.safetensors", "safetensors", model=f"{__name__}:big_linear", input_shape=(1, 4096),
        hardware="a100", batch_size=8192,
    )  # fmt: skip
    assert result.report.set_index("layer").loc["0", "accelerated"].endswith("x modelled)")


def big_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4096, 4096)).eval()


@pytest.mark.slow  # pre-trains the synthetic task (~15 s on a loaded 2-core machine)
def test_load_model_by_task_name_and_checkpoint(tmp_path: Path) -> None:
    model, inputs, task = load_model("synthetic", cache_dir=tmp_path)
    assert task.name == "synthetic" and inputs.shape[1:] == (3, 8, 8)
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    again, _, _ = load_model("synthetic", path, cache_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    with pytest.raises(DeployError, match=r"neither a task .*digits.* nor module:callable"):
        load_model("digitz")
    with pytest.raises(DeployError, match="needs --input-shape"):
        load_model("tests.experiments.test_deploy:tiny_net")
    torch.save({"fc1.weight": torch.zeros(1)}, path)
    with pytest.raises(DeployError, match="does not fit the model"):
        load_model("synthetic", path, cache_dir=tmp_path)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def scheme_file(tmp_path: Path, scheme: Scheme) -> Path:
    path = tmp_path / "scheme.json"
    scheme.save(path)
    return path


TINY = ["--model", "tests.experiments.test_deploy:tiny_net", "--input-shape", "1,8,6,6"]


def test_cli_prints_the_report(tmp_path: Path, scheme_file: Path, capsys) -> None:
    code, out, err = cli(capsys, str(scheme_file), *TINY, "--format", "safetensors", "--hardware", "a100")
    assert code == 0, err
    assert "| conv1 " in out and "written: " in out
    # the tiny layers at batch 1: the A100's 2:4 kernels are not faster, whatever their 2x peak
    assert "| modelled " in out and "yes (" not in out and "dense kernel faster at batch 1" in out
    assert load_safetensors(tmp_path / "deployed.safetensors")[1] == Scheme.load(scheme_file)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "tests.experiments.test_deploy:other_net", "--input-shape", "1,16"], "not a Conv2d/Linear layer"),
        ([], "records no run config: name the model with --model"),
        ([*TINY, "--out", "x.onnx", "--format", "safetensors"], "must end in .safetensors"),
        ([*TINY, "--hardware", "a101"], "unknown hardware profile 'a101'"),
        (["--model", "no_such_module:f"], "No module named 'no_such_module'"),
        ([*TINY, "--checkpoint", "missing.pt"], "checkpoint 'missing.pt' does not exist"),
    ],
    ids=["another-model", "no-model", "suffix", "hardware", "callable", "checkpoint"],
)
def test_cli_bad_input_is_one_line(tmp_path: Path, scheme_file: Path, capsys, args, message) -> None:
    if "--format" not in args:
        args = [*args, "--format", "onnx"]
    code, _, err = cli(capsys, str(scheme_file), *args)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scheme.json"]


def test_cli_refuses_an_existing_output(tmp_path: Path, scheme_file: Path, capsys) -> None:
    out = tmp_path / "m.safetensors"
    out.write_text("keep me")
    code, _, err = cli(capsys, str(scheme_file), *TINY, "--format", "safetensors", "--out", str(out))
    assert code == 2 and "exists; remove it, choose another --out or pass --overwrite" in err
    assert out.read_text() == "keep me"
    code, _, err = cli(capsys, str(scheme_file), *TINY, "--format", "safetensors", "--out", str(out), "--overwrite")
    assert code == 0, err
    assert load_safetensors(out)[1] == Scheme.load(scheme_file)


@pytest.mark.slow  # a search, then the ONNX export of its scheme (~50 s on a loaded 2-core machine)
def test_run_directory_deploys_the_model_the_search_scored(tmp_path: Path, capsys) -> None:
    with initialize_config_module("nmsearch.conf", version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["task=synthetic", "strategy=uniform", "space=weights", f"cache_dir={tmp_path / 'cache'}"],
        )
    run_dir = tmp_path / "run"
    run(cfg, run_dir)
    capsys.readouterr()
    code, out, err = cli(capsys, str(run_dir), "--format", "onnx")
    assert code == 0, err
    recorded = Scheme.load(run_dir / "scheme.json").metrics["accuracy"]
    assert f"accuracy of the deployed model: {recorded:.4f} (the search recorded {recorded:.4f})" in out
    assert "onnxruntime vs PyTorch on 64 inputs" in out and (run_dir / "deployed.onnx").is_file()
    layers = [layer["name"] for layer in json.loads((run_dir / "scheme.json").read_text())["layers"]]
    assert all(f"| {name} " in out for name in layers)
