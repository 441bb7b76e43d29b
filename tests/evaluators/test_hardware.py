import pytest
import yaml
from omegaconf import OmegaConf

from evaluators.hardware import (
    HARDWARE_DIR,
    GemmShape,
    HardwareProfileError,
    available_profiles,
    load_profile,
    runs_on,
)
from search_space import NMPattern, NMSearchError

SHIPPED = [
    "a100",
    "cpu_x86_avx2",
    "h100_pcie",
    "h100_sxm",
    "h200",
    "ideal_nm",
    "l4",
    "orin",
    "rtx3060",
    "rtx4070tis",
    "rtx4090",
]
CPUS = ["cpu_x86_avx2"]
GPUS = [name for name in SHIPPED if name not in ("ideal_nm", *CPUS)]


def p(text: str) -> NMPattern:
    return NMPattern.parse(text)


def profile_data(name: str = "a100") -> dict:
    return yaml.safe_load((HARDWARE_DIR / f"{name}.yaml").read_text())


def write(tmp_path, data: dict, name: str = "custom.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_shipped_profile_loads_with_name_and_source() -> None:
    assert available_profiles() == SHIPPED
    for name in SHIPPED:
        profile = load_profile(name)
        assert profile.name and profile.source
        assert profile.origin.endswith(f"{name}.yaml")
        expected = {"fp32"} if name in CPUS else {"fp16", "bf16", "tf32", "int8"}
        assert expected <= set(profile.dtypes)


def test_cpu_profile_is_measured_and_has_no_sparse_cores() -> None:
    for name in CPUS:
        profile = load_profile(name)
        fp32 = profile.dtype("fp32")
        assert set(profile.dtypes) == {"fp32"} and "benchmarks/cpu_profile.py" in profile.source
        assert fp32.sparse_tflops is None and fp32.sparse_patterns == ()
        assert fp32.sparse_speedup(p("2:4")) == fp32.sparse_speedup(p("1:8")) == 1.0
        # Plausible for a few AVX2 cores: well under a GPU, above a naive loop.
        assert 0.01 < fp32.dense_tflops < 5 and 1 < profile.memory_bandwidth_gbs < 200
        assert 0 < profile.efficiency.compute_dense <= 1 and not profile.fused_activation_compression


def test_profiles_hold_the_reference_numbers() -> None:
    a100 = load_profile("a100")
    assert (a100.dtypes["fp16"].dense_tflops, a100.dtypes["fp16"].sparse_tflops) == (312, 624)
    assert a100.memory_bandwidth_gbs == 2039
    assert load_profile("h200").dtypes["fp16"] == load_profile("h100_sxm").dtypes["fp16"]
    assert load_profile("h200").memory_bandwidth_gbs == 4800
    orin = load_profile("orin")
    # FP16 derived from the published INT8 rate by the Ampere ratio.
    assert orin.dtypes["fp16"].dense_tflops == orin.dtypes["int8"].dense_tflops / 2 == 42.5
    for name in GPUS:
        profile = load_profile(name)
        assert not profile.fused_activation_compression
        assert profile.dtypes["tf32"].sparse_patterns == (p("1:2"),)
        assert all(profile.dtypes[d].sparse_patterns == (p("2:4"),) for d in ("fp16", "bf16", "int8"))
    assert load_profile("ideal_nm").fused_activation_compression


@pytest.mark.parametrize(
    ("pattern", "hardware", "expected"),
    [
        ("2:4", "2:4", True),
        ("1:4", "2:4", True),
        ("1:8", "2:4", True),
        ("2:8", "2:4", True),
        ("2:16", "2:4", True),
        ("3:8", "2:4", False),
        ("4:8", "2:4", False),
        ("3:4", "2:4", False),
        ("1:2", "2:4", True),  # every aligned block of 4 holds two 1:2 groups
        ("2:6", "2:4", False),  # blocks of 4 straddle groups of 6
        ("1:2", "1:2", True),
        ("1:4", "1:2", True),
        ("2:4", "1:2", False),
        ("4:4", "2:4", False),
    ],
)
def test_runs_on(pattern: str, hardware: str, expected: bool) -> None:
    assert runs_on(p(pattern), p(hardware)) is expected


def test_sparse_speedup_is_capped_at_the_hardware_patterns_ratio() -> None:
    for name in GPUS:
        fp16 = load_profile(name).dtypes["fp16"]
        assert fp16.sparse_speedup(p("2:4")) == fp16.sparse_speedup(p("1:8")) == 2.0  # 1979/989 rounds above 2
        assert fp16.sparse_speedup(p("3:8")) == fp16.sparse_speedup(None) == 1.0
    tf32 = load_profile("a100").dtypes["tf32"]
    assert (tf32.sparse_speedup(p("1:4")), tf32.sparse_speedup(p("2:4"))) == (2.0, 1.0)
    ideal = load_profile("ideal_nm").dtypes["fp16"]
    assert (ideal.sparse_speedup(p("1:8")), ideal.sparse_speedup(p("3:8")), ideal.sparse_speedup(p("2:16"))) == (
        8.0,
        8 / 3,
        8.0,
    )


def test_load_from_path_and_mapping_and_save_round_trip(tmp_path) -> None:
    a100 = load_profile("a100")
    assert load_profile(HARDWARE_DIR / "a100.yaml") == a100
    assert load_profile(OmegaConf.create(profile_data())) == a100
    a100.save(tmp_path / "copy.yaml")
    assert load_profile(tmp_path / "copy.yaml") == a100
    ideal = load_profile("ideal_nm")
    ideal.save(tmp_path / "ideal.yaml")
    assert load_profile(tmp_path / "ideal.yaml") == ideal


def single_line_error(call, *fragments: str) -> str:
    with pytest.raises(HardwareProfileError) as info:
        call()
    message = str(info.value)
    assert isinstance(info.value, NMSearchError) and isinstance(info.value, ValueError)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_unknown_profile_lists_the_available_ones() -> None:
    single_line_error(lambda: load_profile("a1000"), "'a1000'", *SHIPPED)
    single_line_error(lambda: load_profile("missing.yaml"), "missing.yaml", "does not exist")


def test_missing_field_names_file_and_field(tmp_path) -> None:
    data = profile_data()
    del data["memory_bandwidth_gbs"]
    single_line_error(
        lambda: load_profile(write(tmp_path, data)), "custom.yaml", "missing field 'memory_bandwidth_gbs'"
    )
    data = profile_data()
    del data["dtypes"]["fp16"]["pj_per_mac"]
    single_line_error(lambda: load_profile(write(tmp_path, data)), "custom.yaml", "'dtypes.fp16.pj_per_mac'")
    data = profile_data()
    del data["efficiency"]["memory"]
    single_line_error(lambda: load_profile(write(tmp_path, data)), "custom.yaml", "'efficiency.memory'")


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda d: d["efficiency"].update(memory=1.5), "'efficiency.memory' must be a number in (0, 1]"),
        (
            lambda d: d["efficiency"].update(compute_dense=0.9, compute_sparse=0.95),
            "'efficiency.compute_sparse' must not exceed",
        ),
        (lambda d: d.update(memory_bandwidth_gbs="fast"), "'memory_bandwidth_gbs' must be a number"),
        (lambda d: d.update(launch_overhead_us=-1), "'launch_overhead_us' must be a number in [0, inf]"),
        (lambda d: d.update(fused_activation_compression="no"), "'fused_activation_compression' must be true or false"),
        (lambda d: d.update(bandwith=1), "unknown field 'bandwith'"),
        (lambda d: d["dtypes"].update(fp64=d["dtypes"]["fp16"]), "unknown dtype 'dtypes.fp64'"),
        (lambda d: d["dtypes"]["fp16"].update(sparse_patterns=["2-4"]), "'dtypes.fp16.sparse_patterns'"),
        (lambda d: d["dtypes"]["fp16"].update(sparse_patterns="some"), "'dtypes.fp16.sparse_patterns' must be"),
        (lambda d: d["dtypes"]["fp16"].update(sparse_tflops=100), "'dtypes.fp16.sparse_tflops' must be a number in"),
        (lambda d: d["dtypes"]["fp16"].update(sparse_patterns="any"), "'dtypes.fp16.sparse_tflops' must be null"),
        (lambda d: d.update(dtypes={}), "'dtypes' must list at least one dtype"),
        (lambda d: d.update(efficiency=0.8), "efficiency must be a mapping"),
        (lambda d: d["gemm"].update(sms=0), "'gemm.sms' must be a positive integer"),
        (lambda d: d["gemm"].update(tile_m=64.5), "'gemm.tile_m' must be a positive integer"),
        (lambda d: d["gemm"].update(k_overhead=-1), "'gemm.k_overhead' must be a number in [0, inf]"),
        (lambda d: d["gemm"].update(warps=4), "unknown field 'gemm.warps'"),
        (lambda d: d["gemm"].pop("sparse_overhead_us"), "missing field 'gemm.sparse_overhead_us'"),
        (lambda d: d.update(compressed_dense_kernels=["2-4"]), "'compressed_dense_kernels'"),
        (lambda d: d.update(compressed_dense_kernels="2:4"), "'compressed_dense_kernels' must be a list"),
        (lambda d: d["gemm"].update(l2_mb=-1), "'gemm.l2_mb' must be a number in [0, inf]"),
        (lambda d: d["gemm"].update(sparse_row_order="yes"), "'gemm.sparse_row_order' must be true or false"),
    ],
)
def test_bad_fields_are_named(tmp_path, edit, fragment: str) -> None:
    data = profile_data()
    edit(data)
    single_line_error(lambda: load_profile(write(tmp_path, data)), "custom.yaml", fragment)


