import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from search_space import (
    InvalidSparsityError,
    MaskState,
    NMSearchError,
    RowsFastPathError,
    RowSkippingConv2d,
    SearchSpace,
    pruned_rows,
    row_extension,
    skip_masked_rows,
    sparsify,
)
from search_space.row_extension import (
    EXTENSION_DIR_ENV,
    ROW_EXTENSION_ENV,
    RowExtensionError,
    extension_dir,
    pack_row_weight,
    row_conv_op,
)
from tests.search_space.test_rows import ROWS, small_cnn

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def fused_op():
    """The fused extension, built once per machine (cached; ~20-40 s the first time), loaded once per session."""
    if os.environ.get(ROW_EXTENSION_ENV) == "0":
        pytest.skip(f"{ROW_EXTENSION_ENV}=0: the fused extension is switched off")
    op = row_conv_op()  # raises under NMSEARCH_ROW_EXTENSION=require (CI) if it cannot be built
    if op is None:
        pytest.skip("the fused row-skipping extension did not build on this machine (see the warning)")
    return op


@pytest.fixture(params=["fused", "gather"])
def kernel(request, monkeypatch) -> str:
    """Run the test with the fused C++ kernel and with the pure-PyTorch gather kernel."""
    if request.param == "fused":
        request.getfixturevalue("fused_op")
    else:
        monkeypatch.setenv(ROW_EXTENSION_ENV, "0")
    return request.param


def expected_kernel(kernel: str, conv: nn.Conv2d) -> str:
    return "fused" if kernel == "fused" and conv.groups == 1 else "gather"


CONVS = {
    "3x3": dict(in_channels=8, out_channels=16, kernel_size=3, padding=1),
    "3x3 stride 2": dict(in_channels=8, out_channels=16, kernel_size=3, padding=1, stride=2, bias=False),
    "1x1 stride 2": dict(in_channels=8, out_channels=16, kernel_size=1, stride=2, bias=False),
    "1x1": dict(in_channels=8, out_channels=12, kernel_size=1),
    "dilated": dict(in_channels=8, out_channels=16, kernel_size=3, padding=2, dilation=2),
    "grouped dilated": dict(in_channels=8, out_channels=16, kernel_size=3, padding=2, dilation=2, groups=4),
    "depthwise same": dict(in_channels=8, out_channels=8, kernel_size=(3, 5), padding="same", groups=8),
    "asymmetric same": dict(in_channels=8, out_channels=16, kernel_size=(2, 4), padding="same"),
    "no padding": dict(in_channels=8, out_channels=16, kernel_size=3),
}


