"""An in-process Fabric peer Gateway service that checks what a real peer checks.

It implements ``gateway.Gateway`` over gRPC on a loopback port and, like a Fabric 2.5
peer, refuses what is not properly formed and signed:

- proposals: ``SignedProposal`` -> ``Proposal`` -> ``Header`` (``ChannelHeader`` of type
  ``ENDORSER_TRANSACTION``, served channel, a timestamp, epoch 0, a
  ``ChaincodeHeaderExtension`` naming the served chaincode; ``SignatureHeader`` with nonce
  and creator) -> ``ChaincodeProposalPayload`` -> ``ChaincodeInvocationSpec`` for the same
  chaincode; the creator is a ``SerializedIdentity`` whose certificate was issued by the
  trusted CA of its MSP id and is valid now; the signature is ECDSA P-256 / SHA-256 over
  the exact proposal bytes and low-S ("access denied" otherwise, as on a peer); the
  transaction id is hex SHA-256(nonce + creator); a committed transaction id is refused;
- the chaincode is the real :class:`ledger._contract.FedLedgerContract` (plus optional
  extra functions), run in a :class:`MemoryContext` at the proposal's timestamp, with every
  argument decoded from JSON and the result encoded as canonical JSON;
- the prepared transaction is assembled as ``protoutil.CreateSignedTx`` does: the proposal's
  header bytes, a ``ChaincodeAction`` (read/write set, event, response) inside a
  ``ProposalResponsePayload`` with the proposal hash, endorsed by the peer's own key, and
  the proposal payload without its transient map;
- Submit: the envelope must be signed (low-S) by its creator and carry, byte for byte,
  the payload Endorse returned; ordering and commit run on a separate thread, in order, and
  validation finds MVCC conflicts through :meth:`MemoryWorldState.commit` (or the code the
  test forces);
- CommitStatus and ChaincodeEvents requests must be signed by a trusted identity;
  CommitStatus waits for the commit; events are streamed per block, valid transactions only;
- blocks are real ``common.Block`` messages, one transaction each, after a genesis block
  holding a config envelope: the header's ``data_hash`` is SHA-256 of the envelopes and
  ``previous_hash`` the SHA-256 of the previous header's ASN.1 DER encoding (both computed
  here, independently of the verifier's code), the metadata has Fabric's five entries with
  the ``TRANSACTIONS_FILTER`` validation codes, the data is the envelope the client
  submitted, and read versions are Fabric's (block, transaction) of the key's last write;
- Deliver (``protos.Deliver``) serves them to a trusted signed ``DELIVER_SEEK_INFO``
  envelope (``FORBIDDEN`` otherwise, ``NOT_FOUND`` past the end with ``FAIL_IF_NOT_READY``),
  one ``DeliverResponse`` per block, then ``SUCCESS``.

Refusals come back as a real gateway sends them: gRPC ``ABORTED`` with one
``gateway.ErrorDetail`` per endorser (or orderer) in the ``grpc-status-details-bin``
trailer. The trailer's ``google.rpc.Status`` is encoded by hand here, so the client's
parser is checked against an independent encoder.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import queue
import threading
from collections import namedtuple
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from fabric_protos.common import common_pb2, configtx_pb2
from fabric_protos.gateway import gateway_pb2, gateway_pb2_grpc
from fabric_protos.ledger.rwset import rwset_pb2
from fabric_protos.ledger.rwset.kvrwset import kv_rwset_pb2
from fabric_protos.msp import identities_pb2
from fabric_protos.orderer import ab_pb2
from fabric_protos.peer import (
    chaincode_event_pb2,
    chaincode_pb2,
    events_pb2,
    events_pb2_grpc,
    proposal_pb2,
    proposal_response_pb2,
    transaction_pb2,
)
from google.protobuf.message import DecodeError

from fedcore import canonical_json
from ledger._context import Identity as TxIdentity
from ledger._context import MemoryContext, MemoryWorldState, MVCCConflictError
from ledger._contract import ContractError, FedLedgerContract

from .pki import ATTRS_OID, ROLE_ATTRIBUTE, Member

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", 100 << 20),
    ("grpc.max_receive_message_length", 100 << 20),
]
ORDERER_ADDRESS = "orderer.example.com:7050"
ORDERER_MSP = "OrdererMSP"
VALID = transaction_pb2.TxValidationCode.Value("VALID")


# ---------------------------------------------------------------------------- wire helpers


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def status_details(code: grpc.StatusCode, message: str, details: list[Any]) -> bytes:
    """A serialized ``google.rpc.Status`` whose details are ``gateway.ErrorDetail`` Anys."""
    out = _varint(1 << 3 | 0) + _varint(code.value[0]) + _field(2, message.encode())
    for detail in details:
        any_ = _field(1, b"type.googleapis.com/gateway.ErrorDetail") + _field(
            2, detail.SerializeToString()
        )
        out += _field(3, any_)
    return out


class _Status(namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    pass


class Refused(Exception):
    """An endorser refused the proposal; the message goes into its ErrorDetail."""


def verify_signature(cert: x509.Certificate, signature: bytes, data: bytes) -> bool:
    """ECDSA P-256 / SHA-256, DER, and low-S only: what Fabric's BCCSP accepts."""
    try:
        _, s = decode_dss_signature(signature)
    except ValueError:
        return False
    if s > P256_ORDER // 2:
        return False
    try:
        cert.public_key().verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, TypeError, ValueError):
        return False
    return True


