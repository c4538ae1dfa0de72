"""``fedledger agent run`` starts without the rest of the command line (fedledger._entry).

What a running agent has loaded is pinned here; what that costs in MB is measured by
``fedledger bench agent``, not asserted.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import time

import pytest

from fedcore import MqttSettings, MqttTransport, presence_topic
from fedledger._entry import _parse_agent_run

#: Never in a running agent: the command line's libraries, what only other commands, other
#: hosts or optional features need (server code, inference runtimes, metrics, certificates).
NOT_ON_A_DEVICE = (
    "typer", "click", "rich", "fedledger.cli", "gateway", "ledger", "sklearn", "matplotlib",
    "onnx", "onnxruntime", "ai_edge_litert", "tflite_runtime", "prometheus_client",
    "cryptography.x509",
)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["agent", "run", "--config", "a.toml"], ("a.toml", "info", None)),
        (["agent", "run", "-c", "a.toml", "--log-level", "DEBUG"], ("a.toml", "DEBUG", None)),
        (["agent", "run", "--log-level=warning", "--config=a.toml"], ("a.toml", "warning", None)),
        (["agent", "run", "-c", "a.toml", "--broker", "h:1"], ("a.toml", "info", "h:1")),
        (["agent", "run", "--broker=h:1", "-c", "a.toml"], ("a.toml", "info", "h:1")),
    ],
)
def test_a_well_formed_agent_run_takes_the_lean_path(args, expected):
    assert _parse_agent_run(args) == expected


@pytest.mark.parametrize(
    "args",
    [
        ["agent", "run"],
        ["agent", "run", "--help"],
        ["agent", "run", "--config"],
        ["agent", "run", "--config", "--log-level", "info"],
        ["agent", "run", "--config", "a.toml", "--log-level", "loud"],
        ["agent", "run", "--config", "a.toml", "extra"],
        ["agent", "run", "-ca.toml"],
        ["agent", "run", "-c", "a.toml", "--broker"],
        ["agent", "run", "-c", "a.toml", "--broker", "--log-level", "info"],
        ["agent", "device-class", "x.toml"],
        ["--version"],
        [],
    ],
)
def test_anything_else_goes_to_the_typer_app(args):
    """Help and every error message come from one place: the typer command."""
    assert _parse_agent_run(args) is None


def test_bad_log_level_gets_the_typer_error(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fedledger", "agent", "run", "-c", "a.toml", "--log-level", "x"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "unknown log level 'x'" in done.stderr


@pytest.mark.mqtt
def test_a_running_agent_loads_only_what_it_needs(tmp_path, dataset, mosquitto):
    from fedledger._provision import TaskOptions, provision

    layout = provision(
        tmp_path / "site", dataset, devices=1, alpha=1.0, seed=0,
        options=TaskOptions(task_id="lean-entry", rounds=1, model="mlp", hidden=32),
        broker_host=mosquitto.host, broker_port=mosquitto.port,
    )  # fmt: skip
    ((device, config),) = layout.agent_configs.items()
    watcher = MqttTransport(
        MqttSettings(host=mosquitto.host, port=mosquitto.port, client_id="lean-entry-watcher")
    )
    watcher.subscribe(presence_topic("lean-entry", device), 1)
    watcher.start()
    agent = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "fedledger", "agent", "run", "-c", str(config)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the agent did not come online"
            try:
                if watcher.messages.get(timeout=remaining).payload == b"online":
                    break
            except queue.Empty:
                pass
    finally:
        agent.terminate()
        _, stderr = agent.communicate(timeout=30)
        watcher.stop()
    assert agent.returncode == 0, stderr[-2000:]
    loaded = {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if "|" in line}
    assert {"edge_agent", "paho.mqtt.client", "numpy"} <= loaded
    unwanted = sorted(
        m for m in loaded if any(m == p or m.startswith(p + ".") for p in NOT_ON_A_DEVICE)
    )
    assert unwanted == []
