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


def test_ci_runs_every_command_the_readme_shows_inline():
    # The docs build, and installing and testing another Keras backend.
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"`((?:\.venv/bin/|KERAS_BACKEND=)[^`]+)`", readme)
    assert any("mkdocs build --strict" in command for command in commands)
    assert any(command.startswith("KERAS_BACKEND=jax") for command in commands)
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci_lines


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
