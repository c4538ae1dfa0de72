"""The gateway service: runs a task's rounds from first model to final record.

One loop, written once: receive -> validate -> persist -> hand to the round protocol -> on
close: aggregate, evaluate, persist (with the round's ledger record), enqueue for the ledger,
publish the next model. The transport's callback thread only queues messages; one thread
owns all state. What differs between synchronous rounds and FedBuff lives in the task's
:class:`~gateway._protocol.RoundProtocol`; the ledger is written by the
:class:`~gateway._anchor.LedgerOutbox`, off this thread when it runs in the background.

No acknowledged update is lost: an update's PUBACK goes out only once its batch (accepted
or rejected) is committed to the store (paho's manual acknowledgements), so the broker
keeps, and after a crash re-delivers, whatever the gateway had not made durable. Updates
that arrive before the open round is rebuilt from the store at start are held, not
refused; a message delivered again that the store already holds is acknowledged and
dropped without a trace (it is not a rejection).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcore import (
    MAX_BATCH_RECORDS,
    CertificateTrust,
    Message,
    ModelHeader,
    Params,
    Signer,
    TaskSpec,
    TensorView,
    Transport,
    UpdateHeader,
    accuracy,
    crash_point,
    decode_envelope,
    decode_tensors,
    encode_model,
    init_params,
    iter_tensors,
    ledger_privacy,
    model_hash,
    model_payload,
    model_topic,
    open_update_payload,
    presence_subscription,
    presence_topic,
    seed_digest,
    update_subscription,
)
from ledger import ContractError, Identity, LedgerBackend, LedgerError

from ._aggregate import RoundAggregator
from ._anchor import LedgerOutbox, read_fleet
from ._errors import GatewayError, Rejected
from ._global import next_global_model
from ._metrics import GatewayMetrics
from ._protocol import make_protocol, protocol_name
from ._registry import DeviceRegistry
from ._round import OpenRound, RoundResult, round_record
from ._store import PendingRejection, PendingUpdate, UpdateStore
from ._validate import AcceptedUpdate, RoundContext, UpdateValidator

# The built-in round protocols register themselves on import.
from . import _dp, _fedbuff, _sync  # noqa: F401  isort: skip

log = logging.getLogger(__name__)

#: Messages handled per store transaction (group commit).
_BATCH = 256
#: Rejections a message delivered again would get; such a message whose update the store
#: already holds is no rejection.
_AGAIN = frozenset({"replayed", "duplicate", "stale_round", "too_stale", "round_closed"})


@dataclass
class GatewayStats:
    """Lifetime counters and last-round figures; :class:`GatewayMetrics` exports them."""

    received: int = 0
    accepted: int = 0
    bytes_received: int = 0
    rejected: Counter = field(default_factory=Counter)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    rounds_closed: int = 0
    online: set[str] = field(default_factory=set)
    #: Ledger writes of the loop itself that failed (certificate rotations); the outbox
    #: counts its own.
    ledger_failures: int = 0
    #: Messages delivered again (by the broker after a crash, or re-sent by a device) whose
    #: update the store already held: acknowledged and dropped.
    redelivered: int = 0
    #: The open round; once the final model is published, the task's round count.
    current_round: int | None = None
    last_participants: int | None = None
    last_accuracy: float | None = None


class Gateway:
    def __init__(
        self,
        *,
        task: TaskSpec,
        transport: Transport,
        store: UpdateStore,
        ledger: LedgerBackend,
        registry: DeviceRegistry,
        signer: Signer,
        evaluation: tuple[np.ndarray, np.ndarray] | None = None,
        max_message_bytes: int,
        clock: Callable[[], float] = time.time,
        on_round: Callable[[RoundResult], None] | None = None,
        metrics: GatewayMetrics | None = None,
        identity: Identity | None = None,
        admin: Identity | None = None,
        trust: CertificateTrust | None = None,
        decryption_key: X25519PrivateKey | None = None,
        require_encryption: bool = False,
        protocol: str | None = None,
        ledger_worker: bool = False,
        dp_seed: bytes | None = None,
    ):
        """``identity`` is who the gateway submits rounds as (role ``gateway``); ``admin``, when
        given, registers the fleet and creates the task on the ledger at first start (the
        embedded backend); without it they must already be there (Fabric, set up by an
        operator).

        ``protocol`` names a registered round protocol (default: the task's, see
        :func:`~gateway._protocol.protocol_name`). ``ledger_worker`` anchors rounds from a
        background thread (``fedledger gateway run``); without it the loop anchors inline,
        which keeps a stepped gateway deterministic. ``dp_seed``: the secret that draws a DP
        task's sampled devices; its SHA-256 must be the task's ``dp.seed_sha256``."""
        self.task = task
        self.spec = task.model_spec()
        self.transport = transport
        self.store = store
        self.ledger = ledger
        self.registry = registry
        self.evaluation = evaluation
        self.stats = GatewayStats()
        self.metrics = metrics
        self.identity = identity or Identity(msp_id="org1", subject="gateway", role="gateway")
        self.admin = admin
        self.results: list[RoundResult] = []
        self._signer = signer
        self._clock = clock
        self._on_round = on_round
        self._validator = UpdateValidator(
            task=task.id,
            registry=registry,
            shapes=self.spec.shapes(),
            max_message_bytes=max_message_bytes,
            trust=trust,
            decryption_key=decryption_key,
            require_encryption=require_encryption,
        )
        options = {}
        if task.dp is not None:
            options["dp_seed"] = _checked_dp_seed(task, dp_seed)
        self.protocol = make_protocol(
            protocol or protocol_name(task),
            task=task,
            store=store,
            read_frame=self._stored_update,
            **options,
        )
        #: Rounds the outbox anchored since the loop last looked (any thread puts).
        self._anchored: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.outbox = LedgerOutbox(
            task_id=task.id,
            store=store,
            ledger=ledger,
            identity=self.identity,
            metrics=metrics,
            on_anchored=self._anchored.put,
        )
        self._ledger_worker = ledger_worker
        #: The certificate each device signs with, as the ledger records it (rotation).
        self._fingerprints: dict[str, str] = {}
        self._counters: dict[str, int] = {}
        #: Accepted updates waiting for the batch commit, with the round each counts in.
        self._pending: list[tuple[AcceptedUpdate, int]] = []
        self._pending_devices: set[str] = set()
        self._pending_rejections: list[PendingRejection] = []
        self._revoked: frozenset[str] = frozenset()
        self._open: OpenRound | None = None
        self._final_hash: str | None = None
        self._presence_prefix = presence_topic(task.id, "")
        #: Devices whose presence a live (not retained) message told: a retained message,
        #: older by nature, never overrides it.
        self._live_presence: set[str] = set()
        #: Until ``start`` has rebuilt the open round, updates wait here (unacknowledged).
        self._started = False
        self._held: list[Message] = []
        #: Messages of the batch being handled: acknowledged once it is committed.
        self._to_ack: list[Message] = []
        if metrics is not None:
            metrics.bind(self)

    # ------------------------------------------------------------------ lifecycle
    @property
    def finished(self) -> bool:
        return self._final_hash is not None

    @property
    def current_round(self) -> int | None:
        return None if self._open is None else self._open.round

    @property
    def final_model(self) -> str | None:
        return self._final_hash

    def connect(self, timeout: float = 10.0) -> None:
        self.transport.subscribe(update_subscription(self.task.id), 1)
        # Presence at QoS 0: it is state (retained, last wills), and it must not queue behind
        # updates held unacknowledged while the gateway starts.
        self.transport.subscribe(presence_subscription(self.task.id), 0)
        for topic, qos in self.protocol.subscriptions(self.task.id):
            self.transport.subscribe(topic, qos)
        self.transport.start()
        if not self.transport.wait_connected(timeout):
            raise GatewayError(f"could not reach the broker within {timeout:.0f} s")

    def wait_for_devices(self, timeout: float) -> int:
        """Drain presence messages until every registered device is online or ``timeout``."""
        end = time.monotonic() + timeout
        while len(self.stats.online & set(self.registry)) < len(self.registry):
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            self._drain(min(remaining, 0.2))
        return len(self.stats.online & set(self.registry))

    def start(self) -> None:
        """Resume the task from the store, or open its first round; then handle the updates
        that arrived meanwhile (held, not refused)."""
        if self._ledger_worker:
            self.outbox.start()
        self._begin()
        self._started = True
        held, self._held = self._held, []
        if held:
            log.info("handling %d updates that arrived before the round was resumed", len(held))
            for message in held:
                self._handle(message)
            self._flush()

    def _begin(self) -> None:
        self._counters = self.store.counters()
        last = self.store.last_round(self.task.id)
        if last is not None and last.status == "open":
            params = self._load_model(last.base_hash)
            self._open_round(
                last.round, params, last.base_hash, resume=(last.opened_at, last.deadline)
            )
            return
        if last is not None:
            assert last.new_hash is not None
            params = self._load_model(last.new_hash)
            next_round = last.round + 1
            base_hash = last.new_hash
        else:
            params = init_params(self.spec)
            base_hash = model_hash(params)
            self.store.put_model(base_hash, 0, model_payload(params))
            self._register(base_hash)
            next_round = 0
        if next_round >= self.task.rounds:
            self._end("completed", None)
            self._anchor_now()
            self._publish_final(base_hash, params, next_round)
        else:
            self._open_round(next_round, params, base_hash)

    def run(self, stop: threading.Event | None = None, *, drain: float = 30.0) -> list[RoundResult]:
        """Serve until the task's last round is closed (or ``stop`` is set); then give the
        ledger worker up to ``drain`` seconds to anchor what is left."""
        while not self.finished and not (stop is not None and stop.is_set()):
            self.step(0.2)
        if self.finished and not self.outbox.drain(drain):
            log.warning(
                "%d closed rounds not on the ledger yet; the next start anchors them",
                self.outbox.state.depth,
            )
        self._note_anchored()
        return self.results

    def step(self, timeout: float) -> None:
        """Handle what arrives within ``timeout`` seconds, then close the round if due."""
        self._drain(timeout)
        self._note_anchored()
        self._maybe_close()

    def close(self, *, drain: float = 5.0) -> None:
        """Give the ledger worker up to ``drain`` seconds to anchor what is closed, stop it
        and serving metrics, leave the broker, close the store and the ledger. What is not
        anchored yet stays in the store's outbox for the next start."""
        if self._anchor_pending():
            self.outbox.drain(drain)
        self.outbox.stop()
        if self.metrics is not None:
            self.metrics.close()
        self.transport.stop()
        self.store.close()
        self.ledger.close()

    # ------------------------------------------------------------------ messages
    def _drain(self, timeout: float) -> None:
        """Handle what is queued (waiting up to ``timeout`` for the first message), committing
        accepted updates and rejections in batches: one transaction per batch."""
        try:
            message = self.transport.messages.get(timeout=timeout)
        except queue.Empty:
            return
        try:
            for _ in range(_BATCH):
                self._handle(message)
                try:
                    message = self.transport.messages.get_nowait()
                except queue.Empty:
                    break
            else:
                self._handle(message)
        finally:
            self._flush()

    def _handle(self, message: Message) -> None:
        if message.topic.startswith(self._presence_prefix):
            message.acknowledge()
            self._presence(message.topic[len(self._presence_prefix) :], message)
            return
        if self.protocol.on_message(message):
            message.acknowledge()
            return
        if not self._started:
            self._held.append(message)
            return
        self._to_ack.append(message)
        size = len(message.payload)
        self.stats.received += 1
        self.stats.bytes_received += size
        current = self._open
        if current is not None:
            current.bytes_received += size
        try:
            if current is None:
                raise Rejected("round_closed", "no round is open")
            accepted = self._validator.check(
                message.topic,
                message.payload,
                RoundContext(
                    round=current.round,
                    base=current.base_hash,
                    has_update=self._has_update,
                    last_counter=lambda d: self._counters.get(d, -1),
                    revoked=self._revoked,
                    max_staleness=self.protocol.max_staleness,
                    bases=self.protocol.bases,
                ),
            )
            target = self.protocol.place(accepted.header, current.round)
        except Rejected as exc:
            digest = hashlib.sha256(message.payload).hexdigest()
            if exc.reason in _AGAIN and self._already_have(exc.device, digest):
                self.stats.redelivered += 1
                log.debug(
                    "update %s of %s delivered again; already stored", digest[:12], exc.device
                )
                return
            self._reject(exc, size, current, digest)
            return
        header = accepted.header
        self._counters[header.device] = header.counter
        self._pending.append((accepted, target))
        self._pending_devices.add(header.device)

    def _presence(self, device: str, message: Message) -> None:
        """Online/offline from a device's own presence topic (the broker's ACL lets only
        that device write it). Anything but ``online``/``offline`` (an empty message clears
        a retained topic) says nothing; a retained message, older than any live one, applies
        only while no live message has told the state."""
        if message.payload not in (b"online", b"offline"):
            return
        if message.retain and device in self._live_presence:
            return
        if not message.retain:
            self._live_presence.add(device)
        if message.payload == b"online":
            self.stats.online.add(device)
        else:
            self.stats.online.discard(device)

    def _already_have(self, device: str | None, digest: str) -> bool:
        if device is None:
            return False
        if any(a.digest == digest for a, _ in self._pending):
            return True
        return self.store.has_update(self.task.id, device, digest)

    def _has_update(self, device: str) -> bool:
        current = self._open
        return device in self._pending_devices or (
            current is not None and device in current.devices
        )

    def _flush(self) -> None:
        """Durable first: accepted updates count only once their batch is committed."""
        if not self._pending and not self._pending_rejections:
            self._acknowledge()
            return
        now = self._clock()
        batch = [
            PendingUpdate(
                task=self.task.id,
                round=target,
                device=a.header.device,
                digest=a.digest,
                samples=a.header.samples,
                counter=a.header.counter,
                frame=a.frame,
                received_at=now,
            )
            for a, target in self._pending
        ]
        crash_point("gateway.before-commit")
        self.store.write_batch(batch, self._pending_rejections)
        crash_point("gateway.after-commit")
        current = self._open
        assert current is not None or not self._pending
        for accepted, target in self._pending:
            h = accepted.header
            # A later round's update stays in the store until that round opens.
            if target == current.round:
                self._count(current, h.device, accepted.digest, h.samples, accepted.views, h.round)
            self.stats.accepted += 1
            if accepted.certificate_sha256 is not None:
                self._note_certificate(h.device, accepted.certificate_sha256)
        self._pending = []
        self._pending_devices = set()
        self._pending_rejections = []
        self._acknowledge()

    def _acknowledge(self) -> None:
        """PUBACK what the batch held, now that it is durable (or needed no storing)."""
        for message in self._to_ack:
            message.acknowledge()
        self._to_ack = []

    def _count(self, current: OpenRound, device, digest, samples, views, base_round) -> None:
        staleness = current.round - base_round
        current.count(device, digest, samples, self.protocol.weight(views, staleness), staleness)

    def _add_stored(self, current: OpenRound, stored) -> None:
        header, views = self._stored_update(stored.frame)
        self._count(current, stored.device, stored.digest, stored.samples, views, header.round)

    def _stored_update(self, frame: bytes) -> tuple[UpdateHeader, list[TensorView]]:
        envelope = decode_envelope(frame, max_bytes=len(frame))
        header = envelope.header
        assert isinstance(header, UpdateHeader)
        payload = open_update_payload(envelope, self._validator.decryption_key)
        return header, list(iter_tensors(payload, max_elements=1 << 62))

    def _reject(self, exc: Rejected, size: int, current: OpenRound | None, digest: str) -> None:
        self.stats.rejected[exc.reason] += 1
        if current is not None:
            current.reject(exc.device, digest, exc.reason)
        log.info("rejected update from %s: %s", exc.device or "?", exc.reason)
        self._pending_rejections.append(
            PendingRejection(
                task=self.task.id,
                round=None if current is None else current.round,
                device=exc.device,
                reason=exc.reason,
                size=size,
                received_at=self._clock(),
                digest=digest,
            )
        )

    # ------------------------------------------------------------------ rounds
    def _open_round(
        self,
        round_: int,
        params: Params,
        base_hash: str,
        *,
        resume: tuple[float, float] | None = None,
    ) -> None:
        """Open ``round_``, or with ``resume=(opened_at, deadline)`` rebuild it as the store
        holds it: the deadline stays absolute, so a gateway restarting more often than the
        round timeout still reaches it."""
        if resume is None:
            refused = self.protocol.may_open(round_)
            if refused is not None:
                log.warning("task %s ends before round %d: %s", self.task.id, round_, refused)
                self._end("budget_exhausted", refused)
                self._publish_final(base_hash, params, round_)
                return
        self._revoked = self._read_revoked()
        self.protocol.sample(round_, sorted(set(self.registry) - self._revoked))
        if resume is not None:
            now, deadline = resume
        else:
            now = self._clock()
            deadline = now + self.task.round_timeout
            self.store.open_round(self.task.id, round_, base_hash, now, deadline)
        current = OpenRound(
            round=round_,
            base_hash=base_hash,
            base_params=params,
            opened_at=now,
            deadline=deadline,
            accumulator=self._new_aggregator(),
        )
        if self.protocol.opened(round_, base_hash, resume=resume is not None):
            for stored in self.store.updates(self.task.id, round_):
                self._add_stored(current, stored)
        if resume is not None:
            for rejection in self.store.rejections(self.task.id, round_):
                current.reject(rejection["device"], rejection["digest"], rejection["reason"])
            log.info("resumed round %d with %d stored updates", round_, len(current.devices))
        self._open = current
        self.outbox.opened(round_, base_hash, deadline)
        self._anchor_now()
        self.stats.current_round = round_
        self._publish_model(round_, "open", deadline, params)

    def _maybe_close(self) -> None:
        if not self.protocol.cascades:
            self._maybe_close_round()
            return
        # A closed buffer's successor may already be full with updates passed on to it.
        closed = -1
        while self._open is not None and self._open.round != closed:
            closed = self._open.round
            self._maybe_close_round()

    def _maybe_close_round(self) -> None:
        current = self._open
        if current is None:
            return
        live = len(self.registry) - len(self._revoked)
        if not self.protocol.due(current, live) and self._clock() < current.deadline:
            return
        # A device revoked while the round was open must not reach the model: the
        # contract would refuse to record it, and the record would not match the model.
        self._revoked = self._read_revoked()
        late = sorted(current.devices & self._revoked)
        if late:
            self._drop_revoked(current, late)
        quorum = self.protocol.quorum
        if len(current.devices) < quorum:
            current.deadline = self._clock() + self.task.round_timeout
            log.warning(
                "round %d: %d of %d updates at the deadline, below quorum %d; extended",
                current.round,
                len(current.devices),
                len(self.registry),
                quorum,
            )
            self.store.open_round(
                self.task.id, current.round, current.base_hash, current.opened_at, current.deadline
            )
            self._publish_model(current.round, "open", current.deadline, current.base_params)
            return
        self._close(current)

    def _drop_revoked(self, current: OpenRound, late: list[str]) -> None:
        """Rebuild the round's aggregate from the store without ``late`` devices' updates."""
        log.warning("round %d: dropping updates of revoked devices %s", current.round, late)
        current.accumulator = self._new_aggregator()
        current.contributors = []
        current.devices = set()
        self.protocol.dropped(current.round, set(late))
        for stored in self.store.updates(self.task.id, current.round):
            if stored.device in late:
                current.reject(stored.device, stored.digest, "revoked")
                self.stats.rejected["revoked"] += 1
            else:
                self._add_stored(current, stored)

    def _new_aggregator(self) -> RoundAggregator:
        own = self.protocol.aggregator(self.spec.shapes(), len(self.registry) - len(self._revoked))
        if own is not None:
            return own  # type: ignore[return-value]  # the same add/result interface
        return RoundAggregator(
            self.spec.shapes(),
            rule=self.task.aggregation,
            options=self.task.aggregation_options,
            capacity=len(self.registry),
        )

    def _close(self, current: OpenRound) -> None:
        started = time.perf_counter()
        delta = current.accumulator.result()
        params, state_payload = next_global_model(
            self.task, self.store, current.round, current.base_params, delta
        )
        aggregation_s = time.perf_counter() - started
        payload = model_payload(params)
        new_hash = model_hash(params)
        acc = None
        if self.evaluation is not None:
            acc = accuracy(self.spec, params, *self.evaluation)
        closed_at = self._clock()
        record = round_record(
            current,
            task=self.task.id,
            codec=self.task.codec,
            aggregation=self.task.aggregation_label(),
            new_hash=new_hash,
            metrics=self._round_metrics(current, acc),
            batch_size=MAX_BATCH_RECORDS,
        )
        # The round, its new model and its ledger record in one transaction: the outbox.
        self.store.close_round(
            self.task.id, current.round, new_hash, payload, record, optimizer_state=state_payload
        )
        crash_point("gateway.round-closed")
        ledgered = self._anchor_now()
        self.stats.rounds_closed += 1
        self.stats.last_participants = len(current.contributors)
        self.stats.last_accuracy = acc
        if self.metrics is not None:
            self.metrics.aggregation.observe(aggregation_s)
            self.metrics.round_duration.observe(closed_at - current.opened_at)
        result = RoundResult(
            round=current.round,
            accuracy=acc,
            participants=len(current.contributors),
            samples=current.accumulator.total_samples,
            bytes_received=current.bytes_received,
            rejected=sum(current.rejected.values()),
            rejected_by_reason=dict(current.rejected),
            duration_s=closed_at - current.opened_at,
            model_hash=new_hash,
            ledgered=ledgered,
        )
        self.results.append(result)
        self._note_anchored()
        n = len(current.contributors)
        log.info("round %d closed: %d updates, accuracy %s", current.round, n, acc)
        self._open = None
        if self._on_round is not None:
            self._on_round(result)
        if current.round + 1 >= self.task.rounds:
            self._end("completed", None)
            self._publish_final(new_hash, params, current.round + 1)
        else:
            self._open_round(current.round + 1, params, new_hash)

    def _round_metrics(self, current: OpenRound, acc: float | None) -> dict[str, float]:
        metrics = {} if acc is None else {"accuracy": round(acc, 6)}
        metrics.update(self.protocol.record_metrics(current))
        if not current.accumulator.streaming:
            metrics["updates_dropped"] = float(current.accumulator.dropped)
            metrics["updates_clipped"] = float(current.accumulator.clipped)
        return metrics

    # ------------------------------------------------------------------ ledger
    def _anchor_now(self) -> bool:
        """Hand new ledger work to the outbox: wake its worker, or (inline) do it now.
        True when the ledger is known to hold every closed round."""
        if self.outbox.background:
            self.outbox.wake()
            return False
        return self.outbox.pump()

    def _anchor_pending(self) -> bool:
        return self.outbox.background and bool(self.store.unledgered(self.task.id))

    def _note_anchored(self) -> None:
        """Mark the results of rounds the outbox anchored since the last look."""
        done: set[int] = set()
        while True:
            try:
                done.add(self._anchored.get_nowait())
            except queue.Empty:
                break
        if done:
            self.results = [
                replace(r, ledgered=True) if r.round in done and not r.ledgered else r
                for r in self.results
            ]

    def _read_revoked(self) -> frozenset[str]:
        """Registered devices the ledger says are revoked: one query per round.

        The contract refuses a revoked device's accepted update, so the gateway must refuse
        it first; if the ledger cannot be read, the last known set stays in force.
        """
        try:
            status = read_fleet(self.ledger, self.registry, self.identity)
        except (LedgerError, OSError) as exc:
            log.error("could not read device status from the ledger: %s", exc)
            return self._revoked
        self._fingerprints.update(status.fingerprints)
        return status.revoked

    def _note_certificate(self, device: str, fingerprint: str) -> None:
        """A device that signs with a new certificate of the CA (a rotation) keeps its id,
        history and counter; the ledger records which certificate it signs with now.

        A failed ``RotateDeviceKey`` is retried after the next round opens (the fingerprint
        is read back from the ledger then).
        """
        known = self._fingerprints.get(device)
        if known is None or known == fingerprint:
            return
        self._fingerprints[device] = fingerprint
        try:
            self.ledger.submit(
                "RotateDeviceKey", device, self.identity.msp_id, known, fingerprint,
                identity=self.identity,
            )  # fmt: skip
        except (LedgerError, OSError) as exc:
            self.stats.ledger_failures += 1
            log.error("ledger could not record the new certificate of %s: %s", device, exc)
            return
        log.info("device %s signs with a new certificate %s", device, fingerprint[:12])

    def _register(self, initial_hash: str) -> None:
        """First start: admit the fleet and declare the task (already there is fine)."""
        if self.admin is None:
            return
        org = self.admin.msp_id
        calls = [
            ("RegisterDevice", (d, org, "default", self.registry.fingerprint(d)))
            for d in self.registry
        ]
        privacy = ledger_privacy(self.task)
        task_args = (self.task.id, org, self.identity.subject, self.spec.spec_hash())
        rule = self.task.aggregation_label()
        calls.append(("CreateTask", (*task_args, rule, privacy, initial_hash)))
        for fn, args in calls:
            try:
                self.ledger.submit(fn, *args, identity=self.admin)
            except ContractError as exc:
                if exc.code != "conflict":
                    raise GatewayError(f"ledger refused {fn} {args[0]}: {exc}") from None

    # ------------------------------------------------------------------ models
    def _load_model(self, model_hash_: str) -> Params:
        payload = self.store.get_model(model_hash_)
        if payload is None:
            raise GatewayError(f"model {model_hash_[:12]} is missing from the store")
        return decode_tensors(payload)

    def _publish_model(self, round_: int, status: str, deadline: float, params: Params) -> None:
        payload = model_payload(params)
        frame = encode_model(
            ModelHeader(
                task=self.task.id,
                round=round_,
                status=status,
                deadline=round(deadline, 3),
                sampled=self.protocol.sampled if status == "open" else None,
            ),
            payload,
            self._signer,
        )
        self.transport.publish(model_topic(self.task.id), frame, qos=1, retain=True)

    def _end(self, status: str, reason: str | None) -> None:
        """The task ends: what the protocol records then (a DP task: its final epsilon and
        the revealed sampling seed) goes to the ledger after the last closed round."""
        detail = self.protocol.end_detail()
        if detail is None:
            return
        if reason is not None:
            detail["reason"] = reason
        self.outbox.end(status, detail)
        self._anchor_now()

    def _publish_final(self, final_hash: str, params: Params, round_: int) -> None:
        self._final_hash = final_hash
        self.stats.current_round = round_
        self._publish_model(round_, "final", self._clock(), params)


def _checked_dp_seed(task: TaskSpec, seed: bytes | None) -> bytes | None:
    """The sampling seed of a DP task, checked against the digest the task commits to."""
    dp = task.dp
    assert dp is not None
    if dp.sampling >= 1:
        return seed
    if seed is None:
        raise GatewayError(
            f"task {task.id} samples devices (dp.sampling = {dp.sampling}): the gateway needs"
            " its sampling seed (dp_seed in the [gateway] section)"
        )
    if seed_digest(seed) != dp.seed_sha256:
        raise GatewayError(
            f"the sampling seed's SHA-256 {seed_digest(seed)[:16]}... is not the task's"
            f" dp.seed_sha256 {dp.seed_sha256[:16]}...: another task's seed?"
        )
    return seed
