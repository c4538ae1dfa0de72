"""A test acting as a Fabric peer on a chaincode server's ``Chaincode.Connect`` stream.

It speaks the shim protocol with the real protos: answers REGISTER with REGISTERED and
READY, sends TRANSACTION messages carrying a ``ChaincodeInput`` and a ``SignedProposal``
built as a Fabric client builds one (channel header with tx id, timestamp and chaincode id,
signature header with the creator's ``SerializedIdentity``), serves the chaincode's state
requests from a dict (its world state: reads see committed state only, writes are kept per
transaction and committed when the transaction completes with status 200), and hands back
the final COMPLETED or ERROR message.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fabric_protos.common import common_pb2
from fabric_protos.ledger.queryresult import kv_query_result_pb2
from fabric_protos.msp import identities_pb2
from fabric_protos.peer import (
    chaincode_pb2,
    chaincode_shim_pb2,
    proposal_pb2,
    proposal_response_pb2,
)
from fabric_protos.peer import chaincode_shim_pb2_grpc as shim_grpc

Msg = chaincode_shim_pb2.ChaincodeMessage
TYPE_NAMES = {number: name for name, number in Msg.Type.items()}
CHANNEL = "fedchannel"
CHAINCODE_NAME = "fedledger"
FABRIC_CA_ATTRS_OID = x509.ObjectIdentifier("1.2.3.4.5.6.7.8.1")
_CLOSE = object()


# ---------------------------------------------------------------------------- identities


@dataclass(frozen=True)
class TestIdentity:
    """An MSP identity: MSP id, X.509 certificate (PEM) and its EC P-256 key."""

    msp_id: str
    cert_pem: bytes
    key: ec.EllipticCurvePrivateKey

    def serialized(self) -> bytes:
        return identities_pb2.SerializedIdentity(
            mspid=self.msp_id, id_bytes=self.cert_pem
        ).SerializeToString()

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))


def make_certificate(
    common_name: str | None,
    *,
    ous: Sequence[str] = (),
    attrs: dict[str, str] | None = None,
    raw_attr_extension: bytes | None = None,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    is_ca: bool = False,
    san: Sequence[x509.GeneralName] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An EC P-256 certificate, self-signed unless ``issuer`` is given.

    ``ous`` go into the subject as OU attributes (Fabric NodeOUs); ``attrs`` into the
    Fabric CA attribute extension (OID 1.2.3.4.5.6.7.8.1, JSON ``{"attrs": {...}}``).
    """
    import json

    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedledger test")]
    names += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou) for ou in ous]
    if common_name is not None:
        names.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    subject = x509.Name(names)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    if attrs is not None or raw_attr_extension is not None:
        value = raw_attr_extension
        if value is None:
            value = json.dumps({"attrs": attrs}).encode()
        builder = builder.add_extension(
            x509.UnrecognizedExtension(FABRIC_CA_ATTRS_OID, value), critical=False
        )
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    return cert, key


def make_identity(msp_id: str, common_name: str, role: str | None = None, **kw) -> TestIdentity:
    """An identity carrying ``role`` as an OU (the NodeOU convention), like Fabric CA issues."""
    ous = list(kw.pop("ous", ["client"]))
    if role is not None:
        ous.append(role)
    cert, key = make_certificate(common_name, ous=ous, **kw)
    return TestIdentity(msp_id, cert.public_bytes(serialization.Encoding.PEM), key)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# ---------------------------------------------------------------------------- proposals


def signed_proposal(
    identity: TestIdentity,
    args: Sequence[bytes],
    *,
    timestamp: float,
    channel: str = CHANNEL,
    transient: dict[str, bytes] | None = None,
) -> tuple[str, proposal_pb2.SignedProposal]:
    """A proposal as a Fabric client builds it; returns ``(tx id, signed proposal)``."""
    creator = identity.serialized()
    nonce = os.urandom(24)
    tx_id = hashlib.sha256(nonce + creator).hexdigest()
    chaincode_id = chaincode_pb2.ChaincodeID(name=CHAINCODE_NAME)
    channel_header = common_pb2.ChannelHeader(
        type=common_pb2.ENDORSER_TRANSACTION,
        channel_id=channel,
        tx_id=tx_id,
        extension=proposal_pb2.ChaincodeHeaderExtension(
            chaincode_id=chaincode_id
        ).SerializeToString(),
    )
    channel_header.timestamp.seconds = int(timestamp)
    channel_header.timestamp.nanos = round((timestamp - int(timestamp)) * 1e9)
    header = common_pb2.Header(
        channel_header=channel_header.SerializeToString(),
        signature_header=common_pb2.SignatureHeader(
            creator=creator, nonce=nonce
        ).SerializeToString(),
    )
    spec = chaincode_pb2.ChaincodeInvocationSpec(
        chaincode_spec=chaincode_pb2.ChaincodeSpec(
            chaincode_id=chaincode_id, input=chaincode_pb2.ChaincodeInput(args=list(args))
        )
    )
    payload = proposal_pb2.ChaincodeProposalPayload(
        input=spec.SerializeToString(), TransientMap=transient or {}
    )
    proposal = proposal_pb2.Proposal(
        header=header.SerializeToString(), payload=payload.SerializeToString()
    ).SerializeToString()
    return tx_id, proposal_pb2.SignedProposal(
        proposal_bytes=proposal, signature=identity.sign(proposal)
    )


