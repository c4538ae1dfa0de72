"""Agents and gateway ride out a broker restart: both reconnect by themselves, resubscribe,
and the task finishes.

The broker keeps its sessions on disk, as every production config does (`fedledger broker
config`, the Ansible role): an update an agent sends before the gateway is back is queued
in the gateway's session instead of being dropped for want of a subscriber.
"""

from __future__ import annotations

import threading
import time

import pytest

from edge_agent import load_agent_config, open_agent
from fedcore.mosquitto import MosquittoBroker
from fedledger._provision import TaskOptions, provision
from gateway import load_gateway_config, open_gateway

pytestmark = pytest.mark.mqtt


def test_broker_restart_mid_task(tmp_path, dataset):
    sessions = tmp_path / "mosquitto"
    sessions.mkdir()
    broker = MosquittoBroker(persistence=sessions).start()
    port = broker.port
    layout = provision(
        tmp_path / "site",
        dataset,
        devices=3,
        alpha=1.0,
        seed=2,
        options=TaskOptions(task_id="reconnect", rounds=3, epochs=1, round_timeout=60.0),
        broker_host=broker.host,
        broker_port=port,
    )
    stop = threading.Event()
    agents = [
        open_agent(load_agent_config(p), source=str(p)) for p in layout.agent_configs.values()
    ]
    threads = [threading.Thread(target=a.run, args=(stop,), daemon=True) for a in agents]
    gateway = open_gateway(load_gateway_config(layout.gateway_config))
    try:
        for agent, thread in zip(agents, threads, strict=True):
            agent.start()
            thread.start()
        gateway.connect()
        assert gateway.wait_for_devices(20) == 3
        gateway.start()
        end = time.monotonic() + 30
        while not gateway.results and time.monotonic() < end:
            gateway.step(0.1)
        assert len(gateway.results) == 1

        broker.stop()  # every client loses its connection
        time.sleep(1.0)
        broker = MosquittoBroker(port=port, persistence=sessions).start()

        end = time.monotonic() + 60
        while not gateway.finished and time.monotonic() < end:
            gateway.step(0.1)
        assert gateway.finished, [r.round for r in gateway.results]
        assert [r.participants for r in gateway.results] == [3, 3, 3]
    finally:
        stop.set()
        for agent, thread in zip(agents, threads, strict=True):
            thread.join(5)
            agent.transport.stop()
        gateway.close()
        broker.stop()
