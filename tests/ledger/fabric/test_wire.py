"""The messages the client builds and parses, checked field by field without a server."""

import hashlib
import logging

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fabric_protos.common import common_pb2
from fabric_protos.gateway import gateway_pb2
from fabric_protos.peer import (
    chaincode_pb2,
    proposal_pb2,
    proposal_response_pb2,
    transaction_pb2,
)

from ledger.fabric import CommitError, EndorseError, ErrorDetail, sha256
from ledger.fabric._commit import commit_status, commit_status_request
from ledger.fabric._errors import error_details, from_rpc_error
from ledger.fabric._events import chaincode_events_request
from ledger.fabric._proposal import build_proposal, new_proposal, transaction_id
from ledger.fabric._transaction import endorsed_transaction

from .fake_peer import status_details

NONCE = bytes(range(24))
TIME_NS = 1_700_000_000_123_456_789


def verify(member, signature: bytes, data: bytes) -> None:
    member.key.public_key().verify(signature, data, ec.ECDSA(hashes.SHA256()))


def test_the_proposal_structure(admin):
    tx_id, raw = build_proposal(
        admin.identity,
        channel_name="mychannel",
        chaincode="fedledger",
        function="RegisterDevice",
        args=[b'"dev-1"', b"3"],
        transient={"k": b"v"},
        nonce=NONCE,
        timestamp_ns=TIME_NS,
    )
    creator = admin.identity.creator()
    assert tx_id == hashlib.sha256(NONCE + creator).hexdigest() == transaction_id(NONCE, creator)

    proposal = proposal_pb2.Proposal.FromString(raw)
    header = common_pb2.Header.FromString(proposal.header)
    channel_header = common_pb2.ChannelHeader.FromString(header.channel_header)
    assert channel_header.type == common_pb2.HeaderType.ENDORSER_TRANSACTION
    assert (channel_header.channel_id, channel_header.tx_id, channel_header.epoch) == (
        "mychannel",
        tx_id,
        0,
    )
    assert channel_header.timestamp.seconds == 1_700_000_000
    assert channel_header.timestamp.nanos == 123_456_789
    extension = proposal_pb2.ChaincodeHeaderExtension.FromString(channel_header.extension)
    assert extension.chaincode_id.name == "fedledger"

    signature_header = common_pb2.SignatureHeader.FromString(header.signature_header)
    assert (signature_header.creator, signature_header.nonce) == (creator, NONCE)

    payload = proposal_pb2.ChaincodeProposalPayload.FromString(proposal.payload)
    assert dict(payload.TransientMap) == {"k": b"v"}
    spec = chaincode_pb2.ChaincodeInvocationSpec.FromString(payload.input).chaincode_spec
    assert spec.chaincode_id.name == "fedledger"
    assert list(spec.input.args) == [b"RegisterDevice", b'"dev-1"', b"3"]

    again = build_proposal(
        admin.identity,
        channel_name="mychannel",
        chaincode="fedledger",
        function="RegisterDevice",
        args=[b'"dev-1"', b"3"],
        transient={"k": b"v"},
        nonce=NONCE,
        timestamp_ns=TIME_NS,
    )
    assert again == (tx_id, raw)


def test_each_proposal_is_fresh_and_signed_over_its_exact_bytes(admin):
    def make():
        return new_proposal(
            admin.identity,
            admin.signer,
            channel_name="mychannel",
            chaincode="fedledger",
            function="GetDevice",
            args=[b'"dev-1"'],
            endorsing_organizations=["Org1MSP"],
        )

    one, two = make(), make()
    assert one.transaction_id != two.transaction_id
    verify(admin, one.signature, one.proposal_bytes)
    request = one.endorse_request()
    assert request.transaction_id == one.transaction_id
    assert request.channel_id == "mychannel"
    assert request.proposed_transaction.proposal_bytes == one.proposal_bytes
    assert list(request.endorsing_organizations) == ["Org1MSP"]
    assert list(one.evaluate_request().target_organizations) == ["Org1MSP"]


def test_proposal_inputs_are_checked(admin):
    with pytest.raises(ValueError, match="channel name"):
        build_proposal(admin.identity, channel_name="", chaincode="cc", function="F")
    with pytest.raises(ValueError, match="function"):
        build_proposal(admin.identity, channel_name="ch", chaincode="cc", function="")
    with pytest.raises(TypeError, match="bytes"):
        build_proposal(admin.identity, channel_name="ch", chaincode="cc", function="F", args=["x"])
    with pytest.raises(TypeError, match="transient"):
        build_proposal(
            admin.identity, channel_name="ch", chaincode="cc", function="F", transient={"k": "v"}
        )


def prepared_envelope(tx_id: str, result: bytes, *, actions: int = 1) -> common_pb2.Envelope:
    action = proposal_pb2.ChaincodeAction(
        response=proposal_response_pb2.Response(status=200, payload=result)
    )
    response_payload = proposal_response_pb2.ProposalResponsePayload(
        proposal_hash=b"h", extension=action.SerializeToString()
    )
    action_payload = transaction_pb2.ChaincodeActionPayload(
        action=transaction_pb2.ChaincodeEndorsedAction(
            proposal_response_payload=response_payload.SerializeToString()
        )
    )
    transaction = transaction_pb2.Transaction(
        actions=[
            transaction_pb2.TransactionAction(payload=action_payload.SerializeToString())
            for _ in range(actions)
        ]
    )
    channel_header = common_pb2.ChannelHeader(
        type=common_pb2.HeaderType.ENDORSER_TRANSACTION, channel_id="mychannel", tx_id=tx_id
    )
    payload = common_pb2.Payload(
        header=common_pb2.Header(channel_header=channel_header.SerializeToString()),
        data=transaction.SerializeToString(),
    )
    return common_pb2.Envelope(payload=payload.SerializeToString())


