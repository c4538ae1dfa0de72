"""Kill the gateway with SIGKILL at random moments while six real agents train, restart it
each time with the same config, and check that nothing any agent sent was lost or counted
twice: the task finishes, every round holds all six updates in the store and on the ledger,
and ``ledger verify --store`` agrees.

The kill moments are random, drawn from a seed printed at the start (set
``FEDLEDGER_CRASH_SEED`` to replay a run); some lives instead arm a fixed crash point and run until it fires
(``FEDLEDGER_CRASH_AT``: before a batch commit, after it and before the acknowledgement,
between a round's close and the next round, in the middle of anchoring) and one agent dies
between saving its update and publishing it. A second test restarts the broker (SIGKILL,
same persistence folder) in the middle as well.

These run in ``make test-crash`` (a few minutes), which ``.ci/run`` runs.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fedcore import load_task
from fedcore.mosquitto import MosquittoBroker
from fedledger._provision import TaskOptions, provision
from ledger import EmbeddedLedger, Identity

from .test_gateway_kill import query

pytestmark = [pytest.mark.mqtt, pytest.mark.crash, pytest.mark.timeout(600)]

AUDITOR = Identity(msp_id="org1", subject="auditor", role="auditor")
DEVICES = 6
ROUNDS = 48
KILLS = 12
#: Rounds the random kills leave for crash points that have not fired by then.
RESERVE = 6
FIXED_POINTS = (
    "gateway.before-commit",
    "gateway.after-commit",
    "gateway.round-closed",
    "gateway.anchoring",
)
SENT = re.compile(r"round (\d+): (?:re-)?sent (?:the )?\d+-byte update")


def seed() -> int:
    value = os.environ.get("FEDLEDGER_CRASH_SEED")
    chosen = int(value) if value else random.SystemRandom().randrange(1 << 32)
    print(f"FEDLEDGER_CRASH_SEED={chosen}")
    return chosen


class Site:
    """A provisioned site whose gateway and agents run as real processes."""

    def __init__(self, root: Path, dataset, broker: MosquittoBroker):
        self.broker = broker
        self.layout = provision(
            root,
            dataset,
            devices=DEVICES,
            alpha=1.0,
            seed=11,
            options=TaskOptions(
                task_id=f"kills-{time.monotonic_ns()}",
                rounds=ROUNDS,
                epochs=1,
                round_timeout=600.0,  # a lost update would stall the task, not be waited out
                quorum=DEVICES,
            ),
            broker_host=broker.host,
            broker_port=broker.port,
        )
        self.logs = root / "logs"
        self.logs.mkdir()
        self.gateway: subprocess.Popen | None = None
        self.gateway_lives = 0
        #: The crash point armed in the gateway's current life.
        self.armed: str | None = None
        self.agents: dict[str, subprocess.Popen] = {}
        self.agent_lives: Counter[str] = Counter()

    def _spawn(self, args, log: Path, crash_at: str | None) -> subprocess.Popen:
        env = dict(os.environ)
        env.pop("FEDLEDGER_CRASH_AT", None)
        if crash_at is not None:
            env["FEDLEDGER_CRASH_AT"] = crash_at
        with log.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "fedledger", *args],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip

    def start_gateway(self, crash_at: str | None = None) -> None:
        self.gateway_lives += 1
        self.armed = crash_at
        self.gateway = self._spawn(
            ["gateway", "run", "--config", str(self.layout.gateway_config)],
            self.logs / "gateway.log",
            crash_at,
        )

    def start_agent(self, device: str, crash_at: str | None = None) -> None:
        self.agent_lives[device] += 1
        config = self.layout.agent_configs[device]
        self.agents[device] = self._spawn(
            ["agent", "run", "--config", str(config)], self.logs / f"{device}.log", crash_at
        )

    def kill_gateway(self) -> None:
        assert self.gateway is not None
        if self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGKILL)
        self.gateway.wait(10)

    def revive_agents(self) -> int:
        """Restart any agent that died (a crash point), without the crash point."""
        revived = 0
        for device, process in self.agents.items():
            code = process.poll()
            if code is not None and code != 0:
                assert code == -signal.SIGKILL, f"{device} exited with {code}"
                self.start_agent(device)
                revived += 1
        return revived

    def closed_rounds(self) -> int:
        rows = query(self.layout.store, "SELECT COUNT(*) FROM rounds WHERE status = 'closed'")
        return 0 if not rows else rows[0][0]

    def finished(self) -> bool:
        return self.gateway is not None and self.gateway.poll() == 0

    def stop(self) -> None:
        for process in [self.gateway, *self.agents.values()]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)

    def sent(self) -> set[tuple[str, int]]:
        """``(device, round)`` of every update the agents' logs say they published."""
        out = set()
        for device in self.layout.agent_configs:
            text = (self.logs / f"{device}.log").read_text(errors="replace")
            for match in SENT.finditer(text):
                out.add((device, int(match.group(1))))
        return out


