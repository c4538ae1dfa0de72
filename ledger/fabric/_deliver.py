"""Blocks from a peer's Deliver service: a signed seek request, then a stream of blocks.

The request is what Fabric's ``protoutil.CreateSignedEnvelope`` builds for a block reader:
a ``common.Envelope`` whose payload has a ``ChannelHeader`` of type ``DELIVER_SEEK_INFO``
(channel, time, epoch 0, no transaction id), a ``SignatureHeader`` with the creator and a
fresh nonce, and as data an ``orderer.SeekInfo`` (start and stop position, behaviour
``FAIL_IF_NOT_READY``: a stop past the chain's end is an error, not a wait). The client
signs the exact payload bytes with the same identity and signer as its proposals; the
peer checks that the creator may read the channel (``/Channel/Readers``).

``protos.Deliver/Deliver`` answers with one ``DeliverResponse`` per block, then a status
(``SUCCESS`` once the stop block was sent). Peers that require mutual TLS also expect the
hash of the client's TLS certificate in the channel header; this client does not bind it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import grpc
from fabric_protos.common import common_pb2
from fabric_protos.orderer import ab_pb2
from google.protobuf import timestamp_pb2

from ._errors import DeliverError, FabricError, from_rpc_error
from ._identity import Hash, Identity, Signer, sha256
from ._proposal import NONCE_BYTES
from ._stream import CallStream

#: Seconds the whole block stream may take (a long chain takes a while to download).
DEFAULT_DELIVER_TIMEOUT = 300.0

_SUCCESS = common_pb2.Status.Value("SUCCESS")


def seek_envelope(
    identity: Identity,
    signer: Signer,
    *,
    channel_name: str,
    start: int | None = 0,
    stop: int | None = None,
    hash: Hash = sha256,
    nonce: bytes | None = None,
    timestamp_ns: int | None = None,
) -> common_pb2.Envelope:
    """A signed request for blocks ``start`` to ``stop`` (None: the newest at request time).

    ``start=None`` asks for the newest block only.
    """
    if not isinstance(channel_name, str) or not channel_name:
        raise ValueError("a block request needs a non-empty channel name")
    positions = []
    for name, value in (("start", start), ("stop", stop)):
        if value is None:
            positions.append(ab_pb2.SeekPosition(newest=ab_pb2.SeekNewest()))
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a block number >= 0, not {value!r}")
        else:
            positions.append(ab_pb2.SeekPosition(specified=ab_pb2.SeekSpecified(number=value)))
    if start is not None and stop is not None and stop < start:
        raise ValueError(f"stop block {stop} is before start block {start}")
    seek = ab_pb2.SeekInfo(
        start=positions[0],
        stop=positions[1],
        behavior=ab_pb2.SeekInfo.SeekBehavior.FAIL_IF_NOT_READY,
    )
    now_ns = time.time_ns() if timestamp_ns is None else timestamp_ns
    channel_header = common_pb2.ChannelHeader(
        type=common_pb2.HeaderType.DELIVER_SEEK_INFO,
        channel_id=channel_name,
        timestamp=timestamp_pb2.Timestamp(
            seconds=now_ns // 1_000_000_000, nanos=now_ns % 1_000_000_000
        ),
        epoch=0,
    )
    signature_header = common_pb2.SignatureHeader(
        creator=identity.creator(), nonce=os.urandom(NONCE_BYTES) if nonce is None else nonce
    )
    payload = common_pb2.Payload(
        header=common_pb2.Header(
            channel_header=channel_header.SerializeToString(),
            signature_header=signature_header.SerializeToString(),
        ),
        data=seek.SerializeToString(),
    ).SerializeToString()
    return common_pb2.Envelope(payload=payload, signature=signer(hash(payload)))


class BlockStream(CallStream[common_pb2.Block]):
    """Iterate over ``common.Block`` messages; :meth:`close` (or leaving ``with``) ends it.

    Raises :class:`DeliverError` when the call fails (unreachable peer, timeout, access
    denied) or the peer ends the stream with another status than ``SUCCESS``;
    ``block_number`` is then the block the stream was waiting for.
    """

    def __init__(self, call: grpc.Call, *, start: int | None = None):
        self._next = start
        super().__init__(call)

    def _iterate(self) -> Iterator[common_pb2.Block]:
        try:
            for response in self._call:  # type: ignore[attr-defined]
                kind = response.WhichOneof("Type")
                if kind == "block":
                    self._next = response.block.header.number + 1
                    yield response.block
                elif kind == "status":
                    if response.status != _SUCCESS:
                        raise DeliverError(
                            f"the peer answered {_status_name(response.status)}",
                            status=_status_name(response.status),
                            block_number=self._next,
                        )
                    return
                else:
                    raise DeliverError(
                        f"unexpected {kind or 'empty'} response", block_number=self._next
                    )
        except grpc.RpcError as exc:
            error = from_rpc_error(FabricError, exc, None)
            raise DeliverError(
                error.status_message,
                code=error.code,
                details=error.details,
                block_number=self._next,
            ) from None
        raise DeliverError("the stream ended without a status", block_number=self._next)


def _status_name(code: int) -> str:
    try:
        return common_pb2.Status.Name(code)
    except ValueError:
        return f"UNKNOWN_STATUS_{code}"
