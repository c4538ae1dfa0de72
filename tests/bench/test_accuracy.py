"""The accuracy benchmark runs end to end at a small size and reports sane figures."""

from __future__ import annotations

import json
import math

import pytest

from bench import accuracy
from fedcore._codec import CODECS


@pytest.fixture(scope="module")
def small():
    return accuracy.run(devices=4, rounds=2, repeats=1, hidden=24, k_fraction=0.1)


def test_small_run_reports_every_dataset_and_codec(small):
    json.dumps(small)  # JSON-ready
    assert small["bench"] == "accuracy"
    assert small["devices"] == 4 and small["rounds"] == 2 and small["seeds"] == "0"
    assert set(small["results"]) == {"breast_cancer", "digits"}
    for result in small["results"].values():
        assert list(result["codecs"]) == list(CODECS)
        assert 0.5 < result["centralized_accuracy"] <= 1.0
        for codec, row in result["codecs"].items():
            assert 0.0 <= row["accuracy"] <= 1.0, codec
            assert len(row["accuracy_by_seed"]) == 1
            for key in ("gap_to_centralized_pp", "gap_to_f32_pp"):
                assert math.isfinite(row[key]), (codec, key)
            assert row["uplink_bytes_per_round"] > row["payload_bytes_per_update"] > 0
            assert row["compression_vs_f32"] > 0
        f32 = result["codecs"]["f32"]
        assert f32["gap_to_f32_pp"] == 0.0 and f32["compression_vs_f32"] == 1.0


def test_compact_codecs_send_fewer_bytes(small):
    rows = small["results"]["digits"]["codecs"]
    payload = {codec: row["payload_bytes_per_update"] for codec, row in rows.items()}
    assert payload["int8"] < payload["f32"] / 3.5
    assert payload["int4"] < payload["int8"] / 1.8
    assert payload["topk-int8"] < payload["topk-f32"] < payload["int8"]


def test_compression_goal_is_only_judged_on_a_big_model(small):
    assert small["results"]["digits"]["n_params"] < 100_000
    assert small["compression_goal_met"] is None


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="codecs"):
        accuracy.run(codecs=("gzip",))
    with pytest.raises(ValueError, match="data sets"):
        accuracy.run(datasets=("mnist",))
    with pytest.raises(ValueError):
        accuracy.run(repeats=0)
