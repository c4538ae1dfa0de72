"""End to end over a real Mosquitto: gateway, five agents (each its own MQTT client),
embedded ledger; then garbage thrown at the gateway while a round runs."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from edge_agent import load_agent_config, open_agent
from fedcore import (
    MqttSettings,
    MqttTransport,
    UpdateHeader,
    accuracy,
    encode_tensors,
    encode_update,
    generate_key,
    init_params,
    load_task,
    update_topic,
)
from fedledger._provision import TaskOptions, provision
from gateway import UpdateStore, load_gateway_config, open_gateway

pytestmark = pytest.mark.mqtt


@pytest.fixture
def layout(tmp_path, dataset, mosquitto):
    return provision(
        tmp_path / "site",
        dataset,
        devices=5,
        alpha=0.5,
        seed=3,
        options=TaskOptions(
            task_id=f"it-{time.monotonic_ns()}", rounds=3, epochs=2, round_timeout=30.0
        ),
        broker_host=mosquitto.host,
        broker_port=mosquitto.port,
    )


class Fleet:
    def __init__(self, layout):
        self.stop = threading.Event()
        self.agents = [
            open_agent(load_agent_config(path), source=str(path))
            for path in layout.agent_configs.values()
        ]
        self.threads = [
            threading.Thread(target=a.run, args=(self.stop,), daemon=True) for a in self.agents
        ]

    def __enter__(self):
        for agent, thread in zip(self.agents, self.threads, strict=True):
            agent.start()
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for agent, thread in zip(self.agents, self.threads, strict=True):
            thread.join(5)
            agent.transport.stop()


def run_gateway(layout, *, during_round=None, limit=60.0):
    gateway = open_gateway(load_gateway_config(layout.gateway_config))
    try:
        gateway.connect()
        assert gateway.wait_for_devices(20.0) == len(layout.agent_configs)
        gateway.start()
        end = time.monotonic() + limit
        fired = False
        while not gateway.finished and time.monotonic() < end:
            gateway.step(0.1)
            if during_round is not None and not fired and gateway.current_round == 1:
                during_round()
                fired = True
        assert gateway.finished, "the task did not finish in time"
        return gateway
    finally:
        gateway.close()


def test_three_rounds_improve_accuracy_and_verify(layout, dataset):
    task = load_task(layout.task)
    spec = task.model_spec()
    initial = accuracy(spec, init_params(spec), dataset.x_test, dataset.y_test)
    with Fleet(layout) as fleet:
        gateway = run_gateway(layout)
        deadline = time.monotonic() + 10
        while any(a.final_model is None for a in fleet.agents) and time.monotonic() < deadline:
            time.sleep(0.05)
    results = gateway.results
    assert [r.round for r in results] == [0, 1, 2]
    assert all(r.participants == 5 for r in results)
    assert results[-1].accuracy > max(initial, 0.85)
    assert results[-1].accuracy >= results[0].accuracy - 0.02
    assert all(r.rejected == 0 for r in results)
    assert {a.final_model for a in fleet.agents} == {gateway.final_model}

    verify = [sys.executable, "-m", "fedledger", "ledger", "verify", "--db", str(layout.ledger)]
    ok = subprocess.run(verify, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    # genesis, 5 registrations, the task, then open/record/commit for each of three rounds
    assert "16 blocks" in ok.stdout

    import sqlite3

    db = sqlite3.connect(layout.ledger)
    db.execute(
        "UPDATE blocks SET records = replace(records, '\"accepted\":true', '\"accepted\":false')"
        " WHERE height = 11"
    )
    db.commit()
    db.close()
    bad = subprocess.run(verify, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "block 11" in bad.stderr and "Merkle" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_bad_input_is_rejected_with_reasons_while_the_round_completes(layout):
    task = load_task(layout.task)
    rogue = MqttTransport(
        MqttSettings(port=layout_port(layout), client_id="rogue", clean_session=True)
    )
    rogue.start()
    assert rogue.wait_connected(10)
    victim = "device-01"
    topic = update_topic(task.id, victim)

    def attack():
        import numpy as np

        mallory = generate_key()
        shapes = task.model_spec().shapes()
        tensors = {k: np.ones(s, np.float32) for k, s in shapes.items()}
        forged = encode_update(
            UpdateHeader(
                task=task.id,
                round=1,
                device=victim,
                base="00" * 32,
                samples=5,
                codec="int8",
                counter=99,
            ),
            encode_tensors(tensors, "int8"),
            mallory.sign,
        )
        for payload in (b"garbage", forged[:40], b"\0" * (2 << 20), forged):
            rogue.publish_confirmed(topic, payload)

    with Fleet(layout):
        gateway = run_gateway(layout, during_round=attack)
    rogue.stop()
    assert [r.participants for r in gateway.results] == [5, 5, 5]
    rejected = Counter()
    for r in gateway.results:
        rejected.update(r.rejected_by_reason)
    assert rejected == {"malformed": 1, "truncated": 1, "too_large": 1, "bad_signature": 1}
    assert gateway.stats.rejected == rejected
    store = UpdateStore(layout.store)
    assert store.rejection_counts(task.id) == dict(rejected)
    store.close()


def layout_port(layout):
    return load_gateway_config(layout.gateway_config).broker.port
