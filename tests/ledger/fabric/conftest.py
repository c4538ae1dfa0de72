"""A test PKI, an in-process Gateway peer, and clients connected to it."""

from __future__ import annotations

import grpc
import pytest

from ledger.fabric import CHANNEL_OPTIONS, FabricClient

from .fake_peer import FakePeer, PeerServer
from .pki import CertificateAuthority

CHANNEL = "mychannel"
CHAINCODE = "fedledger"
PEER_NAME = "peer0.org1.example.com"


def echo(ctx, value):
    """A test-only transaction: returns its argument (to move large messages)."""
    return value


@pytest.fixture(scope="session")
def org1_ca():
    return CertificateAuthority("ca.org1.example.com", "org1.example.com")


@pytest.fixture(scope="session")
def org2_ca():
    return CertificateAuthority("ca.org2.example.com", "org2.example.com")


@pytest.fixture(scope="session")
def rogue_ca():
    """A CA nobody trusts, issuing certificates with the right names."""
    return CertificateAuthority("ca.org1.example.com", "org1.example.com")


@pytest.fixture(scope="session")
def tls_ca():
    return CertificateAuthority("tlsca.org1.example.com", "org1.example.com")


@pytest.fixture(scope="session")
def admin(org1_ca):
    return org1_ca.issue("admin1", msp_id="Org1MSP", role="admin")


@pytest.fixture(scope="session")
def gateway_member(org1_ca):
    return org1_ca.issue("gateway1", msp_id="Org1MSP", role="gateway")


@pytest.fixture(scope="session")
def peer_member(org1_ca):
    return org1_ca.issue(PEER_NAME, msp_id="Org1MSP")


@pytest.fixture(scope="session")
def tls_server(tls_ca):
    # The name only, no IP: connecting to 127.0.0.1 needs the server name override.
    return tls_ca.issue(PEER_NAME, msp_id="Org1MSP", dns=(PEER_NAME,), usage="server")


@pytest.fixture(scope="session")
def tls_client(tls_ca):
    return tls_ca.issue("admin1", msp_id="Org1MSP", usage="client")


@pytest.fixture
def peer_server(peer_member, org1_ca, org2_ca, tls_server, tls_ca):
    peer = FakePeer(
        channel=CHANNEL,
        chaincode=CHAINCODE,
        peer=peer_member,
        trusted={"Org1MSP": org1_ca.cert, "Org2MSP": org2_ca.cert},
        address=f"{PEER_NAME}:7051",
        extra_functions={"Echo": echo},
    )
    with PeerServer(peer, tls=tls_server, client_ca=tls_ca.cert) as server:
        yield server


@pytest.fixture
def peer(peer_server) -> FakePeer:
    return peer_server.peer


@pytest.fixture
def make_client(peer_server, admin):
    """``make_client(member, **overrides)``: a client on a fresh channel to the test peer."""
    channels: list[grpc.Channel] = []

    def make(
        member=admin,
        *,
        channel_name=CHANNEL,
        chaincode=CHAINCODE,
        signer=None,
        options=CHANNEL_OPTIONS,
        **kwargs,
    ) -> FabricClient:
        channel = grpc.insecure_channel(peer_server.target, options=list(options))
        channels.append(channel)
        return FabricClient(
            channel, member.identity, signer or member.signer, channel_name, chaincode, **kwargs
        )

    yield make
    for channel in channels:
        channel.close()


@pytest.fixture
def client(make_client) -> FabricClient:
    """The Org1 admin's client."""
    return make_client()
