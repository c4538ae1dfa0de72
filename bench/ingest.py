"""Signed ~10 KB updates per second through Mosquitto and the gateway into SQLite, beside
the rate at which the same Mosquitto passes the same bytes with no gateway behind it.

Both figures come from one run against one private broker (``MosquittoBroker``, loopback):

``mosquitto_msgs_per_s`` (the limit)
    One paho-mqtt 2.x publisher sends the K pre-built update frames at QoS 1 to one topic;
    one QoS 1 subscriber counts arrivals. Rate = K / (first publish -> last arrival).
``gateway_msgs_per_s``
    The same K frames, each on its own device's update topic, into a real
    ``gateway.Gateway`` (``MqttTransport``, ``UpdateStore`` and ``EmbeddedLedger`` in a
    temporary directory, default SQLite durability): every frame is decoded, its Ed25519
    signature verified, its payload checked, committed to SQLite and folded into the
    round's FedAvg. Rate = accepted / (first publish -> the step that accepted the last
    one returns); that step also closes the round (aggregate, store, ledger append).

The clients are ``fedcore.MqttTransport``s in this process, and the publisher runs on its
own thread in both cases while the main thread receives (the subscriber's queue, or
``Gateway.step``), so the two figures share the same client-side costs. The frames are
built and signed before either clock starts.

With ``tls=True`` the same run measures both figures again over mutual TLS: a CA in a
temporary directory issues certificates for the broker (127.0.0.1 in its subjectAltName),
the gateway, the baseline subscriber, the publishers and a presence-probe device, and
``MosquittoBroker(secure=...)`` runs the production TLS-only configuration with its
generated ACL (plus the open broker's queue limits, so only TLS and the ACL differ). The
publisher stays ONE client, as in the plain run: it is a dedicated benchmark identity the
ACL lets write ``fedledger/v1/<task>/update/#`` (``SecureBrokerFiles.publishers``), rather
than one certificate and connection per device, so the TLS figures differ from the plain
ones by the TLS (and ACL) cost alone, not by a different client topology; the gateway still
verifies every update's device signature. Each TLS measurement gets a fresh broker (the
baseline subscriber's persistent session would otherwise keep matching the gateway run's
topics). ``tls_cost_*`` = plain rate / TLS rate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fedcore import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MqttSettings,
    MqttTransport,
    TaskSpec,
    UpdateHeader,
    encode_tensors,
    encode_update,
    generate_key,
    init_params,
    model_hash,
    presence_topic,
    public_key_b64,
    signer_from_key,
    update_subscription,
    update_topic,
)
from fedledger._broker import MosquittoBroker, SecureBrokerFiles

from ._timing import sig

TASK_ID = "bench-ingest"
N_CLASSES = 2
TIME_LIMIT_S = 120.0
CONNECT_TIMEOUT_S = 10.0
_SEED = 20240601
_BASELINE_TOPIC = "fedledger-bench/baseline"


def _task(n_features: int) -> TaskSpec:
    return TaskSpec.model_validate(
        {
            "id": TASK_ID,
            "rounds": 1,
            "codec": "int8",
            "round_timeout": 600.0,
            "model": {"kind": "logreg", "n_features": n_features, "n_classes": N_CLASSES},
        }
    )


def _frames(
    task: TaskSpec, devices: Sequence[str], keys: dict, rng: np.random.Generator
) -> list[bytes]:
    """One signed int8 update per device for round 0, trained (nominally) from round 0's model."""
    spec = task.model_spec()
    base = model_hash(init_params(spec))
    shapes = spec.shapes()
    frames = []
    for device in devices:
        delta = {
            name: (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01))
            for name, shape in shapes.items()
        }
        header = UpdateHeader(
            task=task.id,
            round=0,
            device=device,
            base=base,
            samples=int(rng.integers(10, 500)),
            codec="int8",
            counter=0,
        )
        payload = encode_tensors(delta, "int8")
        frames.append(encode_update(header, payload, signer_from_key(keys[device])))
    return frames


def _n_features_for(size: int, devices: Sequence[str], keys: dict) -> int:
    """n_features whose int8 update frame is about ``size`` bytes (2 int8 values per feature)."""
    probe_features = 8
    rng = np.random.default_rng(0)
    probe = _frames(_task(probe_features), devices[-1:], keys, rng)[0]
    overhead = len(probe) - N_CLASSES * probe_features
    return max(1, round((size - overhead) / N_CLASSES))


