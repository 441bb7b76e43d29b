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
