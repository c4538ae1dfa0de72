"""The gateway's link to the ledger: the fleet's status in one query, and the ledger outbox.

The outbox is the store itself: a closed round carries its ledger record and a ``ledgered``
flag (``UpdateStore.unledgered`` reads the pending ones through a partial index). One worker
writes them in order (the contract refuses gaps), with retry and backoff, so the loop that
reads MQTT never waits for a block. What the ledger already holds is read back before each
round (its status and batch count), so a retry, or a restart, never records anything twice.

A refusal by the contract is not an outage: every retry would fail the same way. The round
is then reported as refused (log, ``fedledger_gateway_ledger_refused_round``, the
``LedgerRoundRefused`` alert, ``gateway status``) and retried at the longest backoff, in case
an operator fixes the cause (a device registered late, for one); later rounds wait behind it,
since the ledger takes rounds only in order, and the gateway says so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedcore import MAX_BATCH_RECORDS, crash_point
from ledger import ContractError, Identity, LedgerBackend, LedgerError

from ._errors import GatewayError
from ._store import UpdateStore

if TYPE_CHECKING:
    from ._metrics import GatewayMetrics

log = logging.getLogger(__name__)

#: Seconds between retries of a failing ledger write: doubling from the first to the last.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0


@dataclass(frozen=True)
class DeviceStatus:
    """What the ledger says about the registered fleet."""

    revoked: frozenset[str]
    #: The certificate fingerprint each device signs with now (rotation).
    fingerprints: dict[str, str]


def read_fleet(ledger: LedgerBackend, devices: Iterable[str], identity: Identity) -> DeviceStatus:
    """The fleet's status in one query per ``MAX_BATCH_RECORDS`` devices (``GetDevices``).

    Raises :class:`LedgerError` (or ``OSError``) when the ledger cannot be read."""
    ids = sorted(devices)
    revoked, fingerprints = set(), {}
    for i in range(0, len(ids), MAX_BATCH_RECORDS):
        records = ledger.evaluate("GetDevices", ids[i : i + MAX_BATCH_RECORDS], identity=identity)
        for device, record in records.items():
            if record.get("status") == "revoked":
                revoked.add(device)
            if isinstance(record.get("key_fingerprint"), str):
                fingerprints[device] = record["key_fingerprint"]
    return DeviceStatus(frozenset(revoked), fingerprints)


@dataclass
class OutboxState:
    """What the outbox reports (metrics, ``gateway status``); written by the worker."""

    #: Closed rounds the ledger does not hold yet.
    depth: int = 0
    #: Since when (monotonic clock) the oldest of them has waited, as this process saw it.
    oldest_since: float | None = None
    failures: int = 0
    #: The round the contract refuses, and why, while it does.
    refused_round: int | None = None
    refused_reason: str | None = None


class LedgerOutbox:
    """Anchors closed rounds, in order, from the store to the ledger.

    ``start()`` runs it in its own thread (what ``fedledger gateway run`` does): the loop
    only calls :meth:`wake`. Without it, :meth:`pump` does the same work inline when the loop
    calls it (deterministic tests, simulations). ``on_anchored(round)`` is called from the
    thread that anchored it.
    """

    def __init__(
        self,
        *,
        task_id: str,
        store: UpdateStore,
        ledger: LedgerBackend,
        identity: Identity,
        clock: Callable[[], float] = time.time,
        metrics: GatewayMetrics | None = None,
        on_anchored: Callable[[int], None] | None = None,
        max_backoff: float = MAX_BACKOFF,
    ):
        self.task_id = task_id
        self.store = store
        self.ledger = ledger
        self.identity = identity
        self.state = OutboxState()
        self._clock = clock
        self._metrics = metrics
        self._on_anchored = on_anchored
        self._max_backoff = max_backoff
        #: The open round to declare on the ledger once every closed round is there.
        self._open: tuple[int, str, float] | None = None
        self._declared: int | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._own_store: UpdateStore | None = None
        #: How the task ended, for ``EndTask`` once every closed round is on the ledger.
        self._end: tuple[str, dict[str, Any]] | None = None
        self._ended = False
        self._seen: dict[int, float] = {}

    # ------------------------------------------------------------------ driving
    def start(self) -> None:
        """Run in a worker thread, on its own connection to the store (WAL: it reads only
        committed rounds, whatever the loop is writing)."""
        if self._thread is not None:
            return
        self._own_store = UpdateStore(self.store.path)
        self.store = self._own_store
        self._thread = threading.Thread(target=self._run, name="ledger-outbox", daemon=True)
        self._thread.start()

    @property
    def background(self) -> bool:
        return self._thread is not None

    def wake(self) -> None:
        """New work (a round closed or opened): anchor it now, not at the next retry."""
        self._idle.clear()
        self._wake.set()

    def opened(self, round_: int, base_hash: str, deadline: float) -> None:
        """Declare the open round on the ledger (after the closed ones); if this fails, the
        close's anchoring opens it."""
        self._open = (round_, base_hash, round(deadline, 3))

    def end(self, status: str, detail: dict[str, Any]) -> None:
        """Record on the ledger that the task ended (after its closed rounds)."""
        self._end = (status, detail)

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the ledger to hold every closed round (inline: one
        attempt); True when it does."""
        if self._thread is None:
            return self.pump()
        self.wake()
        return self._idle.wait(timeout) and self.state.depth == 0

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("ledger worker still waiting for the ledger; leaving it")
            elif self._own_store is not None:
                self._own_store.close()

    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            if backoff:
                self._wake.wait(backoff)
            else:
                self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                caught_up = self.pump()
            except Exception:  # never let the worker die silently
                log.exception("ledger worker failed; retrying")
                caught_up = False
            if caught_up:
                backoff = 0.0
                self._idle.set()
            else:
                backoff = min(self._max_backoff, max(FIRST_BACKOFF, backoff * 2))
                if self.state.refused_round is not None:
                    backoff = self._max_backoff

    # ------------------------------------------------------------------ work
    def pump(self) -> bool:
        """Anchor every pending closed round in order, then declare the open round; stop at
        the first failure. True when the ledger holds every closed round."""
        pending = [r for r in self.store.unledgered(self.task_id) if r.record is not None]
        now = time.monotonic()
        self._seen = {r.round: self._seen.get(r.round, now) for r in pending}
        self._report(pending)
        for i, row in enumerate(pending):
            if not self._anchor(row.round, row.record):
                return False
            self._report(pending[i + 1 :])
        self._declare_open()
        return self._submit_end()

    def _submit_end(self) -> bool:
        if self._end is None or self._ended:
            return True
        status, detail = self._end
        try:
            task = self.ledger.evaluate("GetTask", self.task_id, identity=self.identity)
            if task.get("ended") is None:
                self.ledger.submit("EndTask", self.task_id, status, detail, identity=self.identity)
                log.info("task %s ended on the ledger: %s", self.task_id, status)
        except (LedgerError, OSError) as exc:
            self.state.failures += 1
            log.error("ledger could not record the end of task %s, retrying: %s", self.task_id, exc)
            return False
        self._ended = True
        return True

    def _report(self, pending: list) -> None:
        self.state.depth = len(pending)
        self.state.oldest_since = self._seen.get(pending[0].round) if pending else None

    def _failed(self, round_: int, exc: Exception, what: str) -> None:
        self.state.failures += 1
        refused = isinstance(exc, ContractError)
        if refused:
            if self.state.refused_round != round_:
                log.error(
                    "the ledger refuses round %d (%s): %s; later rounds wait behind it, retried"
                    " every %.0f s",
                    round_, what, exc, self._max_backoff,
                )  # fmt: skip
            self.state.refused_round, self.state.refused_reason = round_, str(exc)
            try:
                self.store.note_refused(self.task_id, round_, str(exc), self._clock())
            except GatewayError as store_exc:  # reported in the log and the metric anyway
                log.warning("cannot record the refusal of round %d: %s", round_, store_exc)
        else:
            log.error("ledger unavailable for round %d (%s), retrying: %s", round_, what, exc)

    def _anchor(self, round_: int, record: dict[str, Any]) -> bool:
        started = time.perf_counter()
        task = self.task_id
        try:
            state = self._ledger_round(round_)
            if state is None:
                self.ledger.submit(
                    "OpenRound", task, round_, record["base_model"], record["deadline"],
                    identity=self.identity,
                )  # fmt: skip
                state = {"status": "open", "batches": 0}
            crash_point("gateway.anchoring")
            if state["status"] != "committed":
                for batch in record["batches"][state["batches"] :]:
                    self.ledger.submit("RecordUpdates", task, round_, batch, identity=self.identity)
                extra = [record["aggregate_sha256"]] if record.get("aggregate_sha256") else []
                self.ledger.submit(
                    "CommitRound", task, round_, record["global_model"], record["aggregation"],
                    record["contributors"], record["metrics"], *extra, identity=self.identity,
                )  # fmt: skip
        except (LedgerError, OSError) as exc:
            self._failed(round_, exc, "anchoring")
            return False
        if self._metrics is not None:
            self._metrics.ledger_commit.observe(time.perf_counter() - started)
        self.store.mark_ledgered(task, round_)
        if self.state.refused_round == round_:
            log.info("the ledger took round %d after refusing it", round_)
            self.state.refused_round = self.state.refused_reason = None
        if self._on_anchored is not None:
            self._on_anchored(round_)
        return True

    def _declare_open(self) -> None:
        opened = self._open
        if opened is None or self._declared == opened[0]:
            return
        round_, base_hash, deadline = opened
        try:
            if self._ledger_round(round_) is None:
                self.ledger.submit(
                    "OpenRound", self.task_id, round_, base_hash, deadline, identity=self.identity
                )
        except (LedgerError, OSError) as exc:
            self.state.failures += 1
            log.error("ledger could not open round %d (retried at close): %s", round_, exc)
            return
        self._declared = round_

    def _ledger_round(self, round_: int) -> dict[str, Any] | None:
        try:
            return self.ledger.evaluate("GetRound", self.task_id, round_, identity=self.identity)
        except ContractError as exc:
            if exc.code == "not_found":
                return None
            raise
