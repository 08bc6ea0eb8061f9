"""The tree stays clean under the project's ruff configuration (pyproject.toml: line length,
pycodestyle, pyflakes, import order) and its formatter."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip("ruff", reason="ruff is a test dependency: pip install -e '.[test]'")


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]])
def test_ruff_finds_nothing(command):
    ruff = [sys.executable, "-m", "ruff", *command]
    done = subprocess.run(ruff, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
