"""A gateway process killed with SIGKILL at several points resumes the open round with every
accepted update and without double counting (real process, real broker, real kill)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import tomli_w

from fedcore import (
    MqttSettings,
    MqttTransport,
    UpdateHeader,
    encode_tensors,
    encode_update,
    init_params,
    load_private_key,
    load_task,
    model_hash,
    update_topic,
)
from fedcore._config import tomllib
from fedledger._provision import TaskOptions, provision
from ledger import EmbeddedLedger, Identity

AUDITOR = Identity(msp_id="org1", subject="auditor", role="auditor")

pytestmark = pytest.mark.mqtt


@pytest.fixture
def site(tmp_path, dataset, mosquitto):
    layout = provision(
        tmp_path / "site",
        dataset,
        devices=5,
        alpha=1.0,
        seed=5,
        options=TaskOptions(task_id=f"kill-{time.monotonic_ns()}", rounds=2, round_timeout=120.0),
        broker_host=mosquitto.host,
        broker_port=mosquitto.port,
    )
    config = tomllib.loads(layout.gateway_config.read_text())
    config["gateway"]["start_wait"] = 0.0
    layout.gateway_config.write_text(tomli_w.dumps(config))
    return layout


def start_gateway(layout):
    with (layout.root / "gateway.log").open("ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedledger",
                "gateway",
                "run",
                "--config",
                str(layout.gateway_config),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def query(path, sql, *args):
    if not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute(sql, args).fetchall()
    except sqlite3.OperationalError:
        return None
    finally:
        db.close()


def wait_for(predicate, what, limit=30.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stored_updates(layout, round_=0):
    rows = query(layout.store, "SELECT COUNT(*) FROM updates WHERE round = ?", round_)
    return 0 if not rows else rows[0][0]


def round_open(layout, round_):
    rows = query(layout.store, "SELECT status FROM rounds WHERE round = ?", round_)
    return bool(rows) and rows[0][0] == "open"


class Devices:
    """Signed round-0 updates from the site's real device keys, published over MQTT."""

    def __init__(self, layout, port):
        self.task = load_task(layout.task)
        base = model_hash(init_params(self.task.model_spec()))
        shapes = self.task.model_spec().shapes()
        rng = np.random.default_rng(0)
        self.frames = {}
        for n, (device, config) in enumerate(sorted(layout.agent_configs.items())):
            key = load_private_key(config.parent / "device.pem")
            delta = {k: rng.normal(0, 0.01, size=s).astype(np.float32) for k, s in shapes.items()}
            header = UpdateHeader(
                task=self.task.id,
                round=0,
                device=device,
                base=base,
                samples=10 + n,
                codec="int8",
                counter=0,
            )
            self.frames[device] = encode_update(header, encode_tensors(delta, "int8"), key.sign)
        self.client = MqttTransport(
            MqttSettings(port=port, client_id="kill-test-devices", clean_session=True)
        )
        self.client.start()
        assert self.client.wait_connected(10)

    def send(self, devices):
        for device in devices:
            self.client.publish_confirmed(update_topic(self.task.id, device), self.frames[device])


@pytest.mark.parametrize(
    "kill_after",
    [0, pytest.param(1, marks=pytest.mark.slow), 3, pytest.param(4, marks=pytest.mark.slow)],
)
def test_sigkill_then_restart_keeps_every_update_once(site, mosquitto, kill_after):
    devices = Devices(site, mosquitto.port)
    names = sorted(site.agent_configs)
    first = start_gateway(site)
    try:
        wait_for(lambda: round_open(site, 0), "round 0 to open")
        devices.send(names[:kill_after])
        wait_for(lambda: stored_updates(site) == kill_after, f"{kill_after} stored updates")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL

    second = start_gateway(site)
    try:
        wait_for(lambda: round_open(site, 0), "round 0 to reopen")
        time.sleep(0.5)  # let it resubscribe before the rest arrives
        # every update the first process stored again (as a device re-sends what it is not
        # sure arrived), then the rest of the fleet
        devices.send(names[:kill_after] + names[kill_after:])
        wait_for(lambda: round_open(site, 1), "round 0 to close")
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            second.wait(10)
        except subprocess.TimeoutExpired:
            second.kill()
        devices.client.stop()

    with EmbeddedLedger.open_readonly(site.ledger) as chain:
        assert chain.verify(replay=True).ok
        record = chain.evaluate("GetRound", devices.task.id, 0, identity=AUDITOR)
    assert record["status"] == "committed"
    assert sorted(record["contributors"]) == names
    assert record["samples"] == sum(10 + n for n in range(5))
    # the copies of stored updates are dropped, not counted and not recorded as rejections
    assert record["rejected_by_reason"] == {}
    assert stored_updates(site) == 5
