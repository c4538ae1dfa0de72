"""The secure aggregation benchmark measures what it says: exact sums with dropouts, and
upload and time figures taken from the real gateway and agents."""

from __future__ import annotations

from bench.secagg import run
from fedcore import secagg as sa


def test_a_small_run_is_exact_with_dropouts_and_reports_its_costs():
    result = run(devices=(6,), dropouts=(0.0, 0.34), rounds=1)
    assert [e["exact"] for e in result["exactness"]] == [True, True]
    assert [e["dropped"] for e in result["exactness"]] == [0, 2]
    assert result["exactness"][1]["participants"] == 4
    (row,) = result["cost"]
    assert row["bits"] == sa.modulus_bits(6) == 11
    # a masked input packs 11 bits a value where int8 takes 8 (plus a scale per tensor)
    assert 11 / 8 * 0.97 < row["masked_payload_ratio"] < 11 / 8
    assert row["secagg"]["upload_bytes_per_device"] > row["secagg"]["update_frame_bytes"]
    assert row["plain"]["upload_bytes_per_device"] == row["plain"]["update_frame_bytes"]
    assert row["secagg"]["gateway_cpu_s"] > 0 and row["plain"]["gateway_cpu_s"] > 0
    assert isinstance(result["goal_met"], bool)
