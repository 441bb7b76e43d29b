import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """The anchor MkDocs (and GitHub) give a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"\s+", "-", text)


def nav_pages(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [page for value in node.values() for page in nav_pages(value)]
    if isinstance(node, list):
        return [page for item in node for page in nav_pages(item)]
    return []


def test_ci_runs_the_readme_test_command() -> None:
    block = re.search(r"Set up and run the test suite.*?```bash\n(.+?)\n```", README, re.S)
    assert block, "README must show the test command in a bash block after 'Set up and run the test suite'"
    command = block.group(1).strip()
    assert "pytest" in command and "torch==2.13.0" in command
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_is_at_most_250_lines() -> None:
    lines = len(README.splitlines())
    assert lines <= 250, f"README.md has {lines} lines; move the detail into a docs page and link it"


def test_readme_python_example_runs(tmp_path, monkeypatch) -> None:
    blocks = re.findall(r"^```python\n(.+?)^```", README, re.S | re.M)
    assert len(blocks) == 1, "the README shows one Python example; more go into docs/"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md (python example)", "exec"), namespace)
    assert (tmp_path / "scheme.json").exists()
    assert namespace["report"].speedup >= 1  # the fastest plan is taken: never slower than dense


def test_readme_links_resolve() -> None:
    """Every relative link points to an existing file and, with '#anchor', to a heading in it."""
    local = [target for target in LINK.findall(README) if not re.match(r"[a-z]+:", target)]
    assert local, "the README links into docs/"
    for target in local:
        path, _, anchor = target.partition("#")
        assert (ROOT / path).is_file(), f"README links to {path}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), re.M)
            assert anchor in {slug(h) for h in headings}, f"README links to {target}: no such heading"


def test_readme_links_every_docs_page() -> None:
    """A newcomer finds any concept in one click: each page of the site's nav is linked (the API
    reference through its first page)."""
    nav = nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    linked = {target.partition("#")[0] for target in LINK.findall(README)}
    api = [page for page in nav if page.startswith("reference/api/")]
    missing = [page for page in nav if f"docs/{page}" not in linked and page not in api[1:]]
    assert not missing, f"link these docs pages from the README: {missing}"
