"""The round half of the gateway's loop: open a round, close it when due (aggregate,
evaluate, persist with its ledger record, enqueue for the ledger), publish the next model.

What differs between synchronous rounds, FedBuff and DP-FedAvg is asked of the task's
:class:`~gateway._protocol.RoundProtocol`; the ledger is written by the
:class:`~gateway._anchor.LedgerOutbox`.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcore import (
    MAX_BATCH_RECORDS,
    ModelHeader,
    Params,
    Signer,
    TaskSpec,
    TensorView,
    Transport,
    UpdateHeader,
    crash_point,
    decode_envelope,
    decode_tensors,
    encode_model,
    evaluate_model,
    init_params,
    iter_tensors,
    model_hash,
    model_payload,
    model_topic,
    open_update_payload,
)

from ._anchor import LedgerOutbox
from ._combine import RoundAggregator
from ._errors import GatewayError
from ._fleet import FleetLedger
from ._global import next_global_model
from ._protocol import RoundProtocol
from ._round import OpenRound, RoundResult, round_record
from ._stats import GatewayStats
from ._store import UpdateStore

if TYPE_CHECKING:
    from ._metrics import GatewayMetrics

log = logging.getLogger(__name__)

#: Closed rounds whose results a process keeps (``Gateway.results``): a service runs for
#: months, and the store holds every round anyway.
RESULTS_KEPT = 1024


def read_stored_update(
    frame: bytes, key: X25519PrivateKey | None
) -> tuple[UpdateHeader, list[TensorView]]:
    """A stored (already validated) update frame as ``(header, views)``."""
    envelope = decode_envelope(frame, max_bytes=len(frame))
    header = envelope.header
    assert isinstance(header, UpdateHeader)
    payload = open_update_payload(envelope, key)
    return header, list(iter_tensors(payload, max_elements=1 << 62))


class RoundRunner:
    def __init__(
        self,
        *,
        task: TaskSpec,
        store: UpdateStore,
        protocol: RoundProtocol,
        outbox: LedgerOutbox,
        fleet: FleetLedger,
        transport: Transport,
        signer: Signer,
        stats: GatewayStats,
        read_update: Callable[[bytes], tuple[UpdateHeader, list[TensorView]]],
        clock: Callable[[], float],
        evaluation: tuple[np.ndarray, np.ndarray] | None,
        metrics: GatewayMetrics | None,
        on_round: Callable[[RoundResult], None] | None,
        anchored: queue.SimpleQueue[int],
    ):
        self.task = task
        self.spec = task.model_spec()
        self.store = store
        self.protocol = protocol
        self.outbox = outbox
        self.fleet = fleet
        self.transport = transport
        self.stats = stats
        self.read_update = read_update
        self.evaluation = evaluation
        self.metrics = metrics
        #: The rounds this process closed, in order (at least the last RESULTS_KEPT).
        self.results: list[RoundResult] = []
        #: The open round (``None`` between rounds and once the task is done).
        self.current: OpenRound | None = None
        self.final_hash: str | None = None
        #: This store's run of the task, sent with every model (see UpdateStore.run_id).
        self.run = store.run_id(task.id)
        self._signer = signer
        self._clock = clock
        self._on_round = on_round
        #: Rounds the outbox anchored since the loop last looked (its worker puts).
        self._anchored = anchored

    def begin(self) -> None:
        """Resume the open round as the store holds it, or open the next (or first) one."""
        last = self.store.last_round(self.task.id)
        if last is not None and last.status == "open":
            params = self.load_model(last.base_hash)
            self.open(last.round, params, last.base_hash, resume=(last.opened_at, last.deadline))
            return
        if last is not None:
            assert last.new_hash is not None
            params = self.load_model(last.new_hash)
            next_round, base_hash = last.round + 1, last.new_hash
        else:
            params = init_params(self.spec)
            base_hash = model_hash(params)
            self.store.put_model(base_hash, 0, model_payload(params))
            self.fleet.register(base_hash)
            next_round = 0
        if next_round >= self.task.rounds:
            self._end("completed", None)
            self.anchor_now()
            self._publish_final(base_hash, params, next_round)
        else:
            self.open(next_round, params, base_hash)

    def open(
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
        revoked = self.fleet.refresh()
        self.protocol.sample(round_, sorted(set(self.fleet.registry) - revoked))
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
        self.current = current
        self.outbox.opened(round_, base_hash, deadline)
        self.anchor_now()
        self.stats.current_round = round_
        self._publish_model(round_, "open", deadline, params)

    def count(self, current: OpenRound, device, digest, samples, views, base_round) -> None:
        """An update, durable now, counts in ``current``."""
        staleness = current.round - base_round
        current.count(device, digest, samples, self.protocol.weight(views, staleness), staleness)

    def _add_stored(self, current: OpenRound, stored) -> None:
        header, views = self.read_update(stored.frame)
        self.count(current, stored.device, stored.digest, stored.samples, views, header.round)

    def maybe_close(self) -> None:
        if not self.protocol.cascades:
            self._close_if_due()
            return
        # A closed buffer's successor may already be full with updates passed on to it.
        closed = -1
        while self.current is not None and self.current.round != closed:
            closed = self.current.round
            self._close_if_due()

    def _close_if_due(self) -> None:
        current = self.current
        if current is None:
            return
        if not self.protocol.due(current, self.fleet.live) and (
            self._clock() < current.deadline or not self.protocol.closable(current)
        ):
            return
        # A device revoked while the round was open must not reach the model: the
        # contract would refuse to record it, and the record would not match the model.
        late = sorted(current.devices & self.fleet.refresh())
        if late:
            self._drop_revoked(current, late)
        quorum = self.protocol.quorum
        if len(current.devices) < quorum:
            current.deadline = self._clock() + self.task.round_timeout
            log.warning(
                "round %d: %d of %d updates at the deadline, below quorum %d; extended",
                current.round, len(current.devices), len(self.fleet.registry), quorum,
            )  # fmt: skip
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
        own = self.protocol.aggregator(self.spec.shapes(), self.fleet.live)
        if own is not None:
            return own  # type: ignore[return-value]  # the same add/result interface
        return RoundAggregator(
            self.spec.shapes(),
            rule=self.task.aggregation,
            options=self.task.aggregation_options,
            capacity=len(self.fleet.registry),
        )

    def _close(self, current: OpenRound) -> None:
        started = time.perf_counter()
        params, state_payload = next_global_model(
            self.task, self.store, current.round, current.base_params, current.accumulator.result()
        )
        aggregation_s = time.perf_counter() - started
        new_hash = model_hash(params)
        acc, clinical = None, {}
        if self.evaluation is not None:
            positive = 1 if self.task.positive_class is None else self.task.positive_class
            acc, clinical = evaluate_model(self.spec, params, *self.evaluation, positive=positive)
        closed_at = self._clock()
        record = round_record(
            current,
            task=self.task.id,
            codec=self.task.codec,
            aggregation=self.task.aggregation_label(),
            new_hash=new_hash,
            metrics=self._round_metrics(current, acc, clinical),
            batch_size=MAX_BATCH_RECORDS,
        )
        record.update(self.protocol.record_extra(current))
        # The round, its new model and its ledger record in one transaction: the outbox.
        self.store.close_round(
            self.task.id, current.round, new_hash, model_payload(params), record,
            optimizer_state=state_payload,
        )  # fmt: skip
        crash_point("gateway.round-closed")
        ledgered = self.anchor_now()
        self.stats.rounds_closed += 1
        self.stats.last_participants = len(current.contributors)
        self.stats.last_accuracy = acc
        self.stats.last_clinical = clinical
        if self.metrics is not None:
            self.metrics.aggregation.observe(aggregation_s)
            self.metrics.round_duration.observe(closed_at - current.opened_at)
        result = RoundResult(
            round=current.round,
            accuracy=acc,
            clinical=dict(clinical),
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
        if len(self.results) > 2 * RESULTS_KEPT:  # trimmed in halves: O(1) per round
            del self.results[:-RESULTS_KEPT]
        self.note_anchored()
        n = len(current.contributors)
        log.info(
            "round %d closed: %d updates, accuracy %s, balanced accuracy %s, AUC %s",
            current.round, n, acc, clinical.get("balanced_accuracy"), clinical.get("auc"),
        )  # fmt: skip
        self.current = None
        if self._on_round is not None:
            self._on_round(result)
        if current.round + 1 >= self.task.rounds:
            self._end("completed", None)
            self._publish_final(new_hash, params, current.round + 1)
        else:
            self.open(current.round + 1, params, new_hash)

    def _round_metrics(
        self, current: OpenRound, acc: float | None, clinical: dict[str, float]
    ) -> dict[str, float]:
        metrics = {} if acc is None else {"accuracy": round(acc, 6)}
        metrics.update((name, round(value, 6)) for name, value in clinical.items())
        metrics.update(self.protocol.record_metrics(current))
        if not current.accumulator.streaming:
            metrics["updates_dropped"] = float(current.accumulator.dropped)
            metrics["updates_clipped"] = float(current.accumulator.clipped)
        return metrics

    # ------------------------------------------------------------------ ledger
    def anchor_now(self) -> bool:
        """Hand new ledger work to the outbox: wake its worker, or (inline) do it now.
        True when the ledger is known to hold every closed round."""
        if self.outbox.background:
            self.outbox.wake()
            return False
        return self.outbox.pump()

    def note_anchored(self) -> None:
        """Mark the results of rounds the outbox anchored since the last look (the cost is
        the number of those rounds, not the number of results kept)."""
        done: set[int] = set()
        while True:
            try:
                done.add(self._anchored.get_nowait())
            except queue.Empty:
                break
        if not done or not self.results:
            return
        # Results are consecutive rounds (this process closes them in order and trims only
        # the oldest); a round not among them was closed before the start or trimmed.
        first = self.results[0].round
        for i in (round_ - first for round_ in done):
            if 0 <= i < len(self.results) and not self.results[i].ledgered:
                self.results[i] = replace(self.results[i], ledgered=True)

    def _end(self, status: str, reason: str | None) -> None:
        """The task ends: what the protocol records then (a DP task: its final epsilon and
        the revealed sampling seed) goes to the ledger after the last closed round."""
        detail = self.protocol.end_detail()
        if detail is None:
            return
        if reason is not None:
            detail["reason"] = reason
        self.outbox.end(status, detail)
        self.anchor_now()

    # ------------------------------------------------------------------ models
    def load_model(self, model_hash_: str) -> Params:
        payload = self.store.get_model(model_hash_)
        if payload is None:
            raise GatewayError(f"model {model_hash_[:12]} is missing from the store")
        return decode_tensors(payload)

    def _publish_model(self, round_: int, status: str, deadline: float, params: Params) -> None:
        header = ModelHeader(
            task=self.task.id,
            round=round_,
            status=status,
            deadline=round(deadline, 3),
            sampled=self.protocol.sampled if status == "open" else None,
            run=self.run,
        )
        frame = encode_model(header, model_payload(params), self._signer)
        self.transport.publish(model_topic(self.task.id), frame, qos=1, retain=True)

    def _publish_final(self, final_hash: str, params: Params, round_: int) -> None:
        self.final_hash = final_hash
        self.stats.current_round = round_
        self._publish_model(round_, "final", self._clock(), params)
