"""Updates queued by the broker for an offline gateway survive the broker's kill -9.

Mosquitto saves its database only on a clean shutdown and every ``autosave_interval``
(1,800 s by default): without ``autosave_on_changes`` a killed broker forgets every queued
QoS 1 message. Every broker fedledger configures (``broker config``, the launcher, the
Ansible role) carries the same directives, checked here against a real Mosquitto.

Mosquitto acknowledges a publish before it writes the database (the save runs on its next
loop pass), so the broker alone leaves a window of one loop pass: the agent's outbox, which
re-publishes an update until the round's model comes back, closes it end to end
(tests/integration/test_random_kills.py). Here the kill waits until the file holds every
update, which is what the directives promise.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fedcore.mosquitto import MosquittoBroker, persistence_directives

pytestmark = pytest.mark.mqtt

TEMPLATE = Path(__file__).parents[2] / "ansible/roles/mosquitto/templates/mosquitto.conf.j2"
N = 30


def client(client_id: str, port: int, *, clean: bool) -> mqtt.Client:
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
        protocol=mqtt.MQTTv311,
    )  # fmt: skip
    c.connect("127.0.0.1", port)
    return c


def test_queued_messages_survive_a_broker_kill(tmp_path):
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    broker = MosquittoBroker(persistence=sessions).start()
    port = broker.port
    try:
        # The gateway's persistent session subscribes, then goes offline.
        gw = client("gw-persist", port, clean=False)
        gw.loop_start()
        gw.subscribe("t/updates/#", qos=1)[1]
        time.sleep(0.3)
        gw.disconnect()
        gw.loop_stop()
        # Devices publish at QoS 1 while it is away: the broker acknowledges and queues.
        dev = client("dev-persist", port, clean=True)
        dev.loop_start()
        for i in range(N):
            dev.publish(f"t/updates/dev-{i}", f"u{i:03d}".encode(), qos=1).wait_for_publish(5)
        dev.disconnect()
        dev.loop_stop()

        saved = sessions / "mosquitto.db"
        end = time.monotonic() + 10
        while time.monotonic() < end:
            body = saved.read_bytes() if saved.exists() else b""
            if all(f"u{i:03d}".encode() in body for i in range(N)):
                break
            time.sleep(0.05)
        else:
            pytest.fail("Mosquitto never saved the queued updates")
        broker.kill()
        broker = MosquittoBroker(port=port, persistence=sessions).start()

        got: list[str] = []
        done = threading.Event()

        def on_message(_c, _u, msg):
            got.append(msg.payload.decode())
            if len(got) >= N:
                done.set()

        gw = client("gw-persist", port, clean=False)
        gw.on_message = on_message
        gw.loop_start()
        done.wait(10)
        gw.disconnect()
        gw.loop_stop()
        assert sorted(got) == sorted(f"u{i:03d}" for i in range(N))
    finally:
        broker.stop()


def test_every_broker_config_carries_the_same_persistence_directives():
    ours = [line for line in persistence_directives("/x") if not line.startswith("#")]
    template = TEMPLATE.read_text()
    for line in ours:
        if line.startswith("persistence_location"):
            assert re.search(r"^persistence_location \{\{ mosquitto_persistence_dir \}\}/$",
                             template, re.M)  # fmt: skip
        else:
            assert re.search(rf"^{re.escape(line)}$", template, re.M), line
