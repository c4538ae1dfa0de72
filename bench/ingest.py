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

With ``secure=True`` the same run also sends the same K updates (the same tensors, headers
and counters) as a secure site's devices do (``provision(secure=True)``): signed with each
device's certificate key (ECDSA P-256, its ~500-byte DER certificate in the frame) and
sealed to the gateway's X25519 key (X25519 + HKDF-SHA256 + AES-256-GCM). The frames are
built and sealed before any clock starts, so every figure is the receiving side's cost.

``gateway_secure_msgs_per_s``
    As ``gateway_msgs_per_s``, through a gateway configured like a secure site's: devices
    admitted by certificate fingerprint, the temporary CA and its CRL as ``trust``, the
    X25519 key as ``decryption_key``, ``require_encryption`` on. Every frame's certificate
    chain (CA signature, validity, CN = sender, CRL) and ECDSA signature are checked and
    its payload opened before the same payload checks, SQLite commit and FedAvg. Each device
    sends one update, so every certificate is new to the gateway: the figure is a fleet's
    first updates (``CertificateTrust`` caches a verified certificate by fingerprint, so a
    device's later updates skip the CA-signature check). It runs on a fresh open broker,
    after the plain path, over plain MQTT even with ``tls=True``, so it differs from
    ``gateway_msgs_per_s`` by the frame kind alone.
``secure_cost_gateway``
    ``gateway_msgs_per_s / gateway_secure_msgs_per_s``: how many times longer an update
    takes end to end on the secure path than on the plain Ed25519 path, measured in the
    same run (with every update accepted on both paths, the ratio of the two times).
``validator_msgs_per_s``, ``validator_secure_msgs_per_s``
    ``UpdateValidator.check`` alone, no MQTT, SQLite or ledger: frames per second over the K
    plain frames, and over the K secure frames with a fresh ``CertificateTrust`` (every
    chain checked, as on the gateway path); best of three passes each.
    ``validator_secure_cached_msgs_per_s`` is one more pass once the trust has verified
    every certificate (a device's later updates); ``secure_cost_validator`` = plain / secure
    (fresh) validator rate.
``message_bytes_secure``
    The mean secure frame size, beside ``message_bytes`` for the plain frames.

With ``ledger_delay=D`` (default 2 s, Fabric's default batch timeout; 0 skips it) the same K
frames go through a gateway running FedBuff rounds (``buffer`` = K / ``ANCHOR_ROUNDS``, every
frame based on the first model, so ``ANCHOR_ROUNDS`` rounds close during the run) three
times, each on a fresh store and ledger: its ledger outbox in a background worker over the
embedded ledger as it is (``gateway_anchoring_msgs_per_s``), the same with every round
transaction (``OpenRound``, ``RecordUpdates``, ``CommitRound``) waiting D seconds first, as
for a block (``gateway_slow_ledger_msgs_per_s``), and that slow ledger written inline by the
loop itself, as the gateway did before the outbox (``gateway_inline_ledger_msgs_per_s``).
``slow_ledger_ratio`` = slow / as-is (goal: >= 0.9). ``close_to_publish_s_max`` (and
``_inline``): the longest wait, over the closed rounds, from the store's commit of a closed
round to the publication of the next round's model (goal: <= 0.2 s with the slow ledger);
``unanchored_at_end``: closed rounds the slow ledger did not hold yet when the last update
was accepted (ingest went on while anchoring was pending).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcore import (
    ALG_ECDSA_P256,
    DEFAULT_MAX_MESSAGE_BYTES,
    CertificateTrust,
    MqttSettings,
    MqttTransport,
    TaskSpec,
    UpdateHeader,
    certificate_der,
    certificate_fingerprint,
    certificate_signer,
    encode_tensors,
    encode_update,
    generate_key,
    init_params,
    load_x25519_private_key,
    model_hash,
    presence_topic,
    public_key_b64,
    signer_from_key,
    update_subscription,
    update_topic,
)
from fedcore.mosquitto import MosquittoBroker, SecureBrokerFiles

from ._timing import sig

if TYPE_CHECKING:
    from gateway import DeviceRegistry

TASK_ID = "bench-ingest"
N_CLASSES = 2
TIME_LIMIT_S = 120.0
CONNECT_TIMEOUT_S = 10.0
_SEED = 20240601
_BASELINE_TOPIC = "fedledger-bench/baseline"
#: FedBuff rounds the ledger-delay run closes (its buffer: messages / ANCHOR_ROUNDS).
ANCHOR_ROUNDS = 4
#: Goals of the ledger-delay run: ingest with a slow ledger / without, close-to-publish.
SLOW_LEDGER_RATIO_GOAL = 0.9
CLOSE_TO_PUBLISH_GOAL_S = 0.2
#: Contract functions a round costs; the slow ledger delays these (registration is untimed).
_ROUND_TXS = frozenset({"OpenRound", "RecordUpdates", "CommitRound", "EndTask"})
#: Passes of the validator over every frame (``--secure``); the fastest one is reported.
_VALIDATOR_REPEATS = 3


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


def _updates(
    task: TaskSpec, devices: Sequence[str], rng: np.random.Generator
) -> list[tuple[UpdateHeader, bytes]]:
    """One int8 update (header, payload) per device for round 0, trained (nominally) from
    round 0's model; not yet signed, so the plain and secure frames carry the same tensors."""
    spec = task.model_spec()
    base = model_hash(init_params(spec))
    shapes = spec.shapes()
    updates = []
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
        updates.append((header, encode_tensors(delta, "int8")))
    return updates


def _frames(
    task: TaskSpec, devices: Sequence[str], keys: dict, rng: np.random.Generator
) -> list[bytes]:
    """One Ed25519-signed int8 update per device (see ``_updates``)."""
    return _signed(_updates(task, devices, rng), keys)


def _signed(updates: Sequence[tuple[UpdateHeader, bytes]], keys: dict) -> list[bytes]:
    return [encode_update(h, p, signer_from_key(keys[h.device])) for h, p in updates]


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
        from fedcore.pki import ca_cert_path, init_ca, issue

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


@dataclasses.dataclass(frozen=True)
class _SecureSite:
    """What ``provision(secure=True)`` gives a gateway and its devices, in a temporary
    directory: an organisation CA with its (empty) CRL, one device certificate (EC P-256,
    CN = device id, the profile ``fedledger pki issue device`` writes) and key per device,
    and the gateway's X25519 sealing key.

    The device certificates are built in memory with the CA's own leaf builder rather than
    by ``issue``, which locks, rewrites ``index.json`` and fsyncs three files per
    certificate: for 2000 devices that setup would dwarf the measurement.
    """

    ca: Path
    crl: Path
    keys: dict[str, ec.EllipticCurvePrivateKey]
    certificates: dict[str, bytes]  # device -> DER
    sealing: X25519PrivateKey

    @classmethod
    def create(cls, directory: Path, devices: Sequence[str]) -> _SecureSite:
        import datetime as dt

        from fedcore.pki import (
            LEAF_DAYS,
            build_leaf,
            ca_cert_path,
            crl_path,
            init_ca,
            load_ca,
            x25519_key,
        )

        init_ca(directory, "bench")
        ca = load_ca(directory)
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        keys, certificates = {}, {}
        for device in devices:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = build_leaf(ca, key, "device", device, days=LEAF_DAYS, dns=(), ips=(), now=now)
            keys[device], certificates[device] = key, certificate_der(cert)
        sealing = load_x25519_private_key(x25519_key(directory, _GATEWAY).key)
        return cls(ca_cert_path(directory), crl_path(directory), keys, certificates, sealing)

    def registry(self) -> DeviceRegistry:
        """Devices admitted by certificate only (no Ed25519 keys), as in a secure site."""
        from gateway import DeviceRegistry

        fingerprints = {d: certificate_fingerprint(der) for d, der in self.certificates.items()}
        return DeviceRegistry({}, certificates=fingerprints)

    def gateway_options(self) -> dict[str, Any]:
        """The gateway's ``ca``, ``crl``, ``encryption_key`` and ``require_encryption``; a
        fresh ``CertificateTrust`` each time, so no certificate starts out verified."""
        return {
            "trust": CertificateTrust.load(self.ca, self.crl),
            "decryption_key": self.sealing,
            "require_encryption": True,
        }

    def frames(self, updates: Sequence[tuple[UpdateHeader, bytes]]) -> list[bytes]:
        """The updates signed with each device's certificate key (certificate in the frame)
        and sealed to the gateway's X25519 key, as a secure site's agents send them."""
        recipient = self.sealing.public_key()
        frames = []
        for header, payload in updates:
            der = self.certificates[header.device]
            signed = dataclasses.replace(
                header, alg=ALG_ECDSA_P256, cert=base64.b64encode(der).decode("ascii")
            )
            signer = certificate_signer(self.keys[header.device])
            frames.append(encode_update(signed, payload, signer, seal_to=recipient))
        return frames


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
    secure: _SecureSite | None = None,
) -> tuple[float, int, dict[str, int]]:
    """Through the gateway: (seconds, accepted, rejected by reason).

    With ``secure`` the gateway admits the devices by certificate and trusts the site's CA
    and CRL, holds its sealing key and requires sealed payloads (``frames`` must be the
    site's frames)."""
    from gateway import Gateway, UpdateStore
    from ledger import EmbeddedLedger, Identity

    devices = list(keys)
    gateway_key = generate_key()
    signer = signer_from_key(gateway_key)
    if secure is None:
        registry = _plain_registry(keys)
        security: dict[str, Any] = {}
    else:
        registry, security = secure.registry(), secure.gateway_options()
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
        max_message_bytes=_max_message_bytes(frames),
        # the site's admin registers the devices and the task on the ledger (untimed)
        admin=Identity(msp_id="org1", subject="admin", role="admin"),
        **security,
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

        started, done = _send_all(gateway, publisher, task, devices, frames)
        return done - started, gateway.stats.accepted, dict(gateway.stats.rejected)
    finally:
        if prober is not publisher:
            prober.stop()
        publisher.stop()
        gateway.close()


class _SlowLedger:
    """A ledger backend whose round transactions each wait ``delay`` seconds first, as a
    Fabric submit waits for its block; everything else passes straight through."""

    def __init__(self, inner: Any, delay: float):
        self._inner = inner
        self._delay = delay

    def submit(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        if fn in _ROUND_TXS and self._delay > 0:
            time.sleep(self._delay)
        return self._inner.submit(fn, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Timed:
    """The gateway's transport, noting when each open model is published."""

    def __init__(self, inner: MqttTransport):
        self._inner = inner
        self.published: list[float] = []

    def publish(self, topic: str, payload: bytes, **kwargs: Any) -> None:
        self.published.append(time.perf_counter())
        self._inner.publish(topic, payload, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _anchoring_path(
    broker: MosquittoBroker,
    task: TaskSpec,
    keys: dict,
    frames: Sequence[bytes],
    workdir: Path,
    *,
    delay: float,
    worker: bool,
) -> dict[str, Any]:
    """FedBuff rounds through a gateway whose ledger is ``delay`` s slow per round
    transaction, anchored by the outbox's worker (``worker``) or inline."""
    from gateway import Gateway, UpdateStore
    from ledger import EmbeddedLedger, Identity

    closed: list[float] = []

    class Store(UpdateStore):
        def close_round(self, *args: Any, **kwargs: Any) -> None:
            super().close_round(*args, **kwargs)
            closed.append(time.perf_counter())

    workdir.mkdir(parents=True)
    gateway_key = generate_key()
    signer = signer_from_key(gateway_key)
    store = Store(workdir / "store.sqlite")
    ledger = EmbeddedLedger(
        workdir / "ledger.sqlite", signer=signer, public_key=public_key_b64(gateway_key)
    )
    transport = _Timed(_transport(broker, _GATEWAY))
    gateway = Gateway(
        task=task,
        transport=transport,  # type: ignore[arg-type]  # the same interface
        store=store,
        ledger=_SlowLedger(ledger, delay),  # type: ignore[arg-type]
        registry=_plain_registry(keys),
        signer=signer,
        max_message_bytes=_max_message_bytes(frames),
        admin=Identity(msp_id="org1", subject="admin", role="admin"),
        ledger_worker=worker,
    )
    publisher = _transport(broker, _GATEWAY_PUB)
    try:
        gateway.connect(CONNECT_TIMEOUT_S)
        gateway.start()
        _connect(publisher)

        def probe() -> None:
            publisher.publish(presence_topic(task.id, _PROBE_DEVICE), b"online", qos=1)
            gateway.step(0.2)

        _until(lambda: _PROBE_DEVICE in gateway.stats.online, probe, "no presence probe")
        published_before = len(transport.published)
        started, done = _send_all(gateway, publisher, task, list(keys), frames)
        unanchored = len(store.unledgered(task.id))
        published = transport.published[published_before:]
        # each closed round's commit -> the first publication after it (the next model)
        waits = [min((p for p in published if p >= c), default=done) - c for c in closed]
        return {
            "seconds": done - started,
            "accepted": gateway.stats.accepted,
            "rounds": len(closed),
            "close_to_publish_s_max": max(waits, default=None),
            "unanchored_at_end": unanchored,
        }
    finally:
        publisher.stop()
        gateway.close(drain=0)


def _anchoring_figures(
    broker: MosquittoBroker, task: TaskSpec, keys: dict, frames: Sequence[bytes], workdir: Path,
    delay: float,
) -> dict[str, Any]:  # fmt: skip
    buffer = max(1, -(-len(frames) // ANCHOR_ROUNDS))
    async_task = TaskSpec.model_validate(
        {
            **task.model_dump(mode="json", exclude={"asynchronous", "columns", "dp"}),
            "rounds": ANCHOR_ROUNDS + 1,
            "quorum": 1,
            "asynchronous": {
                "buffer": buffer,
                "max_staleness": ANCHOR_ROUNDS + 1,
                "staleness_exponent": 0.0,
            },
        }
    )
    runs = {
        name: _anchoring_path(
            broker, async_task, keys, frames, workdir / name, delay=d, worker=worker
        )
        for name, d, worker in (
            ("as_is", 0.0, True), ("slow", delay, True), ("inline", delay, False),
        )
    }  # fmt: skip
    rate = {name: r["accepted"] / r["seconds"] for name, r in runs.items()}
    ratio = rate["slow"] / rate["as_is"] if rate["as_is"] > 0 else None
    wait = runs["slow"]["close_to_publish_s_max"]
    return {
        "ledger_delay_s": delay,
        "anchor_rounds": runs["slow"]["rounds"],
        "anchor_buffer": buffer,
        "gateway_anchoring_msgs_per_s": sig(rate["as_is"]),
        "gateway_slow_ledger_msgs_per_s": sig(rate["slow"]),
        "gateway_inline_ledger_msgs_per_s": sig(rate["inline"]),
        "slow_ledger_ratio": None if ratio is None else sig(ratio, 3),
        "slow_ledger_ratio_goal": SLOW_LEDGER_RATIO_GOAL,
        "close_to_publish_s_max": None if wait is None else sig(wait, 3),
        "close_to_publish_s_max_inline": sig(runs["inline"]["close_to_publish_s_max"], 3),
        "close_to_publish_goal_s": CLOSE_TO_PUBLISH_GOAL_S,
        "unanchored_at_end": runs["slow"]["unanchored_at_end"],
        "accepted_slow_ledger": runs["slow"]["accepted"],
        "anchoring_goal_met": bool(
            ratio is not None
            and ratio >= SLOW_LEDGER_RATIO_GOAL
            and wait is not None
            and wait <= CLOSE_TO_PUBLISH_GOAL_S
        ),
    }


def _send_all(
    gateway: Any, publisher: MqttTransport, task: TaskSpec, devices: Sequence[str],
    frames: Sequence[bytes],
) -> tuple[float, float]:  # fmt: skip
    """Publish each device's frame from a thread while the gateway steps, until it has
    accepted them all (or TIME_LIMIT_S): ``(first publish, last acceptance)``."""
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
    return sender.started_at, done


def _max_message_bytes(frames: Sequence[bytes]) -> int:
    return max(DEFAULT_MAX_MESSAGE_BYTES, 2 * max(len(f) for f in frames))


def _secure_gateway(
    task: TaskSpec, keys: dict, site: _SecureSite, frames: Sequence[bytes], workdir: Path
) -> tuple[float, int, dict[str, int]]:
    """The secure frames through a gateway configured like a secure site's, on a fresh open
    broker (the plain gateway's broker may still hold its session)."""
    gateway_dir = workdir / "gateway-secure"
    gateway_dir.mkdir()
    with MosquittoBroker() as broker:
        return _gateway_path(broker, task, keys, frames, gateway_dir, secure=site)


def _validator_seconds(
    task: TaskSpec,
    devices: Sequence[str],
    registry: DeviceRegistry,
    frames: Sequence[bytes],
    repeats: int,
    options: Callable[[], dict[str, Any]],
) -> tuple[float, float]:
    """``UpdateValidator.check`` alone over every frame (decode, signature, certificate chain
    and CRL, unseal, payload checks; no MQTT, SQLite or ledger): the best of ``repeats`` passes
    of a fresh validator (``options()`` each time, so a ``CertificateTrust`` starts with no
    certificate verified), then one more pass of the last validator, whose trust has now
    verified every certificate. Returns (best fresh pass, cached pass) in seconds; a frame the
    validator refuses raises, so the figures are for accepted frames only."""
    from gateway import RoundContext, UpdateValidator

    spec = task.model_spec()
    ctx = RoundContext(
        round=0,
        base=model_hash(init_params(spec)),
        has_update=lambda device: False,
        last_counter=lambda device: -1,
    )
    topics = [update_topic(task.id, device) for device in devices]

    def one_pass(validator: UpdateValidator) -> float:
        start = time.perf_counter()
        for topic, frame in zip(topics, frames, strict=True):
            validator.check(topic, frame, ctx)
        return time.perf_counter() - start

    best = float("inf")
    for _ in range(repeats):
        validator = UpdateValidator(
            task=task.id,
            registry=registry,
            shapes=spec.shapes(),
            max_message_bytes=_max_message_bytes(frames),
            **options(),
        )
        best = min(best, one_pass(validator))
    return best, one_pass(validator)


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


def _cost(plain_rate: float, other_rate: float) -> float | None:
    """How many times longer an update takes on the other path: plain rate / its rate."""
    return sig(plain_rate / other_rate, 3) if other_rate > 0 else None


def _plain_registry(keys: dict) -> DeviceRegistry:
    from gateway import DeviceRegistry

    return DeviceRegistry({d: public_key_b64(k) for d, k in keys.items()})


def run(
    *,
    messages: int = 2000,
    size: int = 10_240,
    tls: bool = False,
    secure: bool = False,
    ledger_delay: float = 2.0,
) -> dict:
    """Send ``messages`` signed updates of about ``size`` bytes; return both rates as a dict.

    ``tls=True`` also measures both rates over mutual TLS (see the module docstring) and adds
    the ``*_tls`` figures and ``tls_cost_mosquitto``/``tls_cost_gateway`` (plain / TLS rate).
    ``secure=True`` also sends the same updates certificate-signed and sealed through a
    gateway that requires it, and times the validator alone on both kinds of frame (see the
    module docstring for the ``*_secure`` and ``validator_*`` figures). ``ledger_delay`` > 0
    adds the figures of FedBuff rounds anchored on a ledger that slow per round transaction.
    """
    if messages < 1 or size < 1:
        raise ValueError("messages and size must be at least 1")
    if ledger_delay < 0:
        raise ValueError("ledger_delay must be >= 0")
    rng = np.random.default_rng(_SEED)
    devices = [f"dev-{i:05d}" for i in range(messages)]
    keys = {device: generate_key() for device in devices}
    task = _task(_n_features_for(size, devices, keys))
    updates = _updates(task, devices, rng)
    frames = _signed(updates, keys)
    message_bytes = round(sum(map(len, frames)) / len(frames))

    with tempfile.TemporaryDirectory(prefix="fedledger-bench-") as tmp:
        d = Path(tmp)
        if secure:  # every frame built and sealed before any clock starts
            site = _SecureSite.create(d / "secure-pki", devices)
            secure_frames = site.frames(updates)
        with MosquittoBroker() as broker:
            mosquitto_s, delivered = _baseline(broker, frames)
            gateway_s, accepted, rejected = _gateway_path(broker, task, keys, frames, d)
            if ledger_delay > 0:
                anchoring = _anchoring_figures(
                    broker, task, keys, frames, d / "anchoring", ledger_delay
                )
        if tls:
            tls_figures = _tls_figures(task, keys, frames, d)
        if secure:
            secure_gateway = _secure_gateway(task, keys, site, secure_frames, d)
            validator_s, _ = _validator_seconds(
                task, devices, _plain_registry(keys), frames, _VALIDATOR_REPEATS, dict
            )
            validator_secure_s, validator_cached_s = _validator_seconds(
                task,
                devices,
                site.registry(),
                secure_frames,
                _VALIDATOR_REPEATS,
                site.gateway_options,
            )

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
    if ledger_delay > 0:
        result.update(anchoring)
    if tls:
        tls_mosquitto_s, tls_delivered, tls_gateway_s, tls_accepted, tls_rejected = tls_figures
        tls_mosquitto_rate = tls_delivered / tls_mosquitto_s
        tls_gateway_rate = tls_accepted / tls_gateway_s
        tls_ratio = (
            sig(tls_gateway_rate / tls_mosquitto_rate, 3) if tls_mosquitto_rate > 0 else None
        )
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
    if secure:
        secure_s, secure_accepted, secure_rejected = secure_gateway
        secure_rate = secure_accepted / secure_s
        n = len(frames)
        validator_rate = n / validator_s
        validator_secure_rate = n / validator_secure_s
        result.update(
            {
                "secure": True,
                "message_bytes_secure": round(sum(map(len, secure_frames)) / n),
                "gateway_secure_msgs_per_s": sig(secure_rate),
                "gateway_secure_s": sig(secure_s),
                "accepted_secure": secure_accepted,
                "rejected_secure": dict(sorted(secure_rejected.items())),
                "secure_cost_gateway": _cost(gateway_rate, secure_rate),
                "validator_msgs_per_s": sig(validator_rate),
                "validator_secure_msgs_per_s": sig(validator_secure_rate),
                "validator_secure_cached_msgs_per_s": sig(n / validator_cached_s),
                "secure_cost_validator": _cost(validator_rate, validator_secure_rate),
            }
        )
    return result
