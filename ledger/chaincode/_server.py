"""Chaincode as a service: the gRPC server a Fabric peer dials to run the fedledger contract.

With CCaaS the peer is the client: it reads ``connection.json`` from the installed package
(see :mod:`ledger.chaincode._package`), dials ``address`` and opens ``Chaincode.Connect``;
the chaincode then registers with its package id (``chaincode_id``, ``label:hash`` as
``peer lifecycle chaincode install`` prints it). The shim's own ``start()`` is not used: it
keeps gRPC's 4 MiB receive limit, reads its address and id from environment variables over
its arguments, and serves the stream handler this package replaces (see ``_adapter``).

The server runs its asyncio loop in a thread of its own, so :func:`start_server` returns a
handle (``port``, ``stop()``, ``wait()``) and :func:`serve` is the blocking form for a command
line (it stops on SIGINT and SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fabric_protos.peer import chaincode_shim_pb2_grpc as shim_grpc

from ._adapter import (
    DEFAULT_MAX_WORKERS,
    DEFAULT_REQUEST_TIMEOUT,
    MAX_MESSAGE_BYTES,
    ChaincodeService,
    FedLedgerChaincode,
)
from ._errors import ChaincodeError

logger = logging.getLogger(__name__)

#: Seconds running transactions get to finish when the server stops.
DEFAULT_GRACE = 5.0

_START_TIMEOUT = 30.0

# Limits and keepalive as the Go and Java shims' servers: 100 MiB messages both ways; the
# peer pings every 60 s (Fabric's client keepalive), so pings must not count as abuse on an
# idle stream (gRPC core would answer the third with GOAWAY "too_many_pings"); no
# SO_REUSEPORT, so a port already in use is an error rather than a second silent listener.
_SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),
)

PemSource = bytes | str | os.PathLike[str]


def _read_pem(value: PemSource, setting: str) -> bytes:
    """PEM bytes as given, or read from the file ``value`` names."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str | os.PathLike):
        try:
            with open(value, "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise ChaincodeError(f"cannot read {value}: {exc.strerror}", setting=setting) from None
    raise ChaincodeError(
        f"expected PEM bytes or a file path, got {type(value).__name__}", setting=setting
    )


def _certificates(value: PemSource, setting: str) -> bytes:
    pem = _read_pem(value, setting)
    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ChaincodeError("not a PEM certificate (bundle)", setting=setting) from None
    return pem


def _private_key(value: PemSource, setting: str) -> bytes:
    pem = _read_pem(value, setting)
    try:
        serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise ChaincodeError("not an unencrypted PEM private key", setting=setting) from None
    return pem


def _credentials(
    tls_cert: PemSource | None, tls_key: PemSource | None, client_ca: PemSource | None
) -> grpc.ServerCredentials | None:
    if tls_cert is None and tls_key is None:
        if client_ca is not None:
            raise ChaincodeError(
                "client certificates need TLS: give tls_cert and tls_key too", setting="client_ca"
            )
        return None
    if tls_cert is None or tls_key is None:
        missing = "tls_cert" if tls_cert is None else "tls_key"
        raise ChaincodeError("TLS needs both tls_cert and tls_key", setting=missing)
    cert = _certificates(tls_cert, "tls_cert")
    key = _private_key(tls_key, "tls_key")
    server_public = x509.load_pem_x509_certificates(cert)[0].public_key()
    key_public = serialization.load_pem_private_key(key, password=None).public_key()
    if server_public != key_public:
        raise ChaincodeError("the key does not belong to tls_cert's certificate", setting="tls_key")
    ca = None if client_ca is None else _certificates(client_ca, "client_ca")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def _check_address(address: Any) -> tuple[str, int]:
    if not isinstance(address, str) or ":" not in address:
        raise ChaincodeError(f"{address!r} is not host:port", setting="address")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ChaincodeError(f"{address!r} is not host:port", setting="address")
    return host, int(port)


class ChaincodeServer:
    """A running CCaaS server (made by :func:`start_server`); a context manager that stops it.

    ``port`` is the bound port (useful with port 0), ``address`` the host and that port.
    """

    def __init__(
        self,
        address: str,
        *,
        chaincode_id: str,
        credentials: grpc.ServerCredentials | None,
        mutual_tls: bool,
        max_workers: int,
        request_timeout: float,
        grace: float,
    ):
        self._host, _ = _check_address(address)
        self._requested = address
        self.chaincode_id = chaincode_id
        self.tls = credentials is not None
        self.mutual_tls = mutual_tls
        self.port: int | None = None
        self._credentials = credentials
        self._grace = grace
        self._chaincode = FedLedgerChaincode(
            max_workers=max_workers, request_timeout=request_timeout
        )
        self._service = ChaincodeService(chaincode_id, self._chaincode)
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._stop_requested = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._main, name=f"chaincode-server-{address}", daemon=True
        )

    @property
    def address(self) -> str:
        return f"{self._host}:{self.port}"

    @property
    def sessions(self) -> int:
        """Peer streams connected now."""
        return self._service.sessions

    def _start(self) -> None:
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT):
            self.stop()
            raise ChaincodeError(f"did not start within {_START_TIMEOUT:g} s", setting="address")
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except ChaincodeError as exc:
            self._error = exc
        except BaseException as exc:
            if self._ready.is_set():
                logger.exception("chaincode server %s failed", self._requested)
            else:
                self._error = ChaincodeError(f"cannot start: {exc}", setting="address")
        finally:
            self._chaincode.close()
            self._ready.set()
            self._stopped.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        server = grpc.aio.server(options=_SERVER_OPTIONS)
        shim_grpc.add_ChaincodeServicer_to_server(self._service, server)
        try:
            if self._credentials is None:
                port = server.add_insecure_port(self._requested)
            else:
                port = server.add_secure_port(self._requested, self._credentials)
        except RuntimeError as exc:
            raise ChaincodeError(
                f"cannot listen on {self._requested}: {exc}", setting="address"
            ) from None
        if not port:
            raise ChaincodeError(f"cannot listen on {self._requested}", setting="address")
        await server.start()
        self.port = port
        logger.info(
            "chaincode %s listening on %s (%s)",
            self.chaincode_id,
            self.address,
            "mutual TLS" if self.mutual_tls else "TLS" if self.tls else "no TLS",
        )
        self._ready.set()
        try:
            if not self._stop_requested:
                await self._stop_event.wait()
            # Let running transactions finish (an idle peer stream never ends by itself,
            # so waiting for the streams would always take the whole grace period).
            deadline = self._loop.time() + self._grace
            while self._chaincode_busy() and self._loop.time() < deadline:
                await asyncio.sleep(0.02)
        finally:
            await server.stop(0)
            logger.info("chaincode %s on %s stopped", self.chaincode_id, self.address)

    def _chaincode_busy(self) -> bool:
        return self._service.running > 0

    def request_stop(self) -> None:
        """Ask the server to stop and return at once (safe from a signal handler)."""
        self._stop_requested = True
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                loop.call_soon_threadsafe(event.set)

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting peers, let running transactions finish (the grace), then end."""
        self.request_stop()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; False if ``timeout`` passed first."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> ChaincodeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    address: str,
    *,
    chaincode_id: str,
    tls_cert: PemSource | None = None,
    tls_key: PemSource | None = None,
    client_ca: PemSource | None = None,
    max_workers: int = DEFAULT_MAX_WORKERS,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    grace: float = DEFAULT_GRACE,
) -> ChaincodeServer:
    """Start the fedledger chaincode server in the background and return its handle.

    ``address`` is where to listen (``host:port``; port 0 picks a free one). ``chaincode_id``
    is the package id the peer installed (``label:hash``). TLS is on when ``tls_cert`` and
    ``tls_key`` are given (PEM bytes or file paths); ``client_ca`` (the peer's TLS CA)
    additionally requires the peer to present a client certificate it signed (mutual TLS,
    ``client_auth_required`` in ``connection.json``). Raises :class:`ChaincodeError` naming
    the setting at fault (bad PEM, port in use...).
    """
    if (
        not isinstance(chaincode_id, str)
        or not chaincode_id.strip()
        or not chaincode_id.isprintable()
    ):
        raise ChaincodeError(
            "must be the installed package id (label:hash)", setting="chaincode_id"
        )
    _check_address(address)
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not grace >= 0:
        raise ChaincodeError("must be a non-negative number of seconds", setting="grace")
    credentials = _credentials(tls_cert, tls_key, client_ca)
    try:
        server = ChaincodeServer(
            address,
            chaincode_id=chaincode_id,
            credentials=credentials,
            mutual_tls=client_ca is not None,
            max_workers=max_workers,
            request_timeout=request_timeout,
            grace=float(grace),
        )
    except ValueError as exc:
        raise ChaincodeError(str(exc)) from None
    server._start()
    return server


def serve(
    address: str,
    *,
    chaincode_id: str,
    tls_cert: PemSource | None = None,
    tls_key: PemSource | None = None,
    client_ca: PemSource | None = None,
    max_workers: int = DEFAULT_MAX_WORKERS,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    grace: float = DEFAULT_GRACE,
    on_start: Callable[[ChaincodeServer], None] | None = None,
) -> None:
    """Serve the fedledger chaincode until stopped: the blocking form of :func:`start_server`.

    Called from the main thread, SIGINT and SIGTERM stop it gracefully (previous handlers
    are restored on return). ``on_start`` receives the running server once it listens (to
    print the bound port, or to keep the handle and call ``stop()`` from elsewhere).
    """
    # The handlers go in before the port opens: a signal that arrives as soon as a client
    # can connect must stop the server gracefully, not kill the process.
    stopping = threading.Event()
    running: list[ChaincodeServer] = []
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def on_signal(signum: int, frame: FrameType | None) -> None:
            logger.info("signal %d: stopping the chaincode server", signum)
            stopping.set()
            for each in running:
                each.request_stop()

        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal)
    try:
        server = start_server(
            address,
            chaincode_id=chaincode_id,
            tls_cert=tls_cert,
            tls_key=tls_key,
            client_ca=client_ca,
            max_workers=max_workers,
            request_timeout=request_timeout,
            grace=grace,
        )
    except BaseException:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        raise
    running.append(server)
    if stopping.is_set():
        server.request_stop()
    try:
        if on_start is not None:
            on_start(server)
        while not server.wait(0.5):
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        server.stop()
