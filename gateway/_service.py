"""The gateway service: runs a task's rounds from first model to final record.

One loop, written once: receive -> validate -> persist -> hand to the round protocol -> on
close: aggregate, evaluate, persist (with the round's ledger record), enqueue for the ledger,
publish the next model. The transport's callback thread only queues messages; one thread
owns all state. The loop is four parts, each in its own module:

- :class:`~gateway._ingest.Ingest`: messages in, validated, batch-committed, acknowledged
  (PUBACK only once durable: no acknowledged update is lost);
- :class:`~gateway._rounds.RoundRunner`: rounds opened, closed when due, models published;
- the task's :class:`~gateway._protocol.RoundProtocol`: what differs between synchronous
  rounds, FedBuff and DP-FedAvg;
- :class:`~gateway._fleet.FleetLedger` and :class:`~gateway._anchor.LedgerOutbox`: what the
  ledger says about the fleet, and what the gateway writes to it (off this thread when it
  runs in the background).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcore import (
    CertificateTrust,
    Params,
    Signer,
    TaskSpec,
    Transport,
    presence_subscription,
    seed_digest,
    update_subscription,
)
from ledger import Identity, LedgerBackend

from ._anchor import LedgerOutbox
from ._errors import GatewayError
from ._fleet import FleetLedger
from ._ingest import Ingest
from ._metrics import GatewayMetrics
from ._protocol import make_protocol, protocol_name
from ._registry import DeviceRegistry
from ._round import OpenRound, RoundResult
from ._rounds import RoundRunner, read_stored_update
from ._stats import GatewayStats
from ._store import UpdateStore
from ._validate import UpdateValidator

# The built-in round protocols register themselves on import.
from . import _dp, _fedbuff, _secagg, _sync  # noqa: F401  isort: skip

log = logging.getLogger(__name__)


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
        self.evaluation = evaluation
        self.transport = transport
        self.store = store
        self.ledger = ledger
        self.registry = registry
        self.stats = GatewayStats()
        self.metrics = metrics
        self.identity = identity or Identity(msp_id="org1", subject="gateway", role="gateway")
        self._ledger_worker = ledger_worker
        validator = UpdateValidator(
            task=task.id,
            registry=registry,
            shapes=task.model_spec().shapes(),
            max_message_bytes=max_message_bytes,
            trust=trust,
            decryption_key=decryption_key,
            require_encryption=require_encryption,
            masked=task.secagg is not None,
        )
        #: A stored (validated) update frame as ``(header, views)``.
        self.read_update = functools.partial(read_stored_update, key=decryption_key)
        options: dict[str, object] = {}
        if task.dp is not None:
            options["dp_seed"] = _checked_dp_seed(task, dp_seed)
        if task.secagg is not None:
            options.update(
                transport=transport,
                signer=signer,
                authenticate=validator.authenticate_stage,
                plaintext=validator.plaintext,
                revoked=lambda: self.fleet.revoked,
                clock=clock,
                rejected=self.stats.rejected,
            )
        if task.quorum is not None and task.quorum > len(registry):
            raise GatewayError(
                f"the task's quorum {task.quorum} exceeds the {len(registry)} registered"
                " devices: no round could close at its deadline (lower quorum in the task,"
                " or leave it unset for a majority of the fleet)"
            )
        self.protocol = make_protocol(
            protocol or protocol_name(task),
            task=task,
            store=store,
            read_frame=self.read_update,
            fleet=len(registry),
            **options,
        )
        self.fleet = FleetLedger(
            task=task,
            ledger=ledger,
            registry=registry,
            identity=self.identity,
            admin=admin,
            stats=self.stats,
        )
        #: Rounds the outbox anchored since the loop last looked (any thread puts).
        anchored: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.outbox = LedgerOutbox(
            task_id=task.id,
            store=store,
            ledger=ledger,
            identity=self.identity,
            metrics=metrics,
            on_anchored=anchored.put,
        )
        self.rounds = RoundRunner(
            task=task,
            store=store,
            protocol=self.protocol,
            outbox=self.outbox,
            fleet=self.fleet,
            transport=transport,
            signer=signer,
            stats=self.stats,
            read_update=self.read_update,
            clock=clock,
            evaluation=evaluation,
            metrics=metrics,
            on_round=on_round,
            anchored=anchored,
        )
        self.ingest = Ingest(
            task_id=task.id,
            validator=validator,
            protocol=self.protocol,
            store=store,
            rounds=self.rounds,
            fleet=self.fleet,
            stats=self.stats,
            clock=clock,
        )
        if metrics is not None:
            metrics.bind(self)

    # ------------------------------------------------------------------ state
    @property
    def finished(self) -> bool:
        return self.rounds.final_hash is not None

    @property
    def current_round(self) -> int | None:
        current = self.rounds.current
        return None if current is None else current.round

    @property
    def open_round(self) -> OpenRound | None:
        """The round updates count in now (``None`` between rounds and once finished)."""
        return self.rounds.current

    @property
    def final_model(self) -> str | None:
        return self.rounds.final_hash

    @property
    def results(self) -> list[RoundResult]:
        """The rounds this process closed, in order."""
        return self.rounds.results

    def load_model(self, model_hash_: str) -> Params:
        """A model the store holds, by hash."""
        return self.rounds.load_model(model_hash_)

    # ------------------------------------------------------------------ lifecycle
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
            self.ingest.drain(self.transport.messages, min(remaining, 0.2))
        return len(self.stats.online & set(self.registry))

    def start(self) -> None:
        """Resume the task from the store, or open its first round; then handle the updates
        that arrived meanwhile (held, not refused)."""
        if self._ledger_worker:
            self.outbox.start()
        self.ingest.load_counters()
        self.rounds.begin()
        self.ingest.release()

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
        self.rounds.note_anchored()
        return self.results

    def step(self, timeout: float) -> None:
        """Handle what arrives within ``timeout`` seconds, then close the round if due."""
        self.ingest.drain(self.transport.messages, timeout)
        self.rounds.note_anchored()
        self.rounds.maybe_close()

    def close(self, *, drain: float = 5.0) -> None:
        """Give the ledger worker up to ``drain`` seconds to anchor what is closed, stop it
        and serving metrics, leave the broker, close the store and the ledger. What is not
        anchored yet stays in the store's outbox for the next start."""
        if self.outbox.background and self.store.unledgered(self.task.id):
            self.outbox.drain(drain)
        self.outbox.stop()
        if self.metrics is not None:
            self.metrics.close()
        self.transport.stop()
        self.store.close()
        self.ledger.close()


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
