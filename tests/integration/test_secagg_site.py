"""Secure aggregation with differential privacy on a real site: a Mosquitto with mutual
TLS and a per-device ACL (the stage, inbox and secagg topics included), a real gateway
process and ten agent processes, two of which vanish (SIGKILL) at a random moment of a
round, whatever stage it is at. The task completes with the survivors' sums, the ledger
verifies against the store, epsilon recomputes from the ledger alone, and the gateway's
store holds masked inputs only."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest

from fedcore import decode_envelope, load_task
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


def test_secagg_with_dp_survives_two_agents_killed_mid_round(tmp_path, dataset):
    host, port = "127.0.0.1", free_port()
    layout = provision(
        tmp_path / "site", dataset, devices=DEVICES, alpha=1.0, seed=3,
        options=TaskOptions(
            task_id="secagg-site", rounds=ROUNDS, epochs=1, round_timeout=10.0, quorum=1,
            dp={"noise_multiplier": 1.0, "clip": 1.0, "sampling": 0.8, "budget_epsilon": 50.0},
            secagg={"stage_timeout": 3.0},
        ),
        broker_host=host, broker_port=port, secure=True,
    )  # fmt: skip
    task = load_task(layout.task)
    assert task.dp is not None and task.secagg is not None
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
            # once round 1 is open, two agents vanish at a random moment of it: keys, shares,
            # masked inputs or reveals may be in flight
            end = time.monotonic() + 120
            while not query(layout.store, "SELECT 1 FROM rounds WHERE round = 1"):
                assert time.monotonic() < end, "round 1 never opened"
                time.sleep(0.05)
            # the moment is a random count of round 1's stage messages stored (each device
            # sends about four), so the kill lands in round 1 however fast rounds run here
            chance = random.Random()
            target = chance.randrange(4 * DEVICES)
            while (
                query(layout.store, "SELECT COUNT(*) FROM secagg_messages WHERE round = 1")[0][0]
                < target
                and not query(layout.store, "SELECT 1 FROM rounds WHERE round = 2")
                and time.monotonic() < end
            ):
                time.sleep(0.002)
            stage = query(layout.store, "SELECT stage FROM secagg_messages ORDER BY rowid DESC")
            at = query(layout.store, "SELECT MAX(round) FROM rounds")[0][0]
            vanished = chance.sample(sorted(agents), 2)
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
            for r in range(at + 1, ROUNDS)
        ]
    assert ended["status"] == "completed" and ended["rounds"] == ROUNDS
    assert later, f"killed in round {at}, the last"
    for contributors in later:
        assert not set(contributors) & set(vanished)
    verify = subprocess.run(
        [sys.executable, "-m", "fedledger", "ledger", "verify", "--db", str(layout.ledger),
         "--store", str(layout.store), "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout)["checked_aggregates"] == ROUNDS
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
    gateway_log = (logs / "gateway.log").read_text()
    assert "Traceback" not in gateway_log, gateway_log[-3000:]
    assert "unmasked the sum" in gateway_log
    # what the gateway stored of each update is a masked input, never a plain tensor
    frames = query(layout.store, "SELECT frame FROM updates")
    assert frames and {decode_envelope(f).header.codec for (f,) in frames} == {"secagg"}
    print(f"killed {vanished} at stage {stage[0][0] if stage else 'keys'}")