#: TLS identities (certificate CN = client id): publishers write any device's update topic,
#: the baseline subscriber reads them as a gateway does, the probe announces its presence.
_GATEWAY = "bench-gateway"
_BASELINE_SUB = "bench-baseline-sub"
_BASELINE_PUB = "bench-baseline-pub"
_GATEWAY_PUB = "bench-gateway-pub"
_PROBE_DEVICE = "bench-probe"
#: The open broker's queue limits (MosquittoBroker's open config), for the TLS broker too:
#: Mosquitto's default of 1000 queued messages would drop QoS 1 updates behind the gateway.
_QUEUE_LIMITS = "max_queued_messages 100000\nmax_inflight_messages 100\n"


@dataclasses.dataclass(frozen=True)
class _Tls:
    """A temporary PKI and the TLS-only broker configuration that trusts it."""

    ca: Path
    clients: dict[str, tuple[Path, Path]]  # identity -> (certificate, key)
    secure: SecureBrokerFiles

    @classmethod
    def create(cls, directory: Path) -> _Tls:
        from fedledger._pki import ca_cert_path, init_ca, issue

        init_ca(directory, "bench")
        broker = issue(directory, "broker", "bench-broker", ips=["127.0.0.1"])
        kinds = {
            _GATEWAY: "gateway",
            _BASELINE_SUB: "gateway",
            _BASELINE_PUB: "device",
            _GATEWAY_PUB: "device",
            _PROBE_DEVICE: "device",
        }
        clients = {}
        for name, kind in kinds.items():
            issued = issue(directory, kind, name)  # type: ignore[arg-type]
            clients[name] = (issued.cert, issued.key)
        secure = SecureBrokerFiles(
            ca=ca_cert_path(directory),
            server_cert=broker.cert,
            server_key=broker.key,
            devices=[_PROBE_DEVICE],
            gateways=[_GATEWAY, _BASELINE_SUB],
            tasks=[TASK_ID],
            publishers=[_BASELINE_PUB, _GATEWAY_PUB],
        )
        return cls(ca_cert_path(directory), clients, secure)


class _TlsBroker(MosquittoBroker):
    """The production TLS-only broker with the open broker's queue limits."""

    def _write_secure_config(self, root: Path) -> Path:
        conf = super()._write_secure_config(root)
        with conf.open("a") as handle:
            handle.write("# Benchmark: the same queue limits as the open broker.\n")
            handle.write(_QUEUE_LIMITS)
        return conf


def _transport(broker: MosquittoBroker, client_id: str, tls: _Tls | None = None) -> MqttTransport:
    if tls is None:
        return MqttTransport(MqttSettings(host=broker.host, port=broker.port, client_id=client_id))
    cert, key = tls.clients[client_id]
    return MqttTransport(
        MqttSettings(
            host=broker.host,
            port=broker.port,
            client_id=client_id,
            tls_ca=tls.ca,
            tls_cert=cert,
            tls_key=key,
        )
    )


def _connect(transport: MqttTransport) -> None:
    transport.start()
    if not transport.wait_connected(CONNECT_TIMEOUT_S):
        raise TimeoutError(f"no connection to the broker within {CONNECT_TIMEOUT_S} s")


def _until(ready: Callable[[], bool], poll: Callable[[], None], what: str) -> None:
    """Call ``poll`` until ``ready()``, for at most CONNECT_TIMEOUT_S."""
    end = time.monotonic() + CONNECT_TIMEOUT_S
    while not ready():
        if time.monotonic() > end:
            raise TimeoutError(f"{what} within {CONNECT_TIMEOUT_S} s")
        poll()


class _Publisher(threading.Thread):
    """Publishes (topic, payload) pairs at QoS 1 on its own thread; records its start time."""

    def __init__(self, transport: MqttTransport, messages: Sequence[tuple[str, bytes]]):
        super().__init__(name="bench-publisher", daemon=True)
        self.transport = transport
        self.messages = messages
        self.started_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.started_at = time.perf_counter()
            for topic, payload in self.messages:
                self.transport.publish(topic, payload, qos=1)
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def finish(self) -> None:
        self.join(TIME_LIMIT_S)
        if self.error is not None:
            raise RuntimeError(f"publisher failed: {self.error}") from self.error


