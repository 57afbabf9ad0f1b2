"""The code reads as STYLE.md asks: ruff's checks (pyproject.toml's [tool.ruff]: line length 120, the rule sets
chosen there) pass on the package, the tests and the benchmarks, so a long line or an unused import fails the
suite, and CI, rather than slipping through."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                             "src", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
