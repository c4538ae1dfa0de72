"""The long benchmarks have a quick mode that finishes in seconds, prints JSON marked quick
on stdout and its progress on stderr, so a set-up is checked without a long run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "bench", [pytest.param("robustness", marks=pytest.mark.slow), "privacy", "accuracy"]
)
def test_quick_mode_reports_progress_and_marked_json(bench):
    done = subprocess.run(
        [sys.executable, "-m", "fedledger", "bench", bench, "--quick", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["quick"] is True
    assert done.stderr.strip(), "no progress on stderr"
    assert "Traceback" not in done.stderr