def test_the_result_is_read_from_the_endorsed_envelope(admin):
    envelope = prepared_envelope("t1", b'{"ok":true}')
    transaction = endorsed_transaction(envelope, transaction_id="t1")
    assert transaction.result == b'{"ok":true}'
    assert transaction.channel_name == "mychannel"
    assert transaction.payload == envelope.payload
    signed = transaction.sign(admin.signer)
    verify(admin, signed.signature, envelope.payload)
    request = signed.submit_request()
    assert request.prepared_transaction.payload == envelope.payload  # not re-serialized
    assert (request.transaction_id, request.channel_id) == ("t1", "mychannel")


def test_a_prepared_envelope_for_something_else_is_refused():
    with pytest.raises(ValueError, match="not the proposal"):
        endorsed_transaction(prepared_envelope("t1", b"r"), transaction_id="t2")
    with pytest.raises(ValueError, match="no chaincode result"):
        endorsed_transaction(prepared_envelope("t1", b"r", actions=0), transaction_id="t1")
    with pytest.raises(ValueError, match="malformed"):
        endorsed_transaction(common_pb2.Envelope(payload=b"\xff\xff"), transaction_id="t1")


def test_the_commit_status_request_is_signed(admin):
    signed = commit_status_request(
        admin.identity, admin.signer, channel_name="mychannel", transaction_id="t1"
    )
    request = gateway_pb2.CommitStatusRequest.FromString(signed.request)
    assert (request.transaction_id, request.channel_id) == ("t1", "mychannel")
    assert request.identity == admin.identity.creator()
    verify(admin, signed.signature, signed.request)


def test_commit_status_codes():
    valid = commit_status("t1", gateway_pb2.CommitStatusResponse(result=0, block_number=7))
    assert valid.successful and valid.check() is valid
    bad = commit_status("t1", gateway_pb2.CommitStatusResponse(result=10, block_number=8))
    assert bad.validation_code == "ENDORSEMENT_POLICY_FAILURE"
    with pytest.raises(CommitError) as info:
        bad.check()
    assert (info.value.transaction_id, info.value.block_number) == ("t1", 8)
    assert str(info.value) == (
        "commit of transaction t1 failed: committed as invalid in block 8:"
        " ENDORSEMENT_POLICY_FAILURE"
    )
    odd = commit_status("t1", gateway_pb2.CommitStatusResponse(result=77))
    assert odd.validation_code == "UNKNOWN_CODE_77" and not odd.successful


def test_the_chaincode_events_request(admin):
    signed = chaincode_events_request(
        admin.identity, admin.signer, channel_name="mychannel", chaincode="fedledger"
    )
    request = gateway_pb2.ChaincodeEventsRequest.FromString(signed.request)
    assert request.start_position.WhichOneof("Type") == "next_commit"
    assert (request.channel_id, request.chaincode_id) == ("mychannel", "fedledger")
    assert request.identity == admin.identity.creator()
    verify(admin, signed.signature, signed.request)

    signed = chaincode_events_request(
        admin.identity,
        admin.signer,
        channel_name="mychannel",
        chaincode="fedledger",
        start_block=12,
        after_transaction_id="t1",
    )
    request = gateway_pb2.ChaincodeEventsRequest.FromString(signed.request)
    assert request.start_position.specified.number == 12
    assert request.after_transaction_id == "t1"
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="start_block"):
            chaincode_events_request(
                admin.identity, admin.signer, channel_name="c", chaincode="c", start_block=bad
            )


def test_error_details_from_the_trailer(caplog):
    details = [
        gateway_pb2.ErrorDetail(address="peer0:7051", msp_id="Org1MSP", message="boom"),
        gateway_pb2.ErrorDetail(address="peer1:7051", msp_id="Org2MSP", message="bang"),
    ]
    trailer = status_details(grpc.StatusCode.ABORTED, "failed", details)
    metadata = (("other", "x"), ("grpc-status-details-bin", trailer))
    assert error_details(metadata) == (
        ErrorDetail("peer0:7051", "Org1MSP", "boom"),
        ErrorDetail("peer1:7051", "Org2MSP", "bang"),
    )
    assert error_details(None) == ()
    with caplog.at_level(logging.WARNING, logger="ledger.fabric._errors"):
        assert error_details((("grpc-status-details-bin", b"\xff\xff\xff"),)) == ()
    assert "malformed" in caplog.text


class FakeRpcError(grpc.RpcError, grpc.Call):
    """What a failed unary call raises: an RpcError that is also a Call."""

    def __init__(self, code, details, trailer):
        self._code, self._details, self._trailer = code, details, trailer

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailer

    def initial_metadata(self):
        return ()

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return False

    def add_callback(self, callback):
        return False


def test_a_grpc_error_becomes_a_stage_error():
    detail = gateway_pb2.ErrorDetail(address="p:1", msp_id="M", message="chaincode response 500")
    trailer = (("grpc-status-details-bin", status_details(grpc.StatusCode.ABORTED, "x", [detail])),)
    err = from_rpc_error(
        EndorseError, FakeRpcError(grpc.StatusCode.ABORTED, "failed to endorse", trailer), "t1"
    )
    assert isinstance(err, EndorseError)
    assert err.transaction_id == "t1" and err.code is grpc.StatusCode.ABORTED
    assert err.status_message == "failed to endorse"
    assert err.details == (ErrorDetail("p:1", "M", "chaincode response 500"),)
    assert str(err) == (
        "endorse of transaction t1 failed: ABORTED: failed to endorse;"
        " p:1 (M): chaincode response 500"
    )


def test_sha256_is_the_default_hash():
    assert sha256(b"abc") == hashlib.sha256(b"abc").digest()
