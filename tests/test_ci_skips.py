"""tests/ci_skips.py: with CI=true an unexpected skip fails the run; allowed ones and local runs stay skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = """
import pytest

def test_tool_missing():
    pytest.skip("sshd missing: run make setup")

@pytest.mark.skipif(True, reason="no /dev/kvm")
def test_kvm_only():
    pass

def test_passes():
    pass
"""


@pytest.mark.parametrize("ci, expected", [
    ("true", "1 failed, 1 passed, 1 skipped"),
    ("", "1 passed, 2 skipped"),
])
def test_an_unexpected_skip_fails_only_in_ci(tmp_path, ci, expected):
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["ci_skips"]\n')
    (tmp_path / "test_sample.py").write_text(TESTS)
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(Path(__file__).parent)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-rf", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert expected in run.stdout, run.stdout
    if ci:
        assert run.returncode == 1
        assert "unexpected skip with CI=true: Skipped: sshd missing: run make setup" in run.stdout
    else:
        assert run.returncode == 0