@dataclass
class Unpacked:
    """A proposal that passed the peer's checks."""

    tx_id: str
    channel_header: common_pb2.ChannelHeader
    header: common_pb2.Header
    payload: proposal_pb2.ChaincodeProposalPayload
    creator: bytes
    who: TxIdentity
    function: str
    args: list[bytes]


@dataclass
class Endorsed:
    payload: bytes
    ctx: MemoryContext


@dataclass
class Block:
    number: int
    txs: list[tuple[str, int, tuple[str, bytes] | None]] = field(default_factory=list)
    #: The ``common.Block`` Deliver serves.
    proto: common_pb2.Block | None = None


def header_der(header: common_pb2.BlockHeader) -> bytes:
    """The DER ``SEQUENCE {INTEGER, OCTET STRING, OCTET STRING}`` of a header."""

    def tlv(tag: int, body: bytes) -> bytes:
        n = len(body)
        if n < 128:
            size = bytes([n])
        elif n < 256:
            size = bytes([0x81, n])
        else:
            size = bytes([0x82]) + n.to_bytes(2, "big")
        return bytes([tag]) + size + body

    number = header.number.to_bytes(9, "big", signed=True).lstrip(b"\x00")
    if not number or number[0] & 0x80:
        number = b"\x00" + number
    body = tlv(2, number) + tlv(4, header.previous_hash) + tlv(4, header.data_hash)
    return tlv(0x30, body)


def header_hash(header: common_pb2.BlockHeader) -> bytes:
    """SHA-256 of the header's DER (Fabric's ``BlockHeaderHash``)."""
    return hashlib.sha256(header_der(header)).digest()


