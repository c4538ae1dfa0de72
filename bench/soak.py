"""Does a long-running gateway stay flat? CPU per round and resident memory of a real
``fedledger gateway run`` process over many short rounds, early in the run against late.

A private Mosquitto (``MosquittoBroker``, loopback), a provisioned site (``provision``: the
breast-cancer logistic regression, one local epoch, a short ``round_timeout``, quorum = every
device, rounds without end) and ``devices`` edge agents, each with its own MQTT client, in
this process (threads, as ``fedledger demo --agents thread`` runs them). The gateway is its
own process, so ``/proc/<pid>/stat`` (user + system CPU) and ``/proc/<pid>/statm`` (resident
memory) measure it alone; every round it validates, stores (SQLite, WAL), aggregates,
anchors the round on the embedded ledger (three signed blocks) and publishes the next model.

The clock starts when the first round has closed (imports, connecting and waiting for the
devices are not part of the soak) and runs ``minutes`` (fractional minutes are fine). Every
``sample_s`` the gateway's CPU time and resident memory and the store's closed rounds and
accepted updates (read through a read-only connection) are sampled. The run is cut into
slices: one minute each for runs of two minutes or more, else tenths of the run.

``slices``
    Per slice: rounds closed, updates accepted, ``rounds_per_s``, ``cpu_ms_per_round``
    (the gateway's CPU time in the slice over the rounds closed in it) and ``rss_mb`` (the
    mean of the slice's samples).
``cpu_ms_per_round_first`` / ``_last``, ``rss_mb_first`` / ``_last``
    The first and the last slice's figures; ``ratio_cpu_per_round`` and ``ratio_rss`` are
    last / first, measured in the same run.
``goal_met``
    Both ratios at most ``GOAL_RATIO`` (1.05): flat within 5% from the first slice (minute 1)
    to the last (minute 10 of a ten-minute run).
``all_rounds_full``
    Every closed round counted every device's update and no rejection (from the store's
    round records, after the gateway has stopped).

``FEDLEDGER_SOAK_PROFILE=PATH`` runs the gateway under ``cProfile`` and writes its profile
to PATH when the gateway stops (for finding what grows; the figures then include the
profiler's overhead).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcore import BrokerSection, connect_readonly
from fedcore.mosquitto import MosquittoBroker
from fedledger import LocalAgents, TaskOptions, load_dataset, provision

from ._timing import sig
from .agent import _cpu_s, _rss_mb

GOAL_RATIO = 1.05
TASK_ID = "bench-soak"
PROFILE_ENV = "FEDLEDGER_SOAK_PROFILE"
#: Rounds of the task: more than any soak closes, so the gateway never finishes by itself.
_ROUNDS = 10_000_000
_START_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class _Sample:
    t: float  # seconds since the clock started
    cpu_s: float
    rss_mb: float
    rounds: int
    updates: int


def _progress(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


class _StoreCounter:
    """Closed rounds and accepted updates, read from the live store without writing to it."""

    def __init__(self, path: Path):
        self._db = connect_readonly(path, what="gateway store")

    def __call__(self) -> tuple[int, int]:
        rounds = self._db.execute(
            "SELECT COUNT(*) FROM rounds WHERE task = ? AND status = 'closed'", (TASK_ID,)
        ).fetchone()[0]
        updates = self._db.execute(
            "SELECT COUNT(*) FROM updates WHERE task = ?", (TASK_ID,)
        ).fetchone()[0]
        return int(rounds), int(updates)

    def close(self) -> None:
        self._db.close()


def _gateway_command(config: Path) -> list[str]:
    command = [sys.executable]
    profile = os.environ.get(PROFILE_ENV)
    if profile:
        command += ["-m", "cProfile", "-o", str(Path(profile).absolute())]
    gateway = ["fedledger", "gateway", "run", "--config", str(config), "--log-level", "warning"]
    return [*command, "-m", *gateway]


def _slices(samples: list[_Sample], duration: float) -> list[dict[str, Any]]:
    width = 60.0 if duration >= 120.0 else duration / 10
    n = max(1, round(duration / width))
    out = []
    start = samples[0]
    for i in range(n):
        end_t = float("inf") if i == n - 1 else (i + 1) * width
        inside = [s for s in samples if start.t < s.t <= end_t]
        if not inside:
            continue
        end = inside[-1]
        rounds = end.rounds - start.rounds
        elapsed = end.t - start.t
        out.append(
            {
                "slice": i,
                "start_s": sig(start.t),
                "end_s": sig(end.t),
                "rounds": rounds,
                "updates": end.updates - start.updates,
                "rounds_per_s": sig(rounds / elapsed) if elapsed > 0 else 0.0,
                "cpu_ms_per_round": sig(1000 * (end.cpu_s - start.cpu_s) / rounds)
                if rounds
                else None,
                "rss_mb": sig(sum(s.rss_mb for s in inside) / len(inside)),
            }
        )
        start = end
    return out


def _rounds_full(store: Path, devices: int) -> tuple[int, int, int, bool]:
    """(closed rounds, accepted updates, rejections, every round full), once the gateway
    has stopped."""
    db = connect_readonly(store, what="gateway store")
    try:
        closed = full = 0
        for (record,) in db.execute(
            "SELECT record FROM rounds WHERE task = ? AND status = 'closed' ORDER BY round",
            (TASK_ID,),
        ):
            closed += 1
            body = json.loads(record)
            records = [r for batch in body["batches"] for r in batch]
            accepted = sum(1 for r in records if r["accepted"])
            if len(body["contributors"]) == devices == accepted == len(records):
                full += 1
        updates = db.execute("SELECT COUNT(*) FROM updates WHERE task = ?", (TASK_ID,)).fetchone()
        rejections = db.execute("SELECT COUNT(*) FROM rejections").fetchone()
    finally:
        db.close()
    return closed, int(updates[0]), int(rejections[0]), closed > 0 and full == closed


def _stop(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(
    *,
    minutes: float = 10.0,
    devices: int = 3,
    round_timeout: float = 10.0,
    sample_s: float = 1.0,
    plot: Path | None = None,
    progress: Callable[[str], None] = _progress,
) -> dict[str, Any]:
    if minutes <= 0:
        raise ValueError("minutes must be positive")
    duration = minutes * 60.0
    sample_s = min(sample_s, duration / 20)
    dataset = load_dataset(seed=0)
    with (
        tempfile.TemporaryDirectory(prefix="fedledger-bench-soak-") as tmp,
        MosquittoBroker() as broker,
    ):
        layout = provision(
            Path(tmp) / "site",
            dataset,
            devices=devices,
            alpha=1.0,
            seed=0,
            options=TaskOptions(
                task_id=TASK_ID,
                rounds=_ROUNDS,
                epochs=1,
                round_timeout=round_timeout,
                quorum=devices,
            ),
            broker_host=broker.host,
            broker_port=broker.port,
        )
        env = {k: v for k, v in os.environ.items() if k != BrokerSection.ENV}
        log_path = Path(tmp) / "gateway.log"
        with log_path.open("wb") as log:
            gateway = subprocess.Popen(
                _gateway_command(layout.gateway_config),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        agents = LocalAgents(layout, "thread")
        counter: _StoreCounter | None = None
        samples: list[_Sample] = []
        try:
            agents.start()
            progress(f"soak: gateway pid {gateway.pid}, {devices} agents, {minutes:g} min")
            deadline = time.monotonic() + _START_TIMEOUT_S
            while True:
                if gateway.poll() is not None:
                    raise RuntimeError(
                        f"the gateway exited ({gateway.returncode}): {log_path.read_text()[-2000:]}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError("no round closed within a minute of the start")
                if counter is None and layout.store.with_name("gateway.sqlite-shm").exists():
                    counter = _StoreCounter(layout.store)
                try:
                    if counter is not None and counter()[0] > 0:
                        break
                except sqlite3.OperationalError:  # WAL on, schema not created yet
                    pass
                time.sleep(0.05)
            assert counter is not None
            started = time.monotonic()

            def sample() -> _Sample:
                rounds, updates = counter()
                return _Sample(
                    time.monotonic() - started,
                    _cpu_s(gateway.pid),
                    _rss_mb(gateway.pid),
                    rounds,
                    updates,
                )

            samples.append(sample())
            report_every = 60.0 if duration >= 120.0 else duration / 2
            next_report = report_every
            while True:
                now = time.monotonic() - started
                if now >= duration:
                    break
                time.sleep(min(sample_s, duration - now))
                if gateway.poll() is not None:
                    raise RuntimeError(f"the gateway exited ({gateway.returncode}) mid-soak")
                samples.append(sample())
                if samples[-1].t >= next_report:
                    s, s0 = samples[-1], samples[0]
                    per_round = 1000 * (s.cpu_s - s0.cpu_s) / max(1, s.rounds - s0.rounds)
                    progress(
                        f"soak: {s.t:.0f} s, {s.rounds} rounds, gateway {per_round:.1f}"
                        f" ms CPU/round, {s.rss_mb:.1f} MB"
                    )
                    next_report += report_every
        finally:
            if counter is not None:
                counter.close()
            _stop(gateway)
            agents.stop(grace=0.0)
        closed, updates, rejections, full = _rounds_full(layout.store, devices)
        gateway_rc = gateway.returncode
    slices = _slices(samples, duration)
    first, last = slices[0], slices[-1]
    ratio_cpu = (
        sig(last["cpu_ms_per_round"] / first["cpu_ms_per_round"])
        if first["cpu_ms_per_round"] and last["cpu_ms_per_round"]
        else None
    )
    ratio_rss = sig(last["rss_mb"] / first["rss_mb"])
    soak_rounds = samples[-1].rounds - samples[0].rounds
    result: dict[str, Any] = {
        "bench": "soak",
        "minutes": minutes,
        "devices": devices,
        "round_timeout_s": round_timeout,
        "slice_s": sig(60.0 if duration >= 120.0 else duration / 10),
        "rounds": closed,
        "updates": updates,
        "rejected": rejections,
        "all_rounds_full": full,
        "soak_rounds": soak_rounds,
        "soak_s": sig(samples[-1].t),
        "rounds_per_s": sig(soak_rounds / samples[-1].t) if samples[-1].t > 0 else 0.0,
        "cpu_ms_per_round_first": first["cpu_ms_per_round"],
        "cpu_ms_per_round_last": last["cpu_ms_per_round"],
        "rss_mb_first": first["rss_mb"],
        "rss_mb_last": last["rss_mb"],
        "ratio_cpu_per_round": ratio_cpu,
        "ratio_rss": ratio_rss,
        "goal_ratio": GOAL_RATIO,
        "goal_met": ratio_cpu is not None and ratio_cpu <= GOAL_RATIO and ratio_rss <= GOAL_RATIO,
        "gateway_exit_code": gateway_rc,
        "slices": slices,
    }
    if plot is not None:
        result["plot_path"] = str(write_plot(samples, slices, plot))
    return result


def write_plot(samples: list[_Sample], slices: list[dict[str, Any]], path: Path) -> Path:
    """CPU per round (per slice) and resident memory (per sample) over the soak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cpu, rss) = plt.subplots(2, 1, figsize=(7, 5), dpi=110, sharex=True)
    mids = [(s["start_s"] + s["end_s"]) / 2 for s in slices if s["cpu_ms_per_round"]]
    cpu.plot(mids, [s["cpu_ms_per_round"] for s in slices if s["cpu_ms_per_round"]], marker="o")
    cpu.set_ylabel("gateway CPU (ms/round)")
    cpu.set_ylim(bottom=0)
    cpu.grid(alpha=0.3)
    rss.plot([s.t for s in samples], [s.rss_mb for s in samples])
    rss.set_ylabel("gateway RSS (MB)")
    rss.set_xlabel("seconds since the first round closed")
    rss.set_ylim(bottom=0)
    rss.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
