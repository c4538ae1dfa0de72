"""``bench ingest --tls``: plain and mutual-TLS figures from one run, every update accepted."""

from __future__ import annotations

import math

import pytest

from bench import ingest

pytestmark = pytest.mark.mqtt


def test_ingest_tls_small():
    result = ingest.run(messages=50, size=2048, tls=True, ledger_delay=0)
    assert result["bench"] == "ingest"
    assert result["messages"] == 50
    assert result["tls"] is True
    for key in (
        "mosquitto_msgs_per_s",
        "gateway_msgs_per_s",
        "ratio_gateway_to_mosquitto",
        "mosquitto_s",
        "gateway_s",
        "mosquitto_tls_msgs_per_s",
        "gateway_tls_msgs_per_s",
        "ratio_gateway_to_mosquitto_tls",
        "mosquitto_tls_s",
        "gateway_tls_s",
        "tls_cost_mosquitto",
        "tls_cost_gateway",
    ):
        value = result[key]
        assert isinstance(value, (int, float)), key
        assert math.isfinite(value) and value > 0, (key, value)
    assert result["delivered"] == result["delivered_tls"] == 50
    assert result["accepted"] == result["accepted_tls"] == 50
    assert result["rejected"] == result["rejected_tls"] == {}


def test_ingest_default_keys_unchanged():
    result = ingest.run(messages=10, size=1024, ledger_delay=0)
    assert list(result) == [
        "bench",
        "messages",
        "message_bytes",
        "mosquitto_msgs_per_s",
        "gateway_msgs_per_s",
        "ratio_gateway_to_mosquitto",
        "mosquitto_s",
        "gateway_s",
        "delivered",
        "accepted",
        "rejected",
    ]
