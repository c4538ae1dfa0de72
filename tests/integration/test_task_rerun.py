"""A task id run again with a fresh gateway store, on a broker that still holds the first
run's retained final model: fresh agents started before the new gateway wait for it instead
of quitting, agents that took part in the first run start their rounds over, and the second
run finishes with every device in every round (real broker, gateway and agent processes)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import tomli_w

from edge_agent import load_agent_config
from fedcore._config import tomllib
from fedledger._provision import TaskOptions, provision

from .test_gateway_kill import query

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

ROUNDS = 2
DEVICES = 3


def _run(layout, *args, log):
    with (layout.root / log).open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fedledger", *args], stdout=out, stderr=subprocess.STDOUT
        )


def _gateway(layout, log):
    return _run(layout, "gateway", "run", "--config", str(layout.gateway_config), log=log)


def _agent(layout, device):
    config = layout.agent_configs[device]
    return _run(layout, "agent", "run", "--config", str(config), log=f"{device}.log")


def _wait_all(processes, timeout=180):
    end = time.monotonic() + timeout
    for process in processes:
        code = process.wait(max(end - time.monotonic(), 1))
        assert code == 0, f"exit {code}"


def _wait_log(path, text, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{path.name} never said {text!r}")


def test_a_rerun_of_a_task_id_is_not_ended_by_the_old_runs_retained_final_model(
    tmp_path, dataset, mosquitto
):
    layout = provision(
        tmp_path / "site", dataset, devices=DEVICES, alpha=1.0, seed=3,
        options=TaskOptions(task_id=f"rerun-{time.monotonic_ns()}", rounds=ROUNDS, epochs=1),
        broker_host=mosquitto.host, broker_port=mosquitto.port,
    )  # fmt: skip
    config = tomllib.loads(layout.gateway_config.read_text())
    config["gateway"]["start_wait"] = 0.0
    layout.gateway_config.write_text(tomli_w.dumps(config))
    devices = sorted(layout.agent_configs)
    processes = [_agent(layout, d) for d in devices] + [_gateway(layout, "gateway-1.log")]
    _wait_all(processes)
    first_final = query(layout.store, "SELECT new_hash FROM rounds ORDER BY round DESC")[0][0]

    # A second run of the same task: a fresh store and ledger (the first run's kept aside),
    # one device with a fresh state folder, the others with the first run's state.
    for path in (layout.store, layout.ledger):
        path.rename(path.with_name(path.name + ".first-run"))
    fresh, *returning = devices
    state_path = load_agent_config(layout.agent_configs[fresh]).agent.state
    state_path.rename(state_path.with_name(state_path.name + ".first-run"))

    waiting = _agent(layout, fresh)
    _wait_log(layout.root / f"{fresh}.log", "took no part in")
    assert waiting.poll() is None, "the fresh agent quit on the old run's final model"
    gateway = _gateway(layout, "gateway-2.log")
    # the agents that took part start once the new run published its first model (before
    # it, the old run's final model is all they could see, and they would rightly stop)
    end = time.monotonic() + 60
    while not query(layout.store, "SELECT round FROM rounds"):
        assert time.monotonic() < end and gateway.poll() is None, "no round 0"
        time.sleep(0.1)
    others = [_agent(layout, d) for d in returning]
    _wait_all([waiting, *others, gateway])

    rows = query(layout.store, "SELECT round, device FROM updates ORDER BY round, device")
    assert rows == [(r, d) for r in range(ROUNDS) for d in devices]
    for device in returning:
        assert "a new run" in (layout.root / f"{device}.log").read_text(errors="replace")
    runs = query(layout.store, "SELECT run FROM runs")
    assert len(runs) == 1 and len(runs[0][0]) == 16
    second_final = query(layout.store, "SELECT new_hash FROM rounds ORDER BY round DESC")[0][0]
    assert second_final and first_final
