"""The Fabric client against an in-process Gateway peer that checks what a real peer checks.

The peer runs the real fedledger contract; see ``fake_peer.py`` for what it verifies.
"""

import dataclasses
import json
import time

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from fabric_protos.common import common_pb2
from fabric_protos.peer import chaincode_pb2, proposal_pb2

from fedcore import canonical_json, sha256_hex
from ledger import LedgerError
from ledger.fabric import (
    CommitError,
    CommitStatusError,
    EndorseError,
    EvaluateError,
    FabricError,
    Proposal,
    SubmitError,
    ecdsa_signer,
    sha256,
)
from ledger.fabric._identity import P256_ORDER
from ledger.fabric._proposal import build_proposal

from .conftest import CHAINCODE, CHANNEL, PEER_NAME


def h(text: str) -> str:
    return sha256_hex(text.encode())


def register(client, device: str, fingerprint: str | None = None) -> bytes:
    return client.submit(
        "RegisterDevice", device, "Org1MSP", "wearable", fingerprint or h(f"key-{device}")
    )


def assert_access_denied(err: FabricError, stage: str = "endorse") -> None:
    assert err.code is grpc.StatusCode.ABORTED
    assert err.status_message == (
        f"failed to {stage} transaction, see attached details for more info"
    )
    [detail] = err.details
    assert (detail.address, detail.msp_id) == (f"{PEER_NAME}:7051", "Org1MSP")
    assert detail.message.startswith(f"access denied: channel [{CHANNEL}] creator org")
    assert len(err.transaction_id) == 64


# ---------------------------------------------------------------------------- round trips


def test_submit_then_evaluate(client, peer):
    before = time.time()
    result = register(client, "dev-1")
    record = json.loads(result)
    assert record["device"] == "dev-1"
    assert record["status"] == "active"
    assert record["registered_by"] == "admin1"  # the certificate's common name
    assert record["registered_tx"] == peer.submitted[-1]
    # The contract's time is the proposal's timestamp, chosen by the client.
    assert before - 1 <= record["registered_at"] <= time.time() + 1
    assert result == canonical_json(record)

    fetched = client.evaluate("GetDevice", "dev-1")
    assert fetched == result


def test_evaluate_reports_the_chaincode_error(client):
    with pytest.raises(EvaluateError) as info:
        client.evaluate("GetDevice", "nobody")
    err = info.value
    assert err.code is grpc.StatusCode.ABORTED
    [detail] = err.details
    assert detail.message == "chaincode response 500, not_found: no device nobody"
    assert err.transaction_id in str(err) and "not_found" in str(err)
    assert isinstance(err, FabricError) and isinstance(err, LedgerError)


def test_evaluate_is_not_ordered(client, peer):
    json.loads(client.evaluate("RegisterDevice", "dev-1", "Org1MSP", "wearable", h("k")))
    assert peer.height == 1 and len(peer.world) == 0
    with pytest.raises(EvaluateError):
        client.evaluate("GetDevice", "dev-1")


def test_the_stages_one_by_one(client, peer):
    proposal = client.propose("RegisterDevice", "dev-2", "Org1MSP", "wearable", h("k"))
    assert isinstance(proposal, Proposal)
    assert (proposal.channel_name, proposal.chaincode) == (CHANNEL, CHAINCODE)
    assert proposal.function == "RegisterDevice" and len(proposal.transaction_id) == 64

    transaction = client.endorse(proposal)
    assert transaction.transaction_id == proposal.transaction_id
    assert transaction.channel_name == CHANNEL
    assert transaction.signature == b""  # signed at submit, over the payload as returned
    assert json.loads(transaction.result)["registered_tx"] == proposal.transaction_id
    assert peer.height == 1  # endorsed, not ordered

    tx_id = client.submit_transaction(transaction)
    assert tx_id == proposal.transaction_id
    status = client.commit_status(tx_id)
    assert status.successful
    assert (status.transaction_id, status.validation_code, status.block_number) == (
        tx_id,
        "VALID",
        1,
    )
    assert json.loads(client.evaluate("GetDevice", "dev-2"))["registered_tx"] == tx_id


