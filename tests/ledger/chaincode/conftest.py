"""A chaincode server on a free loopback port and a test peer connected to it."""

from __future__ import annotations

import pytest

from ledger.chaincode import start_server

from .fake_peer import FakePeer, make_identity

PACKAGE_ID = "fedledger_1.0:" + "ab" * 32


@pytest.fixture(scope="module")
def identities():
    return {
        "admin": make_identity("Org1MSP", "admin1", "admin"),
        "gateway": make_identity("Org1MSP", "gateway1", "gateway"),
        "device": make_identity("Org1MSP", "dev-0001", "device"),
        "auditor": make_identity("Org2MSP", "auditor1", "auditor"),
    }


@pytest.fixture
def server():
    with start_server("127.0.0.1:0", chaincode_id=PACKAGE_ID, grace=1.0) as running:
        yield running


@pytest.fixture
def peer(server):
    with FakePeer(server.address) as connected:
        yield connected