def make_block(
    number: int,
    previous: common_pb2.Block | None,
    envelopes: list[bytes],
    codes: list[int],
    orderer: Member | None = None,
) -> common_pb2.Block:
    """A block as a Fabric 2.x orderer and committer leave it; ``orderer`` signs it the way
    a Raft orderer does (over metadata value, signature header and header DER)."""
    last_config = common_pb2.LastConfig(index=0).SerializeToString()
    metadata = [b""] * len(common_pb2.BlockMetadataIndex.keys())
    metadata[common_pb2.BlockMetadataIndex.Value("LAST_CONFIG")] = common_pb2.Metadata(
        value=last_config
    ).SerializeToString()
    metadata[common_pb2.BlockMetadataIndex.Value("TRANSACTIONS_FILTER")] = bytes(codes)
    header = common_pb2.BlockHeader(
        number=number,
        previous_hash=b"" if previous is None else header_hash(previous.header),
        data_hash=hashlib.sha256(b"".join(envelopes)).digest(),
    )
    signatures = common_pb2.Metadata(value=last_config)
    if orderer is not None:
        signature_header = common_pb2.SignatureHeader(
            creator=identities_pb2.SerializedIdentity(
                mspid=orderer.msp_id, id_bytes=orderer.cert_pem
            ).SerializeToString(),
            nonce=os.urandom(24),
        ).SerializeToString()
        signed = last_config + signature_header + header_der(header)
        signatures.signatures.add(
            signature_header=signature_header,
            signature=orderer.signer(hashlib.sha256(signed).digest()),
        )
    metadata[common_pb2.BlockMetadataIndex.Value("SIGNATURES")] = signatures.SerializeToString()
    return common_pb2.Block(
        header=header,
        data=common_pb2.BlockData(data=envelopes),
        metadata=common_pb2.BlockMetadata(metadata=metadata),
    )


def genesis_block(channel: str) -> common_pb2.Block:
    header = common_pb2.ChannelHeader(
        type=common_pb2.HeaderType.CONFIG, channel_id=channel, epoch=0
    )
    header.timestamp.GetCurrentTime()
    envelope = common_pb2.Envelope(
        payload=common_pb2.Payload(
            header=common_pb2.Header(channel_header=header.SerializeToString()),
            data=configtx_pb2.ConfigEnvelope(config=configtx_pb2.Config()).SerializeToString(),
        ).SerializeToString()
    )
    return make_block(0, None, [envelope.SerializeToString()], [VALID])