@pytest.mark.parametrize("config", CONVS.values(), ids=CONVS.keys())
@pytest.mark.parametrize("sparsity", [0.2, 0.0])
def test_row_skipping_kernel_equals_the_masked_dense_conv(kernel: str, config: dict, sparsity: float) -> None:
    conv = nn.Conv2d(**config)
    weight = "2:4" if conv.groups == 1 else None
    layer = sparsify(conv, weight=weight, activation="r0.3", name="c")
    layer.mask_state = MaskState(row_sparsity=sparsity)  # 0.0: the same path with no row skipped
    fast = RowSkippingConv2d.from_layer(layer)
    for x in (torch.randn(2, 8, 11, 9), torch.randn(1, 8, 12, 12).contiguous(memory_format=torch.channels_last)):
        with torch.no_grad():
            expected = layer(x)
            out = fast(x)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5)  # cached plan
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert fast.kernel_in_use == expected_kernel(kernel, conv) and fast.path_in_use == "rows"
        if fast.kernel_in_use == "gather":
            assert (fast._plan.gemm_matrix is not None) == (conv.groups == 1)  # one plain mm unless grouped
        zero_rows = int((out.abs().sum((0, 1)) == 0).sum())
        assert zero_rows == (pruned_rows(math.prod(out.shape[-2:]), sparsity) if sparsity else 0)


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_kernel_tiles_blocks_and_odd_inputs(fused_op, threads: int) -> None:
    """Several row tiles, column blocks (Cout > 64, not a multiple) and K chunks (K > 512), batch > 1,
    non-contiguous inputs, bias, stride and dilation, with one and two threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for conv, sparsity in (
            (nn.Conv2d(72, 80, 3, padding=1), 0.3),  # K = 648: two K chunks; two column blocks
            (nn.Conv2d(16, 130, 3, stride=2, padding=(2, 1), dilation=(2, 1), bias=False), 0.5),
            (nn.Conv2d(40, 24, 1), 0.1),
        ):
            layer = sparsify(conv, activation="r0.3", name="c")
            layer.mask_state = MaskState(row_sparsity=sparsity)
            fast = RowSkippingConv2d.from_layer(layer)
            base = torch.randn(3, 19, 21, conv.in_channels)  # NHWC storage
            for x in (base.permute(0, 3, 1, 2), base.permute(0, 3, 2, 1).transpose(2, 3), base.permute(0, 3, 1, 2)[1:]):
                with torch.no_grad():
                    torch.testing.assert_close(fast(x), layer(x), atol=1e-4, rtol=1e-4)
                assert fast.kernel_in_use == "fused"
    finally:
        torch.set_num_threads(before)


def test_pack_row_weight_blocks_columns_by_64() -> None:
    matrix = torch.arange(3 * 130, dtype=torch.float32).reshape(3, 130)
    packed = pack_row_weight(matrix)
    assert packed.shape == (3 * 130,) and packed.is_contiguous()
    torch.testing.assert_close(packed[: 3 * 64].view(3, 64), matrix[:, :64])
    torch.testing.assert_close(packed[3 * 128 :].view(3, 2), matrix[:, 128:])


def test_fused_kernel_leaves_other_dtypes_to_the_gather_kernel(fused_op) -> None:
    layer = sparsify(nn.Conv2d(8, 16, 3, padding=1), activation="r0.2", name="c").double()
    fast = RowSkippingConv2d.from_layer(layer)
    x = torch.randn(1, 8, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), layer(x))
    assert fast.kernel_in_use == "gather"


def test_failed_build_warns_once_and_falls_back(monkeypatch) -> None:
    def no_compiler():
        raise FileNotFoundError("[Errno 2] No such file or directory: 'c++'")

    monkeypatch.setattr(row_extension, "_state", {})
    monkeypatch.setattr(row_extension, "_build", no_compiler)
    monkeypatch.delenv(ROW_EXTENSION_ENV, raising=False)
    with pytest.warns(RuntimeWarning, match=r"did not build, using the slower pure-PyTorch kernels .*'c\+\+'"):
        assert row_conv_op() is None
    assert row_conv_op() is None  # remembered: no second warning (pytest's filter makes one an error)
    layer = sparsify(nn.Conv2d(4, 6, 3, padding=1), activation="r0.3", name="c")
    fast = RowSkippingConv2d.from_layer(layer)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), layer(x), atol=1e-5, rtol=1e-5)
    assert fast.kernel_in_use == "gather"
    monkeypatch.setattr(row_extension, "_state", {})
    monkeypatch.setenv(ROW_EXTENSION_ENV, "require")
    with pytest.raises(RowExtensionError, match=r"did not build: .*'c\+\+'"):
        row_conv_op()
    assert issubclass(RowExtensionError, NMSearchError)


def test_extension_dir_follows_the_cache_unless_pinned(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(EXTENSION_DIR_ENV)
    monkeypatch.setenv("NMSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    built = extension_dir()
    assert built.parent == tmp_path / "cache" / "extensions" and built.name.startswith("cpu_kernels-")
    monkeypatch.setenv(EXTENSION_DIR_ENV, str(tmp_path / "pinned"))
    assert extension_dir() == tmp_path / "pinned" / built.name  # the name hashes source, torch and flags


@pytest.mark.slow
def test_a_machine_without_a_compiler_gets_the_fallback(tmp_path: Path) -> None:
    """A real failed build (a fresh cache, a compiler that does not exist) in a fresh process."""
    script = textwrap.dedent(
        """
        import warnings, torch
        from torch import nn
        from search_space import RowSkippingConv2d, sparsify
        layer = sparsify(nn.Conv2d(4, 6, 3, padding=1), activation="r0.3", name="c")
        fast = RowSkippingConv2d.from_layer(layer)
        x = torch.randn(1, 4, 6, 6)
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            torch.testing.assert_close(fast(x), layer(x), atol=1e-5, rtol=1e-5)
        print(fast.kernel_in_use, len(caught), caught[0].message)
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "NMSEARCH_CACHE_DIR": str(tmp_path),
        EXTENSION_DIR_ENV: "",  # not the suite's pinned (built) one: a fresh build in tmp_path
        "CXX": str(tmp_path / "no-such-c++"),
        ROW_EXTENSION_ENV: "",
    }
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    kernel, warnings_count, message = done.stdout.strip().split(" ", 2)
    assert (kernel, warnings_count) == ("gather", "1") and "did not build" in message


@pytest.mark.parametrize("config", CONVS.values(), ids=CONVS.keys())
@pytest.mark.parametrize("path", ["dense", "auto"])
def test_masked_dense_and_auto_paths_equal_the_masked_dense_conv(kernel: str, config: dict, path: str) -> None:
    conv = nn.Conv2d(**config)
    layer = sparsify(conv, activation="r0.3", name="c")
    fast = RowSkippingConv2d.from_layer(layer, path=path)
    assert fast.path_in_use is None and f"path='{path}'" in repr(fast)
    x = torch.randn(2, 8, 11, 9)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), layer(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.dense_weight(), layer.sparse_weight())
    if path == "dense":
        assert fast.path_in_use == fast.kernel_in_use == "dense"
    else:
        assert fast.kernel_in_use in ("dense", expected_kernel(kernel, conv))
    rows = RowSkippingConv2d.from_layer(layer)
    with torch.no_grad():
        rows(x)
    assert rows.path_in_use == "rows" and rows.kernel_in_use == expected_kernel(kernel, conv)


