"""An endorsed transaction: the prepared envelope, its contract result, its signature.

Endorse returns the transaction the gateway assembled from the endorsements, as an
unsigned ``common.Envelope``. The client signs the envelope's payload exactly as it came
(never a re-serialization: protobuf does not promise identical bytes, and the
endorsements sign what is inside) and sends it to Submit.

Submit does not return the contract's result, so it is read from the endorsed envelope::

    Envelope.payload -> Payload.data -> Transaction.actions[i].payload
      -> ChaincodeActionPayload.action.proposal_response_payload
      -> ProposalResponsePayload.extension -> ChaincodeAction.response.payload
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fabric_protos.common import common_pb2
from fabric_protos.gateway import gateway_pb2
from fabric_protos.peer import proposal_pb2, proposal_response_pb2, transaction_pb2
from google.protobuf.message import DecodeError

from ._identity import Hash, Signer, sha256


@dataclass(frozen=True, slots=True)
class Transaction:
    """An endorsed transaction; ``signature`` is empty until :meth:`sign`."""

    transaction_id: str
    channel_name: str
    #: The prepared envelope's payload, byte for byte as Endorse returned it.
    payload: bytes = field(repr=False)
    #: What the contract returned (identical on every endorser, or endorsement failed).
    result: bytes = field(repr=False)
    signature: bytes = field(default=b"", repr=False)

    def sign(self, signer: Signer, hash: Hash = sha256) -> Transaction:
        return dataclasses.replace(self, signature=signer(hash(self.payload)))

    def envelope(self) -> common_pb2.Envelope:
        return common_pb2.Envelope(payload=self.payload, signature=self.signature)

    def submit_request(self) -> gateway_pb2.SubmitRequest:
        if not self.signature:
            raise ValueError(f"transaction {self.transaction_id} is not signed")
        return gateway_pb2.SubmitRequest(
            transaction_id=self.transaction_id,
            channel_id=self.channel_name,
            prepared_transaction=self.envelope(),
        )


def endorsed_transaction(envelope: common_pb2.Envelope, *, transaction_id: str) -> Transaction:
    """Check a prepared envelope belongs to ``transaction_id`` and read its result.

    Raises ValueError if the envelope is not a well-formed endorser transaction for it.
    """
    channel_header, payload = _headers(envelope.payload)
    if channel_header.type != common_pb2.HeaderType.ENDORSER_TRANSACTION:
        raise ValueError(f"prepared transaction has header type {channel_header.type}")
    if channel_header.tx_id != transaction_id:
        raise ValueError(f"prepared transaction is {channel_header.tx_id!r}, not the proposal's")
    return Transaction(
        transaction_id=transaction_id,
        channel_name=channel_header.channel_id,
        payload=envelope.payload,
        result=_result(payload),
    )


def _headers(raw: bytes) -> tuple[common_pb2.ChannelHeader, common_pb2.Payload]:
    try:
        payload = common_pb2.Payload.FromString(raw)
        channel_header = common_pb2.ChannelHeader.FromString(payload.header.channel_header)
    except DecodeError as exc:
        raise ValueError(f"malformed prepared transaction: {exc}") from None
    return channel_header, payload


def _result(payload: common_pb2.Payload) -> bytes:
    try:
        transaction = transaction_pb2.Transaction.FromString(payload.data)
    except DecodeError as exc:
        raise ValueError(f"malformed transaction in prepared envelope: {exc}") from None
    problems = []
    for action in transaction.actions:
        try:
            action_payload = transaction_pb2.ChaincodeActionPayload.FromString(action.payload)
            response_payload = proposal_response_pb2.ProposalResponsePayload.FromString(
                action_payload.action.proposal_response_payload
            )
            chaincode_action = proposal_pb2.ChaincodeAction.FromString(response_payload.extension)
        except DecodeError as exc:
            problems.append(str(exc))
            continue
        if chaincode_action.HasField("response"):
            return chaincode_action.response.payload
        problems.append("chaincode action without a response")
    raise ValueError(
        "no chaincode result in prepared transaction"
        + (f" ({'; '.join(problems)})" if problems else "")
    )
