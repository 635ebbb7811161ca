"""`ruff check` stays clean: the rules in pyproject.toml ([tool.ruff.lint]) over the package, tests, benchmarks and
experiments. ruff comes with the `test` extra; without it the test is skipped, not passed."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
CHECKED = ["kcd_ray", "tests", "bench", "experiments"]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                    reason="ruff is not installed (pip install -e '.[test]' brings it)")
def test_ruff_check_is_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format=concise", *CHECKED],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    rc = out.returncode
    assert rc == 0, f"ruff check {' '.join(CHECKED)} exited {rc}:\n{out.stdout}{out.stderr}"