def test_auto_path_keeps_the_faster_path_per_shape(kernel: str, monkeypatch) -> None:
    layer = sparsify(nn.Conv2d(8, 8, 3, padding=1), activation="r0.2", name="c")
    fast = RowSkippingConv2d.from_layer(layer, path="auto")
    slow = {"dense": 0.0, "rows": 0.0}
    timed = []

    def seconds(run, clock):
        assert clock is time.thread_time  # one torch thread on the CPU: its CPU time
        timed.append(run())  # the timed call really runs the path
        return slow[timed_path["now"]]

    timed_path = {"now": ""}

    def dense(x, plan, original=fast._masked_dense):
        timed_path["now"] = "dense"
        return original(x, plan)

    def rows(x, plan, original=fast._skip_rows):
        timed_path["now"] = "rows"
        return original(x, plan)

    monkeypatch.setattr(fast, "_masked_dense", dense)
    monkeypatch.setattr(fast, "_skip_rows", rows)
    monkeypatch.setattr("search_space.row_kernel._seconds", seconds)
    slow.update(dense=1.0, rows=2.0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    with torch.no_grad():
        fast(torch.randn(1, 8, 6, 6))
        assert fast.path_in_use == "dense" and len(timed) == 2
        slow.update(dense=2.0, rows=1.0)
        fast(torch.randn(1, 8, 6, 6))  # same shape: the choice is kept
        assert fast.path_in_use == "dense" and len(timed) == 2
        fast(torch.randn(1, 8, 7, 7))  # a new shape is timed again
        assert fast.path_in_use == "rows" and fast.kernel_in_use == kernel


def test_auto_path_times_with_torch_benchmark() -> None:
    from search_space import row_kernel

    calls = []
    for clock in (time.perf_counter, time.thread_time):
        calls.clear()
        assert row_kernel._seconds(lambda: calls.append(1) or torch.zeros(1), clock) >= 0
        assert len(calls) >= 1 + row_kernel._AUTO_ROUNDS  # a warm-up call, then the timed rounds


def test_unknown_path_is_refused() -> None:
    layer = sparsify(nn.Conv2d(4, 4, 3), activation="r0.2", name="c")
    with pytest.raises(RowsFastPathError, match=r"layer 'c': path must be one of .*'auto'.*got 'fast'"):
        RowSkippingConv2d.from_layer(layer, path="fast")


def test_row_skipping_kernel_outputs_do_not_alias_its_work_buffers(kernel: str) -> None:
    layer = sparsify(nn.Conv2d(4, 6, 3, padding=1), activation="r0.3", name="c")
    fast = RowSkippingConv2d.from_layer(layer)
    x, y = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        first = fast(x)
        kept = first.clone()
        second = fast(y)
        fast(x).mul_(0)  # writing into an output leaves the next call alone
        torch.testing.assert_close(first, kept)
        torch.testing.assert_close(second, layer(y), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast(x), layer(x), atol=1e-5, rtol=1e-5)


def test_skip_masked_rows_converts_a_model(kernel: str) -> None:
    model = small_cnn().eval()
    space = SearchSpace.from_model(model, torch.randn(1, 3, 16, 16), targets=ROWS)
    scheme = space.scheme({"0": "r0.2", "3": "w2:4+r0.3", "5": "r0.1"})
    sparse = scheme.apply(model)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = sparse(x)
        fast = skip_masked_rows(sparse)
        torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5)
    assert [type(fast[i]).__name__ for i in (0, 3, 5)] == ["RowSkippingConv2d"] * 3
    assert {fast[i].kernel_in_use for i in (0, 3, 5)} == {kernel}
    assert type(sparse[0]).__name__ == "SparseConv2d"  # a copy unless inplace=True
    assert "rows_skipped=0.3" in repr(fast[3])
    auto = skip_masked_rows(sparse, path="auto")
    with torch.no_grad():
        torch.testing.assert_close(auto(x), expected, atol=1e-5, rtol=1e-5)
    assert {auto[i].path for i in (0, 3, 5)} == {"auto"} and auto[3].path_in_use in ("rows", "dense")
    with pytest.raises(NMSearchError, match="no row-masked layers"):
        skip_masked_rows(small_cnn())


def test_row_skipping_kernel_bad_input() -> None:
    reflect = sparsify(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), activation="r0.2", name="r")
    with pytest.raises(RowsFastPathError, match=r"layer 'r': .*padding_mode='zeros' only, got 'reflect'"):
        RowSkippingConv2d.from_layer(reflect)
    with pytest.raises(RowsFastPathError, match="has no row mask"):
        RowSkippingConv2d.from_layer(sparsify(nn.Conv2d(4, 4, 3), weight="2:4", name="w"))
    fast = RowSkippingConv2d.from_layer(sparsify(nn.Conv2d(4, 4, 3), activation="r0.2", name="c"))
    with pytest.raises(RowsFastPathError, match="batched"):
        fast(torch.randn(4, 8, 8))
    with pytest.raises(RowsFastPathError, match="expected 4 input channels, got 3"):
        fast(torch.randn(1, 3, 8, 8))
    with pytest.raises(RowsFastPathError, match="inference-only"):
        fast(torch.randn(1, 4, 8, 8, requires_grad=True))
    for error in (RowsFastPathError, InvalidSparsityError):
        assert issubclass(error, NMSearchError)