class FakePeer(gateway_pb2_grpc.GatewayServicer, events_pb2_grpc.DeliverServicer):
    """One peer of ``msp_id`` serving ``chaincode`` on ``channel``; see the module docstring."""

    def __init__(
        self,
        *,
        channel: str,
        chaincode: str,
        peer: Member,
        trusted: dict[str, x509.Certificate],
        address: str = "peer0.org1.example.com:7051",
        extra_functions: dict[str, Callable[..., Any]] | None = None,
        orderer: Member | None = None,
    ):
        self.channel = channel
        self.chaincode = chaincode
        self.peer = peer
        self.trusted = trusted
        self.address = address
        #: The ordering service member that signs each new block (None: unsigned blocks).
        self.orderer = orderer
        self.functions = {n: fn for n, (fn, _) in FedLedgerContract.transactions().items()}
        self.functions.update(extra_functions or {})
        self.world = MemoryWorldState()
        self._cond = threading.Condition()
        self._endorsed: dict[str, Endorsed] = {}
        self._status: dict[str, tuple[int, int]] = {}
        self._blocks: list[Block] = [Block(0, proto=genesis_block(channel))]
        #: Fabric's version of each commit of ``world``: (block number, transaction index).
        self._versions: dict[int, tuple[int, int]] = {}
        self._orderer: queue.Queue[tuple[str, Endorsed] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._order, name="fake-orderer", daemon=True)
        self._thread.start()
        #: Validation codes the next commits get instead of their own (a test's lever).
        self.forced_codes: list[str] = []
        #: What the peer received, for tests to inspect.
        self.endorse_requests: list[gateway_pb2.EndorseRequest] = []
        self.transient_keys: list[list[str]] = []
        self.submitted: list[str] = []
        #: Set once an event stream knows its start block (tests wait for it, then commit).
        self.events_listening = threading.Event()

    def stop(self) -> None:
        self._orderer.put(None)
        self._thread.join(timeout=5)

    @property
    def height(self) -> int:
        with self._cond:
            return len(self._blocks)

    # ------------------------------------------------------------------ identities

    def _identity(self, creator: bytes, channel: str) -> tuple[x509.Certificate, TxIdentity]:
        """The certificate and contract identity of a creator, or Refused (access denied)."""
        malformed = f"access denied: channel [{channel}] creator org unknown, creator is malformed"
        try:
            serialized = identities_pb2.SerializedIdentity.FromString(creator)
            cert = x509.load_pem_x509_certificate(serialized.id_bytes)
        except (DecodeError, ValueError):
            raise Refused(malformed) from None
        denied = f"access denied: channel [{channel}] creator org [{serialized.mspid}]"
        ca = self.trusted.get(serialized.mspid)
        if ca is None:
            raise Refused(denied)
        try:
            cert.verify_directly_issued_by(ca)
        except (InvalidSignature, TypeError, ValueError):
            raise Refused(denied) from None
        now = dt.datetime.now(dt.timezone.utc)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise Refused(denied)
        common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        role = ""
        try:
            attrs = cert.extensions.get_extension_for_oid(ATTRS_OID).value
            role = json.loads(attrs.value)["attrs"].get(ROLE_ATTRIBUTE, "")
        except x509.ExtensionNotFound:
            pass
        subject = str(common_names[0].value) if common_names else ""
        return cert, TxIdentity(serialized.mspid, subject, role)

    def _check_signed(
        self, data: bytes, signature: bytes, creator: bytes, channel: str, context
    ) -> None:
        """A signed request (CommitStatus, events): a trusted identity, a valid signature."""
        try:
            cert, _ = self._identity(creator, channel)
        except Refused as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        if not verify_signature(cert, signature, data):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "request signature is not valid")

    # ------------------------------------------------------------------ proposals

    def _unpack(self, signed: proposal_pb2.SignedProposal, request_channel: str, context):
        """Parse and check a proposal as gateway and endorser do; abort or return it."""
        try:
            proposal = proposal_pb2.Proposal.FromString(signed.proposal_bytes)
            header = common_pb2.Header.FromString(proposal.header)
            channel_header = common_pb2.ChannelHeader.FromString(header.channel_header)
            signature_header = common_pb2.SignatureHeader.FromString(header.signature_header)
            extension = proposal_pb2.ChaincodeHeaderExtension.FromString(channel_header.extension)
            payload = proposal_pb2.ChaincodeProposalPayload.FromString(proposal.payload)
            spec = chaincode_pb2.ChaincodeInvocationSpec.FromString(payload.input).chaincode_spec
        except DecodeError as exc:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"failed to unpack transaction proposal: {exc}"
            )
        channel = channel_header.channel_id
        if request_channel != channel:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request channel {request_channel!r} is not the proposal's {channel!r}",
            )
        if channel != self.channel:
            context.abort(grpc.StatusCode.NOT_FOUND, f"channel '{channel}' not found")
        try:
            return self._endorser_checks(
                channel_header, header, signature_header, extension, payload, spec, signed
            )
        except Refused as exc:
            return exc

    def _endorser_checks(
        self, channel_header, header, signature_header, extension, payload, spec, signed
    ) -> Unpacked:
        channel = channel_header.channel_id
        if channel_header.type != common_pb2.HeaderType.ENDORSER_TRANSACTION:
            raise Refused(f"invalid header type {channel_header.type}")
        if channel_header.epoch != 0 or not channel_header.HasField("timestamp"):
            raise Refused("invalid channel header: epoch must be 0 and a timestamp is required")
        if not signature_header.nonce or not signature_header.creator:
            raise Refused("invalid signature header: nonce and creator are required")
        cert, who = self._identity(signature_header.creator, channel)
        if not verify_signature(cert, signed.signature, signed.proposal_bytes):
            raise Refused(f"access denied: channel [{channel}] creator org [{who.msp_id}]")
        expected = hashlib.sha256(signature_header.nonce + signature_header.creator).hexdigest()
        if channel_header.tx_id != expected:
            raise Refused(f"invalid txid. got [{channel_header.tx_id}], expected [{expected}]")
        with self._cond:
            if channel_header.tx_id in self._status:
                raise Refused(f"duplicate transaction found [{channel_header.tx_id}]")
        name = extension.chaincode_id.name
        if name != self.chaincode:
            raise Refused(
                f"make sure the chaincode {name} has been successfully defined on channel"
                f" {channel} and try again: chaincode {name} not found"
            )
        if spec.chaincode_id.name != name:
            raise Refused("chaincode name in the invocation spec differs from the header's")
        if not spec.input.args:
            raise Refused("chaincode input has no function name")
        return Unpacked(
            tx_id=channel_header.tx_id,
            channel_header=channel_header,
            header=header,
            payload=payload,
            creator=signature_header.creator,
            who=who,
            function=spec.input.args[0].decode("utf-8", "replace"),
            args=list(spec.input.args[1:]),
        )

    def _execute(self, u: Unpacked) -> tuple[proposal_response_pb2.Response, MemoryContext]:
        ts = u.channel_header.timestamp
        ctx = self.world.context(
            tx_id=u.tx_id, timestamp=ts.seconds + ts.nanos / 1e9, creator=u.who
        )
        fn = self.functions.get(u.function)
        if fn is None:
            return _error_response(f"Invalid function {u.function} passed"), ctx
        try:
            args = [json.loads(arg.decode("utf-8")) for arg in u.args]
        except (UnicodeDecodeError, ValueError) as exc:
            return _error_response(f"argument is not JSON text: {exc}"), ctx
        try:
            result = fn(ctx, *args)
        except ContractError as exc:
            return _error_response(str(exc)), ctx
        except Exception as exc:  # a chaincode returns errors, it does not crash the peer
            return _error_response(f"{type(exc).__name__}: {exc}"), ctx
        payload = b"" if result is None else canonical_json(result)
        return proposal_response_pb2.Response(status=200, payload=payload), ctx

    def _abort_refused(self, context, message: str, what: str) -> None:
        detail = gateway_pb2.ErrorDetail(
            address=self.address, msp_id=self.peer.msp_id, message=message
        )
        _abort_with_details(
            context,
            grpc.StatusCode.ABORTED,
            f"failed to {what} transaction, see attached details for more info",
            [detail],
        )

    # ------------------------------------------------------------------ Gateway service

    def Evaluate(self, request, context):
        u = self._unpack(request.proposed_transaction, request.channel_id, context)
        if isinstance(u, Refused):
            self._abort_refused(context, str(u), "evaluate")
        response, _ = self._execute(u)
        if response.status >= 400:
            self._abort_refused(
                context, f"chaincode response {response.status}, {response.message}", "evaluate"
            )
        return gateway_pb2.EvaluateResponse(result=response)

    def Endorse(self, request, context):
        self.endorse_requests.append(request)
        u = self._unpack(request.proposed_transaction, request.channel_id, context)
        if isinstance(u, Refused):
            self._abort_refused(context, str(u), "endorse")
        if request.transaction_id != u.tx_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "transaction id does not match")
        self.transient_keys.append(sorted(u.payload.TransientMap))
        response, ctx = self._execute(u)
        if response.status >= 400:
            self._abort_refused(
                context, f"chaincode response {response.status}, {response.message}", "endorse"
            )
        payload = self._prepared_payload(u, response, ctx)
        with self._cond:
            self._endorsed[u.tx_id] = Endorsed(payload, ctx)
        # The peer returns it unsigned; the client signs the payload.
        return gateway_pb2.EndorseResponse(
            prepared_transaction=common_pb2.Envelope(payload=payload)
        )

    def _prepared_payload(
        self, u: Unpacked, response: proposal_response_pb2.Response, ctx: MemoryContext
    ) -> bytes:
        kv = kv_rwset_pb2.KVRWSet()
        for key, version in sorted(ctx.read_set.items()):
            read = kv.reads.add(key=key)
            if version is not None:
                read.version.block_num, read.version.tx_num = self._versions[version]
        for key, value in sorted(ctx.write_set.items()):
            kv.writes.add(key=key, value=value)
        results = rwset_pb2.TxReadWriteSet(
            data_model=rwset_pb2.TxReadWriteSet.DataModel.KV,
            ns_rwset=[
                rwset_pb2.NsReadWriteSet(namespace=self.chaincode, rwset=kv.SerializeToString())
            ],
        )
        event = b""
        if ctx.event is not None:
            event = chaincode_event_pb2.ChaincodeEvent(
                chaincode_id=self.chaincode,
                tx_id=u.tx_id,
                event_name=ctx.event[0],
                payload=ctx.event[1],
            ).SerializeToString()
        action = proposal_pb2.ChaincodeAction(
            results=results.SerializeToString(),
            events=event,
            response=response,
            chaincode_id=chaincode_pb2.ChaincodeID(name=self.chaincode, version="1.0"),
        )
        # The transient map never leaves the endorsers.
        payload_bytes = proposal_pb2.ChaincodeProposalPayload(
            input=u.payload.input
        ).SerializeToString()
        proposal_hash = hashlib.sha256(
            u.header.channel_header + u.header.signature_header + payload_bytes
        ).digest()
        response_payload = proposal_response_pb2.ProposalResponsePayload(
            proposal_hash=proposal_hash, extension=action.SerializeToString()
        ).SerializeToString()
        endorser = self.peer.identity.creator()
        endorsement = proposal_response_pb2.Endorsement(
            endorser=endorser,
            signature=self.peer.key.sign(response_payload + endorser, ec.ECDSA(hashes.SHA256())),
        )
        action_payload = transaction_pb2.ChaincodeActionPayload(
            chaincode_proposal_payload=payload_bytes,
            action=transaction_pb2.ChaincodeEndorsedAction(
                proposal_response_payload=response_payload, endorsements=[endorsement]
            ),
        )
        transaction = transaction_pb2.Transaction(
            actions=[
                transaction_pb2.TransactionAction(
                    header=u.header.signature_header, payload=action_payload.SerializeToString()
                )
            ]
        )
        return common_pb2.Payload(
            header=common_pb2.Header(
                channel_header=u.header.channel_header,
                signature_header=u.header.signature_header,
            ),
            data=transaction.SerializeToString(),
        ).SerializeToString()

    def Submit(self, request, context):
        if request.channel_id != self.channel:
            context.abort(grpc.StatusCode.NOT_FOUND, f"channel '{request.channel_id}' not found")
        envelope = request.prepared_transaction
        if not envelope.signature:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prepared transaction must be signed")
        try:
            payload = common_pb2.Payload.FromString(envelope.payload)
            channel_header = common_pb2.ChannelHeader.FromString(payload.header.channel_header)
            signature_header = common_pb2.SignatureHeader.FromString(
                payload.header.signature_header
            )
        except DecodeError as exc:
            self._abort_orderer(context, f"BAD_REQUEST, info=malformed envelope: {exc}")
        if channel_header.tx_id != request.transaction_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "transaction id does not match")
        try:
            cert, _ = self._identity(signature_header.creator, channel_header.channel_id)
        except Refused:
            cert = None
        if cert is None or not verify_signature(cert, envelope.signature, envelope.payload):
            self._abort_orderer(
                context,
                "FORBIDDEN, info=implicit policy evaluation failed - 0 sub-policies were"
                " satisfied, but this policy requires 1 of the 'Writers' sub-policies",
            )
        with self._cond:
            endorsed = self._endorsed.get(request.transaction_id)
        if endorsed is None:
            self._abort_orderer(context, "BAD_REQUEST, info=transaction was never endorsed")
        if envelope.payload != endorsed.payload:
            self._abort_orderer(
                context, "BAD_REQUEST, info=payload differs from the endorsed transaction"
            )
        self.submitted.append(request.transaction_id)
        self._orderer.put((request.transaction_id, endorsed, envelope.SerializeToString()))
        return gateway_pb2.SubmitResponse()

    def _abort_orderer(self, context, status: str) -> None:
        detail = gateway_pb2.ErrorDetail(
            address=ORDERER_ADDRESS,
            msp_id=ORDERER_MSP,
            message=f"received unsuccessful response from orderer: status={status}",
        )
        _abort_with_details(
            context, grpc.StatusCode.ABORTED, "failed to send transaction to orderer", [detail]
        )

    def CommitStatus(self, request, context):
        try:
            inner = gateway_pb2.CommitStatusRequest.FromString(request.request)
        except DecodeError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed commit status request")
        if inner.channel_id != self.channel:
            context.abort(grpc.StatusCode.NOT_FOUND, f"channel '{inner.channel_id}' not found")
        self._check_signed(
            request.request, request.signature, inner.identity, self.channel, context
        )
        with self._cond:
            while inner.transaction_id not in self._status and context.is_active():
                self._cond.wait(timeout=0.05)
            found = self._status.get(inner.transaction_id)
        if found is None:
            context.abort(grpc.StatusCode.CANCELLED, "client went away")
        code, block = found
        return gateway_pb2.CommitStatusResponse(result=code, block_number=block)

    def ChaincodeEvents(self, request, context):
        try:
            inner = gateway_pb2.ChaincodeEventsRequest.FromString(request.request)
        except DecodeError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed chaincode events request")
        if inner.channel_id != self.channel:
            context.abort(grpc.StatusCode.NOT_FOUND, f"channel '{inner.channel_id}' not found")
        self._check_signed(
            request.request, request.signature, inner.identity, self.channel, context
        )
        position = inner.start_position
        kind = position.WhichOneof("Type")
        with self._cond:
            next_block = position.specified.number if kind == "specified" else len(self._blocks)
        self.events_listening.set()
        after = inner.after_transaction_id or None
        first = True
        while context.is_active():
            with self._cond:
                if next_block >= len(self._blocks):
                    self._cond.wait(timeout=0.05)
                    continue
                block = self._blocks[next_block]
            next_block += 1
            txs = block.txs
            tx_ids = [tx_id for tx_id, _, _ in txs]
            if first and after in tx_ids:  # resume after a checkpointed transaction
                txs = txs[tx_ids.index(after) + 1 :]
            first = False
            events = [
                chaincode_event_pb2.ChaincodeEvent(
                    chaincode_id=self.chaincode, tx_id=tx_id, event_name=name, payload=payload
                )
                for tx_id, code, event in txs
                if code == VALID and event is not None
                for name, payload in (event,)
            ]
            if events and inner.chaincode_id == self.chaincode:
                yield gateway_pb2.ChaincodeEventsResponse(events=events, block_number=block.number)

    # ------------------------------------------------------------------ ordering and commit

    def _order(self) -> None:
        while (item := self._orderer.get()) is not None:
            tx_id, endorsed, envelope = item
            with self._cond:
                block = Block(len(self._blocks))
                self._versions[self.world.height + 1] = (block.number, 0)
                if tx_id in self._status:
                    code = transaction_pb2.TxValidationCode.Value("DUPLICATE_TXID")
                elif self.forced_codes:
                    code = transaction_pb2.TxValidationCode.Value(self.forced_codes.pop(0))
                else:
                    try:
                        self.world.commit(endorsed.ctx)
                        code = VALID
                    except MVCCConflictError as exc:
                        code = transaction_pb2.TxValidationCode.Value(exc.code)
                block.txs.append((tx_id, code, endorsed.ctx.event if code == VALID else None))
                block.proto = make_block(
                    block.number, self._blocks[-1].proto, [envelope], [code], self.orderer
                )
                self._blocks.append(block)
                self._status.setdefault(tx_id, (code, block.number))
                self._cond.notify_all()

    # ------------------------------------------------------------------ Deliver service

    def blocks(self) -> list[common_pb2.Block]:
        """Copies of the blocks Deliver serves."""
        with self._cond:
            return [_copy(b.proto) for b in self._blocks]

    def replace_block(self, number: int, block: common_pb2.Block) -> None:
        """Serve ``block`` as block ``number`` from now on (a test tampering with the chain)."""
        with self._cond:
            self._blocks[number].proto = _copy(block)

    def Deliver(self, request_iterator, context):
        for envelope in request_iterator:
            status = yield from self._seek(envelope, context)
            yield events_pb2.DeliverResponse(status=status)
            if status != common_pb2.Status.SUCCESS:
                return

    def _seek(self, envelope: common_pb2.Envelope, context) -> Iterator[Any]:
        """Yield the blocks an envelope asks for; return the status that ends them."""
        try:
            payload = common_pb2.Payload.FromString(envelope.payload)
            header = common_pb2.ChannelHeader.FromString(payload.header.channel_header)
            signature_header = common_pb2.SignatureHeader.FromString(
                payload.header.signature_header
            )
            seek = ab_pb2.SeekInfo.FromString(payload.data)
        except DecodeError:
            return common_pb2.Status.BAD_REQUEST
        if header.type != common_pb2.HeaderType.DELIVER_SEEK_INFO:
            return common_pb2.Status.BAD_REQUEST
        if header.channel_id != self.channel:
            return common_pb2.Status.NOT_FOUND
        try:
            cert, _ = self._identity(signature_header.creator, header.channel_id)
        except Refused:
            return common_pb2.Status.FORBIDDEN
        if not verify_signature(cert, envelope.signature, envelope.payload):
            return common_pb2.Status.FORBIDDEN
        with self._cond:
            newest = len(self._blocks) - 1
        positions = []
        for position in (seek.start, seek.stop):
            kind = position.WhichOneof("Type")
            positions.append(
                0 if kind == "oldest" else newest if kind == "newest" else position.specified.number
            )
        start, stop = positions
        if start > stop:
            return common_pb2.Status.BAD_REQUEST
        if stop > newest and seek.behavior == ab_pb2.SeekInfo.SeekBehavior.FAIL_IF_NOT_READY:
            return common_pb2.Status.NOT_FOUND
        for number in range(start, stop + 1):
            with self._cond:
                while number >= len(self._blocks) and context.is_active():
                    self._cond.wait(timeout=0.05)
                if not context.is_active():
                    return common_pb2.Status.SERVICE_UNAVAILABLE
                block = self._blocks[number].proto
            yield events_pb2.DeliverResponse(block=block)
        return common_pb2.Status.SUCCESS


