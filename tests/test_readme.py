"""README.md: its Python examples run, and CI runs its test command verbatim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", README, re.S)


def setup_commands() -> list[str]:
    section = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```\n(.*?)```", section, re.S)]


def test_readme_gives_exactly_two_setup_commands_and_ci_runs_the_second() -> None:
    """The main job and the test command; .ci/run contains the test command verbatim."""
    commands = setup_commands()
    assert len(commands) == 2
    assert "supervise" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index: int, tmp_path: Path) -> None:
    """Each ```python block of the README runs to completion in a fresh ``-X dev``
    interpreter and exits cleanly: no ResourceWarning, no pending task destroyed."""
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-X", "dev", "-W", "error::ResourceWarning",
                             "-c", EXAMPLES[index]], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for dirty in ("ResourceWarning", "Task was destroyed", "Exception ignored"):
        assert dirty not in result.stderr, result.stderr[-3000:]
    assert list(tmp_path.glob("kernel-*.json")) == []


def test_readme_examples_exist() -> None:
    """The tour has examples for the seed, async, supervisor, pool and policy APIs."""
    assert len(EXAMPLES) >= 6
