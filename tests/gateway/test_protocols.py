"""Round protocols: the built-in ones are registered, and a new one is one class plus one
registry entry, run by the same loop (over the in-memory transport)."""

import pytest

from fedcore import InMemoryBroker
from gateway import PROTOCOLS, GatewayError, Rejected, RoundProtocol, register_protocol

from .fleet import Clock, make_agents, make_gateway, pump


class FirstK(RoundProtocol):
    """A toy protocol: a round takes the first ``K`` updates and closes at once; later
    ones are told the round is closed."""

    name = "first-k-test"
    K = 2

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.taken: dict[int, int] = {}

    def place(self, header, current):
        if self.taken.get(current, 0) >= self.K:
            raise Rejected(
                "round_closed", f"round {current} took its {self.K}", device=header.device
            )
        self.taken[current] = self.taken.get(current, 0) + 1
        return current

    def due(self, current, live):
        return len(current.devices) >= self.K

    @property
    def quorum(self):
        return self.K


@pytest.fixture(scope="module", autouse=True)
def first_k():
    register_protocol(FirstK)
    yield
    del PROTOCOLS[FirstK.name]


def test_the_builtin_protocols_are_registered():
    assert {"synchronous", "fedbuff"} <= set(PROTOCOLS)
    with pytest.raises(ValueError, match="already registered"):
        register_protocol(PROTOCOLS["synchronous"])


def test_a_new_protocol_runs_in_the_same_loop(
    tmp_path, task, registry, gateway_key, dataset, device_keys
):
    broker, clock = InMemoryBroker(), Clock()
    gateway = make_gateway(
        tmp_path, task, registry, gateway_key, dataset, broker, clock, protocol=FirstK.name
    )
    agents = make_agents(task, device_keys, gateway_key, dataset, broker)
    gateway.connect()
    gateway.start()
    try:
        for _ in range(task.rounds):
            pump(gateway, agents)
        assert gateway.finished
        assert [r.participants for r in gateway.results] == [2, 2, 2]
        assert all(r.rejected_by_reason == {"round_closed": 3} for r in gateway.results)
        assert all(r.ledgered for r in gateway.results)
        assert gateway.ledger.verify(replay=True, store=gateway.store).ok
    finally:
        gateway.close()


def test_an_unknown_protocol_is_named(tmp_path, task, registry, gateway_key, dataset):
    with pytest.raises(GatewayError, match="unknown round protocol 'nope'; known: .*fedbuff"):
        make_gateway(
            tmp_path,
            task,
            registry,
            gateway_key,
            dataset,
            InMemoryBroker(),
            Clock(),
            protocol="nope",
        )
