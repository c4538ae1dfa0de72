"""The gateway service: runs a task's rounds from first model to final record.

One thread owns all state. The transport's callback thread only queues messages; this
thread validates them, persists accepted updates before counting them, closes rounds on
"every registered device reported" or on the deadline (with a quorum), aggregates,
evaluates, anchors the round on the ledger and publishes the next global model.

No acknowledged update is lost: an update's PUBACK goes out only once its batch (accepted
or rejected) is committed to the store (paho's manual acknowledgements), so the broker
keeps, and after a crash re-delivers, whatever the gateway had not made durable. Updates
that arrive before the open round is rebuilt from the store at start are held, not
refused; a message delivered again that the store already holds is acknowledged and
dropped without a trace (it is not a rejection).

A task with an ``asynchronous`` section runs buffered asynchronous rounds instead (FedBuff):
each round is one model version, closed by ``buffer`` accepted updates trained from any of
the last ``max_staleness`` versions, each weighted by its staleness (``_buffer``). The
deadline and quorum still apply, so a fleet smaller than the buffer is not stalled either.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

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
    decode_envelope,
    decode_tensors,
    encode_model,
    encode_tensors,
    init_params,
    iter_tensors,
    model_hash,
    model_payload,
    model_topic,
    open_update_payload,
    presence_subscription,
    presence_topic,
    update_subscription,
)
from ledger import ContractError, Identity, LedgerBackend, LedgerError

from ._aggregate import RoundAggregator
from ._buffer import place_update, staleness_weight
from ._errors import GatewayError, Rejected
from ._metrics import GatewayMetrics
from ._registry import DeviceRegistry
from ._store import PendingRejection, PendingUpdate, UpdateStore
from ._strategies import ServerOptimizerState, server_step
from ._validate import AcceptedUpdate, RoundContext, UpdateValidator

if TYPE_CHECKING:
    from fedcore._task import AsynchronousSection

log = logging.getLogger(__name__)

#: Messages handled per store transaction (group commit).
_BATCH = 256
#: Update records per ledger transaction (the contract takes at most 1,000).
_LEDGER_BATCH = MAX_BATCH_RECORDS
#: Rejections a message delivered again would get; such a message whose update the store
#: already holds is no rejection.
_AGAIN = frozenset({"replayed", "duplicate", "stale_round", "too_stale", "round_closed"})


@dataclass(frozen=True)
class RoundResult:
    """What a closed round produced; also the shape of the demo's per-round report."""

    round: int
    accuracy: float | None
    participants: int
    samples: int
    bytes_received: int
    rejected: int
    rejected_by_reason: dict[str, int]
    duration_s: float
    model_hash: str
    ledgered: bool


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
    ledger_failures: int = 0
    #: Messages delivered again (by the broker after a crash, or re-sent by a device) whose
    #: update the store already held: acknowledged and dropped.
    redelivered: int = 0
    #: The open round; once the final model is published, the task's round count.
    current_round: int | None = None
    last_participants: int | None = None
    last_accuracy: float | None = None


