"""``fedledger bench privacy``: the figures it prints come from runs, and move the way DP
says they must."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_privacy_measures_the_trade_off(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fedledger", "bench", "privacy", "--devices", "120",
         "--sampling", "0.2", "--rounds", "15", "--noise", "0.8", "--noise", "4",
         "--repeats", "1", "--plot", str(tmp_path / "p.png"), "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    low, high = result["settings"]
    assert result["devices"] == 120 and result["rounds"] == 15
    assert len(result["no_dp_curve"]) == 15 and len(low["curve"]) == 15
    # more noise: less privacy spent, less accuracy; sampling amplifies
    assert high["epsilon"] < low["epsilon"] < low["epsilon_without_amplification"]
    assert high["accuracy"] < low["accuracy"]
    assert high["loss_pp"] > 0
    assert result["no_dp_accuracy"] > 0.5
    assert (tmp_path / "p.png").stat().st_size > 1000
