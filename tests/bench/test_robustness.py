"""The robustness bench runs end to end on a tiny configuration (no timing asserts), and the
aggregate bench reports the robust-rule figures beside its FedAvg ones."""

from __future__ import annotations

import math

import pytest

from bench import aggregate, robustness

RULES = (
    "fedavg",
    "median",
    "multi_krum",
    "bulyan",
    "multi_krum_refined",
    "geometric_median",
    "geometric_median_trimmed",
)


def test_robustness_tiny():
    result = robustness.run(
        datasets=("breast_cancer", "digits"),
        fractions=(0.3, 0.45),
        rounds=2,
        devices=8,
        repeats=1,
        rules=RULES,
        attacks=("nan", "sign_flip"),
    )
    assert result["bench"] == "robustness"
    table = result["table"]
    assert table["columns"][:4] == ["dataset", "rule", "attack", "fraction"]
    assert len(table["rows"]) == 2 * 7 * 2 * 2  # datasets x rules x fractions x attacks
    col = {c: i for i, c in enumerate(table["columns"])}
    for row in table["rows"]:
        assert 0.0 <= row[col["accuracy"]] <= 1.0
        assert math.isfinite(row[col["loss_pp"]])
        assert len(row[col["loss_pp_per_seed"]]) == 1  # one seed: its loss is the mean
        assert row[col["loss_pp_per_seed"]][0] == pytest.approx(row[col["loss_pp"]], abs=0.02)
        if row[col["attack"]] == "nan":  # every NaN update of every round was dropped
            assert row[col["dropped"]] == row[col["attackers"]] * 2
    assert result["nonfinite_aggregated"] == 0
    # 2 and 4 attackers (round(0.3 * 8), round(0.45 * 8)), 2 rounds, 7 rules, 2 data sets
    assert result["nonfinite_dropped"] >= (2 + 4) * 2 * 7 * 2
    for pct in ("30pct", "45pct"):
        for key in ("met", "met_vs_fedavg_clean", "met_single_rule"):
            assert isinstance(result[f"goal_{pct}_{key}"], bool)
        assert result[f"single_best_rule_{pct}"] in RULES[1:]
        cell = result[f"worst_loss_cell_{pct}"]
        assert cell["loss_pp"] == result[f"worst_loss_pp_{pct}"]
        samples = result["test_samples"][cell["dataset"]]
        assert cell["loss_test_samples"] == pytest.approx(cell["loss_pp"] * samples / 100, abs=0.01)
    assert result["test_samples"] == {"breast_cancer": 114, "digits": 360}
    assert len(result["best_rule_per_cell"]["rows"]) == 2 * 2 * 2
    clean_rules = {row[1] for row in result["clean"]["rows"]}
    assert clean_rules == set(RULES)
    assert result["runs"] > 0 and result["elapsed_s"] > 0


def test_aggregate_reports_robust_rule_figures():
    result = aggregate.run(devices=7, params=3000, repeats=1)
    assert result["fedavg_f32_s"] > 0  # the original figures are still there
    for key in (
        "sort_axis0_s",
        "median_s",
        "trimmed_mean_s",
        "ratio_median_to_sort",
        "ratio_trimmed_mean_to_sort",
        "matmul_s",
        "krum_distances_s",
        "ratio_krum_distances_to_matmul",
    ):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["max_abs_error_median"] == 0.0  # the same float32 values, picked
    assert result["max_abs_error_trimmed_mean"] < 1e-6
    assert result["max_rel_error_krum_distances"] < 1e-3
