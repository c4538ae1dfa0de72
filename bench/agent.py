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
``device_classes`` gives each board class of ``firmware_configs/`` its memory budget and the
margin the peak leaves in it.

``launcher`` runs the agent (and the floor's bare interpreter) elsewhere: a command prefix
such as a ``systemd-nspawn`` into an arm64 userland whose programs run under qemu-user;
``{dir}`` in it becomes the benchmark's working folder, which the launcher must show at the
same path, and ``python`` is the interpreter there. The process sampled is then the launched
interpreter (under qemu-user, the emulator running it, so its RSS includes the emulator's
own and its translated code); its CPU time is the emulator's, reported as
``emulated_cpu_s_per_round``, not a device figure.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedcore import load_device_class
from fedcore.mosquitto import MosquittoBroker
from fedledger import TaskOptions, load_dataset, provision
from gateway import load_gateway_config, open_gateway

from ._timing import sig

FIRMWARE_CONFIGS = Path(__file__).resolve().parents[1] / "firmware_configs"
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


def _signal(pid: int, sig_: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig_)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, children first."""
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop(0)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    children = [int(c) for c in handle.read().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return [a.decode(errors="replace") for a in handle.read().split(b"\0") if a]
    except OSError:
        return []


def _find(proc: subprocess.Popen, marker: str, timeout: float = 120.0) -> int:
    """The launched interpreter: ``proc`` itself, or its deepest descendant that runs
    ``marker`` (a launcher such as systemd-nspawn forks it)."""
    end = time.monotonic() + timeout
    while True:
        candidates = [p for p in [proc.pid, *_descendants(proc.pid)] if marker in _cmdline(p)]
        if candidates:
            return candidates[-1]
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"the launched process running {marker!r} was not found")
        time.sleep(0.05)


def _python_floor_mb(prefix: list[str], python: str) -> float:
    """A bare interpreter's resident memory (launched the same way), for reference."""
    marker = "import time; time.sleep(4)"
    proc = subprocess.Popen([*prefix, python, "-c", marker])
    try:
        pid = _find(proc, marker)
        time.sleep(2.0 if prefix else 0.5)
        return _rss_mb(pid)
    finally:
        proc.wait()


def _device_classes(peak: float) -> dict[str, dict[str, float]]:
    classes = {}
    for path in sorted(FIRMWARE_CONFIGS.glob("*.toml")):
        device = load_device_class(path)
        classes[device.name] = {
            "memory_budget_mb": device.memory_budget_mb,
            "peak_margin_mb": sig(device.memory_budget_mb - peak),
            "fits": peak <= device.memory_budget_mb,
        }
    return classes


def run(
    *,
    rounds: int = 5,
    model: str = "mlp",
    hidden: int = 3300,
    epochs: int = 2,
    launcher: str | None = None,
    python: str | None = None,
) -> dict[str, Any]:
    dataset = load_dataset(seed=0)
    python = python or sys.executable
    with (
        tempfile.TemporaryDirectory(prefix="fedledger-bench-agent-") as tmp,
        MosquittoBroker() as broker,
    ):
        prefix = shlex.split(launcher.replace("{dir}", tmp)) if launcher else []
        layout = provision(
            Path(tmp) / "site",
            dataset,
            devices=1,
            alpha=1.0,
            seed=0,
            options=TaskOptions(
                task_id="bench-agent",
                rounds=rounds,
                model=model,
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
        pid = -1
        with (Path(tmp) / "agent.log").open("wb") as log:
            agent = subprocess.Popen(
                [*prefix, python, "-m", "fedledger", "agent", "run", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            gateway.connect()
            if gateway.wait_for_devices(600.0 if prefix else 60.0) != 1:
                raise RuntimeError(
                    "the agent did not come online: "
                    + (Path(tmp) / "agent.log").read_text(errors="replace")[-2000:]
                )
            pid = _find(agent, str(config)) if prefix else agent.pid
            time.sleep(3.0 if prefix else 1.0)  # connected and waiting for a model
            idle = _rss_mb(pid)
            cpu_idle = _cpu_s(pid)
            sampler = _Sampler(pid)
            sampler.start()
            started = time.perf_counter()
            gateway.start()
            gateway.run()
            wall = time.perf_counter() - started
            time.sleep(0.5)  # the agent reads the final model
            cpu_rounds = _cpu_s(pid) - cpu_idle
            sampler.done.set()
            sampler.join()
            peak = sampler.peak
        finally:
            # The launched interpreter first: a launcher may not pass the signal on.
            if pid > 0 and pid != agent.pid:
                _signal(pid, signal.SIGTERM)
            agent.terminate()
            agent.wait(30)
            gateway.close()
        n_params = gateway.spec.n_params()
        floor = _python_floor_mb(prefix, python)
        machine = subprocess.run(
            [*prefix, python, "-c", "import platform; print(platform.machine())"],
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout.strip()
    cpu = "emulated_cpu_s_per_round" if prefix else "cpu_s_per_round"
    wall_key = "emulated_wall_s_per_round" if prefix else "wall_s_per_round"
    return {
        "bench": "agent",
        "machine": machine,
        "launcher": launcher,
        "model": model,
        "model_params": n_params,
        "rounds": rounds,
        "local_epochs": epochs,
        "idle_rss_mb": sig(idle),
        "peak_rss_mb": sig(peak),
        cpu: sig(cpu_rounds / rounds),
        wall_key: sig(wall / rounds),
        "python_floor_mb": sig(floor),
        "peak_above_floor_mb": sig(peak - floor),
        "device_classes": _device_classes(peak),
        "peak_limit_mb": PEAK_LIMIT_MB,
        "idle_limit_mb": IDLE_LIMIT_MB,
        "ratio_peak_to_limit": sig(peak / PEAK_LIMIT_MB),
        "ratio_idle_to_limit": sig(idle / IDLE_LIMIT_MB),
    }