def _baseline(
    broker: MosquittoBroker, frames: Sequence[bytes], tls: _Tls | None = None
) -> tuple[float, int]:
    """Mosquitto alone: (seconds from first publish to last arrival, messages delivered)."""
    publisher = _transport(broker, _BASELINE_PUB, tls)
    subscriber = _transport(broker, _BASELINE_SUB, tls)
    if tls is None:
        subscription = f"{_BASELINE_TOPIC}/#"
        probe_topic, topic = f"{_BASELINE_TOPIC}/probe", f"{_BASELINE_TOPIC}/data"
    else:  # the only topics the ACL lets these identities use
        subscription = update_subscription(TASK_ID)
        probe_topic, topic = update_topic(TASK_ID, "probe"), update_topic(TASK_ID, "baseline")
    try:
        subscriber.subscribe(subscription, 1)
        _connect(subscriber)
        _connect(publisher)
        # The subscription is live once a probe comes back; then nothing else is in flight.
        seen: list[str] = []

        def probe() -> None:
            publisher.publish(probe_topic, b"probe", qos=1)
            with contextlib.suppress(queue.Empty):
                seen.append(subscriber.messages.get(timeout=0.2).topic)

        _until(lambda: bool(seen), probe, "the baseline subscription was not confirmed")
        time.sleep(0.2)
        while not subscriber.messages.empty():
            subscriber.messages.get_nowait()

        sender = _Publisher(publisher, [(topic, frame) for frame in frames])
        end = time.monotonic() + TIME_LIMIT_S
        sender.start()
        arrived = 0
        last = None
        while arrived < len(frames) and time.monotonic() < end:
            try:
                message = subscriber.messages.get(timeout=0.05)
            except queue.Empty:
                continue
            if message.topic == topic:
                arrived += 1
                last = time.perf_counter()
        sender.finish()
        assert sender.started_at is not None
        elapsed = (last if last is not None else time.perf_counter()) - sender.started_at
        return elapsed, arrived
    finally:
        publisher.stop()
        subscriber.stop()


def _gateway_path(
    broker: MosquittoBroker,
    task: TaskSpec,
    keys: dict,
    frames: Sequence[bytes],
    workdir: Path,
    tls: _Tls | None = None,
) -> tuple[float, int, dict[str, int]]:
    """Through the gateway: (seconds, accepted, rejected by reason)."""
    from gateway import DeviceRegistry, Gateway, UpdateStore
    from ledger import EmbeddedLedger, Identity

    devices = list(keys)
    gateway_key = generate_key()
    signer = signer_from_key(gateway_key)
    registry = DeviceRegistry({d: public_key_b64(k) for d, k in keys.items()})
    store = UpdateStore(workdir / "store.sqlite")
    try:
        ledger = EmbeddedLedger(
            workdir / "ledger.sqlite", signer=signer, public_key=public_key_b64(gateway_key)
        )
    except BaseException:
        store.close()
        raise
    gateway = Gateway(
        task=task,
        transport=_transport(broker, _GATEWAY, tls),
        store=store,
        ledger=ledger,
        registry=registry,
        signer=signer,
        evaluation=None,
        max_message_bytes=max(DEFAULT_MAX_MESSAGE_BYTES, 2 * max(len(f) for f in frames)),
        # the site's admin registers the devices and the task on the ledger (untimed)
        admin=Identity(msp_id="org1", subject="admin", role="admin"),
    )
    publisher = _transport(broker, _GATEWAY_PUB, tls)
    # Over TLS the publisher may write update topics only: a device announces the presence.
    prober = publisher if tls is None else _transport(broker, _PROBE_DEVICE, tls)
    try:
        gateway.connect(CONNECT_TIMEOUT_S)
        gateway.start()
        _connect(publisher)
        if prober is not publisher:
            _connect(prober)
        # The gateway's subscriptions are live once it has seen a presence probe.
        probe_device = _PROBE_DEVICE

        def probe() -> None:
            prober.publish(presence_topic(task.id, probe_device), b"online", qos=1)
            gateway.step(0.2)

        _until(
            lambda: probe_device in gateway.stats.online,
            probe,
            "the gateway's subscriptions were not confirmed",
        )

        sender = _Publisher(
            publisher, [(update_topic(task.id, d), f) for d, f in zip(devices, frames, strict=True)]
        )
        end = time.monotonic() + TIME_LIMIT_S
        sender.start()
        while gateway.stats.accepted < len(frames) and time.monotonic() < end:
            gateway.step(0.05)
        done = time.perf_counter()
        sender.finish()
        assert sender.started_at is not None
        return done - sender.started_at, gateway.stats.accepted, dict(gateway.stats.rejected)
    finally:
        if prober is not publisher:
            prober.stop()
        publisher.stop()
        gateway.close()


