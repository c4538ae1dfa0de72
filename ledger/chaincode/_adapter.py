"""The one place where Hyperledger's Python shim meets the fedledger contract.

The contract (:class:`~ledger._contract.FedLedgerContract`) is plain synchronous Python over
a :class:`~ledger._context.TxContext`; ``fabric-chaincode-python`` 2.5.4 is an asyncio shim
with a stub whose state calls are coroutines. This module joins the two and works around
the shim's defects, so that neither the contract nor the server needs to know about them.

What is used from the shim, and what is not
-------------------------------------------
Used: the low-level ``Chaincode`` interface (``init``/``invoke`` with a stub, implemented by
:class:`FedLedgerChaincode`), and the ``ChaincodeStub`` (it decodes the signed proposal into
tx id, timestamp and creator, and turns ``get_state``/``put_state``/``get_state_by_range``
into shim messages, paging range queries with ``QUERY_STATE_NEXT``/``QUERY_STATE_CLOSE``).

Not used: the contract API (``Contract``/``ContractChaincode``: it decodes every argument as
UTF-8 text, dispatches by its own metadata and types, and would need the contract rewritten
as its subclass) and the stream ``Handler``/``ChaincodeService``/``start()``: their defects
sit in the very code paths every transaction takes, so :class:`_PeerSession` replaces them.
It implements the shim protocol as the Go shim does (REGISTER, then REGISTERED and READY
from the peer; TRANSACTION/INIT answered with COMPLETED or ERROR; state requests matched to
the peer's RESPONSE/ERROR by channel and tx id; KEEPALIVE echoed) and is the ``client`` the
shim's stub calls into.

Defects of fabric-chaincode-python 2.5.4 and where each is handled
------------------------------------------------------------------
- Concurrent transactions write to the gRPC stream at the same time, and grpc.aio refuses
  the overlapping writes (``GRPC_CALL_ERROR_TOO_MANY_OPERATIONS``): every write here goes
  through one :class:`asyncio.Lock` (:meth:`_PeerSession.send`).
- The server keeps gRPC's 4 MiB receive limit: :mod:`ledger.chaincode._server` builds its
  own server with :data:`MAX_MESSAGE_BYTES` both ways, as the Go and Java shims do.
- Every argument is decoded as UTF-8 (``get_function_and_parameters``), so a binary argument
  raises: the raw ``ChaincodeInput.args`` bytes are read instead, and each argument must be
  a JSON text; one that is not UTF-8 or not JSON is an ``invalid_argument`` error response
  naming the argument (binary data travels as base64 or hex inside JSON).
- An exception escaping the chaincode is only logged, no message goes back, and the peer
  waits for its execute timeout (30 s): here every failure becomes a response. A contract
  error is a status-500 response with the message ``"<code>: <text>"`` (``code`` one of
  the contract's codes); any other exception is ``"internal: ..."`` (the traceback goes to
  the log, never to the peer); a message that cannot even start a transaction (undecodable
  input or proposal) gets an ERROR message, as the Go shim sends.
- The peer's ERROR answer to a state request is handed back as if it were a RESPONSE (a
  failed ``GET_STATE`` reads the error text as the value, a failed ``PUT_STATE`` passes
  silently): :meth:`_PeerSession._ask` raises :class:`PeerRequestError` on it.
- ``set_event`` is stored on the stub but never put in the COMPLETED message, so events are
  lost: the session attaches the transaction's event to COMPLETED (successful ones only).
- Importing the shim runs ``logging.basicConfig(level=DEBUG)`` on the root logger, moves the
  ``asyncio`` logger behind a queue thread, and the shim logs every written value at INFO:
  :func:`_import_shim` undoes the first two and a filter drops the shim's own log records,
  so no payload reaches a log.

Identity convention
-------------------
The creator is the proposal's ``SerializedIdentity``: MSP id and X.509 certificate (PEM).
:func:`certificate_identity` maps it to the contract's :class:`~ledger._context.Identity`:
``msp_id`` is the MSP id, ``subject`` the certificate's common name, and ``role``

1. the Fabric CA attribute :data:`ROLE_ATTRIBUTE` (``fedledger.role``, registered with
   ``--id.attrs 'fedledger.role=gateway:ecert'``) from the attribute extension Fabric CA
   writes (OID ``1.2.3.4.5.6.7.8.1``, JSON ``{"attrs": {...}}``) when the certificate has
   it; otherwise
2. the subject's organizational unit that names a role (``OU=admin``, ``OU=gateway``,
   ``OU=device``, ``OU=auditor``), as Fabric NodeOUs mark admins with ``OU=admin``; other OUs
   (``client``, affiliations) are ignored, and two different role OUs name no role.

An identity without a role, common name or parsable certificate gets an empty field, which
the contract refuses as ``forbidden``. The MSP already validated the certificate chain
before the proposal reached the chaincode; the adapter only reads it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import json
import logging
import math
import os
import sys
import time
from collections.abc import Awaitable, Iterator, Sequence
from typing import Any, TypeVar

from cryptography import x509
from cryptography.x509.oid import NameOID
from fabric_protos.peer import chaincode_event_pb2 as event_pb
from fabric_protos.peer import chaincode_pb2 as cc_pb
from fabric_protos.peer import chaincode_shim_pb2 as shim_pb
from fabric_protos.peer import chaincode_shim_pb2_grpc as shim_grpc
from fabric_protos.peer import proposal_response_pb2 as response_pb

from fedcore import canonical_json

from .._context import ROLES, Identity, _check_key
from .._contract import ContractError, FedLedgerContract
from .._errors import LedgerError
from ._errors import PeerRequestError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Largest gRPC message either way (Fabric's peer and the Go and Java shims use 100 MiB).
MAX_MESSAGE_BYTES = 100 * 1024 * 1024

#: The Fabric CA attribute that carries a fedledger role.
ROLE_ATTRIBUTE = "fedledger.role"

#: Status of an error response (the Go shim's ``shim.ERROR``); success is 200.
OK_STATUS = 200
ERROR_STATUS = 500

#: How long a transaction waits for the peer to answer one state request.
DEFAULT_REQUEST_TIMEOUT = 60.0

#: Worker threads running contract code (each blocks while the peer answers a request).
DEFAULT_MAX_WORKERS = 16

_FABRIC_CA_ATTRS_OID = x509.ObjectIdentifier("1.2.3.4.5.6.7.8.1")

_Msg = shim_pb.ChaincodeMessage
_TYPE_NAMES = {number: name for name, number in _Msg.Type.items()}


# ---------------------------------------------------------------------------- shim import


class _DropShimRecords(logging.Filter):
    """Drop records the shim logs itself: it logs keys, written values and whole messages."""

    def __init__(self, shim_dir: str):
        super().__init__()
        self.shim_dir = shim_dir

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.pathname.startswith(self.shim_dir)


def _import_shim() -> tuple[type, type]:
    """Import the shim's ``Chaincode`` and ``ChaincodeStub`` without its logging side effects.

    ``fabric_shim.logging`` runs at import: ``basicConfig(level=DEBUG)`` on the root logger
    (when it has no handler yet, as in a command line) and a queue thread behind the
    ``asyncio`` logger, which the shim logs to. Both are undone here, and the shim's own
    records are filtered out of the ``asyncio`` logger (only those: records from asyncio
    itself still pass).
    """
    root = logging.getLogger()
    shim_logger = logging.getLogger("asyncio")
    first_import = "fabric_chaincode_python.fabric_shim.logging" not in sys.modules
    root_level, root_handlers = root.level, list(root.handlers)
    try:
        import fabric_chaincode_python
        from fabric_chaincode_python.fabric_shim import logging as shim_logging
        from fabric_chaincode_python.fabric_shim.interfaces import Chaincode
        from fabric_chaincode_python.fabric_shim.stub import ChaincodeStub
    finally:
        if first_import:
            for handler in list(root.handlers):
                if handler not in root_handlers:
                    root.removeHandler(handler)
                    handler.close()
            root.setLevel(root_level)
    listener = getattr(shim_logging, "_QUEUE_LISTENER", None)
    for handler in list(shim_logger.handlers):
        if type(handler).__module__ == shim_logging.__name__:
            shim_logger.removeHandler(handler)
    if listener is not None:
        with contextlib.suppress(AttributeError):  # already stopped: its thread is gone
            listener.stop()
        for handler in listener.handlers:
            if handler not in shim_logger.handlers:
                shim_logger.addHandler(handler)
    shim_dir = os.path.dirname(fabric_chaincode_python.__file__)
    if not any(isinstance(f, _DropShimRecords) for f in shim_logger.filters):
        shim_logger.addFilter(_DropShimRecords(shim_dir + os.sep))
    return Chaincode, ChaincodeStub


_ShimChaincode, _ShimStub = _import_shim()


# ---------------------------------------------------------------------------- identity


def certificate_identity(msp_id: str, certificate: bytes) -> Identity:
    """The contract identity of a creator: MSP id, certificate common name, role.

    ``certificate`` is the ``id_bytes`` of the creator's ``SerializedIdentity`` (PEM, or DER).
    The role comes from the Fabric CA attribute :data:`ROLE_ATTRIBUTE` if the certificate
    carries it, else from the one subject OU that names a role (see the module docstring).
    Fields that cannot be established are empty strings, which the contract refuses.
    """
    if not isinstance(msp_id, str) or not isinstance(certificate, bytes | bytearray):
        raise TypeError("certificate_identity takes an MSP id (str) and certificate bytes")
    return _certificate_identity(msp_id, bytes(certificate))


@functools.lru_cache(maxsize=1024)
def _certificate_identity(msp_id: str, certificate: bytes) -> Identity:
    try:
        if certificate.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(certificate)
        else:
            cert = x509.load_der_x509_certificate(certificate)
    except ValueError:
        return Identity(msp_id, "", "")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = names[0].value if len(names) == 1 else ""
    return Identity(msp_id, subject if isinstance(subject, str) else "", _role(cert))


def _role(cert: x509.Certificate) -> str:
    try:
        ext = cert.extensions.get_extension_for_oid(_FABRIC_CA_ATTRS_OID)
    except x509.ExtensionNotFound:
        pass
    except ValueError:  # a malformed extension list
        return ""
    else:
        raw = getattr(ext.value, "value", b"")
        try:
            attrs = json.loads(raw)["attrs"]
        except (ValueError, KeyError, TypeError):
            attrs = None
        if not isinstance(attrs, dict):
            return ""  # an attribute extension we cannot read: no role rather than a guess
        if ROLE_ATTRIBUTE in attrs:
            role = attrs[ROLE_ATTRIBUTE]
            return role if role in ROLES else ""
    units = {
        a.value
        for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        if a.value in ROLES
    }
    return units.pop() if len(units) == 1 else ""


# ---------------------------------------------------------------------------- arguments


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("an object has a key twice")
    return out


def encode_arguments(function: str, *args: Any) -> list[bytes]:
    """``ChaincodeInput.args`` for a call: the function name, then each argument as JSON.

    The inverse of :func:`decode_arguments`, for clients (each argument is canonical JSON,
    so the same call always has the same bytes, and so the same proposal digest).
    """
    if not isinstance(function, str) or not function:
        raise TypeError("the function name must be a non-empty string")
    return [function.encode("utf-8"), *(canonical_json(a) for a in args)]


def decode_arguments(raw_args: Sequence[bytes]) -> tuple[str, list[Any]]:
    """Split ``ChaincodeInput.args`` into the function name and its JSON-decoded arguments.

    The name is UTF-8 text; every other argument is one JSON text (strict: no NaN or
    Infinity, no duplicate keys). Raises :class:`ContractError` ``invalid_argument`` naming
    the argument (1 is the first after the name) when one is not UTF-8 or not JSON.
    """
    if not raw_args:
        raise ContractError("invalid_argument", "no function name: the transaction has no args")
    try:
        name = bytes(raw_args[0]).decode("utf-8")
    except UnicodeDecodeError:
        raise ContractError("invalid_argument", "the function name is not UTF-8 text") from None
    params = []
    for index, raw in enumerate(raw_args[1:], start=1):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ContractError(
                "invalid_argument",
                f"argument {index} of {_short(name)} is not UTF-8 text (byte {exc.start}):"
                " arguments are JSON texts; send binary data as base64 or hex inside JSON",
            ) from None
        try:
            params.append(
                json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
            )
        except (ValueError, RecursionError) as exc:
            detail = str(exc) if isinstance(exc, ValueError) else "nested too deeply"
            raise ContractError(
                "invalid_argument",
                f"argument {index} of {_short(name)} is not a JSON text: {_short(detail)}",
            ) from None
    return name, params


def _short(text: str, limit: int = 80) -> str:
    text = repr(text) if not text.isprintable() else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------- context


def _prefix_range(prefix: str) -> tuple[str, str]:
    """``[start, end)`` holding exactly the keys that start with ``prefix``.

    The end is the prefix with its last character incremented (the contract's prefixes end
    in ``/``, so ``/`` becomes ``0``); Fabric compares keys as UTF-8 bytes, which sort as
    code points. An empty prefix starts after composite keys (``\\x00...``), as the Go
    shim's empty-key substitute does, and has no end.
    """
    stem = prefix
    while stem:
        last = ord(stem[-1])
        if last < 0x10FFFF:
            nxt = 0xE000 if 0xD800 <= last + 1 <= 0xDFFF else last + 1
            return prefix, stem[:-1] + chr(nxt)
        stem = stem[:-1]
    return (prefix or "\x01"), ""


class ShimContext:
    """A :class:`~ledger._context.TxContext` over the shim's stub, used from a worker thread.

    The contract is synchronous and the stub's state calls are coroutines of the session's
    event loop, so each call is handed to that loop and waited for (at most ``timeout``
    seconds). Reads see committed state only, as the peer simulates a transaction that way.
    ``read_only`` (evaluate functions) makes writes and events an error, as in
    :class:`~ledger._context.MemoryContext`.
    """

    def __init__(
        self,
        stub: Any,
        loop: asyncio.AbstractEventLoop,
        *,
        read_only: bool = False,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ):
        self._stub = stub
        self._loop = loop
        self._timeout = timeout
        self.read_only = read_only
        self.tx_id: str = stub.get_txid()
        stamp = stub.get_tx_timestamp()
        self.timestamp: float = (
            math.nan if stamp is None else stamp.seconds + stamp.nanos / 1_000_000_000
        )
        creator = stub.get_creator() or {}
        self.creator: Identity = certificate_identity(
            creator.get("mspid", "") or "", creator.get("idBytes", b"") or b""
        )
        self.event: tuple[str, bytes] | None = None

    def _call(self, coro: Awaitable[T], request: str) -> T:
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        except RuntimeError:  # the loop is closed: the server is stopping
            coro.close()  # type: ignore[attr-defined]
            raise PeerRequestError(self.tx_id, request, "the chaincode server stopped") from None
        try:
            return future.result(self._timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise PeerRequestError(
                self.tx_id, request, f"no answer from the peer within {self._timeout:g} s"
            ) from None
        except concurrent.futures.CancelledError:
            raise PeerRequestError(self.tx_id, request, "the peer stream closed") from None

    def get_state(self, key: str) -> bytes | None:
        _check_key(key)
        value = self._call(self._stub.get_state(key), "GET_STATE")
        return bytes(value) if value else None  # Fabric: an absent key reads as empty

    def put_state(self, key: str, value: bytes) -> None:
        _check_key(key)
        if not isinstance(value, bytes) or not value:
            raise TypeError("a state value must be non-empty bytes")
        if self.read_only:
            raise LedgerError(f"transaction {self.tx_id} is read-only but wrote {key!r}")
        self._call(self._stub.put_state(key, value), "PUT_STATE")

    def get_state_by_prefix(self, prefix: str) -> Iterator[tuple[str, bytes]]:
        """Every ``(key, value)`` under ``prefix``, read eagerly so the query is always closed."""
        if not isinstance(prefix, str):
            raise TypeError("a key prefix must be a string")
        start, end = _prefix_range(prefix)
        stub = self._stub

        async def collect() -> list[tuple[str, bytes]]:
            results = await stub.get_state_by_range(start, end)
            found = []
            try:
                async for kv in results:
                    found.append((kv.key, bytes(kv.value)))
            finally:
                await results.aclose()
            return found

        found = self._call(collect(), "GET_STATE_BY_RANGE")
        return iter(sorted((k, v) for k, v in found if k.startswith(prefix)))

    def set_event(self, name: str, payload: bytes) -> None:
        if not isinstance(name, str) or not name or not isinstance(payload, bytes):
            raise TypeError("an event needs a non-empty name and bytes payload")
        if self.read_only:
            raise LedgerError(f"transaction {self.tx_id} is read-only but set event {name!r}")
        if self.event is not None:
            raise LedgerError(
                f"transaction {self.tx_id} already set event {self.event[0]!r}:"
                " Fabric keeps one event per transaction"
            )
        self.event = (name, payload)
        self._stub.set_event(name, payload)


# ---------------------------------------------------------------------------- chaincode


def _response(status: int, *, payload: bytes = b"", message: str = "") -> Any:
    return response_pb.Response(status=status, payload=payload, message=message)


class FedLedgerChaincode(_ShimChaincode):
    """The fedledger contract as a shim ``Chaincode``: ``invoke(stub)`` runs one transaction.

    The contract runs in a worker thread; the event loop stays free to carry the other
    transactions' messages. A transaction holds its thread while it waits for the peer, so
    ``max_workers`` transactions run at once and later ones queue (they are accepted on the
    stream and start when a thread frees up). ``invoke`` never raises: every failure is an
    error response (see the module docstring for the message format).
    """

    def __init__(
        self,
        *,
        max_workers: int = DEFAULT_MAX_WORKERS,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ):
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError("max_workers must be a positive integer")
        if not isinstance(request_timeout, int | float) or not request_timeout > 0:
            raise ValueError("request_timeout must be a positive number of seconds")
        self._transactions = FedLedgerContract.transactions()
        self._signatures = {
            name: inspect.signature(fn) for name, (fn, _) in self._transactions.items()
        }
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="fedledger-tx"
        )
        self._request_timeout = float(request_timeout)

    def close(self) -> None:
        """Stop the worker threads (after the transactions they run have ended)."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def init(self, stub: Any) -> Any:
        """Nothing to initialise: the contract creates its state in transactions."""
        return _response(OK_STATUS)

    async def invoke(self, stub: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._run, stub, loop)
        except RuntimeError as exc:  # the executor is shut down: the server is stopping
            return _response(ERROR_STATUS, message=f"internal: {exc}")

    def _run(self, stub: Any, loop: asyncio.AbstractEventLoop) -> Any:
        started = time.perf_counter()
        tx_id = str(getattr(stub, "tx_id", "?"))
        name = "?"
        try:
            name, params = decode_arguments(list(stub.cc_input.args))
            entry = self._transactions.get(name)
            if entry is None:
                raise ContractError(
                    "invalid_argument", f"no transaction function named {_short(name)}"
                )
            fn, kind = entry
            ctx = ShimContext(
                stub, loop, read_only=kind == "evaluate", timeout=self._request_timeout
            )
            try:
                self._signatures[name].bind(ctx, *params)
            except TypeError as exc:
                raise ContractError("invalid_argument", f"{name}: {exc}") from None
            result = fn(ctx, *params)
            response = _response(OK_STATUS, payload=canonical_json(result))
        except ContractError as exc:
            response = _response(ERROR_STATUS, message=f"{exc.code}: {exc.message}")
        except PeerRequestError as exc:
            logger.warning("transaction %s (%s): %s", tx_id, name, exc)
            response = _response(ERROR_STATUS, message=f"internal: {exc}")
        except Exception as exc:
            logger.exception("transaction %s (%s) failed unexpectedly", tx_id, name)
            response = _response(
                ERROR_STATUS,
                message=(
                    f"internal: transaction {tx_id} ({name}) failed unexpectedly"
                    f" ({type(exc).__name__}); see the chaincode log"
                ),
            )
        logger.debug(
            "transaction %s %s: status %d in %.1f ms",
            tx_id,
            name,
            response.status,
            (time.perf_counter() - started) * 1000,
        )
        return response


