"""The Fabric client against a real Fabric 2.5+ network running the fedledger chaincode.

Skipped unless ``FEDLEDGER_FABRIC_PROFILE`` names a connection profile (see
``ledger/fabric/_profile.py``). The profile's identity must be an ``admin`` of its
organisation as the contract sees it (Fabric CA attribute ``fedledger.role=admin`` in the
enrolment certificate, or ``OU=admin``), because the tests register devices. Every test uses fresh device ids, so they can run again and again
on the same channel.
"""

import json
import os
import uuid

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fedcore import sha256_hex
from ledger.fabric import (
    CommitError,
    EndorseError,
    EvaluateError,
    FabricClient,
    connect,
    ecdsa_signer,
    load_profile,
    open_channel,
    verify_chain,
)

PROFILE = os.environ.get("FEDLEDGER_FABRIC_PROFILE")

pytestmark = pytest.mark.skipif(
    not PROFILE,
    reason="needs a Fabric network with the fedledger chaincode:"
    " set FEDLEDGER_FABRIC_PROFILE to a connection profile",
)


@pytest.fixture(scope="module")
def client():
    with connect(PROFILE) as client:
        yield client


def fresh_device() -> str:
    return f"dev-{uuid.uuid4().hex[:16]}"


def register(client: FabricClient, device: str, fingerprint: str | None = None) -> bytes:
    return client.submit(
        "RegisterDevice",
        device,
        client.identity.msp_id,
        "integration-test",
        fingerprint or sha256_hex(device.encode()),
    )


def test_an_unknown_device_is_not_found(client):
    device = fresh_device()
    with pytest.raises(EvaluateError) as info:
        client.evaluate("GetDevice", device)
    assert "not_found" in str(info.value)
    assert len(info.value.transaction_id) == 64


def test_register_a_device_then_get_it(client):
    device = fresh_device()
    record = json.loads(register(client, device))
    assert record["device"] == device
    assert record["org"] == client.identity.msp_id
    assert record["status"] == "active"
    assert json.loads(client.evaluate("GetDevice", device)) == record


def test_the_stages_one_by_one(client):
    device = fresh_device()
    proposal = client.propose(
        "RegisterDevice", device, client.identity.msp_id, "integration-test", "ab" * 32
    )
    transaction = client.endorse(proposal)
    assert json.loads(transaction.result)["registered_tx"] == proposal.transaction_id
    assert client.submit_transaction(transaction) == proposal.transaction_id
    status = client.commit_status(proposal.transaction_id)
    assert status.successful and status.validation_code == "VALID"
    assert status.block_number > 0
    fetched = json.loads(client.evaluate("GetDevice", device))
    assert fetched["registered_tx"] == proposal.transaction_id


def test_a_second_registration_is_refused_by_the_contract(client):
    device = fresh_device()
    register(client, device)
    with pytest.raises(EndorseError) as info:
        register(client, device)
    assert "already registered" in str(info.value)


def test_two_registrations_endorsed_together_conflict_at_commit(client):
    device = fresh_device()
    msp_id = client.identity.msp_id
    first = client.endorse(client.propose("RegisterDevice", device, msp_id, "t", "aa" * 32))
    second = client.endorse(client.propose("RegisterDevice", device, msp_id, "t", "bb" * 32))
    client.submit_transaction(first)
    client.submit_transaction(second)
    assert client.commit_status(first.transaction_id).successful
    with pytest.raises(CommitError) as info:
        client.commit_status(second.transaction_id)
    assert info.value.transaction_id == second.transaction_id
    assert info.value.validation_code == "MVCC_READ_CONFLICT"
    assert json.loads(client.evaluate("GetDevice", device))["key_fingerprint"] == "aa" * 32


def test_a_proposal_signed_by_another_key_is_refused(client):
    profile = load_profile(PROFILE)
    channel = open_channel(profile.peer)
    try:
        impostor = FabricClient(
            channel,
            client.identity,
            ecdsa_signer(ec.generate_private_key(ec.SECP256R1())),
            client.channel_name,
            client.chaincode,
        )
        with pytest.raises(EndorseError) as info:
            register(impostor, fresh_device())
        assert len(info.value.transaction_id) == 64
    finally:
        channel.close()


def test_chaincode_events_can_be_replayed(client):
    with client.chaincode_events(start_block=0, timeout=3) as stream:
        events = list(stream)
    assert all(event.chaincode == client.chaincode for event in events)
    assert [e.block_number for e in events] == sorted(e.block_number for e in events)
    assert {e.event_name for e in events} <= {"UpdatesRecorded", "RoundCommitted"}


def test_the_channel_verifies_from_its_genesis_block(client):
    """Every block read through Deliver, every fedledger transaction replayed."""
    register(client, fresh_device())
    seen = []
    report = verify_chain(client, progress=lambda done, total: seen.append(total))
    assert report.ok, f"block {report.first_bad_height}: {report.problem}"
    assert report.blocks == seen[-1] > 1
    assert report.transactions >= 1 and report.endorsements >= report.transactions


def test_the_orderers_signed_every_block(client):
    """Set FEDLEDGER_FABRIC_ORDERER_MSP (e.g. OrdererMSP) to check block signatures too."""
    msp_id = os.environ.get("FEDLEDGER_FABRIC_ORDERER_MSP")
    if not msp_id:
        pytest.skip("set FEDLEDGER_FABRIC_ORDERER_MSP to check the orderers' block signatures")
    report = verify_chain(client, orderer_msps=[msp_id])
    assert report.ok, f"block {report.first_bad_height}: {report.problem}"