def test_invalid_yaml_and_non_mapping(tmp_path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n  other: 1\n")
    single_line_error(lambda: load_profile(path), "broken.yaml", "not valid YAML")
    path.write_text("- just\n- a list\n")
    single_line_error(lambda: load_profile(path), "broken.yaml", "must be a mapping")


def test_missing_dtype_names_file_and_dtype() -> None:
    single_line_error(
        lambda: load_profile("orin").dtype("fp8"), "orin.yaml", "'fp8'", "available: fp16, bf16, tf32, int8"
    )


def test_gemm_block_and_compressed_dense_kernels_are_optional_and_round_trip(tmp_path) -> None:
    data = profile_data()
    del data["gemm"]
    plain = load_profile(write(tmp_path, data))
    assert plain.gemm == GemmShape() and plain.compressed_dense_kernels == ()  # a plain roofline
    shipped = load_profile("a100")
    assert shipped.gemm.sms == 108 and shipped.gemm.sparse_row_multiple == 32
    data = shipped.to_dict() | {"compressed_dense_kernels": ["3:8"]}
    reader = load_profile(data)
    assert reader.reads_compressed_when_dense(p("3:8")) and not reader.reads_compressed_when_dense(p("2:4"))
    reader.save(tmp_path / "round.yaml")
    assert load_profile(tmp_path / "round.yaml") == reader


def test_cache_and_row_order_fields_are_optional(tmp_path) -> None:
    data = profile_data()
    data["gemm"].pop("l2_mb", None)
    data["gemm"].pop("sparse_row_order", None)
    plain = load_profile(write(tmp_path, data)).gemm
    assert plain.l2_mb == 0.0 and plain.sparse_row_order is False
    data["gemm"].update(l2_mb=48, sparse_row_order=True)
    set_ = load_profile(write(tmp_path, data)).gemm
    assert set_.l2_mb == 48.0 and set_.sparse_row_order is True
    # Shipped GPUs give their L2 size; none assumes row-order sparse kernels (torch picks cuSPARSELt).
    assert load_profile("a100").gemm.l2_mb == 40 and load_profile("rtx3060").gemm.l2_mb == 3
    assert not any(load_profile(name).gemm.sparse_row_order for name in available_profiles())