def run_with_kills(site: Site, rng: random.Random, *, broker_restart_at: int | None = None):
    """Start everything, then kill and restart the gateway ``KILLS`` times at random moments
    (a fixed crash point armed in some lives), then let the task finish."""
    agent_crash = sorted(site.layout.agent_configs)[rng.randrange(DEVICES)]
    for device in site.layout.agent_configs:
        # one agent dies once between saving an update and publishing it
        crash = f"agent.after-save:{rng.randint(2, 6)}" if device == agent_crash else None
        site.start_agent(device, crash)
    points = list(FIXED_POINTS)
    rng.shuffle(points)
    kills = 0
    fired: list[str] = []
    deadline = time.monotonic() + 480
    site.start_gateway()

    def ended_itself() -> None:
        code = site.gateway.poll()
        assert code == -signal.SIGKILL, f"the gateway exited with {code}"
        assert site.armed is not None, "the gateway died with no crash point armed"
        fired.append(site.armed.split(":")[0])

    while kills < KILLS:
        assert time.monotonic() < deadline, f"gave up after {kills} kills"
        # a random moment, drawn shorter when the task runs ahead of the kills still to come
        # (a few rounds are kept for the crash points that have not fired yet)
        # (a life with a crash point armed is left to reach it: a random kill that pre-empts
        # it would leave the point for the end, when the task may have no work left)
        ahead = ROUNDS - RESERVE - site.closed_rounds() < 2 * (KILLS - kills)
        life = rng.uniform(0.1, 0.8) if ahead else rng.uniform(0.3, 2.5)
        end = deadline if site.armed is not None else time.monotonic() + life
        while time.monotonic() < end and site.gateway.poll() is None:
            site.revive_agents()
            time.sleep(0.05)
        if site.finished():
            break
        if site.gateway.poll() is None:
            site.kill_gateway()
        else:
            ended_itself()
        kills += 1
        if broker_restart_at is not None and kills == broker_restart_at:
            site.broker.kill()
            time.sleep(rng.uniform(0.0, 1.0))
            site.broker.start()
        crash_at = None
        if points and kills % 2 == 1:
            crash_at = f"{points.pop()}:{rng.randint(1, 3)}"
        site.start_gateway(crash_at)
    # every fixed point a random kill pre-empted gets lives of its own, each ending there
    while missing := [p for p in FIXED_POINTS if p not in fired]:
        if site.armed is None:
            site.kill_gateway()
            kills += 1
            site.start_gateway(f"{missing[0]}:1")
        while site.gateway.poll() is None:
            assert time.monotonic() < deadline, f"{site.armed} never fired"
            site.revive_agents()
            time.sleep(0.05)
        assert not site.finished(), f"the task ended before {site.armed} fired"
        ended_itself()
        kills += 1
        missing = [p for p in FIXED_POINTS if p not in fired]
        site.start_gateway(f"{missing[0]}:1" if missing else None)
    # the last life runs to the end of the task, restarted only if a crash point took it
    while not site.finished():
        assert time.monotonic() < deadline, (
            f"the task stalled at {site.closed_rounds()} closed rounds of {ROUNDS}"
        )
        site.revive_agents()
        if site.gateway.poll() not in (None, 0):
            ended_itself()
            kills += 1
            site.start_gateway()
        time.sleep(0.1)
    end = time.monotonic() + 30
    while any(p.poll() is None for p in site.agents.values()) and time.monotonic() < end:
        site.revive_agents()
        time.sleep(0.1)
    return kills, fired, agent_crash


def check_nothing_lost(site: Site) -> None:
    layout = site.layout
    devices = sorted(layout.agent_configs)
    stored = query(layout.store, "SELECT round, device FROM updates")
    per_slot = Counter((round_, device) for round_, device in stored)
    assert set(per_slot.values()) == {1}, "an update was stored twice"
    expected = {(device, r) for r in range(ROUNDS) for device in devices}
    assert {(d, r) for r, d in per_slot} == expected, "the store lacks updates"
    assert site.sent() == expected, "the agents' logs and the store disagree"
    task = load_task(layout.task)
    with EmbeddedLedger.open_readonly(layout.ledger) as chain:
        assert chain.verify(replay=True).ok
        for r in range(ROUNDS):
            record = chain.evaluate("GetRound", task.id, r, identity=AUDITOR)
            assert record["status"] == "committed", f"round {r} not committed"
            assert sorted(record["contributors"]) == devices, f"round {r}"
            assert record["samples"] == sum(layout.device_samples.values()), f"round {r}"
    verify = subprocess.run(
        [
            sys.executable, "-m", "fedledger", "ledger", "verify", "--db", str(layout.ledger),
            "--store", str(layout.store), "--json",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout)["ok"] is True
    gateway_log = (site.logs / "gateway.log").read_text(errors="replace")
    assert "Traceback" not in gateway_log


@pytest.fixture
def broker(tmp_path):
    sessions = tmp_path / "broker"
    sessions.mkdir()
    with MosquittoBroker(persistence=sessions) as running:
        yield running


def test_random_gateway_kills_lose_no_update(tmp_path, dataset, broker):
    rng = random.Random(seed())
    site = Site(tmp_path / "site", dataset, broker)
    try:
        kills, fired, agent = run_with_kills(site, rng)
    finally:
        site.stop()
    print(f"kills={kills} crash points fired={fired} agent crashed={agent}")
    assert kills >= 10
    assert set(fired) == set(FIXED_POINTS)
    assert site.agent_lives[agent] == 2, "the agent's crash point never fired"
    check_nothing_lost(site)


def test_random_gateway_kills_and_a_broker_kill_lose_no_update(tmp_path, dataset, broker):
    rng = random.Random(seed())
    site = Site(tmp_path / "site", dataset, broker)
    try:
        kills, fired, agent = run_with_kills(site, rng, broker_restart_at=rng.randint(3, 8))
    finally:
        site.stop()
    print(f"kills={kills} crash points fired={fired} agent crashed={agent}")
    assert kills >= 10
    assert set(fired) == set(FIXED_POINTS)
    check_nothing_lost(site)
