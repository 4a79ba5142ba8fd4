"""The CI entry point passes on pytest's exit code, "no tests collected" included."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STUB_PYTHON = """#!/bin/sh
# python3 -m venv DIR: a venv whose activate puts these stubs first on PATH
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"; printf 'PATH="%s:$PATH"\\n' "$(dirname "$0")" > "$3/bin/activate"; exit 0
fi
if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then exit "$PYTEST_EXIT"; fi
exit 0
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("pytest_exit, expected", [(0, 0), (1, 1), (5, 5)])
def test_ci_fails_when_pytest_fails_or_collects_nothing(tmp_path, pytest_exit, expected):
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("python3", "python", "pip", "ruff", "apt-get"):
        (stubs / name).write_text(STUB_PYTHON)
        (stubs / name).chmod(stat.S_IRWXU)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "PYTEST_EXIT": str(pytest_exit)}
    run = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == expected, run.stderr