@dataclass
class TxResult:
    """The chaincode's final message for one transaction."""

    tx_id: str
    message: Msg
    elapsed: float
    response: proposal_response_pb2.Response | None = None

    @property
    def kind(self) -> str:
        return TYPE_NAMES[self.message.type]

    @property
    def status(self) -> int | None:
        return None if self.response is None else self.response.status

    @property
    def error(self) -> str:
        """The error text: the response message, or an ERROR message's payload."""
        if self.response is not None:
            return self.response.message
        return self.message.payload.decode("utf-8", "replace")

    def json(self):
        import json

        assert self.response is not None and self.response.status == 200, self.error
        return json.loads(self.response.payload)


@dataclass
class _Tx:
    future: Future
    started: float
    commit: bool
    writes: dict[str, bytes] = field(default_factory=dict)


# ---------------------------------------------------------------------------- the peer


class FakePeer:
    """The peer side of one ``Chaincode.Connect`` stream (a gRPC client, as a real peer is).

    ``page_size`` is how many results a range query returns per page, so the chaincode
    has to page with QUERY_STATE_NEXT and close with QUERY_STATE_CLOSE. ``hook(msg, name)``
    can answer any state request itself (return a message) to inject peer errors.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, object]] = (),
        page_size: int = 2,
        handshake: bool = True,
    ):
        opts = [
            ("grpc.max_send_message_length", 100 * 1024 * 1024),
            ("grpc.max_receive_message_length", 100 * 1024 * 1024),
            *options,
        ]
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=opts)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=opts)
        self.page_size = page_size
        self.world: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (tx id, message type) as received
        self.closed_queries: list[str] = []
        self.keepalives = 0
        self.max_in_flight = 0
        self.hook: Callable[[Msg, str], Msg | None] | None = None
        self.orphans: list[Msg] = []  # COMPLETED/ERROR for no transaction in flight
        self._txs: dict[str, _Tx] = {}
        self._queries: dict[str, list[kv_query_result_pb2.KV]] = {}
        self._query_seq = 0
        self._held: list[Msg] = []
        self._hold_until = 0
        self._lock = threading.Lock()
        self._outbox: queue.Queue = queue.Queue()
        self.stream_error: BaseException | None = None
        self._call = shim_grpc.ChaincodeStub(self._channel).Connect(iter(self._outbox.get, _CLOSE))
        self.registered_as: str | None = None
        if handshake:
            self.handshake()

    # ------------------------------------------------------------------ stream plumbing

    def handshake(self) -> None:
        first = next(self._call)
        assert first.type == Msg.REGISTER, TYPE_NAMES[first.type]
        self.registered_as = chaincode_pb2.ChaincodeID.FromString(first.payload).name
        self.send(Msg(type=Msg.REGISTERED))
        self.send(Msg(type=Msg.READY))
        self._reader = threading.Thread(target=self._read, name="fake-peer", daemon=True)
        self._reader.start()

    def send(self, msg: Msg) -> None:
        self._outbox.put(msg)

    def next_message(self) -> Msg:
        """Read one message directly (only before the handshake starts the reader)."""
        return next(self._call)

    def close(self) -> None:
        self._outbox.put(_CLOSE)
        self._call.cancel()
        self._channel.close()

    def __enter__(self) -> FakePeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> None:
        try:
            for msg in self._call:
                self._handle(msg)
        except grpc.RpcError as exc:
            self.stream_error = exc
        finally:
            with self._lock:
                txs = list(self._txs.values())
                self._txs.clear()
            for tx in txs:
                if not tx.future.done():
                    tx.future.set_exception(ConnectionError(f"stream ended: {self.stream_error}"))

    @staticmethod
    def reply(request: Msg, payload: bytes = b"", kind: int = Msg.RESPONSE) -> Msg:
        """The peer's answer to ``request`` (RESPONSE, or ERROR with ``kind``)."""
        return Msg(type=kind, payload=payload, txid=request.txid, channel_id=request.channel_id)

    def _reply(self, request: Msg, payload: bytes = b"", kind: int = Msg.RESPONSE) -> Msg:
        return Msg(type=kind, payload=payload, txid=request.txid, channel_id=request.channel_id)

    def _handle(self, msg: Msg) -> None:
        name = TYPE_NAMES.get(msg.type, str(msg.type))
        with self._lock:
            self.requests.append((msg.txid, name))
            tx = self._txs.get(msg.txid)
        if msg.type == Msg.KEEPALIVE:
            self.keepalives += 1
        elif msg.type in (Msg.COMPLETED, Msg.ERROR):
            if tx is None:
                self.orphans.append(msg)
            else:
                self._finish(msg, tx)
        elif tx is None:
            raise AssertionError(f"{name} for unknown transaction {msg.txid!r}")
        elif self.hook is not None and (reply := self.hook(msg, name)) is not None:
            self.send(reply)
        elif msg.type == Msg.GET_STATE:
            self._get_state(msg)
        elif msg.type == Msg.PUT_STATE:
            put = chaincode_shim_pb2.PutState.FromString(msg.payload)
            assert put.collection == ""
            tx.writes[put.key] = put.value
            self.send(self._reply(msg))
        elif msg.type == Msg.GET_STATE_BY_RANGE:
            query = chaincode_shim_pb2.GetStateByRange.FromString(msg.payload)
            keys = [
                k
                for k in sorted(self.world)
                if k >= query.startKey and (query.endKey == "" or k < query.endKey)
            ]
            results = [
                kv_query_result_pb2.KV(namespace=CHAINCODE_NAME, key=k, value=self.world[k])
                for k in keys
            ]
            with self._lock:
                self._query_seq += 1
                query_id = f"query-{self._query_seq}"
                self._queries[query_id] = results
            self.send(self._reply(msg, self._page(query_id)))
        elif msg.type == Msg.QUERY_STATE_NEXT:
            query_id = chaincode_shim_pb2.QueryStateNext.FromString(msg.payload).id
            if query_id not in self._queries:
                self.send(self._reply(msg, b"query iterator not found", Msg.ERROR))
            else:
                self.send(self._reply(msg, self._page(query_id)))
        elif msg.type == Msg.QUERY_STATE_CLOSE:
            query_id = chaincode_shim_pb2.QueryStateClose.FromString(msg.payload).id
            self._queries.pop(query_id, None)
            self.closed_queries.append(query_id)
            body = chaincode_shim_pb2.QueryResponse(has_more=False, id=query_id)
            self.send(self._reply(msg, body.SerializeToString()))
        else:
            self.send(self._reply(msg, f"peer cannot handle {name}".encode(), Msg.ERROR))

    def _page(self, query_id: str) -> bytes:
        remaining = self._queries[query_id]
        page, rest = remaining[: self.page_size], remaining[self.page_size :]
        self._queries[query_id] = rest
        return chaincode_shim_pb2.QueryResponse(
            results=[
                chaincode_shim_pb2.QueryResultBytes(resultBytes=kv.SerializeToString())
                for kv in page
            ],
            has_more=bool(rest),
            id=query_id,
        ).SerializeToString()

    def _get_state(self, msg: Msg) -> None:
        key = chaincode_shim_pb2.GetState.FromString(msg.payload).key
        reply = self._reply(msg, self.world.get(key, b""))
        with self._lock:
            if self._hold_until:
                # Hold each transaction's reads until enough transactions wait at once.
                self._held.append(reply)
                if len({m.txid for m in self._held}) < self._hold_until:
                    return
                held, self._held, self._hold_until = self._held, [], 0
            else:
                held = [reply]
        for m in held:
            self.send(m)

    def _finish(self, msg: Msg, tx: _Tx) -> None:
        response = None
        if msg.type == Msg.COMPLETED:
            response = proposal_response_pb2.Response.FromString(msg.payload)
            if tx.commit and response.status == 200:
                self.world.update(tx.writes)  # as if ordered and committed at once
        with self._lock:
            self._txs.pop(msg.txid, None)
        tx.future.set_result(TxResult(msg.txid, msg, time.perf_counter() - tx.started, response))

    # ------------------------------------------------------------------ transactions

    def hold_reads_until(self, n_transactions: int) -> None:
        """Answer no GET_STATE until ``n_transactions`` different transactions wait for one."""
        with self._lock:
            self._hold_until = n_transactions

    def start(
        self,
        identity: TestIdentity | None,
        function: str,
        *args: object,
        raw_args: Sequence[bytes] | None = None,
        timestamp: float = 1_700_000_000.25,
        transient: dict[str, bytes] | None = None,
        proposal: proposal_pb2.SignedProposal | None = None,
        tx_id: str | None = None,
        commit: bool = True,
        kind: int = Msg.TRANSACTION,
    ) -> tuple[str, Future]:
        """Send one TRANSACTION; returns its tx id and a future of its :class:`TxResult`."""
        import json

        if raw_args is None:
            raw_args = [function.encode()] + [json.dumps(a).encode() for a in args]
        if proposal is None and identity is not None:
            tx_id, proposal = signed_proposal(
                identity, raw_args, timestamp=timestamp, transient=transient
            )
        tx_id = tx_id or hashlib.sha256(os.urandom(16)).hexdigest()
        msg = Msg(
            type=kind,
            payload=chaincode_pb2.ChaincodeInput(args=list(raw_args)).SerializeToString(),
            txid=tx_id,
            channel_id=CHANNEL,
        )
        if proposal is not None:
            msg.proposal.CopyFrom(proposal)
        future: Future = Future()
        with self._lock:
            self._txs[tx_id] = _Tx(future, time.perf_counter(), commit)
            self.max_in_flight = max(self.max_in_flight, len(self._txs))
        self.send(msg)
        return tx_id, future

    def call(self, identity, function, *args, timeout: float = 20.0, **kw) -> TxResult:
        _, future = self.start(identity, function, *args, **kw)
        return future.result(timeout)
