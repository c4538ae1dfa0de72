"""The alert rules load (``promtool check rules``) and behave as their unit tests say
(``promtool test rules monitoring/alerts_test.yml``: each alert firing and not firing)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
ALERTS = MONITORING / "alerts.yml"
ALERTS_TEST = MONITORING / "alerts_test.yml"
ALERT_NAMES = (
    "FedledgerGatewayDown",
    "FedledgerNoRoundCompleted",
    "FedledgerRejectionRatioHigh",
    "FedledgerLedgerCommitFailures",
    "FedledgerLedgerRoundRefused",
    "FedledgerDevicesOffline",
)


def promtool() -> str:
    found = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(found).exists():
        pytest.fail("promtool is not installed (Debian package prometheus): run 'make test'")
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=MONITORING, capture_output=True, text=True, timeout=60
    )


def test_promtool_checks_the_rules():
    done = run("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in done.stdout


def test_promtool_unit_tests_pass():
    done = run("test", "rules", str(ALERTS_TEST))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_firing_and_a_quiet_case_and_a_runbook():
    rules, tests = ALERTS.read_text(), ALERTS_TEST.read_text()
    operations = (MONITORING.parent / "docs" / "operations.md").read_text()
    for name in ALERT_NAMES:
        assert f"alert: {name}\n" in rules, name
        assert f'runbook: "docs/operations.md#{name.lower()}"' in rules, name
        assert f"### {name}\n" in operations, name  # the anchor the runbook link points to
        assert f"alertname: {name}\n" in tests, name
        # a case expecting the alert and a case expecting silence
        blocks = tests.split(f"alertname: {name}\n")[1:]
        assert any(b.lstrip().startswith("exp_alerts: []") for b in blocks), name
        assert any(b.lstrip().startswith("exp_alerts:\n") for b in blocks), name
