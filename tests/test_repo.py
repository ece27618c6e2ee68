"""The README's set-up commands are the ones CI runs."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_starts_with_demo_and_test_commands_and_ci_runs_the_second():
    text = (REPO / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2
    assert block[0].endswith("semiseg demo")
    assert block[1].endswith("pytest -q")
    assert block[1] in (REPO / ".ci" / "run").read_text()