def test_a_transaction_signed_elsewhere_is_submitted_as_is(client, admin):
    """Offline signing: the signature can be made apart from the client."""
    transaction = client.endorse(client.propose("Echo", "offline"))
    signed = transaction.sign(admin.signer)
    assert client.submit_transaction(signed) == transaction.transaction_id
    assert client.commit_status(transaction.transaction_id).successful
    with pytest.raises(ValueError, match="not signed"):
        transaction.submit_request()


# ---------------------------------------------------------------------------- refusals


def test_a_proposal_signed_by_another_key_is_refused(make_client, admin, peer):
    impostor = make_client(admin, signer=ecdsa_signer(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(EndorseError) as info:
        register(impostor, "dev-1")
    assert_access_denied(info.value)
    assert info.value.details[0].message.endswith("creator org [Org1MSP]")
    with pytest.raises(EvaluateError) as info:
        impostor.evaluate("GetDevice", "dev-1")
    assert_access_denied(info.value, "evaluate")
    assert peer.height == 1 and len(peer.world) == 0


def test_a_certificate_from_an_untrusted_ca_is_refused(make_client, rogue_ca):
    rogue = rogue_ca.issue("admin1", msp_id="Org1MSP", role="admin")
    with pytest.raises(EndorseError) as info:
        register(make_client(rogue), "dev-1")
    assert_access_denied(info.value)


def test_an_unknown_msp_is_refused(make_client, org1_ca):
    stranger = org1_ca.issue("admin1", msp_id="Org9MSP", role="admin")
    with pytest.raises(EndorseError) as info:
        register(make_client(stranger), "dev-1")
    assert info.value.details[0].message.endswith("creator org [Org9MSP]")


def test_the_peer_refuses_a_high_s_signature(make_client, admin):
    """Why the signer normalizes: the same signature in high-S form is "access denied"."""

    def high_s(digest: bytes) -> bytes:
        r, s = decode_dss_signature(admin.signer(digest))
        return encode_dss_signature(r, P256_ORDER - s)

    with pytest.raises(EndorseError) as info:
        register(make_client(admin, signer=high_s), "dev-1")
    assert_access_denied(info.value)


def test_a_wrong_channel_is_refused(make_client):
    client = make_client(channel_name="otherchannel")
    with pytest.raises(EndorseError) as info:
        register(client, "dev-1")
    assert info.value.code is grpc.StatusCode.NOT_FOUND
    assert "otherchannel" in str(info.value)
    with pytest.raises(EvaluateError) as info:
        client.evaluate("GetDevice", "dev-1")
    assert info.value.code is grpc.StatusCode.NOT_FOUND
    with pytest.raises(CommitStatusError) as info:
        client.commit_status("0" * 64)
    assert info.value.code is grpc.StatusCode.NOT_FOUND
    assert info.value.transaction_id == "0" * 64


def test_a_wrong_chaincode_is_refused(make_client):
    with pytest.raises(EndorseError) as info:
        register(make_client(chaincode="basic"), "dev-1")
    assert info.value.details[0].message.endswith("chaincode basic not found")


def test_the_transaction_id_must_derive_from_nonce_and_creator(client, admin):
    _, proposal_bytes = build_proposal(
        admin.identity, channel_name=CHANNEL, chaincode=CHAINCODE, function="Echo", args=[b"1"]
    )
    proposal = proposal_pb2.Proposal.FromString(proposal_bytes)
    header = common_pb2.Header.FromString(proposal.header)
    channel_header = common_pb2.ChannelHeader.FromString(header.channel_header)
    channel_header.tx_id = "f" * 64
    header.channel_header = channel_header.SerializeToString()
    proposal.header = header.SerializeToString()
    forged = proposal.SerializeToString()
    signed = Proposal(
        transaction_id="f" * 64,
        channel_name=CHANNEL,
        chaincode=CHAINCODE,
        function="Echo",
        proposal_bytes=forged,
        signature=admin.signer(sha256(forged)),
    )
    with pytest.raises(EndorseError) as info:
        client.endorse(signed)
    assert info.value.details[0].message.startswith(f"invalid txid. got [{'f' * 64}]")


def test_a_tampered_envelope_is_refused_at_submit(client, admin, peer):
    transaction = client.endorse(client.propose("RegisterDevice", "dev-3", "Org1MSP", "pi", h("k")))
    tampered_payload = transaction.payload.replace(b"dev-3", b"dev-4")
    assert tampered_payload != transaction.payload

    # Changed, then signed by the rightful creator: not what was endorsed.
    forged = dataclasses.replace(transaction, payload=tampered_payload).sign(admin.signer)
    with pytest.raises(SubmitError) as info:
        client.submit_transaction(forged)
    err = info.value
    assert err.transaction_id == transaction.transaction_id
    assert err.code is grpc.StatusCode.ABORTED
    [detail] = err.details
    assert detail.msp_id == "OrdererMSP"
    assert "payload differs from the endorsed transaction" in detail.message

    # Signed, then changed: the signature no longer matches.
    swapped = dataclasses.replace(transaction.sign(admin.signer), payload=tampered_payload)
    with pytest.raises(SubmitError) as info:
        client.submit_transaction(swapped)
    assert "status=FORBIDDEN" in info.value.details[0].message

    # Signed by someone else.
    other = ecdsa_signer(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(SubmitError):
        client.submit_transaction(transaction.sign(other))

    # The untouched transaction still goes through.
    client.submit_transaction(transaction)
    assert client.commit_status(transaction.transaction_id).successful
    assert "device/dev-3" in peer.world and "device/dev-4" not in peer.world


# ---------------------------------------------------------------------------- commit status


def test_an_mvcc_conflict_is_a_commit_error(client, peer):
    first = client.endorse(client.propose("RegisterDevice", "dev-5", "Org1MSP", "pi", h("a")))
    second = client.endorse(client.propose("RegisterDevice", "dev-5", "Org1MSP", "pi", h("b")))
    client.submit_transaction(first)
    assert client.commit_status(first.transaction_id).successful
    client.submit_transaction(second)
    with pytest.raises(CommitError) as info:
        client.commit_status(second.transaction_id)
    err = info.value
    assert err.transaction_id == second.transaction_id
    assert err.validation_code == "MVCC_READ_CONFLICT"
    assert err.block_number == 2
    assert err.code is None  # a normal reply, not a gRPC error
    assert second.transaction_id in str(err) and "MVCC_READ_CONFLICT" in str(err)

    status = client.commit_status(second.transaction_id, check=False)
    assert not status.successful and status.validation_code == "MVCC_READ_CONFLICT"
    assert json.loads(client.evaluate("GetDevice", "dev-5"))["key_fingerprint"] == h("a")


def test_an_endorsement_policy_failure_is_a_commit_error(client, peer):
    peer.forced_codes.append("ENDORSEMENT_POLICY_FAILURE")
    with pytest.raises(CommitError) as info:
        register(client, "dev-6")
    assert info.value.validation_code == "ENDORSEMENT_POLICY_FAILURE"
    assert info.value.transaction_id == peer.submitted[-1]
    assert isinstance(info.value, FabricError)
    with pytest.raises(EvaluateError):  # nothing it wrote reached the world state
        client.evaluate("GetDevice", "dev-6")
    register(client, "dev-6")  # and it can simply be submitted again


def test_commit_status_waits_until_its_timeout(make_client):
    client = make_client(commit_status_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(CommitStatusError) as info:
        client.commit_status("a" * 64)
    assert 0.25 <= time.monotonic() - started < 5
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert info.value.transaction_id == "a" * 64


def test_commit_status_is_signed_by_a_trusted_identity(make_client, client, rogue_ca):
    tx_id = client.submit_transaction(client.endorse(client.propose("Echo", 1)))
    rogue = make_client(rogue_ca.issue("admin1", msp_id="Org1MSP", role="admin"))
    with pytest.raises(CommitStatusError) as info:
        rogue.commit_status(tx_id)
    assert info.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert client.commit_status(tx_id).successful


# ---------------------------------------------------------------------------- arguments


def test_arguments_travel_as_canonical_json(client, peer):
    value = {"b": [1, 2.5, None, True], "a": "é"}
    assert client.submit("Echo", value) == canonical_json(value)
    proposal = proposal_pb2.Proposal.FromString(
        peer.endorse_requests[-1].proposed_transaction.proposal_bytes
    )
    payload = proposal_pb2.ChaincodeProposalPayload.FromString(proposal.payload)
    spec = chaincode_pb2.ChaincodeInvocationSpec.FromString(payload.input).chaincode_spec
    assert list(spec.input.args) == [b"Echo", '{"a":"é","b":[1,2.5,null,true]}'.encode()]

    with pytest.raises(TypeError, match="binary"):
        client.propose("Echo", b"\x00\xff")
    with pytest.raises(TypeError, match="JSON"):
        client.propose("Echo", float("nan"))


def test_transient_data_stays_with_the_endorsers(client, peer):
    transaction = client.endorse(
        client.propose(
            "Echo", 1, transient={"secret": b"s3cret"}, endorsing_organizations=["Org1MSP"]
        )
    )
    assert peer.transient_keys[-1] == ["secret"]
    assert list(peer.endorse_requests[-1].endorsing_organizations) == ["Org1MSP"]
    assert b"s3cret" not in transaction.payload


def test_messages_above_the_4_mib_grpc_default(make_client):
    big = "x" * (5 << 20)
    assert json.loads(make_client().evaluate("Echo", big)) == big
    default_limits = make_client(options=())
    with pytest.raises(EvaluateError) as info:
        default_limits.evaluate("Echo", big)
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED


# ---------------------------------------------------------------------------- events


def test_chaincode_events(make_client, admin, gateway_member, peer):
    org_admin, gateway = make_client(admin), make_client(gateway_member)
    register(org_admin, "dev-0")
    org_admin.submit(
        "CreateTask", "t1", "Org1MSP", "gateway1", h("spec"), "fedavg", {}, h("model-0")
    )
    gateway.submit("OpenRound", "t1", 0, h("model-0"), time.time() + 60)
    update = {
        "device": "dev-0",
        "digest": h("update"),
        "samples": 10,
        "codec": "int8",
        "accepted": True,
        "reason": None,
    }

    with gateway.chaincode_events(timeout=30) as stream:
        assert peer.events_listening.wait(5)
        summary = json.loads(gateway.submit("RecordUpdates", "t1", 0, [update]))
        event = next(stream)
    assert event.event_name == "UpdatesRecorded"
    assert event.chaincode == CHAINCODE
    assert event.transaction_id == peer.submitted[-1]
    assert event.block_number == peer.height - 1 == 4
    assert json.loads(event.payload) == summary
    assert list(stream) == []  # closed: iteration ends

    # Catching up from a start block replays the same event; earlier blocks had none.
    with org_admin.chaincode_events(start_block=0, timeout=5) as replay:
        assert next(replay) == event
    # Resuming after the checkpointed transaction: nothing more, until the timeout.
    resumed = org_admin.chaincode_events(
        start_block=event.block_number, after_transaction_id=event.transaction_id, timeout=0.5
    )
    assert list(resumed) == []


def test_events_of_invalid_transactions_are_not_delivered(make_client, admin, gateway_member, peer):
    org_admin, gateway = make_client(admin), make_client(gateway_member)
    register(org_admin, "dev-0")
    org_admin.submit(
        "CreateTask", "t1", "Org1MSP", "gateway1", h("spec"), "fedavg", {}, h("model-0")
    )
    gateway.submit("OpenRound", "t1", 0, h("model-0"), time.time() + 60)
    start = peer.height
    record = {"device": "dev-0", "digest": h("u"), "samples": 1, "codec": "int8",
              "accepted": True, "reason": None}  # fmt: skip
    peer.forced_codes.append("MVCC_READ_CONFLICT")
    with pytest.raises(CommitError):
        gateway.submit("RecordUpdates", "t1", 0, [record])
    gateway.submit("RecordUpdates", "t1", 0, [record])
    with gateway.chaincode_events(start_block=start, timeout=5) as stream:
        event = next(stream)
    assert event.block_number == start + 1 and event.transaction_id == peer.submitted[-1]
