"""A task with differential privacy on a real site: a Mosquitto with mutual TLS and a
per-device ACL, a real gateway process and ten agent processes, two of which vanish
(SIGKILL) in the middle of a round. The task completes, the ledger verifies against the
store, and ``fedledger ledger privacy`` recomputes the gateway's epsilon from the ledger
alone and checks every contributor against the revealed sampling seed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from fedcore import load_task
from fedcore.mosquitto import MosquittoBroker, SecureBrokerFiles, free_port
from fedcore.pki import ca_cert_path, crl_path
from fedledger._provision import TaskOptions, provision
from ledger import EmbeddedLedger, Identity

from .test_gateway_kill import query

pytestmark = [pytest.mark.mqtt, pytest.mark.slow, pytest.mark.timeout(300)]

AUDITOR = Identity(msp_id="org1", subject="auditor", role="auditor")
DEVICES = 10
ROUNDS = 5


def fedledger(*args, log=None):
    return subprocess.Popen(
        [sys.executable, "-m", "fedledger", *args],
        stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip


def test_a_dp_task_survives_two_vanishing_agents_and_its_budget_recomputes(tmp_path, dataset):
    host, port = "127.0.0.1", free_port()
    layout = provision(
        tmp_path / "site", dataset, devices=DEVICES, alpha=1.0, seed=3,
        options=TaskOptions(
            task_id="dp-site", rounds=ROUNDS, epochs=1, round_timeout=4.0, quorum=1,
            dp={"noise_multiplier": 1.0, "clip": 1.0, "sampling": 0.6, "budget_epsilon": 50.0},
        ),
        broker_host=host, broker_port=port, secure=True,
    )  # fmt: skip
    task = load_task(layout.task)
    assert task.dp is not None and task.dp.seed_sha256 is not None
    secure = SecureBrokerFiles(
        ca=ca_cert_path(layout.pki), server_cert=layout.pki / "brokers" / "broker.pem",
        server_key=layout.pki / "brokers" / "broker.key", devices=sorted(layout.agent_configs),
        gateways=["gateway"], tasks=[task.id], crl=crl_path(layout.pki),
    )  # fmt: skip
    logs = tmp_path / "logs"
    logs.mkdir()
    with MosquittoBroker(host=host, port=port, secure=secure):
        with (logs / "gateway.log").open("ab") as out:
            gateway = fedledger("gateway", "run", "-c", str(layout.gateway_config), log=out)
        agents = {}
        for device, config in layout.agent_configs.items():
            with (logs / f"{device}.log").open("ab") as out:
                agents[device] = fedledger("agent", "run", "-c", str(config), log=out)
        try:
            # once round 1 is open, two agents vanish, with their updates maybe in flight
            end = time.monotonic() + 120
            while not query(layout.store, "SELECT 1 FROM rounds WHERE round = 1"):
                assert time.monotonic() < end, "round 1 never opened"
                time.sleep(0.05)
            vanished = sorted(agents)[:2]
            for device in vanished:
                agents[device].send_signal(signal.SIGKILL)
            assert gateway.wait(180) == 0
        finally:
            for process in [gateway, *agents.values()]:
                if process.poll() is None:
                    process.kill()
                    process.wait(10)
    with EmbeddedLedger.open_readonly(layout.ledger) as chain:
        ended = chain.evaluate("GetTask", task.id, identity=AUDITOR)["ended"]
        later = [
            chain.evaluate("GetRound", task.id, r, identity=AUDITOR)["contributors"]
            for r in range(2, ROUNDS)
        ]
    assert ended["status"] == "completed" and ended["rounds"] == ROUNDS
    for contributors in later:
        assert not set(contributors) & set(vanished)
    verify = subprocess.run(
        [sys.executable, "-m", "fedledger", "ledger", "verify", "--db", str(layout.ledger),
         "--store", str(layout.store), "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    privacy = subprocess.run(
        [sys.executable, "-m", "fedledger", "ledger", "privacy", task.id, "--db",
         str(layout.ledger), "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert privacy.returncode == 0, privacy.stdout + privacy.stderr
    report = json.loads(privacy.stdout)
    assert report["ok"] and len(report["rounds"]) == ROUNDS
    assert abs(report["epsilon"] - report["recorded_epsilon"]) <= 1e-6
    assert all(r["contributors_sampled"] for r in report["rounds"])
    assert report["epsilon"] < report["epsilon_without_amplification"]
    assert "Traceback" not in (logs / "gateway.log").read_text()