def _copy(block: common_pb2.Block) -> common_pb2.Block:
    out = common_pb2.Block()
    out.CopyFrom(block)
    return out


def _error_response(message: str) -> proposal_response_pb2.Response:
    return proposal_response_pb2.Response(status=500, message=message)


def _abort_with_details(context, code: grpc.StatusCode, message: str, details: list) -> None:
    trailer = (("grpc-status-details-bin", status_details(code, message, details)),)
    context.abort_with_status(_Status(code, message, trailer))


class PeerServer:
    """Serves a :class:`FakePeer` on loopback: plain text, TLS, and mutual TLS ports."""

    def __init__(
        self,
        peer: FakePeer,
        *,
        tls: Member | None = None,
        client_ca: x509.Certificate | None = None,
    ):
        self.peer = peer
        self.executor = futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="fake-peer")
        self.server = grpc.server(self.executor, options=SERVER_OPTIONS)
        gateway_pb2_grpc.add_GatewayServicer_to_server(peer, self.server)
        events_pb2_grpc.add_DeliverServicer_to_server(peer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.tls_port = self.mtls_port = None
        if tls is not None:
            pair = [(tls.key_pem, tls.cert_pem)]
            self.tls_port = self.server.add_secure_port(
                "127.0.0.1:0", grpc.ssl_server_credentials(pair)
            )
            if client_ca is not None:
                ca = client_ca.public_bytes(serialization.Encoding.PEM)
                self.mtls_port = self.server.add_secure_port(
                    "127.0.0.1:0",
                    grpc.ssl_server_credentials(
                        pair, root_certificates=ca, require_client_auth=True
                    ),
                )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> PeerServer:
        self.server.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.stop(grace=None).wait(5)
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.peer.stop()
