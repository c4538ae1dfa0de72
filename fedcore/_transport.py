"""Message transports: MQTT (paho-mqtt 2.x) for real fleets, in-memory for tests.

Callbacks never block and never publish: they hand every message to a queue that the
owner's own thread drains, as paho's threading model requires.

With ``tls_ca``/``tls_cert``/``tls_key`` set, the MQTT connection is mutual TLS: the broker's
certificate must chain to the organisation CA and name the host connected to, and the client
proves its identity (its certificate's CN) with its own key.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt

from ._errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    retain: bool = False
    #: With manual acknowledgements (``MqttSettings.manual_ack``): sends this message's
    #: PUBACK. Until it is called the broker keeps the message and delivers it again after a
    #: reconnect, so a receiver calls it only once the message is durable on its side.
    ack: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    def acknowledge(self) -> None:
        if self.ack is not None:
            self.ack()


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True


class Transport(Protocol):
    """What agents and gateways need from a message bus."""

    messages: queue.Queue[Message]

    def start(self) -> None: ...

    def wait_connected(self, timeout: float) -> bool: ...

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now and again after every reconnect."""
        ...

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None: ...

    def stop(self) -> None: ...


@dataclass
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    keepalive: int = 30
    client_id: str = ""
    clean_session: bool = False  # persistent session: QoS 1 messages survive a reconnect
    max_inflight: int = 100
    will: Will | None = None
    online: Message | None = None  # published (retained) after every connect
    #: Acknowledge QoS 1 messages only when the receiver calls ``Message.ack`` (paho's
    #: manual acks): what is not yet durable stays with the broker across a crash.
    manual_ack: bool = False
    #: Mutual TLS: the CA the broker's certificate must chain to (PEM). Setting any of the
    #: three switches TLS on; ``tls_cert`` and ``tls_key`` go together.
    tls_ca: str | os.PathLike[str] | None = None
    #: This client's certificate (PEM); its CN is the MQTT identity the broker uses.
    tls_cert: str | os.PathLike[str] | None = None
    #: This client's private key (PEM, unencrypted).
    tls_key: str | os.PathLike[str] | None = None

    @property
    def tls(self) -> bool:
        return any(p is not None for p in (self.tls_ca, self.tls_cert, self.tls_key))


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """A client context: TLS 1.2+, the broker's certificate and host name checked.

    Each file is loaded on its own, so an unreadable or wrong file is named in the error
    (a :class:`ConfigError`) instead of surfacing later as a failed connection.
    """
    if (settings.tls_cert is None) != (settings.tls_key is None):
        missing = "tls_key" if settings.tls_key is None else "tls_cert"
        raise ConfigError("a client certificate needs both tls_cert and tls_key", key=missing)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.sslsocket_class = _ClosingSSLSocket
    if settings.tls_ca is None:
        context.load_default_certs()
    else:
        _readable(settings.tls_ca, "tls_ca")
        try:
            context.load_verify_locations(cafile=os.fspath(settings.tls_ca))
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                f"not a PEM CA certificate ({exc})", file=os.fspath(settings.tls_ca), key="tls_ca"
            ) from None
    if settings.tls_cert is not None and settings.tls_key is not None:
        _readable(settings.tls_cert, "tls_cert")
        _readable(settings.tls_key, "tls_key")
        try:
            context.load_cert_chain(os.fspath(settings.tls_cert), os.fspath(settings.tls_key))
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                f"certificate and key are not a PEM pair that belongs together ({exc})",
                file=os.fspath(settings.tls_cert),
                key="tls_cert",
            ) from None
    return context


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when the handshake fails: paho 2.x drops the socket without closing it
    (a file descriptor per refused attempt until the garbage collector runs, and a
    ResourceWarning), and a refused client retries for as long as it runs."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def _readable(path: str | os.PathLike[str], key: str) -> None:
    try:
        with Path(path).open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=os.fspath(path), key=key) from None


