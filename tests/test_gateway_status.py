"""``fedledger gateway status --config``: the open round's quorum (a majority of the fleet
unless the task sets one) and why it is stalled."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from fedcore import load_task
from fedledger import TaskOptions, load_dataset, provision
from gateway import UpdateStore


def _status(config, *more):
    return subprocess.run(
        [sys.executable, "-m", "fedledger", "gateway", "status", "--config", str(config), *more],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_status_names_the_quorum_and_a_round_stalled_below_it(tmp_path):
    layout = provision(
        tmp_path / "site", load_dataset("breast_cancer", seed=0), devices=4, alpha=1.0, seed=0,
        options=TaskOptions(), broker_host="127.0.0.1", broker_port=1,
    )  # fmt: skip
    task = load_task(layout.task)
    assert task.quorum is None  # the default: a majority of the fleet
    store = UpdateStore(layout.store)
    now = time.time()
    store.open_round(task.id, 0, "0" * 64, now - 60, now + 600)
    store.close()
    waiting = _status(layout.gateway_config)
    assert waiting.returncode == 0, waiting.stderr
    assert "quorum: 3 of 4 registered devices" in waiting.stdout
    expected = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 600))
    assert f"deadline {expected}" in waiting.stdout  # ISO-8601 UTC in text, a number in JSON
    assert "stalled" not in waiting.stdout  # its deadline has not passed
    store = UpdateStore(layout.store)
    store.open_round(task.id, 0, "0" * 64, now - 60, now - 5)
    store.close()
    stalled = _status(layout.gateway_config)
    assert "stalled: 0 updates at the deadline, below the quorum 3" in stalled.stdout
    body = json.loads(_status(layout.gateway_config, "--json").stdout)
    assert body["tasks"][0]["quorum"] == 3 and body["tasks"][0]["devices"] == 4
