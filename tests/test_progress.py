"""The demo's terminal view: per-round lines and the summary carry the clinical metrics."""

from __future__ import annotations

import io

from rich.console import Console

from fedledger._progress import RoundTable
from gateway import RoundResult

BINARY = {
    "balanced_accuracy": 0.9125,
    "auc": 0.98765,
    "sensitivity": 0.95,
    "specificity": 0.875,
    "recall_0": 0.875,
    "recall_1": 0.95,
}


def result(round_: int, clinical: dict[str, float]) -> RoundResult:
    return RoundResult(
        round=round_, accuracy=0.93, clinical=clinical, participants=3, samples=300,
        bytes_received=1234, rejected=0, rejected_by_reason={}, duration_s=0.5,
        model_hash="ab" * 32, ledgered=True,
    )  # fmt: skip


def console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def test_each_round_line_shows_the_clinical_metrics_it_has():
    con, out = console()
    table = RoundTable(con, rounds=2, devices=3)
    table.add(result(0, BINARY))
    table.add(result(1, {"balanced_accuracy": 0.5, "auc": 0.75, "recall_0": 0.5}))
    first, second = out.getvalue().splitlines()
    assert "accuracy 93.00%  balanced acc. 91.25%  AUC 0.988" in first
    assert "sensitivity 95.00%  specificity 87.50%" in first
    assert "balanced acc. 50.00%  AUC 0.750  bytes" in second  # what the round lacks is not shown


def test_the_table_has_a_column_per_clinical_metric_some_round_has():
    con, out = console()
    table = RoundTable(con, rounds=1, devices=3)
    table.rows.append(result(0, {"balanced_accuracy": 0.5, "auc": 0.75}))
    con.print(table._table())
    header = out.getvalue().splitlines()[0]
    assert "balanced acc." in header and "AUC" in header and "sensitivity" not in header


def test_the_summary_shows_the_final_clinical_metrics():
    con, out = console()
    report = {
        "final_accuracy": 0.93, "final_clinical": BINARY, "centralized_accuracy": 0.95,
        "gap_pp": 2.0, "final_model": "ab" * 32, "ledger_verified": True, "ledger_blocks": 9,
        "ledger_checked_models": 2, "ledger_checked_updates": 6, "ledger_path": "l.db",
        "report_path": "report.json", "ledger_problem": None, "devices": 3,
        "rounds": [{}, {}], "duration_s": 1.0,
    }  # fmt: skip
    RoundTable(con, rounds=2, devices=3).summary(report)
    text = out.getvalue()
    assert (
        "final clinical        balanced acc. 91.25%, AUC 0.988, sensitivity 95.00%,"
        " specificity 87.50%"
    ) in text