def _tls_figures(
    task: TaskSpec, keys: dict, frames: Sequence[bytes], workdir: Path
) -> tuple[float, int, float, int, dict[str, int]]:
    """Both measurements over mutual TLS, each on a fresh TLS-only broker."""
    tls = _Tls.create(workdir / "pki")
    with _TlsBroker(secure=tls.secure) as broker:
        mosquitto_s, delivered = _baseline(broker, frames, tls)
    gateway_dir = workdir / "gateway-tls"
    gateway_dir.mkdir()
    with _TlsBroker(secure=tls.secure) as broker:
        gateway_s, accepted, rejected = _gateway_path(broker, task, keys, frames, gateway_dir, tls)
    return mosquitto_s, delivered, gateway_s, accepted, rejected


def _cost(plain_rate: float, tls_rate: float) -> float | None:
    return sig(plain_rate / tls_rate, 3) if tls_rate > 0 else None


def run(*, messages: int = 2000, size: int = 10_240, tls: bool = False) -> dict:
    """Send ``messages`` signed updates of about ``size`` bytes; return both rates as a dict.

    ``tls=True`` also measures both rates over mutual TLS (see the module docstring) and adds
    the ``*_tls`` figures and ``tls_cost_mosquitto``/``tls_cost_gateway`` (plain / TLS rate).
    """
    if messages < 1 or size < 1:
        raise ValueError("messages and size must be at least 1")
    rng = np.random.default_rng(_SEED)
    devices = [f"dev-{i:05d}" for i in range(messages)]
    keys = {device: generate_key() for device in devices}
    task = _task(_n_features_for(size, devices, keys))
    frames = _frames(task, devices, keys, rng)
    message_bytes = round(sum(map(len, frames)) / len(frames))

    with MosquittoBroker() as broker, tempfile.TemporaryDirectory(prefix="fedledger-bench-") as d:
        mosquitto_s, delivered = _baseline(broker, frames)
        gateway_s, accepted, rejected = _gateway_path(broker, task, keys, frames, Path(d))
        if tls:
            tls_figures = _tls_figures(task, keys, frames, Path(d))

    mosquitto_rate = delivered / mosquitto_s
    gateway_rate = accepted / gateway_s
    ratio = sig(gateway_rate / mosquitto_rate, 3) if mosquitto_rate > 0 else None
    result = {
        "bench": "ingest",
        "messages": messages,
        "message_bytes": message_bytes,
        "mosquitto_msgs_per_s": sig(mosquitto_rate),
        "gateway_msgs_per_s": sig(gateway_rate),
        "ratio_gateway_to_mosquitto": ratio,
        "mosquitto_s": sig(mosquitto_s),
        "gateway_s": sig(gateway_s),
        "delivered": delivered,
        "accepted": accepted,
        "rejected": dict(sorted(rejected.items())),
    }
    if not tls:
        return result
    tls_mosquitto_s, tls_delivered, tls_gateway_s, tls_accepted, tls_rejected = tls_figures
    tls_mosquitto_rate = tls_delivered / tls_mosquitto_s
    tls_gateway_rate = tls_accepted / tls_gateway_s
    tls_ratio = sig(tls_gateway_rate / tls_mosquitto_rate, 3) if tls_mosquitto_rate > 0 else None
    result.update(
        {
            "tls": True,
            "mosquitto_tls_msgs_per_s": sig(tls_mosquitto_rate),
            "gateway_tls_msgs_per_s": sig(tls_gateway_rate),
            "ratio_gateway_to_mosquitto_tls": tls_ratio,
            "mosquitto_tls_s": sig(tls_mosquitto_s),
            "gateway_tls_s": sig(tls_gateway_s),
            "delivered_tls": tls_delivered,
            "accepted_tls": tls_accepted,
            "rejected_tls": dict(sorted(tls_rejected.items())),
            "tls_cost_mosquitto": _cost(mosquitto_rate, tls_mosquitto_rate),
            "tls_cost_gateway": _cost(gateway_rate, tls_gateway_rate),
        }
    )
    return result
