"""The edge agent's footprint on a device, measured on a real ``fedledger agent run`` process.

A private Mosquitto and an in-process gateway run a task with the benchmark model (an MLP
of more than 100,000 parameters on the breast-cancer features); the agent is a separate
process, sampled from ``/proc`` every few milliseconds:

``idle_rss_mb``
    Resident memory once connected and waiting for a model (the floor a device pays).
``peak_rss_mb``
    The highest resident memory seen while it trains and sends its updates.
``cpu_s_per_round``
    User + system CPU seconds of the agent per local round (``/proc/<pid>/stat``).

Limits: 100 MB peak and 60 MB idle (a Raspberry Pi Zero 2 W has 512 MB for everything);
``python_floor_mb`` is a bare ``python -c pass`` measured in the same run, for reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedcore.mosquitto import MosquittoBroker
from fedledger import TaskOptions, load_dataset, provision
from gateway import load_gateway_config, open_gateway

from ._timing import sig

PEAK_LIMIT_MB = 100.0
IDLE_LIMIT_MB = 60.0
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE / 2**20


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


class _Sampler(threading.Thread):
    """Polls a process's resident memory; ``peak`` is the highest value seen."""

    def __init__(self, pid: int, period: float = 0.002):
        super().__init__(daemon=True)
        self.pid = pid
        self.period = period
        self.peak = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, _rss_mb(self.pid))
            except OSError:
                return
            time.sleep(self.period)


def _python_floor_mb() -> float:
    """A bare interpreter's resident memory, for reference."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    try:
        time.sleep(0.5)
        return _rss_mb(proc.pid)
    finally:
        proc.wait()


def run(*, rounds: int = 5, hidden: int = 3300, epochs: int = 2) -> dict[str, Any]:
    dataset = load_dataset(seed=0)
    with (
        tempfile.TemporaryDirectory(prefix="fedledger-bench-agent-") as tmp,
        MosquittoBroker() as broker,
    ):
        layout = provision(
            Path(tmp) / "site",
            dataset,
            devices=1,
            alpha=1.0,
            seed=0,
            options=TaskOptions(
                task_id="bench-agent",
                rounds=rounds,
                model="mlp",
                hidden=hidden,
                epochs=epochs,
                round_timeout=300.0,
            ),
            broker_host=broker.host,
            broker_port=broker.port,
        )
        (config,) = layout.agent_configs.values()
        # Stay up after the final model, so the CPU time of the rounds can still be read.
        config.write_text(
            config.read_text().replace("exit_on_final = true", "exit_on_final = false")
        )
        gateway = open_gateway(load_gateway_config(layout.gateway_config))
        with (Path(tmp) / "agent.log").open("wb") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "fedledger", "agent", "run", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            gateway.connect()
            if gateway.wait_for_devices(60.0) != 1:
                raise RuntimeError("the agent did not come online")
            time.sleep(1.0)  # connected and waiting for a model
            idle = _rss_mb(agent.pid)
            cpu_idle = _cpu_s(agent.pid)
            sampler = _Sampler(agent.pid)
            sampler.start()
            started = time.perf_counter()
            gateway.start()
            gateway.run()
            wall = time.perf_counter() - started
            time.sleep(0.5)  # the agent reads the final model
            cpu_rounds = _cpu_s(agent.pid) - cpu_idle
            sampler.done.set()
            sampler.join()
            peak = sampler.peak
        finally:
            agent.terminate()
            agent.wait(10)
            gateway.close()
        n_params = gateway.spec.n_params()
    return {
        "bench": "agent",
        "model_params": n_params,
        "rounds": rounds,
        "local_epochs": epochs,
        "idle_rss_mb": sig(idle),
        "peak_rss_mb": sig(peak),
        "cpu_s_per_round": sig(cpu_rounds / rounds),
        "wall_s_per_round": sig(wall / rounds),
        "python_floor_mb": sig(_python_floor_mb()),
        "peak_limit_mb": PEAK_LIMIT_MB,
        "idle_limit_mb": IDLE_LIMIT_MB,
        "ratio_peak_to_limit": sig(peak / PEAK_LIMIT_MB),
        "ratio_idle_to_limit": sig(idle / IDLE_LIMIT_MB),
    }
