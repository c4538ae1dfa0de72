"""Message transports: MQTT (paho-mqtt 2.x) for real fleets, in-memory for tests.

Callbacks never block and never publish: they hand every message to a queue that the
owner's own thread drains, as paho's threading model requires.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Protocol

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    retain: bool = False


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


class MqttTransport:
    """A paho-mqtt 2.x client that reconnects by itself and queues what it receives."""

    def __init__(self, settings: MqttSettings, *, max_queue: int = 0):
        self.settings = settings
        self.messages: queue.Queue[Message] = queue.Queue(maxsize=max_queue)
        self._subscriptions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            clean_session=settings.clean_session,
            protocol=mqtt.MQTTv311,
        )
        client.max_inflight_messages_set(settings.max_inflight)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        if settings.will is not None:
            client.will_set(
                settings.will.topic, settings.will.payload, qos=1, retain=settings.will.retain
            )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        s = self.settings
        self._client.connect_async(s.host, s.port, keepalive=s.keepalive)
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        with self._lock:
            self._subscriptions[topic] = qos
        if self._connected.is_set():
            self._client.subscribe(topic, qos)

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
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    # paho callbacks: run on paho's thread, must not block.
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused connection: %s", reason_code)
            return
        with self._lock:
            subscriptions = list(self._subscriptions.items())
        if subscriptions:
            client.subscribe(subscriptions)
        if self.settings.online is not None:
            online = self.settings.online
            client.publish(online.topic, online.payload, qos=1, retain=online.retain)
        self._connected.set()
        log.debug("connected to %s:%s", self.settings.host, self.settings.port)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        log.debug("disconnected: %s", reason_code)

    def _on_message(self, client, userdata, message) -> None:
        try:
            self.messages.put_nowait(Message(message.topic, bytes(message.payload), message.retain))
        except queue.Full:
            log.warning("inbound queue full, message on %s dropped", message.topic)


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
