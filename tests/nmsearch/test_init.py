"""The nmsearch namespace: the public API, the shipped configs and the guard against shadowed packages."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import nmsearch
from evaluators.hardware import HARDWARE_DIR, available_profiles
from experiments.config import register_configs
from search_space import Scheme, SearchSpace
from strategies import OptunaStrategy

ROOT = Path(__file__).resolve().parents[2]


def test_public_api_is_the_packages_objects() -> None:
    from nmsearch import OptunaStrategy as Reexported
    from nmsearch import Scheme as ReexportedScheme
    from nmsearch import SearchSpace as ReexportedSpace

    assert (Reexported, ReexportedScheme, ReexportedSpace) == (OptunaStrategy, Scheme, SearchSpace)
    for name in nmsearch.__all__:
        assert getattr(nmsearch, name) is not None
    assert set(nmsearch.__all__) <= set(dir(nmsearch))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        nmsearch.Nope  # noqa: B018


def test_configs_are_found_through_the_package() -> None:
    conf = nmsearch.config_dir()
    assert (conf / "config.yaml").is_file() and conf / "hardware" == HARDWARE_DIR
    assert {"a100", "orin"} <= set(available_profiles())
    register_configs()  # the schemas config.yaml extends
    with initialize_config_module(nmsearch.CONFIG_PACKAGE, version_base="1.3"):
        cfg = compose("config", overrides=["hardware=a100", "task=synthetic"])
    assert cfg.hardware.name == "A100-SXM-80GB"


def run_python(code: str, cwd: Path, pythonpath: list[Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_a_shadowing_package_is_one_line(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    (foreign / "strategies").mkdir(parents=True)
    (foreign / "strategies" / "__init__.py").write_text("raise SystemExit('foreign code must not run')\n")
    result = run_python("import nmsearch", tmp_path, [foreign, ROOT])
    assert result.returncode == 1
    assert (
        result.stderr.startswith("nmsearch: its package 'strategies' resolves to ") and result.stderr.count("\n") == 1
    )
    assert str(foreign / "strategies") in result.stderr and "in its own virtual environment" in result.stderr
    # What the console script does: the same one line.
    cli = run_python("from nmsearch.cli import main; main(['export', '--help'])", tmp_path, [foreign, ROOT])
    assert cli.returncode == 1 and cli.stderr == result.stderr
    caught = run_python("try:\n import nmsearch\nexcept ImportError as e: print(type(e).__name__)", tmp_path,
                        [foreign, ROOT])  # fmt: skip
    assert caught.stdout == "ShadowedPackageError\n"
    assert run_python("import nmsearch", tmp_path, [ROOT]).returncode == 0


@pytest.mark.slow  # builds the wheel (pip, ~10 s)
def test_wheel_ships_the_configs_and_the_command(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("nmsearch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = {p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert {f"nmsearch/conf/{name}" for name in conf} <= names and "nmsearch/conf/config.yaml" in names
    assert {
        "nmsearch/__init__.py",
        "nmsearch/cli.py",
        "experiments/deploy.py",
        "search_space/scheme.schema.json",
    } <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "nmsearch = nmsearch.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
