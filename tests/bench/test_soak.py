"""The soak bench end to end for a few seconds: a real gateway process, Mosquitto and agents
(no speed asserts: the figures are checked for shape and sense only)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

DEVICES = 2


def _number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_soak_reports_flatness_figures_and_full_rounds(tmp_path):
    plot = tmp_path / "soak.png"
    done = subprocess.run(
        [
            sys.executable, "-m", "fedledger", "bench", "soak", "--minutes", "0.3",
            "--devices", str(DEVICES), "--plot", str(plot), "--json",
        ],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "soak:" in done.stderr  # progress on stderr, JSON alone on stdout
    result = json.loads(done.stdout)
    assert result["bench"] == "soak" and result["devices"] == DEVICES
    assert result["minutes"] == 0.3
    assert result["rounds"] > 0 and result["rejected"] == 0
    # Every closed round counted one accepted update per device; the store holds at most
    # one more round's updates (the round open when the gateway stopped).
    assert result["all_rounds_full"] is True
    assert DEVICES * result["rounds"] <= result["updates"] <= DEVICES * (result["rounds"] + 1)
    assert result["gateway_exit_code"] == 0
    for key in ("cpu_ms_per_round_first", "cpu_ms_per_round_last", "rss_mb_first",
                "rss_mb_last", "ratio_cpu_per_round", "ratio_rss", "rounds_per_s"):  # fmt: skip
        assert _number(result[key]), key
    assert result["goal_ratio"] == 1.05
    assert result["goal_met"] == (
        result["ratio_cpu_per_round"] <= 1.05 and result["ratio_rss"] <= 1.05
    )
    slices = result["slices"]
    assert len(slices) == 10  # tenths of a short run
    assert [s["slice"] for s in slices] == list(range(10))
    assert sum(s["rounds"] for s in slices) == result["soak_rounds"] > 0
    for s in slices:
        assert set(s) == {"slice", "start_s", "end_s", "rounds", "updates", "rounds_per_s",
                          "cpu_ms_per_round", "rss_mb"}  # fmt: skip
        assert s["end_s"] > s["start_s"] >= 0 and s["rss_mb"] > 0
    assert slices[0]["cpu_ms_per_round"] == result["cpu_ms_per_round_first"]
    assert slices[-1]["rss_mb"] == result["rss_mb_last"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["plot_path"] == str(plot)
