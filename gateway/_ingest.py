"""The receiving half of the gateway's loop: message -> validate -> persist -> count -> PUBACK.

Accepted updates and rejections of one batch are committed in one store transaction (group
commit); only then do they count in the open round and are their messages acknowledged
(paho's manual PUBACK), so the broker keeps, and after a crash re-delivers, whatever the
gateway had not made durable. Until the open round is rebuilt from the store at start,
updates wait unacknowledged (held, not refused). A message delivered again whose update the
store already holds is acknowledged and dropped without a trace: it is not a rejection.
"""

from __future__ import annotations

import hashlib
import logging
import queue
from collections.abc import Callable
from typing import TYPE_CHECKING

from fedcore import Message, crash_point, presence_topic

from ._errors import Rejected
from ._fleet import FleetLedger
from ._protocol import RoundProtocol
from ._round import OpenRound
from ._stats import GatewayStats
from ._store import PendingRejection, PendingUpdate, UpdateStore
from ._validate import AcceptedUpdate, RoundContext, UpdateValidator

if TYPE_CHECKING:
    from ._rounds import RoundRunner

log = logging.getLogger(__name__)

#: Messages handled per store transaction (group commit).
BATCH = 256
#: Rejections a message delivered again would get; such a message whose update the store
#: already holds is no rejection.
_AGAIN = frozenset({"replayed", "duplicate", "stale_round", "too_stale", "round_closed"})


class Ingest:
    def __init__(
        self,
        *,
        task_id: str,
        validator: UpdateValidator,
        protocol: RoundProtocol,
        store: UpdateStore,
        rounds: RoundRunner,
        fleet: FleetLedger,
        stats: GatewayStats,
        clock: Callable[[], float],
    ):
        self.task_id = task_id
        self.validator = validator
        self.protocol = protocol
        self.store = store
        self.rounds = rounds
        self.fleet = fleet
        self.stats = stats
        self._clock = clock
        self._counters: dict[str, int] = {}
        #: Accepted updates waiting for the batch commit, with the round each counts in.
        self._pending: list[tuple[AcceptedUpdate, int]] = []
        self._pending_devices: set[str] = set()
        self._pending_rejections: list[PendingRejection] = []
        self._presence_prefix = presence_topic(task_id, "")
        #: Devices whose presence a live (not retained) message told: a retained message,
        #: older by nature, never overrides it.
        self._live_presence: set[str] = set()
        #: Until :meth:`release`, updates wait here (unacknowledged).
        self._started = False
        self._held: list[Message] = []
        #: Messages of the batch being handled: acknowledged once it is committed.
        self._to_ack: list[Message] = []

    def load_counters(self) -> None:
        """Each device's last accepted counter, as the store holds them (replay defence)."""
        self._counters = self.store.counters()

    def release(self) -> None:
        """The open round is rebuilt: handle the updates that arrived meanwhile."""
        self._started = True
        held, self._held = self._held, []
        if held:
            log.info("handling %d updates that arrived before the round was resumed", len(held))
            for message in held:
                self.handle(message)
            self.flush()

    def drain(self, messages: queue.Queue[Message], timeout: float) -> None:
        """Handle what is queued (waiting up to ``timeout`` for the first message), one
        store transaction per batch."""
        try:
            message = messages.get(timeout=timeout)
        except queue.Empty:
            return
        try:
            for _ in range(BATCH):
                self.handle(message)
                try:
                    message = messages.get_nowait()
                except queue.Empty:
                    break
            else:
                self.handle(message)
        finally:
            self.flush()

    def handle(self, message: Message) -> None:
        if message.topic.startswith(self._presence_prefix):
            message.acknowledge()
            self._presence(message.topic[len(self._presence_prefix) :], message)
            return
        if self.protocol.on_message(message):
            return  # the protocol acknowledges it once it is durable
        if not self._started:
            self._held.append(message)
            return
        self._to_ack.append(message)
        size = len(message.payload)
        self.stats.received += 1
        self.stats.bytes_received += size
        current = self.rounds.current
        if current is not None:
            current.bytes_received += size
        try:
            if current is None:
                raise Rejected("round_closed", "no round is open")
            accepted = self.validator.check(
                message.topic,
                message.payload,
                RoundContext(
                    round=current.round,
                    base=current.base_hash,
                    has_update=self._has_update,
                    last_counter=lambda d: self._counters.get(d, -1),
                    revoked=self.fleet.revoked,
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

    def flush(self) -> None:
        """Durable first: accepted updates count only once their batch is committed."""
        if not self._pending and not self._pending_rejections:
            self._acknowledge()
            return
        now = self._clock()
        batch = [
            PendingUpdate(
                task=self.task_id,
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
        current = self.rounds.current
        assert current is not None or not self._pending
        for accepted, target in self._pending:
            h = accepted.header
            # A later round's update stays in the store until that round opens.
            if target == current.round:
                self.rounds.count(
                    current, h.device, accepted.digest, h.samples, accepted.views, h.round
                )
            self.stats.accepted += 1
            if accepted.certificate_sha256 is not None:
                self.fleet.note_certificate(h.device, accepted.certificate_sha256)
        self._pending = []
        self._pending_devices = set()
        self._pending_rejections = []
        self._acknowledge()

    def _acknowledge(self) -> None:
        """PUBACK what the batch held, now that it is durable (or needed no storing)."""
        for message in self._to_ack:
            message.acknowledge()
        self._to_ack = []

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
        return self.store.has_update(self.task_id, device, digest)

    def _has_update(self, device: str) -> bool:
        current = self.rounds.current
        return device in self._pending_devices or (
            current is not None and device in current.devices
        )

    def _reject(self, exc: Rejected, size: int, current: OpenRound | None, digest: str) -> None:
        self.stats.rejected[exc.reason] += 1
        if current is not None:
            current.reject(exc.device, digest, exc.reason)
        log.info("rejected update from %s: %s", exc.device or "?", exc.reason)
        self._pending_rejections.append(
            PendingRejection(
                task=self.task_id,
                round=None if current is None else current.round,
                device=exc.device,
                reason=exc.reason,
                size=size,
                received_at=self._clock(),
                digest=digest,
            )
        )
