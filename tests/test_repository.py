"""The repository keeps its promises: README commands and example, lint."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_both_readme_commands_exactly():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = readme_commands()
    assert len(commands) == 2
    for command in commands:
        assert command in ci_lines


def test_ci_builds_the_docs_with_the_readme_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"`(\.venv/bin/pip install -e \"\.\[docs\]\".+?)`", readme)
    assert command.group(1) in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_quickstart_command_runs_the_quickstart_example():
    quickstart = next(c for c in readme_commands() if "quickstart" in c)
    assert quickstart.endswith("examples/quickstart.py")
    assert (ROOT / "examples" / "quickstart.py").is_file()


def test_ruff_lint_and_format_are_clean():
    for args in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_readme_python_example_runs(tmp_path):
    example = re.search(r"```python\n(.+?)```", (ROOT / "README.md").read_text(), re.S)
    result = subprocess.run(
        [sys.executable, "-c", example.group(1)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable params:" in result.stdout
