"""Chaincode events: a signed request, then a stream of events from committed blocks.

The gateway delivers the events of valid transactions only, block by block, starting at
the next block to commit unless a start block is given (to catch up after a restart).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
from fabric_protos.gateway import gateway_pb2
from fabric_protos.orderer import ab_pb2

from ._errors import ChaincodeEventsError, from_rpc_error
from ._identity import Hash, Identity, Signer, sha256
from ._stream import CallStream


@dataclass(frozen=True, slots=True)
class ChaincodeEvent:
    """One event set by a committed transaction (Fabric keeps one per transaction)."""

    block_number: int
    transaction_id: str
    chaincode: str
    event_name: str
    payload: bytes = field(repr=False)


def chaincode_events_request(
    identity: Identity,
    signer: Signer,
    *,
    channel_name: str,
    chaincode: str,
    start_block: int | None = None,
    after_transaction_id: str | None = None,
    hash: Hash = sha256,
) -> gateway_pb2.SignedChaincodeEventsRequest:
    if start_block is None:
        position = ab_pb2.SeekPosition(next_commit=ab_pb2.SeekNextCommit())
    else:
        if isinstance(start_block, bool) or not isinstance(start_block, int) or start_block < 0:
            raise ValueError(f"start_block must be a block number >= 0, not {start_block!r}")
        position = ab_pb2.SeekPosition(specified=ab_pb2.SeekSpecified(number=start_block))
    request = gateway_pb2.ChaincodeEventsRequest(
        channel_id=channel_name,
        chaincode_id=chaincode,
        identity=identity.creator(),
        start_position=position,
        after_transaction_id=after_transaction_id or "",
    ).SerializeToString()
    return gateway_pb2.SignedChaincodeEventsRequest(
        request=request, signature=signer(hash(request))
    )


class ChaincodeEventStream(CallStream[ChaincodeEvent]):
    """Iterate over :class:`ChaincodeEvent`; :meth:`close` (or leaving ``with``) ends it.

    Iteration blocks until the next event; it ends when the stream is closed or the call's
    timeout passes, and raises :class:`ChaincodeEventsError` if the gateway fails.
    """

    def _iterate(self) -> Iterator[ChaincodeEvent]:
        try:
            for response in self._call:  # type: ignore[attr-defined]
                for event in response.events:
                    yield ChaincodeEvent(
                        block_number=response.block_number,
                        transaction_id=event.tx_id,
                        chaincode=event.chaincode_id,
                        event_name=event.event_name,
                        payload=event.payload,
                    )
        except grpc.RpcError as exc:
            if self._closed and exc.code() is grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
                return
            if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
                return
            raise from_rpc_error(ChaincodeEventsError, exc, None) from None