class _PahoLog(logging.LoggerAdapter):
    """paho's logger: forwards to ours and keeps the last error (a TLS alert, a reset), which
    paho reports nowhere else when a connection dies before the broker accepted it.

    paho's errors are network events the transport recovers from by reconnecting: they are
    logged as warnings.
    """

    def __init__(self, logger: logging.Logger, transport: MqttTransport):
        super().__init__(logger, {})
        self._transport = transport

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if level >= logging.ERROR:
            text = str(msg) % args if args else str(msg)
            if text.startswith("Client is not connected"):
                # paho's loop going round once more without a socket: not a cause; after
                # stop() it is the shutdown itself, worth no warning.
                level = logging.DEBUG if self._transport._stopping else logging.WARNING
            else:
                self._transport._last_socket_error = text
                level = logging.WARNING
        super().log(level, msg, *args, **kwargs)


class MqttTransport:
    """A paho-mqtt 2.x client that reconnects by itself and queues what it receives.

    ``last_error`` says why the latest connection attempt failed (refused by the broker, TLS
    handshake failed, closed before the broker accepted it) and is None once connected; paho
    keeps retrying in the background, so ``wait_connected`` returning False plus
    ``last_error`` is how a caller tells "refused" from "not yet".
    """

    def __init__(self, settings: MqttSettings, *, max_queue: int = 0):
        self.settings = settings
        self.messages: queue.Queue[Message] = queue.Queue(maxsize=max_queue)
        self.last_error: str | None = None
        self._last_socket_error: str | None = None
        self._subscriptions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        #: Connected and every subscription acknowledged (SUBACK): nothing sent to us from
        #: now on is missed.
        self._ready = threading.Event()
        self._pending_subscriptions: set[int] = set()
        self._stopping = False
        context = tls_context(settings) if settings.tls else None
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            clean_session=settings.clean_session,
            protocol=mqtt.MQTTv311,
        )
        client.max_inflight_messages_set(settings.max_inflight)
        if settings.manual_ack:
            client.manual_ack_set(True)
        #: Connections made so far (a reconnect increments it): what a client re-sends after
        #: a broker restart keys on it.
        self.connections = 0
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        if settings.will is not None:
            client.will_set(
                settings.will.topic, settings.will.payload, qos=1, retain=settings.will.retain
            )
        if context is not None:
            client.tls_set_context(context)
        # paho calls only .log() on its logger: an adapter will do.
        paho_log = _PahoLog(logging.getLogger(f"{__name__}.paho"), self)
        client.enable_logger(paho_log)  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        self._stopping = False
        s = self.settings
        self._client.connect_async(s.host, s.port, keepalive=s.keepalive)
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected with every subscription acknowledged by the broker."""
        return self._ready.wait(timeout)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        with self._lock:
            self._subscriptions[topic] = qos
            connected = self._connected.is_set()
            if connected:
                self._ready.clear()
        if connected:  # paho's own locks are taken outside ours
            _, mid = self._client.subscribe(topic, qos)
            with self._lock:
                self._pending_subscriptions.add(mid)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise ConnectionError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")

    def publish_confirmed(
        self, topic: str, payload: bytes, *, qos: int = 1, timeout: float = 10.0
    ) -> None:
        """Publish and wait until the broker acknowledged it (not from a paho callback)."""
        info = self._client.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise ConnectionError(f"publish to {topic} not acknowledged within {timeout} s")

    def stop(self) -> None:
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
        self._ready.clear()

    # paho callbacks: run on paho's thread, must not block.
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            log.warning("broker refused connection: %s", reason_code)
            return
        self.last_error = None
        self._last_socket_error = None
        with self._lock:
            subscriptions = list(self._subscriptions.items())
            self._pending_subscriptions.clear()
        if subscriptions:
            _, mid = client.subscribe(subscriptions)
            with self._lock:
                self._pending_subscriptions.add(mid)
        if self.settings.online is not None:
            online = self.settings.online
            client.publish(online.topic, online.payload, qos=1, retain=online.retain)
        self.connections += 1
        self._connected.set()
        if not subscriptions:
            self._ready.set()
        log.debug("connected to %s:%s", self.settings.host, self.settings.port)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [code for code in reason_codes if code.is_failure]
        if refused:
            log.warning("broker refused a subscription: %s", refused[0])
        with self._lock:
            self._pending_subscriptions.discard(mid)
            if not self._pending_subscriptions and self._connected.is_set():
                self._ready.set()

    def _on_connect_fail(self, client, userdata) -> None:
        # paho calls this inside its ``except OSError`` block: the exception is the reason
        # (connection refused, TLS handshake or certificate verification failure).
        exc = sys.exc_info()[1]
        self.last_error = f"cannot connect to {self.settings.host}:{self.settings.port}: {exc}"
        log.debug("%s", self.last_error)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if not self._connected.is_set() and not self._stopping:
            # Closed before the broker accepted us: with TLS 1.3 a rejected client
            # certificate shows up here, after the handshake seemed to succeed.
            detail = self._last_socket_error or str(reason_code)
            if self.last_error is None or self._last_socket_error is not None:
                self.last_error = f"connection closed before the broker accepted it: {detail}"
            self._last_socket_error = None
        self._connected.clear()
        self._ready.clear()
        log.debug("disconnected: %s", reason_code)

    def _on_message(self, client, userdata, message) -> None:
        ack = None
        if self.settings.manual_ack and message.qos > 0:
            ack = functools.partial(self._ack, message.mid, message.qos)
        try:
            self.messages.put_nowait(
                Message(message.topic, bytes(message.payload), message.retain, ack)
            )
        except queue.Full:
            # Not acknowledged: the broker delivers it again after the next reconnect.
            log.warning("inbound queue full, message on %s left with the broker", message.topic)

    def _ack(self, mid: int, qos: int) -> None:
        """PUBACK ``mid`` (from any thread: paho queues the packet under its own lock). After
        a reconnect the broker re-sends unacknowledged messages with their original packet
        ids, so an ack that crosses a reconnect still names the same message."""
        self._client.ack(mid, qos)


@dataclass
class _Client:
    transport: InMemoryTransport
    subscriptions: dict[str, int] = field(default_factory=dict)


class InMemoryBroker:
    """A broker in one process: topic wildcards, retained messages, last wills."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: list[_Client] = []
        self._retained: dict[str, Message] = {}

    def transport(
        self, *, will: Will | None = None, online: Message | None = None
    ) -> InMemoryTransport:
        return InMemoryTransport(self, will=will, online=online)

    def _attach(self, transport: InMemoryTransport) -> None:
        with self._lock:
            self._clients.append(_Client(transport))

    def _detach(self, transport: InMemoryTransport, *, unexpected: bool) -> None:
        with self._lock:
            self._clients = [c for c in self._clients if c.transport is not transport]
        if unexpected and transport.will is not None:
            will = transport.will
            self._route(Message(will.topic, will.payload, will.retain))

    def _subscribe(self, transport: InMemoryTransport, topic: str) -> None:
        with self._lock:
            for client in self._clients:
                if client.transport is transport:
                    client.subscriptions[topic] = 1
            retained = [m for t, m in self._retained.items() if mqtt.topic_matches_sub(topic, t)]
        for message in retained:
            transport.messages.put(Message(message.topic, message.payload, True))

    def _route(self, message: Message) -> None:
        with self._lock:
            if message.retain:
                if message.payload:
                    self._retained[message.topic] = message
                else:
                    self._retained.pop(message.topic, None)
            targets = [
                c.transport
                for c in self._clients
                if any(mqtt.topic_matches_sub(s, message.topic) for s in c.subscriptions)
            ]
        for target in targets:
            target.messages.put(Message(message.topic, message.payload, False))


class InMemoryTransport:
    def __init__(self, broker: InMemoryBroker, *, will: Will | None, online: Message | None):
        self.messages: queue.Queue[Message] = queue.Queue()
        self.will = will
        self._online = online
        self._broker = broker
        self._started = False
        self._subscriptions: list[str] = []

    def start(self) -> None:
        self._broker._attach(self)
        self._started = True
        for topic in self._subscriptions:
            self._broker._subscribe(self, topic)
        if self._online is not None:
            self._broker._route(self._online)

    def wait_connected(self, timeout: float) -> bool:
        return self._started

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self._subscriptions.append(topic)
        if self._started:
            self._broker._subscribe(self, topic)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self._broker._route(Message(topic, bytes(payload), retain))

    def stop(self, *, unexpected: bool = False) -> None:
        """Leave the broker; ``unexpected=True`` simulates a lost connection (will fires)."""
        self._broker._detach(self, unexpected=unexpected)
        self._started = False
