"""Commit status: wait for a submitted transaction to commit, and check it is valid.

CommitStatus blocks until the transaction is in a committed block. A transaction that was
committed but marked invalid (endorsement policy failure, MVCC read conflict...) is not a
gRPC error: the reply carries the ``TxValidationCode``, so it must be checked.
The request is signed by the client, and names it with the same creator bytes as the
proposal: the gateway checks that the requester may read the channel.
"""

from __future__ import annotations

from dataclasses import dataclass

from fabric_protos.gateway import gateway_pb2
from fabric_protos.peer import transaction_pb2

from ._errors import CommitError
from ._identity import Hash, Identity, Signer, sha256

VALID = "VALID"


@dataclass(frozen=True, slots=True)
class CommitStatus:
    """How a transaction committed: ``validation_code`` is a ``TxValidationCode`` name."""

    transaction_id: str
    validation_code: str
    block_number: int

    @property
    def successful(self) -> bool:
        return self.validation_code == VALID

    def check(self) -> CommitStatus:
        """Return self if the transaction is valid, raise :class:`CommitError` if not."""
        if not self.successful:
            raise CommitError(
                transaction_id=self.transaction_id,
                validation_code=self.validation_code,
                block_number=self.block_number,
            )
        return self


def commit_status_request(
    identity: Identity,
    signer: Signer,
    *,
    channel_name: str,
    transaction_id: str,
    hash: Hash = sha256,
) -> gateway_pb2.SignedCommitStatusRequest:
    request = gateway_pb2.CommitStatusRequest(
        transaction_id=transaction_id, channel_id=channel_name, identity=identity.creator()
    ).SerializeToString()
    return gateway_pb2.SignedCommitStatusRequest(request=request, signature=signer(hash(request)))


def commit_status(transaction_id: str, response: gateway_pb2.CommitStatusResponse) -> CommitStatus:
    code = response.result
    try:
        name = transaction_pb2.TxValidationCode.Name(code)
    except ValueError:
        name = f"UNKNOWN_CODE_{code}"
    return CommitStatus(transaction_id, name, response.block_number)
