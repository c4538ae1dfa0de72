"""A site of one's own: init from a CSV, device add, the admin's ledger steps, and the broker
address from the command line or the environment (real subprocesses, real Mosquitto)."""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import time

import numpy as np
import pytest

from edge_agent import load_agent_config
from fedcore import (
    BrokerSection,
    ConfigError,
    MqttSettings,
    MqttTransport,
    load_local_data,
    load_task,
    presence_topic,
    read_csv_table,
    read_marker,
)
from gateway import DeviceRegistry, load_gateway_config

FEDLEDGER = [sys.executable, "-m", "fedledger"]


def run(*args, cwd=None, env=None, timeout=120):
    return subprocess.run(
        [*FEDLEDGER, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


@pytest.fixture(scope="module")
def csvs(tmp_path_factory):
    out = tmp_path_factory.mktemp("csv") / "data"
    done = run("data", "sample-csv", "--out", str(out), "--devices", "3", "--json")
    assert done.returncode == 0, done.stderr
    return out


def init(tmp_path, csvs, *extra, name="site"):
    site = tmp_path / name
    done = run(
        "init", str(site), "--data", str(csvs / "holdout.csv"), "--label", "diagnosis",
        "--task-id", "own-site", "--rounds", "2", "--json", *extra,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return site, json.loads(done.stdout)


def test_init_writes_a_complete_site_from_the_holdout_only(tmp_path, csvs):
    site, result = init(tmp_path, csvs, "--model", "mlp")
    assert read_marker(site)["kind"] == "site"
    task = load_task(site / "task.toml")
    assert task.model.kind == "mlp" and task.rounds == 2
    assert task.columns.label == "diagnosis" and task.columns.classes == ["benign", "malignant"]
    holdout = read_csv_table(csvs / "holdout.csv", label="diagnosis")
    assert task.columns.features == list(holdout.features)
    np.testing.assert_allclose(task.model.feature_mean, holdout.x.mean(axis=0), rtol=1e-5)
    device = read_csv_table(csvs / "device-1.csv", label="diagnosis")
    assert not np.allclose(task.model.feature_mean, device.x.mean(axis=0), rtol=1e-3)
    assert result["holdout_labels"] == {
        "benign": int((holdout.y == 0).sum()),
        "malignant": int((holdout.y == 1).sum()),
    }
    config = load_gateway_config(site / "gateway.toml")
    assert config.gateway.key.is_file() and config.gateway.evaluation == site / "holdout.csv"
    x, y = load_local_data(config.gateway.evaluation, n_classes=2, columns=task.columns)
    assert len(y) == result["holdout_rows"] and x.shape[1] == 30
    assert len(DeviceRegistry.load(site / "registry.json")) == 0
    assert "gateway_public_key" in (site / "agent.template.toml").read_text()
    # Nothing of the build is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


def test_init_refuses_foreign_and_existing_folders(tmp_path, csvs):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    done = run("init", str(foreign), "--data", str(csvs / "holdout.csv"), "--label", "diagnosis")
    assert done.returncode == 2 and done.stderr.startswith("error:")
    assert "not made by fedledger" in done.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    site, _ = init(tmp_path, csvs)
    before = (site / "keys" / "gateway.pem").read_bytes()
    done = run("init", str(site), "--data", str(csvs / "holdout.csv"), "--label", "diagnosis")
    assert done.returncode == 2 and "is already a site" in done.stderr
    assert (site / "keys" / "gateway.pem").read_bytes() == before


def test_bad_csv_is_one_error_line_with_file_row_and_column(tmp_path):
    bad = tmp_path / "holdout.csv"
    bad.write_text("age,size,diagnosis\n50,1.5,benign\n40,,malignant\n")
    done = run("init", str(tmp_path / "s"), "--data", str(bad), "--label", "diagnosis")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {bad}: row 3, column 'size': missing value"
    ]
    assert not (tmp_path / "s").exists()


def test_device_add_issues_a_key_registers_and_writes_a_config(tmp_path, csvs):
    site, _ = init(tmp_path, csvs)
    done = run("device", "add", str(site), "ward-1", "--class", "pi4",
               "--data", str(csvs / "device-1.csv"), "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["device_class"] == "raspberry-pi-4"
    registry = DeviceRegistry.load(site / "registry.json")
    assert list(registry) == ["ward-1"] and registry.public_key("ward-1") is not None
    config = load_agent_config(site / "devices" / "ward-1" / "agent.toml")
    assert config.agent.device == "ward-1" and config.agent.key.is_file()
    assert config.agent.task.resolve() == (site / "task.toml").resolve()
    assert config.agent.device_class.is_file()
    # A second device with the same name is refused and changes nothing.
    before = (site / "registry.json").read_bytes()
    again = run("device", "add", str(site), "ward-1")
    assert again.returncode == 2 and again.stderr.startswith("error: device ward-1 is already")
    assert (site / "registry.json").read_bytes() == before


def test_device_data_with_an_unknown_label_is_refused_at_add_and_at_agent_start(tmp_path, csvs):
    site, _ = init(tmp_path, csvs)
    rows = (csvs / "device-1.csv").read_text().splitlines()
    rows[3] = rows[3].rsplit(",", 1)[0] + ",borderline"
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(rows) + "\n")
    done = run("device", "add", str(site), "ward-9", "--data", str(bad))
    assert done.returncode == 2
    assert "row 4, column 'diagnosis': label 'borderline' is not one of" in done.stderr
    assert "ward-9" not in DeviceRegistry.load(site / "registry.json")
    assert not (site / "devices" / "ward-9").exists()
    # An agent whose data holds label 2 of a 2-class task stops at load, naming the row.
    assert run("device", "add", str(site), "ward-2").returncode == 0
    np.savez(site / "devices" / "ward-2" / "data.npz", x=np.ones((3, 30)), y=np.array([0, 2, 1]))
    config = site / "devices" / "ward-2" / "agent.toml"
    config.write_text(config.read_text().replace('"data.csv"', '"data.npz"'))
    done = run("agent", "run", "-c", str(config), "--broker", "127.0.0.1:9")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "data.npz: y[1]: label 2 is outside the task's 2 classes" in done.stderr


def test_secure_site_devices_get_certificates(tmp_path, csvs):
    site, result = init(tmp_path, csvs, "--secure")
    assert result["secure"] is True
    assert run("device", "add", str(site), "ward-1").returncode == 0
    config = load_agent_config(site / "devices" / "ward-1" / "agent.toml")
    assert config.agent.certificate.is_file() and config.broker.tls_cert.is_file()
    assert not (site / "devices" / "ward-1" / "device.pem").exists()
    registry = DeviceRegistry.load(site / "registry.json")
    assert registry.public_key("ward-1") is None and len(registry.fingerprint("ward-1")) == 64
    gateway = load_gateway_config(site / "gateway.toml")
    assert gateway.gateway.ca.is_file() and gateway.broker.tls_ca.is_file()


def test_ledger_steps_are_idempotent(tmp_path, csvs):
    site, _ = init(tmp_path, csvs)
    for name in ("ward-1", "ward-2"):
        assert run("device", "add", str(site), name).returncode == 0
    first = run("ledger", "register-fleet", "--site", str(site), "--json")
    assert first.returncode == 0, first.stderr
    assert [d["status"] for d in json.loads(first.stdout)["devices"]] == ["registered"] * 2
    assert run("device", "add", str(site), "ward-3").returncode == 0
    second = json.loads(run("ledger", "register-fleet", "--site", str(site), "--json").stdout)
    assert [d["status"] for d in second["devices"]] == [
        "already registered", "already registered", "registered",
    ]  # fmt: skip
    created = run("ledger", "create-task", "--site", str(site))
    assert created.returncode == 0 and "task own-site: created" in created.stdout
    again = run("ledger", "create-task", "--site", str(site))
    assert again.returncode == 0 and "task own-site: already created" in again.stdout
    db = site / "ledger.sqlite"
    device = json.loads(run("ledger", "device", "ward-1", "--db", str(db), "--json").stdout)
    assert device["device"]["device_class"] == "default"
    verify = run("ledger", "verify", "--db", str(db), "--json")
    # genesis, three registrations, one task: nothing recorded twice
    assert json.loads(verify.stdout)["blocks"] == 5


def test_a_ledger_task_with_another_initial_model_is_an_error(tmp_path, csvs):
    site, _ = init(tmp_path, csvs)
    assert run("ledger", "create-task", "--site", str(site)).returncode == 0
    task = site / "task.toml"
    task.write_text(task.read_text().replace("init_seed = 0", "init_seed = 7"))
    done = run("ledger", "create-task", "--site", str(site))
    assert done.returncode == 2 and "with another initial model" in done.stderr


def test_broker_address_option_wins_over_environment_over_file():
    section = BrokerSection(host="file", port=1)
    assert section.overridden(None, environ={}) == section
    env = {"FEDLEDGER_BROKER": "env-host:2"}
    assert (
        section.overridden(None, environ=env).host,
        section.overridden(None, environ=env).port,
    ) == ("env-host", 2)
    chosen = section.overridden("cli:3", environ=env)
    assert (chosen.host, chosen.port) == ("cli", 3)
    assert section.overridden("[::1]:4", environ={}).host == "::1"
    with pytest.raises(ConfigError, match=r"FEDLEDGER_BROKER: 'nope' is not host:port"):
        section.overridden(None, environ={"FEDLEDGER_BROKER": "nope"})
    with pytest.raises(ConfigError, match=r"--broker: 'h:0' is not host:port"):
        section.overridden("h:0", environ={})


def _wait_online(watcher: MqttTransport, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if watcher.messages.get(timeout=0.5).payload == b"online":
                return True
        except queue.Empty:
            pass
    return False


@pytest.mark.mqtt
@pytest.mark.parametrize("how", ["option", "environment"])
def test_agent_reaches_the_broker_given_on_the_command_line_or_environment(
    tmp_path, csvs, mosquitto, how
):
    import os

    from fedcore.mosquitto import free_port

    site, _ = init(tmp_path, csvs, "--broker", f"127.0.0.1:{free_port()}")
    assert (
        run("device", "add", str(site), "ward-1", "--data", str(csvs / "device-1.csv")).returncode
        == 0
    )
    live = f"{mosquitto.host}:{mosquitto.port}"
    dead = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "FEDLEDGER_BROKER": live if how == "environment" else dead}
    extra = ["--broker", live] if how == "option" else []
    watcher = MqttTransport(
        MqttSettings(host=mosquitto.host, port=mosquitto.port, client_id=f"site-watch-{how}")
    )
    watcher.subscribe(presence_topic("own-site", "ward-1"), 1)
    watcher.start()
    config = site / "devices" / "ward-1" / "agent.toml"
    agent = subprocess.Popen(
        [*FEDLEDGER, "agent", "run", "-c", str(config), *extra], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        online = _wait_online(watcher, agent)
    finally:
        agent.terminate()
        _, stderr = agent.communicate(timeout=30)
        watcher.stop()
    assert online, stderr[-2000:]


@pytest.mark.mqtt
def test_gateway_run_takes_the_broker_option_over_the_environment(tmp_path, csvs, mosquitto):
    import os

    from fedcore import model_topic
    from fedcore.mosquitto import free_port

    site, _ = init(tmp_path, csvs, "--broker", f"127.0.0.1:{free_port()}", "--task-id", "gw-opt")
    assert run("device", "add", str(site), "ward-1").returncode == 0
    config = site / "gateway.toml"
    config.write_text(
        config.read_text().replace('id = "gateway"', 'id = "gateway"\nstart_wait = 0.0')
    )
    watcher = MqttTransport(
        MqttSettings(host=mosquitto.host, port=mosquitto.port, client_id="site-watch-gateway")
    )
    watcher.subscribe(model_topic("gw-opt"), 1)
    watcher.start()
    env = {**os.environ, "FEDLEDGER_BROKER": f"127.0.0.1:{free_port()}"}
    gateway = subprocess.Popen(
        [*FEDLEDGER, "gateway", "run", "-c", str(config), "--broker",
         f"{mosquitto.host}:{mosquitto.port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        got = None
        deadline = time.monotonic() + 60
        while got is None and time.monotonic() < deadline and gateway.poll() is None:
            with contextlib.suppress(queue.Empty):
                got = watcher.messages.get(timeout=0.5)
    finally:
        gateway.terminate()
        _, stderr = gateway.communicate(timeout=30)
        watcher.stop()
    assert got is not None, stderr[-2000:]
    assert got.topic == model_topic("gw-opt")