# ---------------------------------------------------------------------------- the stream


class _PeerSession:
    """One peer's ``Chaincode.Connect`` stream: the shim protocol, chaincode side.

    Also the ``client`` the shim's stub calls (``handle_get_state``...): each such request
    is sent on the stream and answered by the peer's RESPONSE or ERROR for the same channel
    and tx id; a transaction has at most one request outstanding, as in every shim.
    """

    def __init__(self, chaincode_id: str, chaincode: Any, context: Any):
        self._chaincode_id = chaincode_id
        self._chaincode = chaincode
        self._context = context
        self._write_lock = asyncio.Lock()
        self._pending: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self._running: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._state = "created"
        self._closed = False

    async def send(self, msg: Any) -> None:
        """Write one message; writes are serialized (grpc.aio refuses overlapping writes)."""
        async with self._write_lock:
            await self._context.write(msg)

    async def run(self, requests: Any) -> None:
        register = _Msg(
            type=_Msg.REGISTER,
            payload=cc_pb.ChaincodeID(name=self._chaincode_id).SerializeToString(),
        )
        register.timestamp.GetCurrentTime()
        try:
            await self.send(register)
            async for msg in requests:
                try:
                    if not await self._dispatch(msg):
                        return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.exception("cannot handle a %s message", _TYPE_NAMES.get(msg.type))
        finally:
            await self._close()

    async def _close(self) -> None:
        self._closed = True
        for key, future in list(self._pending.items()):
            if not future.done():
                future.set_exception(PeerRequestError(key[1], "request", "the peer stream closed"))
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _dispatch(self, msg: Any) -> bool:
        """Handle one message from the peer; False ends the stream (a protocol violation)."""
        if msg.type == _Msg.KEEPALIVE:
            await self.send(msg)  # the Go shim echoes keepalives
            return True
        if self._state == "ready":
            if msg.type in (_Msg.RESPONSE, _Msg.ERROR):
                future = self._pending.get((msg.channel_id, msg.txid))
                if future is None or future.done():
                    logger.warning("a %s for no pending request", _TYPE_NAMES.get(msg.type))
                else:
                    future.set_result(msg)
                return True
            if msg.type in (_Msg.TRANSACTION, _Msg.INIT):
                self._start(msg)
                return True
            await self._send_error(msg, f"cannot handle {_TYPE_NAMES.get(msg.type, msg.type)}")
            return True
        expected = _Msg.REGISTERED if self._state == "created" else _Msg.READY
        if msg.type != expected:
            await self._send_error(
                msg,
                f"expected {_TYPE_NAMES[expected]} in state {self._state},"
                f" got {_TYPE_NAMES.get(msg.type, msg.type)}",
            )
            return False
        self._state = "established" if self._state == "created" else "ready"
        logger.info("chaincode %s: peer stream %s", self._chaincode_id, self._state)
        return True

    async def _send_error(self, msg: Any, text: str) -> None:
        await self.send(
            _Msg(
                type=_Msg.ERROR,
                payload=text.encode("utf-8"),
                txid=msg.txid,
                channel_id=msg.channel_id,
            )
        )

    def _start(self, msg: Any) -> None:
        key = (msg.channel_id, msg.txid)
        if key in self._running:
            task = asyncio.create_task(
                self._send_error(msg, f"transaction {msg.txid} is already running")
            )
        else:
            task = asyncio.create_task(self._transaction(msg))
            self._running[key] = task
        task.add_done_callback(functools.partial(self._done, key))

    def _done(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled() and task.exception() is not None:
            logger.error("transaction %s: reply not sent", key[1], exc_info=task.exception())

    async def _transaction(self, msg: Any) -> None:
        try:
            cc_input = cc_pb.ChaincodeInput.FromString(msg.payload)
            stub = _ShimStub(self, msg.channel_id, msg.txid, cc_input, msg.proposal)
        except Exception as exc:
            # As the Go shim: a message that cannot start a transaction gets an ERROR.
            await self._send_error(msg, f"cannot start transaction {msg.txid}: {exc}")
            return
        try:
            if msg.type == _Msg.INIT:
                response = await self._chaincode.init(stub)
            else:
                response = await self._chaincode.invoke(stub)
            if not isinstance(response, response_pb.Response) or not response.status:
                raise TypeError(f"the chaincode returned {type(response).__name__}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("transaction %s failed in the chaincode", msg.txid)
            response = _response(
                ERROR_STATUS, message=f"internal: transaction {msg.txid} failed ({exc})"
            )
        reply = _Msg(
            type=_Msg.COMPLETED,
            payload=response.SerializeToString(),
            txid=msg.txid,
            channel_id=msg.channel_id,
        )
        events = stub.get_events()
        if response.status < 400 and events:
            event = events[-1]
            reply.chaincode_event.CopyFrom(
                event_pb.ChaincodeEvent(
                    chaincode_id=self._chaincode_id,
                    tx_id=msg.txid,
                    event_name=event.event_name,
                    payload=event.payload,
                )
            )
        await self.send(reply)

    # --------------------------------------------------------- the stub's client interface

    async def _ask(self, msg: Any) -> Any:
        """Send a state request and wait for the peer's answer; ERROR raises."""
        request = _TYPE_NAMES.get(msg.type, str(msg.type))
        if self._closed:
            raise PeerRequestError(msg.txid, request, "the peer stream closed")
        key = (msg.channel_id, msg.txid)
        if key in self._pending:
            raise PeerRequestError(msg.txid, request, "another request is outstanding")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            await self.send(msg)
            reply = await future
        finally:
            if self._pending.get(key) is future:
                del self._pending[key]
        if reply.type == _Msg.RESPONSE:
            return reply
        reason = bytes(reply.payload).decode("utf-8", "replace")
        if reply.type != _Msg.ERROR:
            reason = f"unexpected {_TYPE_NAMES.get(reply.type, reply.type)} answer"
        raise PeerRequestError(msg.txid, request, reason)

    def _request(self, kind: int, body: Any, channel_id: str, tx_id: str) -> Awaitable[Any]:
        return self._ask(
            _Msg(type=kind, payload=body.SerializeToString(), txid=tx_id, channel_id=channel_id)
        )

    async def handle_get_state(self, collection: str, key: str, channel_id: str, tx_id: str):
        body = shim_pb.GetState(key=key, collection=collection)
        return (await self._request(_Msg.GET_STATE, body, channel_id, tx_id)).payload

    async def handle_put_state(
        self, collection: str, key: str, value: bytes, channel_id: str, tx_id: str
    ):
        body = shim_pb.PutState(key=key, value=value, collection=collection)
        return await self._request(_Msg.PUT_STATE, body, channel_id, tx_id)

    async def handle_get_state_by_range(
        self,
        collection: str,
        start_key: str,
        end_key: str,
        channel_id: str,
        tx_id: str,
        metadata: bytes | None = None,
    ):
        body = shim_pb.GetStateByRange(
            startKey=start_key, endKey=end_key, collection=collection, metadata=metadata or b""
        )
        return await self._request(_Msg.GET_STATE_BY_RANGE, body, channel_id, tx_id)

    async def handle_query_state_next(self, query_id: str, channel_id: str, tx_id: str):
        body = shim_pb.QueryStateNext(id=query_id)
        return await self._request(_Msg.QUERY_STATE_NEXT, body, channel_id, tx_id)

    async def handle_query_state_close(self, query_id: str, channel_id: str, tx_id: str):
        body = shim_pb.QueryStateClose(id=query_id)
        return await self._request(_Msg.QUERY_STATE_CLOSE, body, channel_id, tx_id)


class ChaincodeService(shim_grpc.ChaincodeServicer):
    """The ``protos.Chaincode`` gRPC service (``Connect``) a peer dials for CCaaS."""

    def __init__(self, chaincode_id: str, chaincode: Any):
        if not isinstance(chaincode_id, str) or not chaincode_id.strip():
            raise ValueError("chaincode_id must be the installed package id (label:hash)")
        self.chaincode_id = chaincode_id
        self.chaincode = chaincode
        self._sessions: set[_PeerSession] = set()

    async def Connect(self, request_iterator: Any, context: Any) -> None:
        session = _PeerSession(self.chaincode_id, self.chaincode, context)
        self._sessions.add(session)
        try:
            await session.run(request_iterator)
        finally:
            self._sessions.discard(session)

    @property
    def sessions(self) -> int:
        """Peer streams connected now."""
        return len(self._sessions)

    @property
    def running(self) -> int:
        """Transactions running now, over every peer stream."""
        return sum(len(s._running) for s in list(self._sessions))
