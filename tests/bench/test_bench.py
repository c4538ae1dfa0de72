"""The benchmarks run end to end at small sizes and report sane figures (no timing asserts)."""

from __future__ import annotations

import math

import pytest

from bench import aggregate, ingest


def _positive_finite(result: dict, keys: list[str]) -> None:
    for key in keys:
        value = result[key]
        assert isinstance(value, (int, float)), key
        assert math.isfinite(value) and value > 0, (key, value)


def test_aggregate_small():
    result = aggregate.run(devices=5, params=2000, repeats=1)
    assert result["bench"] == "aggregate"
    assert result["devices"] == 5
    assert result["params"] == 2000
    assert result["repeats"] == 1
    _positive_finite(
        result,
        [
            "floor_s",
            "floor_gb_per_s",
            "fedavg_f32_s",
            "fedavg_int8_s",
            "ratio_f32_to_floor",
            "ratio_int8_to_floor",
        ],
    )
    for key in ("max_abs_error_f32", "max_abs_error_int8"):
        assert math.isfinite(result[key]) and result[key] >= 0, key
    # float32 accumulation of 5 updates of size ~0.01: far below 1e-6 of the float64 mean.
    assert result["max_abs_error_f32"] < 1e-6
    # int8: at most half a quantization step (peak / 127 / 2) per update, averaged.
    assert result["max_abs_error_int8"] < 1e-3


@pytest.mark.mqtt
def test_ingest_small():
    result = ingest.run(messages=50, size=2048, ledger_delay=0)
    assert result["bench"] == "ingest"
    assert result["messages"] == 50
    assert abs(result["message_bytes"] - 2048) <= 16
    _positive_finite(
        result,
        [
            "mosquitto_msgs_per_s",
            "gateway_msgs_per_s",
            "ratio_gateway_to_mosquitto",
            "mosquitto_s",
            "gateway_s",
        ],
    )
    assert result["delivered"] == 50
    assert result["accepted"] == 50
    assert result["rejected"] == {}
    assert "slow_ledger_ratio" not in result


@pytest.mark.mqtt
def test_ingest_goes_on_while_a_slow_ledger_anchors():
    delay = 0.3
    result = ingest.run(messages=120, size=1024, ledger_delay=delay)
    assert result["ledger_delay_s"] == delay
    assert result["anchor_rounds"] == ingest.ANCHOR_ROUNDS and result["anchor_buffer"] == 30
    assert result["accepted_slow_ledger"] == 120
    # with the worker, rounds closed faster than the ledger took them: ingest did not wait
    assert result["unanchored_at_end"] >= 1
    # inline, a round's three transactions sleep before the next model goes out
    assert result["close_to_publish_s_max_inline"] >= 3 * delay
    _positive_finite(
        result,
        [
            "gateway_anchoring_msgs_per_s",
            "gateway_slow_ledger_msgs_per_s",
            "gateway_inline_ledger_msgs_per_s",
            "slow_ledger_ratio",
            "close_to_publish_s_max",
        ],
    )
    assert isinstance(result["anchoring_goal_met"], bool)


def test_ledger_bench_small():
    from bench.ledger import run

    result = run(batch=10, rounds=3, verify_records=200)
    assert result["records_anchored"] == 30 and result["verify_records"] == 200
    for key in (
        "records_per_s",
        "sqlite_records_per_s",
        "ratio_to_sqlite",
        "verify_s",
        "verify_replay_s",
    ):
        assert math.isfinite(result[key]) and result[key] > 0, key
    # genesis, 10 registrations, the task, one round opened, then 20 batches of 10 records
    assert result["verify_blocks"] == 1 + 10 + 1 + 1 + 20


@pytest.mark.mqtt
def test_agent_bench_small():
    from bench.agent import run

    result = run(rounds=2, hidden=64, epochs=1)
    assert result["model_params"] == 30 * 64 + 64 + 64 * 2 + 2
    assert 10 < result["idle_rss_mb"] <= result["peak_rss_mb"] < 1000
    assert result["cpu_s_per_round"] > 0 and result["python_floor_mb"] > 1
    assert result["machine"] and result["launcher"] is None
    pi_zero = result["device_classes"]["raspberry-pi-zero-2w"]
    assert pi_zero["memory_budget_mb"] == 100
    assert pi_zero["peak_margin_mb"] == pytest.approx(100 - result["peak_rss_mb"], abs=0.1)


def test_agent_bench_through_a_launcher_samples_the_launched_interpreter(tmp_path):
    from bench.agent import run

    # A launcher that forks before it runs the agent, as systemd-nspawn does.
    result = run(
        rounds=1,
        model="logreg",
        epochs=1,
        launcher="env FEDLEDGER_BENCH_DIR={dir} sh -c '\"$@\"; exit $?' launcher",
    )
    assert result["model"] == "logreg" and "launcher" in result["launcher"]
    assert "cpu_s_per_round" not in result and result["emulated_cpu_s_per_round"] > 0
    # The agent, not the launcher: a Python process with the agent's memory.
    assert result["peak_rss_mb"] > result["python_floor_mb"] > 1
