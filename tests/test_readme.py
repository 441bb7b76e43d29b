import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"Set up and run the test suite.*?```bash\n(.+?)\n```", readme, re.S)
    assert block, "README must show the test command in a bash block after 'Set up and run the test suite'"
    command = block.group(1).strip()
    assert "pytest" in command and "torch==2.13.0" in command
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_python_examples_run(tmp_path, monkeypatch) -> None:
    """Blocks under these headings run top to bottom in one namespace (the recipe one needs a data loader)."""
    readme = (ROOT / "README.md").read_text()
    runnable = ["## N:M masks", "## Sparse layers", "## Search space", "## Schemes and the JSON format"]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for heading in runnable:
        section = readme.split(heading, 1)[1].split("\n## ", 1)[0]
        for block in re.findall(r"```python\n(.+?)```", section, re.S):
            exec(compile(block, f"README {heading}", "exec"), namespace)
    assert (tmp_path / "scheme.json").exists()
    assert namespace["report"]["weights_ok"].all()