@dataclass
class _OpenRound:
    round: int
    base_hash: str
    base_params: Params
    opened_at: float
    deadline: float
    accumulator: RoundAggregator
    contributors: list[dict[str, Any]] = field(default_factory=list)
    devices: set[str] = field(default_factory=set)
    bytes_received: int = 0
    rejected: Counter = field(default_factory=Counter)
    rejections: list[dict[str, Any]] = field(default_factory=list)


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
    ):
        """``identity`` is who the gateway submits rounds as (role ``gateway``); ``admin``, when
        given, registers the fleet and creates the task on the ledger at first start (the
        embedded backend); without it they must already be there (Fabric, set up by an
        operator)."""
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
        #: The certificate each device signs with, as the ledger records it (rotation).
        self._fingerprints: dict[str, str] = {}
        self._counters: dict[str, int] = {}
        #: Accepted updates waiting for the batch commit, with the round each counts in.
        self._pending: list[tuple[AcceptedUpdate, int]] = []
        self._pending_devices: set[str] = set()
        self._pending_rejections: list[PendingRejection] = []
        self._revoked: frozenset[str] = frozenset()
        self._open: _OpenRound | None = None
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
        #: Asynchronous rounds only: the devices each buffer from the open round on holds
        #: (stored or in the pending batch), the ``(device, base round)`` of accepted updates
        #: in the staleness window, and the base model of each round still accepted as a base.
        self._occupancy: dict[int, set[str]] = {}
        self._trained_on: set[tuple[str, int]] = set()
        self._bases: dict[int, str] = {}
        if metrics is not None:
            metrics.bind(self)

    # ------------------------------------------------------------------ lifecycle
    @property
    def finished(self) -> bool:
        return self._final_hash is not None

    @property
    def current_round(self) -> int | None:
        return None if self._open is None else self._open.round

    def connect(self, timeout: float = 10.0) -> None:
        self.transport.subscribe(update_subscription(self.task.id), 1)
        # Presence at QoS 0: it is state (retained, last wills), and it must not queue behind
        # updates held unacknowledged while the gateway starts.
        self.transport.subscribe(presence_subscription(self.task.id), 0)
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
        self._catch_up()
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
            self._publish_final(base_hash, params, next_round)
        else:
            self._open_round(next_round, params, base_hash)

    def run(self, stop: threading.Event | None = None) -> list[RoundResult]:
        """Serve until the task's last round is closed (or ``stop`` is set)."""
        while not self.finished and not (stop is not None and stop.is_set()):
            self.step(0.2)
        return self.results

    def step(self, timeout: float) -> None:
        """Handle what arrives within ``timeout`` seconds, then close the round if due."""
        self._drain(timeout)
        self._maybe_close()

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
                    max_staleness=None if self._async is None else self._async.max_staleness,
                    bases=self._bases,
                ),
            )
            target = current.round if self._async is None else self._place(accepted.header)
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

    @property
    def _async(self) -> AsynchronousSection | None:
        return self.task.asynchronous

    def _place(self, header: UpdateHeader) -> int:
        """Asynchronous rounds: the round whose buffer takes the update, reserved at once so
        the rest of the batch sees it."""
        assert self._async is not None and self._open is not None
        target = place_update(
            device=header.device,
            base_round=header.round,
            current=self._open.round,
            buffer=self._async.buffer,
            max_staleness=self._async.max_staleness,
            rounds=self.task.rounds,
            occupancy=self._occupancy,
            trained_on=self._trained_on,
        )
        self._occupancy.setdefault(target, set()).add(header.device)
        self._trained_on.add((header.device, header.round))
        return target

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
        self.store.write_batch(batch, self._pending_rejections)
        current = self._open
        assert current is not None or not self._pending
        for accepted, target in self._pending:
            h = accepted.header
            # A later round's update stays in the store until that round opens.
            if target == current.round:
                staleness = target - h.round
                self._count(
                    current, h.device, accepted.digest, h.samples, accepted.views, staleness
                )
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

    def _count(
        self,
        current: _OpenRound,
        device: str,
        digest: str,
        samples: int,
        views: Sequence[TensorView],
        staleness: int = 0,
    ) -> None:
        current.accumulator.add(self._weighted(views, staleness), samples)
        current.devices.add(device)
        current.contributors.append(
            {"device": device, "update": digest, "samples": samples, "staleness": staleness}
        )

    def _weighted(self, views: Sequence[TensorView], staleness: int) -> Sequence[TensorView]:
        """The update's views scaled by its staleness weight: one multiply on each scale,
        so the aggregation rules (and the streaming mean) need not know about staleness."""
        if self._async is None or staleness == 0:
            return views
        weight = staleness_weight(staleness, self._async.staleness_exponent)
        return [replace(v, scale=v.scale * weight) for v in views]

    def _add_stored(self, current: _OpenRound, stored) -> None:
        header, views = self._stored_update(stored.frame)
        staleness = current.round - header.round
        self._count(current, stored.device, stored.digest, stored.samples, views, staleness)

    def _reject(self, exc: Rejected, size: int, current: _OpenRound | None, digest: str) -> None:
        self.stats.rejected[exc.reason] += 1
        if current is not None:
            current.rejected[exc.reason] += 1
            current.rejections.append(
                {"device": exc.device, "digest": digest, "reason": exc.reason}
            )
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
        if resume is not None:
            now, deadline = resume
        else:
            now = self._clock()
            deadline = now + self.task.round_timeout
            self.store.open_round(self.task.id, round_, base_hash, now, deadline)
        current = _OpenRound(
            round=round_,
            base_hash=base_hash,
            base_params=params,
            opened_at=now,
            deadline=deadline,
            accumulator=self._new_aggregator(),
        )
        if self._async is not None:
            self._advance_window(round_, base_hash, resume=resume is not None)
        if resume is not None or self._async is not None:
            # Asynchronous rounds: a buffer may hold updates before it opens (passed on by
            # a full buffer before it).
            for stored in self.store.updates(self.task.id, round_):
                self._add_stored(current, stored)
        if resume is not None:
            for rejection in self.store.rejections(self.task.id, round_):
                current.rejected[rejection["reason"]] += 1
                current.rejections.append(rejection)
            log.info("resumed round %d with %d stored updates", round_, len(current.devices))
        self._open = current
        self._revoked = self._ledger_revoked()
        if self._catch_up():
            self._ledger_open(round_, base_hash, deadline)
        self.stats.current_round = round_
        self._publish_model(round_, "open", deadline, params)

    def _advance_window(self, round_: int, base_hash: str, *, resume: bool) -> None:
        """Asynchronous rounds: slide the bases, buffers and trained-on set to ``round_``; at
        a restart, rebuild them from the store (whatever it holds counts, nothing else)."""
        assert self._async is not None
        oldest = round_ - self._async.max_staleness
        if resume or not self._bases:
            self._bases = self.store.bases_since(self.task.id, oldest)
            self._occupancy, self._trained_on = {}, set()
            # Updates based on a round in the window are counted from there to
            # ``max_staleness`` rounds later.
            for round_held in range(max(oldest, 0), round_ + self._async.max_staleness + 1):
                for stored in self.store.updates(self.task.id, round_held):
                    header, _ = self._stored_update(stored.frame)
                    self._trained_on.add((stored.device, header.round))
                    if round_held >= round_:
                        self._occupancy.setdefault(round_held, set()).add(stored.device)
        self._bases[round_] = base_hash
        self._bases = {r: h for r, h in self._bases.items() if r >= oldest}
        self._occupancy = {r: d for r, d in self._occupancy.items() if r >= round_}
        self._trained_on = {(d, b) for d, b in self._trained_on if b >= oldest}

    def _stored_update(self, frame: bytes) -> tuple[UpdateHeader, list[TensorView]]:
        envelope = decode_envelope(frame, max_bytes=len(frame))
        header = envelope.header
        assert isinstance(header, UpdateHeader)
        payload = open_update_payload(envelope, self._validator.decryption_key)
        return header, list(iter_tensors(payload, max_elements=1 << 62))

    def _maybe_close(self) -> None:
        if self._async is None:
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
        if self._async is None:
            due = len(current.devices) >= live
            quorum = self.task.quorum
        else:
            due = len(current.devices) >= max(1, min(self._async.buffer, live))
            quorum = min(self.task.quorum, self._async.buffer)
        if not due and self._clock() < current.deadline:
            return
        # A device revoked while the round was open must not reach the model: the
        # contract would refuse to record it, and the record would not match the model.
        self._revoked = self._ledger_revoked()
        late = sorted(current.devices & self._revoked)
        if late:
            self._drop_revoked(current, late)
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

    def _server_step(self, current: _OpenRound, delta: Params) -> tuple[Params, bytes | None]:
        """The new global model: ``base + delta`` (FedAvg), or an adaptive server step whose
        state after this round is returned for the store (so a restart resumes it)."""
        kind, lr = self.task.server_optimizer, self.task.server_lr
        if kind == "sgd" and lr in (None, 1.0):
            base = current.base_params
            return {k: (base[k] + delta[k]).astype(np.float32) for k in base}, None
        state = None
        stored = self.store.optimizer_state(self.task.id)
        if stored is not None and stored[0] < current.round:
            tensors = decode_tensors(stored[1])
            names = list(current.base_params)
            state = ServerOptimizerState(
                m={k: tensors[f"m.{k}"] for k in names},
                v={k: tensors[f"v.{k}"] for k in names},
                rounds=stored[0] + 1,
            )
        params, state = server_step(
            kind,
            current.base_params,
            delta,
            state,
            lr=lr if lr is not None else (1.0 if kind == "sgd" else 0.1),
        )
        tensors = {f"m.{k}": v for k, v in state.m.items()} | {
            f"v.{k}": v for k, v in state.v.items()
        }
        return params, encode_tensors(tensors, "f32")

    def _drop_revoked(self, current: _OpenRound, late: list[str]) -> None:
        """Rebuild the round's aggregate from the store without ``late`` devices' updates."""
        log.warning("round %d: dropping updates of revoked devices %s", current.round, late)
        current.accumulator = self._new_aggregator()
        current.contributors = []
        current.devices = set()
        if current.round in self._occupancy:
            self._occupancy[current.round] -= set(late)
        for stored in self.store.updates(self.task.id, current.round):
            if stored.device in late:
                current.rejected["revoked"] += 1
                self.stats.rejected["revoked"] += 1
                current.rejections.append(
                    {"device": stored.device, "digest": stored.digest, "reason": "revoked"}
                )
            else:
                self._add_stored(current, stored)

    def _new_aggregator(self) -> RoundAggregator:
        return RoundAggregator(
            self.spec.shapes(),
            rule=self.task.aggregation,
            options=self.task.aggregation_options,
            capacity=len(self.registry),
        )

    def _close(self, current: _OpenRound) -> None:
        started = time.perf_counter()
        delta = current.accumulator.result()
        params, state_payload = self._server_step(current, delta)
        aggregation_s = time.perf_counter() - started
        payload = model_payload(params)
        new_hash = model_hash(params)
        acc = None
        if self.evaluation is not None:
            acc = accuracy(self.spec, params, *self.evaluation)
        closed_at = self._clock()
        contributors = sorted(current.contributors, key=lambda c: c["device"])
        record = self._round_record(current, contributors, new_hash, acc)
        self.store.close_round(
            self.task.id, current.round, new_hash, payload, record, optimizer_state=state_payload
        )
        ledgered = self._catch_up()
        self.stats.rounds_closed += 1
        self.stats.last_participants = len(contributors)
        self.stats.last_accuracy = acc
        if self.metrics is not None:
            self.metrics.aggregation.observe(aggregation_s)
            self.metrics.round_duration.observe(closed_at - current.opened_at)
        result = RoundResult(
            round=current.round,
            accuracy=acc,
            participants=len(contributors),
            samples=current.accumulator.total_samples,
            bytes_received=current.bytes_received,
            rejected=sum(current.rejected.values()),
            rejected_by_reason=dict(current.rejected),
            duration_s=closed_at - current.opened_at,
            model_hash=new_hash,
            ledgered=ledgered,
        )
        self.results.append(result)
        log.info("round %d closed: %d updates, accuracy %s", current.round, len(contributors), acc)
        self._open = None
        if self._on_round is not None:
            self._on_round(result)
        if current.round + 1 >= self.task.rounds:
            self._publish_final(new_hash, params, current.round + 1)
        else:
            self._open_round(current.round + 1, params, new_hash)

    def _round_record(
        self, current: _OpenRound, contributors: list[dict[str, Any]], new_hash: str, acc
    ) -> dict[str, Any]:
        """What the ledger gets for a round: its update records in batches, then the commit.

        Kept in the store with the closed round, so an anchoring interrupted by a crash or
        a ledger outage is finished at the next start.
        """
        records = [
            {
                "device": c["device"],
                "digest": c["update"],
                "samples": c["samples"],
                "codec": self.task.codec,
                "accepted": True,
                "reason": None,
            }
            for c in contributors
        ] + [
            {
                "device": r["device"],
                "digest": r["digest"],
                "samples": None,
                "codec": None,
                "accepted": False,
                "reason": r["reason"],
            }
            for r in current.rejections
        ]
        return {
            "task": self.task.id,
            "round": current.round,
            "base_model": current.base_hash,
            "deadline": round(current.deadline, 3),
            "batches": [
                records[i : i + _LEDGER_BATCH] for i in range(0, len(records), _LEDGER_BATCH)
            ],
            "global_model": new_hash,
            "aggregation": self.task.aggregation_label(),
            "contributors": [c["device"] for c in contributors],
            "metrics": self._round_metrics(current, acc),
        }

    def _round_metrics(self, current: _OpenRound, acc: float | None) -> dict[str, float]:
        metrics = {} if acc is None else {"accuracy": round(acc, 6)}
        if self._async is not None and current.contributors:
            staleness = [c["staleness"] for c in current.contributors]
            metrics["staleness_mean"] = round(sum(staleness) / len(staleness), 6)
            metrics["staleness_max"] = float(max(staleness))
        if not current.accumulator.streaming:
            metrics["updates_dropped"] = float(current.accumulator.dropped)
            metrics["updates_clipped"] = float(current.accumulator.clipped)
        return metrics

    def _anchor(self, round_: int, record: dict[str, Any]) -> bool:
        """Bring the ledger up to date with a closed round; a failure is retried at restart.

        What is already there is read back from the ledger itself (the round's status and
        batch count), so a retry never records anything twice.
        """
        started = time.perf_counter()
        task = self.task.id
        try:
            state = self._ledger_round(round_)
            if state is None:
                self.ledger.submit(
                    "OpenRound", task, round_, record["base_model"], record["deadline"],
                    identity=self.identity,
                )  # fmt: skip
                state = {"status": "open", "batches": 0}
            if state["status"] != "committed":
                for batch in record["batches"][state["batches"] :]:
                    self.ledger.submit("RecordUpdates", task, round_, batch, identity=self.identity)
                self.ledger.submit(
                    "CommitRound", task, round_, record["global_model"], record["aggregation"],
                    record["contributors"], record["metrics"], identity=self.identity,
                )  # fmt: skip
        except (LedgerError, OSError) as exc:
            self.stats.ledger_failures += 1
            log.error("ledger update for round %d failed, will retry at restart: %s", round_, exc)
            return False
        if self.metrics is not None:
            self.metrics.ledger_commit.observe(time.perf_counter() - started)
        self.store.mark_ledgered(task, round_)
        return True

    def _ledger_open(self, round_: int, base_hash: str, deadline: float) -> None:
        """Anchor the round's opening now; if the ledger is down, closing the round does it."""
        try:
            if self._ledger_round(round_) is None:
                self.ledger.submit(
                    "OpenRound", self.task.id, round_, base_hash, round(deadline, 3),
                    identity=self.identity,
                )  # fmt: skip
        except (LedgerError, OSError) as exc:
            self.stats.ledger_failures += 1
            log.error("ledger could not open round %d (retried at close): %s", round_, exc)

    def _ledger_revoked(self) -> frozenset[str]:
        """Registered devices the ledger says are revoked, read once per round.

        The contract refuses a revoked device's accepted update, so the gateway must refuse
        it first; if the ledger cannot be read, the last known set stays in force.
        """
        revoked = set()
        try:
            for device in self.registry:
                try:
                    record = self.ledger.evaluate("GetDevice", device, identity=self.identity)
                except ContractError as exc:
                    if exc.code != "not_found":
                        raise
                    continue
                if record.get("status") == "revoked":
                    revoked.add(device)
                if isinstance(record.get("key_fingerprint"), str):
                    self._fingerprints[device] = record["key_fingerprint"]
        except (LedgerError, OSError) as exc:
            log.error("could not read device status from the ledger: %s", exc)
            return self._revoked
        return frozenset(revoked)

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
            log.error("ledger could not record the new certificate of %s: %s", device, exc)
            return
        log.info("device %s signs with a new certificate %s", device, fingerprint[:12])

    def _ledger_round(self, round_: int) -> dict[str, Any] | None:
        try:
            return self.ledger.evaluate("GetRound", self.task.id, round_, identity=self.identity)
        except ContractError as exc:
            if exc.code == "not_found":
                return None
            raise

    def _catch_up(self) -> bool:
        """Anchor every closed round the ledger does not have yet, in order.

        Rounds must reach the ledger in order (the contract refuses gaps), so a round whose
        anchoring failed (ledger down) is retried before any later one. True when the
        ledger holds every closed round.
        """
        pending = [row for row in self.store.unledgered(self.task.id) if row.record is not None]
        return all(self._anchor(row.round, row.record) for row in pending)

    def _register(self, initial_hash: str) -> None:
        """First start: admit the fleet and declare the task (already there is fine)."""
        if self.admin is None:
            return
        org = self.admin.msp_id
        calls = [
            ("RegisterDevice", (d, org, "default", self.registry.fingerprint(d)))
            for d in self.registry
        ]
        privacy = {"dp": None, "secure_aggregation": False}
        task_args = (self.task.id, org, self.identity.subject, self.spec.spec_hash())
        rule = self.task.aggregation_label()
        calls.append(("CreateTask", (*task_args, rule, privacy, initial_hash)))
        for fn, args in calls:
            try:
                self.ledger.submit(fn, *args, identity=self.admin)
            except ContractError as exc:
                if exc.code != "conflict":
                    raise GatewayError(f"ledger refused {fn} {args[0]}: {exc}") from None

    def _load_model(self, model_hash_: str) -> Params:
        payload = self.store.get_model(model_hash_)
        if payload is None:
            raise GatewayError(f"model {model_hash_[:12]} is missing from the store")
        return decode_tensors(payload)

    def _publish_model(self, round_: int, status: str, deadline: float, params: Params) -> None:
        payload = model_payload(params)
        frame = encode_model(
            ModelHeader(
                task=self.task.id, round=round_, status=status, deadline=round(deadline, 3)
            ),
            payload,
            self._signer,
        )
        self.transport.publish(model_topic(self.task.id), frame, qos=1, retain=True)

    def _publish_final(self, final_hash: str, params: Params, round_: int) -> None:
        self._final_hash = final_hash
        self.stats.current_round = round_
        self._publish_model(round_, "final", self._clock(), params)

    @property
    def final_model(self) -> str | None:
        return self._final_hash

    def close(self) -> None:
        """Stop serving metrics, leave the broker and close the store and the ledger."""
        if self.metrics is not None:
            self.metrics.close()
        self.transport.stop()
        self.store.close()
        self.ledger.close()
