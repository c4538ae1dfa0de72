"""Build and sign a transaction proposal, the first message of every Fabric transaction.

The structure is the one Fabric's ``protoutil.CreateChaincodeProposalWithTransient``
produces and its endorsers check:

- a fresh 24-byte nonce and the creator (serialized identity); the transaction id is the
  hex SHA-256 of ``nonce + creator``, which every peer recomputes;
- ``ChannelHeader``: ``ENDORSER_TRANSACTION``, the channel, the transaction id, the time
  (which the chaincode sees as the transaction timestamp) and, as its extension, a
  ``ChaincodeHeaderExtension`` naming the chaincode;
- ``SignatureHeader``: creator and nonce;
- payload: ``ChaincodeProposalPayload`` holding the ``ChaincodeInvocationSpec`` (the
  chaincode name and the arguments, function name first) and the transient map, which
  peers keep out of the transaction that is ordered;
- ``SignedProposal``: the serialized ``Proposal`` and the signer's signature of those exact
  bytes.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fabric_protos.common import common_pb2
from fabric_protos.gateway import gateway_pb2
from fabric_protos.peer import chaincode_pb2, proposal_pb2
from google.protobuf import timestamp_pb2

from ._identity import Hash, Identity, Signer, sha256

NONCE_BYTES = 24


def transaction_id(nonce: bytes, creator: bytes) -> str:
    """Fabric's transaction id: hex SHA-256 of the nonce followed by the creator."""
    return hashlib.sha256(nonce + creator).hexdigest()


@dataclass(frozen=True, slots=True)
class Proposal:
    """A signed proposal, ready to be endorsed (submit) or evaluated (query)."""

    transaction_id: str
    channel_name: str
    chaincode: str
    function: str
    proposal_bytes: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    endorsing_organizations: tuple[str, ...] = ()

    def signed_proposal(self) -> proposal_pb2.SignedProposal:
        return proposal_pb2.SignedProposal(
            proposal_bytes=self.proposal_bytes, signature=self.signature
        )

    def endorse_request(self) -> gateway_pb2.EndorseRequest:
        return gateway_pb2.EndorseRequest(
            transaction_id=self.transaction_id,
            channel_id=self.channel_name,
            proposed_transaction=self.signed_proposal(),
            endorsing_organizations=list(self.endorsing_organizations),
        )

    def evaluate_request(self) -> gateway_pb2.EvaluateRequest:
        return gateway_pb2.EvaluateRequest(
            transaction_id=self.transaction_id,
            channel_id=self.channel_name,
            proposed_transaction=self.signed_proposal(),
            target_organizations=list(self.endorsing_organizations),
        )


def build_proposal(
    identity: Identity,
    *,
    channel_name: str,
    chaincode: str,
    function: str,
    args: Sequence[bytes] = (),
    transient: Mapping[str, bytes] | None = None,
    nonce: bytes | None = None,
    timestamp_ns: int | None = None,
) -> tuple[str, bytes]:
    """The transaction id and the serialized (unsigned) ``Proposal``."""
    _require_name(channel_name, "channel name")
    _require_name(chaincode, "chaincode name")
    _require_name(function, "transaction function name")
    if any(not isinstance(arg, bytes) for arg in args):
        raise TypeError("proposal arguments must be bytes")
    if transient is not None and any(
        not isinstance(k, str) or not isinstance(v, bytes) for k, v in transient.items()
    ):
        raise TypeError("the transient map maps str keys to bytes values")
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    creator = identity.creator()
    tx_id = transaction_id(nonce, creator)
    now_ns = time.time_ns() if timestamp_ns is None else timestamp_ns

    chaincode_id = chaincode_pb2.ChaincodeID(name=chaincode)
    channel_header = common_pb2.ChannelHeader(
        type=common_pb2.HeaderType.ENDORSER_TRANSACTION,
        channel_id=channel_name,
        tx_id=tx_id,
        timestamp=timestamp_pb2.Timestamp(
            seconds=now_ns // 1_000_000_000, nanos=now_ns % 1_000_000_000
        ),
        epoch=0,
        extension=proposal_pb2.ChaincodeHeaderExtension(
            chaincode_id=chaincode_id
        ).SerializeToString(),
    )
    signature_header = common_pb2.SignatureHeader(creator=creator, nonce=nonce)
    invocation = chaincode_pb2.ChaincodeInvocationSpec(
        chaincode_spec=chaincode_pb2.ChaincodeSpec(
            type=chaincode_pb2.ChaincodeSpec.Type.NODE,  # what the official clients send
            chaincode_id=chaincode_id,
            input=chaincode_pb2.ChaincodeInput(args=[function.encode("utf-8"), *args]),
        )
    )
    payload = proposal_pb2.ChaincodeProposalPayload(
        input=invocation.SerializeToString(), TransientMap=dict(transient or {})
    )
    proposal = proposal_pb2.Proposal(
        header=common_pb2.Header(
            channel_header=channel_header.SerializeToString(),
            signature_header=signature_header.SerializeToString(),
        ).SerializeToString(),
        payload=payload.SerializeToString(),
    )
    return tx_id, proposal.SerializeToString()


def new_proposal(
    identity: Identity,
    signer: Signer,
    *,
    channel_name: str,
    chaincode: str,
    function: str,
    args: Sequence[bytes] = (),
    transient: Mapping[str, bytes] | None = None,
    endorsing_organizations: Sequence[str] = (),
    hash: Hash = sha256,
) -> Proposal:
    """Build a proposal and sign its exact serialized bytes."""
    tx_id, proposal_bytes = build_proposal(
        identity,
        channel_name=channel_name,
        chaincode=chaincode,
        function=function,
        args=args,
        transient=transient,
    )
    return Proposal(
        transaction_id=tx_id,
        channel_name=channel_name,
        chaincode=chaincode,
        function=function,
        proposal_bytes=proposal_bytes,
        signature=signer(hash(proposal_bytes)),
        endorsing_organizations=tuple(endorsing_organizations),
    )


def _require_name(value: object, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"a proposal needs a non-empty {what}")
