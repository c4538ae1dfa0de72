"""The ledger outbox: rounds reach the ledger in order, off the loop; a refused round is
reported and waits; the fleet's status is one query per round."""

import json
import subprocess
import sys
import threading

import pytest
from prometheus_client import CollectorRegistry

from fedcore import InMemoryBroker
from gateway import GatewayMetrics
from ledger import ContractError

from .fleet import Clock, make_agents, make_gateway, pump

G = "fedledger_gateway_"


def gateway_status(store):
    return subprocess.run(
        [sys.executable, "-m", "fedledger", "gateway", "status", "--store", str(store), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


class GatedLedger:
    """An embedded ledger whose submits wait while ``gate`` is closed (a block that takes
    as long as the test wants), and that can refuse one round's commit."""

    def __init__(self, inner):
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()
        self.refuse_round: int | None = None
        self.calls: list[str] = []

    def submit(self, fn, *args, identity):
        if not self.gate.is_set():
            self.waiting.set()
            assert self.gate.wait(30)
        if fn == "CommitRound" and args[1] == self.refuse_round:
            raise ContractError("forbidden", f"round {args[1]} refused by the test")
        return self.inner.submit(fn, *args, identity=identity)

    def evaluate(self, fn, *args, identity):
        self.calls.append(fn)
        return self.inner.evaluate(fn, *args, identity=identity)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def world(tmp_path, task, registry, gateway_key, dataset, device_keys, request):
    broker, clock = InMemoryBroker(), Clock()
    prom = CollectorRegistry()
    gateway = make_gateway(
        tmp_path, task, registry, gateway_key, dataset, broker, clock,
        wrap_ledger=GatedLedger, metrics=GatewayMetrics(registry=prom),
        ledger_worker=request.param,
    )  # fmt: skip
    agents = make_agents(task, device_keys, gateway_key, dataset, broker)
    gateway.connect()
    yield gateway, agents, prom
    gateway.close()


@pytest.mark.parametrize("world", [True], indirect=True)
def test_rounds_go_on_while_the_ledger_waits_for_a_block(world):
    gateway, agents, prom = world
    gateway.start()
    assert gateway.outbox.drain(10)
    ledger = gateway.ledger
    ledger.gate.clear()  # every submit now waits until the test opens the gate
    pump(gateway, agents)  # round 0 closes: its anchoring is stuck in the worker
    assert ledger.waiting.wait(10)
    pump(gateway, agents)  # round 1 is served and closed all the same
    assert [r.round for r in gateway.results] == [0, 1]
    assert gateway.current_round == 2
    assert not any(r.ledgered for r in gateway.results)
    assert gateway.store.unledgered(gateway.task.id)[0].round == 0
    assert prom.get_sample_value(G + "ledger_outbox_depth") >= 1
    assert prom.get_sample_value(G + "ledger_outbox_oldest_age_seconds") > 0
    ledger.gate.set()
    pump(gateway, agents)
    assert gateway.finished
    assert gateway.outbox.drain(10)
    gateway.step(0)
    assert all(r.ledgered for r in gateway.results)
    assert prom.get_sample_value(G + "ledger_outbox_depth") == 0
    assert gateway.ledger.verify(replay=True, store=gateway.store).ok


@pytest.mark.parametrize("world", [False, True], indirect=True, ids=["inline", "worker"])
def test_a_refused_round_is_reported_and_later_rounds_wait(world, caplog):
    gateway, agents, prom = world
    gateway.ledger.refuse_round = 1
    gateway.start()
    for _ in range(3):
        pump(gateway, agents)
    assert gateway.finished
    assert not gateway.outbox.drain(2)  # round 1 refused, round 2 waits behind it
    assert gateway.outbox.state.refused_round == 1
    assert "forbidden" in gateway.outbox.state.refused_reason
    assert prom.get_sample_value(G + "ledger_refused_round") == 1
    assert [r.round for r in gateway.store.unledgered(gateway.task.id)] == [1, 2]
    assert "the ledger refuses round 1" in caplog.text
    # ``gateway status`` reads the refusal from the store, from another process
    status = gateway_status(gateway.store.path)
    assert status.returncode == 1, status.stderr
    (summary,) = json.loads(status.stdout)["tasks"]
    assert [r["round"] for r in summary["refused_rounds"]] == [1]
    assert "forbidden" in summary["refused_rounds"][0]["reason"]
    assert summary["unledgered_rounds"] == 2 and summary["oldest_unledgered"] == 1
    gateway.ledger.refuse_round = None  # the operator fixed the cause
    gateway.outbox.wake()
    assert gateway.outbox.drain(40)
    assert gateway.outbox.state.refused_round is None
    assert prom.get_sample_value(G + "ledger_refused_round") == -1
    status = gateway_status(gateway.store.path)
    assert status.returncode == 0, status.stderr
    (summary,) = json.loads(status.stdout)["tasks"]
    assert summary["refused_rounds"] == [] and summary["unledgered_rounds"] == 0
    assert summary["closed_rounds"] == 3
    assert gateway.ledger.verify(replay=True, store=gateway.store).ok


@pytest.mark.parametrize("world", [False], indirect=True)
def test_the_fleet_status_is_one_query_per_round_check(world):
    gateway, agents, _ = world
    gateway.start()
    pump(gateway, agents)
    # opening round 0, checking it at close, opening round 1: three reads, none per device
    assert gateway.ledger.calls.count("GetDevices") == 3
    assert "GetDevice" not in gateway.ledger.calls
