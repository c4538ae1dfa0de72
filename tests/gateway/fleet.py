"""A gateway and its agents over the in-memory transport: the shared test fixture pieces."""

from __future__ import annotations

import numpy as np

from edge_agent import EdgeAgent
from fedcore import public_key_b64, signer_from_key
from gateway import Gateway, UpdateStore
from ledger import EmbeddedLedger, Identity

ADMIN = Identity(msp_id="org1", subject="admin", role="admin")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 1_000.0

    def __call__(self):
        return self.now


def gateway_chain(path, gateway_key):
    """An embedded ledger at ``path`` that signs as the gateway."""
    return EmbeddedLedger(
        path, signer=signer_from_key(gateway_key), public_key=public_key_b64(gateway_key)
    )


def make_gateway(
    tmp_path,
    task,
    registry,
    gateway_key,
    dataset,
    broker,
    clock,
    *,
    wrap_ledger=None,
    metrics=None,
    **options,
):
    """``options`` go to :class:`Gateway` (``protocol``, ``ledger_worker``...); the held-out
    ``evaluation`` data is the data set's test split unless given."""
    ledger = gateway_chain(tmp_path / "ledger.sqlite", gateway_key)
    return Gateway(
        task=task,
        transport=broker.transport(),
        store=UpdateStore(tmp_path / "store.sqlite"),
        ledger=ledger if wrap_ledger is None else wrap_ledger(ledger),
        registry=registry,
        signer=signer_from_key(gateway_key),
        evaluation=options.pop("evaluation", (dataset.x_test, dataset.y_test)),
        max_message_bytes=1 << 20,
        clock=clock,
        metrics=metrics,
        admin=ADMIN,
        **options,
    )


def make_agents(task, device_keys, gateway_key, dataset, broker):
    agents = []
    for i, (device, key) in enumerate(device_keys.items()):
        idx = np.arange(i, len(dataset.y_train), len(device_keys))
        agent = EdgeAgent(
            device=device,
            task=task,
            transport=broker.transport(),
            signer=signer_from_key(key),
            gateway_key=gateway_key.public_key(),
            data=(dataset.x_train[idx], dataset.y_train[idx]),
        )
        agent.start()
        agents.append(agent)
    return agents


def pump(gateway, agents, steps=1):
    for _ in range(steps):
        for agent in agents:
            agent.step(0)
        gateway.step(0)
