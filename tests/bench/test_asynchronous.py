"""The asynchronous bench runs end to end on a tiny configuration (no timing asserts)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from bench import asynchronous


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_asynchronous_tiny():
    result = asynchronous.run(
        datasets=("breast_cancer",), devices=6, buffer=2, repeats=1, horizon_s=200.0
    )
    assert result["bench"] == "asynchronous"
    figures = result["datasets"]["breast_cancer"]
    assert 0.5 < figures["centralized_accuracy"] <= 1.0
    assert figures["target_accuracy"] == pytest.approx(
        0.95 * figures["centralized_accuracy"], rel=1e-3
    )
    for mode in ("sync", "sync_deadline", "async"):
        assert set(figures[mode]) >= {"time_to_target_s", "rounds", "updates", "final_accuracy"}
    assert finite(figures["sync"]["time_to_target_s"])
    assert finite(figures["async"]["time_to_target_s"])
    assert finite(figures["speedup"]) and figures["speedup"] > 0
    assert result["breast_cancer_speedup"] == figures["speedup"]
    assert result["speedup_min"] == figures["speedup"]
    assert result["goal_speedup"] == 1.8
    assert isinstance(result["goal_met"], bool)
    assert finite(result["elapsed_s"])
    json.dumps(result)  # the CLI prints it as JSON


def test_staleness_bound_refuses_updates():
    """With no staleness allowed, the slow devices' updates are refused, never applied."""
    fleet = asynchronous._fleet("breast_cancer", 6, 0.5, 10.0, 0)
    out = asynchronous.simulate_async(
        fleet, target=1.01, horizon=30.0, buffer=2, max_staleness=0, exponent=0.5
    )
    assert out["time_to_target_s"] is None  # an unreachable target: runs to the horizon
    assert out["rejected_too_stale"] > 0 and out["updates"] >= 2 * out["rounds"]


def test_cli_bench_async_prints_json():
    done = subprocess.run(
        [sys.executable, "-m", "fedledger", "bench", "async", "--json", "--repeats", "1",
         "--devices", "4", "--dataset", "breast_cancer"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["bench"] == "asynchronous" and result["devices"] == 4
    assert isinstance(result["goal_met"], bool)
