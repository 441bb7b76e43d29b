"""Every ```python block of the docs site runs: one namespace per page, top to bottom, in a
temporary working directory. A page marked ``<!-- docs-test: slow ... -->`` runs under
``pytest -m slow`` (CI runs both); ``--8<-- "path"`` lines include a repository file, as the
site's snippets extension does, so the code shown is the code tested."""

import re
import sys
import types
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SNIPPET = re.compile(r'^--8<-- "([^"]+)"$', re.M)
SLOW = "<!-- docs-test: slow"


def python_blocks(text: str) -> list[str]:
    """The page's ```python blocks with their snippet lines replaced by the included files."""
    return [SNIPPET.sub(lambda m: (ROOT / m.group(1)).read_text(), block) for block in BLOCK.findall(text)]


def pages() -> list:
    params = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        if python_blocks(text):
            marks = [pytest.mark.slow] if SLOW in text else []
            params.append(pytest.param(page, marks=marks, id=str(page.relative_to(DOCS))))
    return params


@pytest.fixture(scope="session")
def docs_cache(tmp_path_factory) -> Path:
    """One pre-training cache for all pages, never the user's ~/.cache."""
    return tmp_path_factory.mktemp("nmsearch-cache")


def run_page(page: Path) -> dict:
    # A real module, so dataclasses and pickling defined on the page resolve their module.
    module = types.ModuleType("docs_page_" + re.sub(r"\W", "_", page.stem))
    sys.modules[module.__name__] = module
    try:
        for number, block in enumerate(python_blocks(page.read_text()), start=1):
            exec(compile(block, f"{page.name} (python block {number})", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module.__dict__


@pytest.mark.parametrize("page", pages())
def test_page_python_blocks_run(page: Path, tmp_path, monkeypatch, docs_cache) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NMSEARCH_CACHE_DIR", str(docs_cache))
    run_page(page)


def test_blocks_are_found_and_snippets_exist() -> None:
    found = [param.values[0] for param in pages()]
    assert DOCS / "getting-started" / "your-own-model.md" in found
    for page in DOCS.rglob("*.md"):
        for path in SNIPPET.findall(page.read_text()):
            assert (ROOT / path).is_file(), f"{page.relative_to(ROOT)} includes {path}, which does not exist"


def test_a_failing_block_fails(tmp_path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```python\nvalue = 1\n```\n\ntext\n\n```python\nassert value == 2, 'one namespace'\n```\n")
    with pytest.raises(AssertionError, match="one namespace"):
        run_page(page)


def test_every_config_key_is_documented() -> None:
    """reference/config.md names every key of every file in conf/ and of the composed config (as
    `key` or `group.key`)."""
    documented = (DOCS / "reference" / "config.md").read_text()

    def keys(node: object) -> set[str]:
        if not isinstance(node, dict):
            return set()
        own = {k for k in node if k not in ("defaults", "hydra") and not k.startswith("_")}
        return own | {key for k in own for key in keys(node[k])}

    sources = {str(p.relative_to(ROOT)): yaml.safe_load(p.read_text()) for p in (ROOT / "conf").rglob("*.yaml")}
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        for strategy in sorted(p.stem for p in (ROOT / "conf" / "strategy").glob("*.yaml")):
            config = compose("config", overrides=[f"strategy={strategy}"])  # the schemas' keys too
            sources[f"composed config, strategy={strategy}"] = OmegaConf.to_container(config)
    missing = {
        f"{source}: {key}"
        for source, node in sources.items()
        for key in keys(node)
        if not re.search(rf"`([\w.]+\.)?{re.escape(key)}`", documented)
    }
    assert not missing, f"add these keys to docs/reference/config.md: {sorted(missing)}"


def test_every_module_has_an_api_page() -> None:
    """reference/api/<package>.md renders every module of the package (``::: package.module``)."""
    missing = []
    for package in ("search_space", "evaluators", "strategies", "experiments"):
        page = (DOCS / "reference" / "api" / f"{package}.md").read_text()
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            module = ".".join(parts)
            if module != package and not parts[-1].startswith("_") and f"::: {module}\n" not in page:
                missing.append(module)
    assert not missing, f"add '::: MODULE' lines to docs/reference/api/ for: {missing}"
