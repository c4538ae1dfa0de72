"""Fabric client exceptions: one per stage of a transaction, each naming the transaction.

The tree::

    LedgerError (ledger)
    └── FabricError              a Fabric Gateway call failed (transaction_id, code, details)
        ├── EvaluateError        Evaluate: the query was refused or the chaincode failed
        ├── EndorseError         Endorse: no endorsement (bad signature, chaincode error...)
        ├── SubmitError          Submit: the ordering service did not accept the transaction
        ├── CommitStatusError    CommitStatus: the commit status could not be obtained
        ├── CommitError          committed, but marked invalid (validation_code, block_number)
        ├── ChaincodeEventsError the chaincode event stream failed
        └── DeliverError         Deliver: blocks could not be read (status, block_number)

Everything but :class:`CommitError` wraps a gRPC error: ``code`` is its
:class:`grpc.StatusCode`, ``status_message`` its message and ``details`` the per-endorser
(or per-orderer) :class:`ErrorDetail` entries the gateway attaches in the
``grpc-status-details-bin`` trailer, which is where the actual reason usually is ("chaincode
response 500, ..."). A :class:`CommitError` is not a gRPC error: the gateway answered
normally with an invalid validation code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

import grpc
from fabric_protos.gateway import gateway_pb2
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from ledger._errors import LedgerError

log = logging.getLogger(__name__)

#: The trailer carrying a serialized ``google.rpc.Status`` with the error details.
STATUS_DETAILS_KEY = "grpc-status-details-bin"
_ERROR_DETAIL_TYPE = "gateway.ErrorDetail"


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    """What one endorsing peer or orderer said: its address, organisation and message."""

    address: str
    msp_id: str
    message: str

    def __str__(self) -> str:
        return f"{self.address} ({self.msp_id}): {self.message}"


class FabricError(LedgerError):
    """A Fabric Gateway operation failed; root of the Fabric client's errors."""

    stage = "fabric gateway call"

    def __init__(
        self,
        message: str,
        *,
        transaction_id: str | None = None,
        code: grpc.StatusCode | None = None,
        details: Iterable[ErrorDetail] = (),
    ):
        self.transaction_id = transaction_id
        self.code = code
        self.status_message = message
        self.details = tuple(details)
        text = self.stage
        if transaction_id:
            text += f" of transaction {transaction_id}"
        text += " failed: "
        if code is not None:
            text += f"{code.name}: "
        text += message
        if self.details:
            text += "; " + "; ".join(str(d) for d in self.details)
        super().__init__(text)


class EvaluateError(FabricError):
    stage = "evaluate"


class EndorseError(FabricError):
    stage = "endorse"


class SubmitError(FabricError):
    stage = "submit"


class CommitStatusError(FabricError):
    stage = "commit status"


class ChaincodeEventsError(FabricError):
    stage = "chaincode events"


class CommitError(FabricError):
    """The transaction was ordered and committed, but the peers marked it invalid.

    ``validation_code`` is the ``TxValidationCode`` name (``MVCC_READ_CONFLICT``,
    ``ENDORSEMENT_POLICY_FAILURE``...); nothing it wrote reached the world state.
    """

    stage = "commit"

    def __init__(self, *, transaction_id: str, validation_code: str, block_number: int):
        self.validation_code = validation_code
        self.block_number = block_number
        super().__init__(
            f"committed as invalid in block {block_number}: {validation_code}",
            transaction_id=transaction_id,
        )


class DeliverError(FabricError):
    """The peer's Deliver service refused the block request or the stream broke off.

    ``status`` is the ``common.Status`` name when the peer answered with one (``FORBIDDEN``:
    the identity may not read the channel, ``NOT_FOUND``: no such channel or block) and
    ``block_number`` the block the stream was waiting for, if known.
    """

    stage = "deliver"

    def __init__(
        self,
        message: str,
        *,
        status: str | None = None,
        block_number: int | None = None,
        code: grpc.StatusCode | None = None,
        details: Iterable[ErrorDetail] = (),
    ):
        self.status = status
        self.block_number = block_number
        if block_number is not None:
            message = f"at block {block_number}: {message}"
        super().__init__(message, code=code, details=details)


E = TypeVar("E", bound=FabricError)


def from_rpc_error(error_type: type[E], exc: grpc.RpcError, transaction_id: str | None) -> E:
    """Wrap a failed gRPC call, with the error details from its trailer."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    message = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
    trailer = exc.trailing_metadata() if isinstance(exc, grpc.Call) else None
    return error_type(
        message, transaction_id=transaction_id, code=code, details=error_details(trailer)
    )


def error_details(trailing_metadata: Any) -> tuple[ErrorDetail, ...]:
    """The ``gateway.ErrorDetail`` entries of a ``grpc-status-details-bin`` trailer.

    Parsed without grpcio-status (whose pins fight ``hyperledger-fabric-protos``'s
    protobuf < 6); a malformed trailer yields no details rather than hiding the error.
    """
    found: list[ErrorDetail] = []
    for key, value in trailing_metadata or ():
        if key != STATUS_DETAILS_KEY:
            continue
        try:
            status = _status_type().FromString(value)
            for item in status.details:
                if item.type_url.rsplit("/", 1)[-1] != _ERROR_DETAIL_TYPE:
                    continue
                detail = gateway_pb2.ErrorDetail.FromString(item.value)
                found.append(ErrorDetail(detail.address, detail.msp_id, detail.message))
        except (DecodeError, TypeError):
            log.warning("ignoring a malformed %s trailer", STATUS_DETAILS_KEY)
    return tuple(found)


@cache
def _status_type() -> Any:
    """``google.rpc.Status``, defined in a private descriptor pool.

    googleapis-common-protos is not a dependency; a private pool keeps this definition from
    clashing with it if it is installed.
    """
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(any_pb2.DESCRIPTOR.serialized_pb)
    file = descriptor_pb2.FileDescriptorProto(
        name="fedledger/google/rpc/status.proto",
        package="google.rpc",
        syntax="proto3",
        dependency=["google/protobuf/any.proto"],
    )
    message = file.message_type.add(name="Status")
    field = descriptor_pb2.FieldDescriptorProto
    message.field.add(name="code", number=1, type=field.TYPE_INT32, label=field.LABEL_OPTIONAL)
    message.field.add(name="message", number=2, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    message.field.add(
        name="details",
        number=3,
        type=field.TYPE_MESSAGE,
        type_name=".google.protobuf.Any",
        label=field.LABEL_REPEATED,
    )
    pool.AddSerializedFile(file.SerializeToString())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.Status"))
