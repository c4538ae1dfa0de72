"""One gateway per store and one agent per state file: a second ``fedledger gateway run`` (or
``agent run``) on it is refused with the PID of the first, and a process killed with SIGKILL
leaves no stale lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from edge_agent import load_agent_config
from fedcore import AlreadyLocked, ProcessLock
from fedledger import TaskOptions, load_dataset, provision
from gateway import GatewayError, UpdateStore

HOLD = (
    "import sys, time; from gateway import UpdateStore;"
    "UpdateStore(sys.argv[1], exclusive=True); print('held', flush=True); time.sleep(120)"
)


def _holder(path):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()


def test_a_second_process_is_refused_with_the_holders_pid_until_it_dies(tmp_path):
    store = tmp_path / "gateway.sqlite"
    holder = _holder(store)
    try:
        with pytest.raises(GatewayError, match=f"already running on .*PID {holder.pid}"):
            UpdateStore(store, exclusive=True)
        # reading (status, verify) needs no lock
        UpdateStore(store).close()
    finally:
        _kill(holder)
    # the kernel dropped the lock with the process: no stale lock
    taken = UpdateStore(store, exclusive=True)
    assert (tmp_path / "gateway.sqlite.lock").read_text().strip() == str(os.getpid())
    taken.close()
    UpdateStore(store, exclusive=True).close()  # released on close


def test_a_file_of_that_name_that_is_not_a_lock_is_left_alone(tmp_path):
    foreign = tmp_path / "notes.lock"
    foreign.write_text("my notes\n")
    with pytest.raises(FileExistsError, match="not a lock file"):
        ProcessLock(foreign)
    assert foreign.read_text() == "my notes\n"


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    first = ProcessLock(tmp_path / "x.lock")
    with pytest.raises(AlreadyLocked) as exc:
        ProcessLock(tmp_path / "x.lock")
    assert exc.value.pid == os.getpid()
    first.release()
    ProcessLock(tmp_path / "x.lock").release()


def test_gateway_run_on_a_store_in_use_exits_2_naming_the_pid(tmp_path):
    layout = provision(
        tmp_path / "site", load_dataset("breast_cancer", seed=0), devices=2, alpha=1.0, seed=0,
        options=TaskOptions(), broker_host="127.0.0.1", broker_port=1,
    )  # fmt: skip
    holder = _holder(layout.store)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fedledger", "gateway", "run", "-c", str(layout.gateway_config)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        _kill(holder)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and f"already running on {layout.store}" in lines[0]
    assert f"PID {holder.pid}" in lines[0]


def test_a_second_agent_on_one_state_file_exits_2_naming_the_pid(tmp_path):
    """Two agents on one state file would reuse message counters and train a round twice."""
    layout = provision(
        tmp_path / "site", load_dataset("breast_cancer", seed=0), devices=2, alpha=1.0, seed=0,
        options=TaskOptions(), broker_host="127.0.0.1", broker_port=1,
    )  # fmt: skip
    device, config = sorted(layout.agent_configs.items())[0]
    state = load_agent_config(config).agent.state
    hold = (
        "import sys, time; from edge_agent._run import lock_state;"
        "from pathlib import Path; lock_state(Path(sys.argv[1]));"
        "print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(state)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        done = subprocess.run(
            [sys.executable, "-m", "fedledger", "agent", "run", "-c", str(config)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        _kill(holder)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and f"an agent is already running on {state}" in lines[0], lines
    assert f"PID {holder.pid}" in lines[0]
    assert not state.exists(), "the refused agent wrote state"
