"""Every Prometheus metric the gateway exports, in one place.

Counters and gauges are read at scrape time from state the gateway keeps anyway
(:class:`~gateway.GatewayStats`), so handling a message costs nothing extra; only timings are
observed, when a round closes. Labels come from small fixed sets (``reason`` is one of
:data:`~gateway.REJECT_REASONS`; ``class`` a class index, at most
:data:`~fedcore.MAX_CLASS_RECALLS` of them): a device id is never a label.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fedcore import MAX_CLASS_RECALLS, MetricsEndpoint

from ._errors import REJECT_REASONS, GatewayError

if TYPE_CHECKING:
    from ._service import Gateway

PREFIX = "fedledger_gateway"

#: Rounds last from tens of milliseconds (a few devices on a LAN, small models) to the
#: task's deadline (minutes, hours); the low buckets keep short rounds' quantiles honest.
_ROUND_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0
)  # fmt: skip
#: Aggregation is O(model): milliseconds for small models, seconds for large ones.
_AGGREGATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
#: An embedded append is a SQLite transaction; a Fabric commit waits for ordering (seconds).
_LEDGER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _version() -> str:
    try:
        return importlib.metadata.version("fedledger")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


#: Gauge noun -> (the :func:`fedcore.clinical_metrics` key it exports, its help).
_CLINICAL_GAUGES = {
    "global_model_balanced_accuracy_ratio": (
        "balanced_accuracy",
        "Balanced accuracy (mean recall over the classes present, 0..1) of the last global"
        " model on the held-out evaluation data.",
    ),
    "global_model_auc_ratio": (
        "auc",
        "ROC AUC (0..1; macro one-vs-rest above two classes) of the last global model on the"
        " held-out evaluation data.",
    ),
    "global_model_sensitivity_ratio": (
        "sensitivity",
        "Sensitivity (recall of the task's positive_class, by default class 1; 0..1) of the"
        " last global model of a two-class task on the held-out evaluation data.",
    ),
    "global_model_specificity_ratio": (
        "specificity",
        "Specificity (recall of the other class; 0..1) of the last global model of a two-class"
        " task on the held-out evaluation data.",
    ),
}
_RECALL = "recall_"


def _clinical(gauge, stats) -> Iterator[Metric]:
    """The last global model's clinical metrics: absent until a round closes with held-out
    data, and each one absent while that data does not define it (a class missing)."""
    clinical = {} if stats is None else stats.last_clinical  # replaced whole, never mutated
    for noun, (key, doc) in _CLINICAL_GAUGES.items():
        yield gauge(noun, doc, lambda s, key=key: clinical.get(key))
    recall = GaugeMetricFamily(
        f"{PREFIX}_global_model_class_recall_ratio",
        "Recall (0..1) of each class of the last global model on the held-out evaluation data"
        f" (tasks of at most {MAX_CLASS_RECALLS} classes; a class absent from the data has none).",
        labels=["class"],
    )
    for key, value in clinical.items():
        if key.startswith(_RECALL):
            recall.add_metric([key[len(_RECALL) :]], value)
    yield recall


class GatewayMetrics:
    """The gateway's metrics on the registry it is given (never the global default).

    A collector itself: registered on ``registry`` at construction, it reads the bound
    gateway's :class:`~gateway.GatewayStats` at each scrape. Pass it to
    ``Gateway(metrics=...)``, which binds it; :meth:`serve` exposes the registry over HTTP.
    """

    def __init__(self, *, registry: CollectorRegistry, version: str | None = None):
        self.registry = registry
        self.version = version or _version()
        self.round_duration = Histogram(
            f"{PREFIX}_round_duration_seconds",
            "Time from opening a round to closing it.",
            buckets=_ROUND_BUCKETS,
            registry=registry,
        )
        self.aggregation = Histogram(
            f"{PREFIX}_aggregation_seconds",
            "Time to compute a round's FedAvg result and add it to the base model.",
            buckets=_AGGREGATION_BUCKETS,
            registry=registry,
        )
        self.ledger_commit = Histogram(
            f"{PREFIX}_ledger_commit_seconds",
            "Time to append a round record to the ledger (successful appends only).",
            buckets=_LEDGER_BUCKETS,
            registry=registry,
        )
        self._gateway: Gateway | None = None
        self._endpoint = MetricsEndpoint(registry, error=GatewayError)
        registry.register(self)

    def bind(self, gateway: Gateway) -> None:
        """Export ``gateway``'s state from now on (a later gateway replaces an earlier one)."""
        self._gateway = gateway

    # ------------------------------------------------------------------ collector
    def describe(self) -> Iterator[Metric]:
        """The families :meth:`collect` yields (build info aside, without samples): lets the
        registry refuse a second collector with the same names."""
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        return self._families(self._gateway)

    def _families(self, gateway: Gateway | None) -> Iterator[Metric]:
        # Runs on the HTTP server's thread while the gateway thread mutates its stats: read
        # single values and look up fixed keys, never iterate a collection that can change.
        info = GaugeMetricFamily(
            f"{PREFIX}_build_info",
            "Always 1; labelled with the fedledger version.",
            labels=["version"],
        )
        info.add_metric([self.version], 1)
        yield info
        stats = None if gateway is None else gateway.stats
        registered = None if gateway is None else gateway.registry

        def counter(noun: str, doc: str, value) -> CounterMetricFamily:
            family = CounterMetricFamily(f"{PREFIX}_{noun}", doc)
            if stats is not None:
                family.add_metric([], value(stats))
            return family

        def gauge(noun: str, doc: str, value) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"{PREFIX}_{noun}", doc)
            if stats is not None and (v := value(stats)) is not None:
                family.add_metric([], v)
            return family

        yield counter(
            "updates_received_total",
            "Messages received on update topics, before validation.",
            lambda s: s.received,
        )
        yield counter(
            "updates_accepted_total",
            "Updates that passed validation and were committed to the store.",
            lambda s: s.accepted,
        )
        rejected = CounterMetricFamily(
            f"{PREFIX}_updates_rejected_total",
            "Messages refused, by reason (see docs/wire.md).",
            labels=["reason"],
        )
        if stats is not None:
            for reason in REJECT_REASONS:
                rejected.add_metric([reason], stats.rejected.get(reason, 0))
        yield rejected
        yield counter(
            "update_received_bytes_total",
            "Bytes of messages received on update topics, accepted or not.",
            lambda s: s.bytes_received,
        )
        yield counter(
            "rounds_closed_total",
            "Rounds closed (aggregated, stored and anchored) by this process.",
            lambda s: s.rounds_closed,
        )
        outbox = None if gateway is None else gateway.outbox.state
        yield counter(
            "ledger_commit_failures_total",
            "Ledger writes that failed (retried by the ledger outbox with backoff).",
            lambda s: s.ledger_failures + outbox.failures,
        )
        yield gauge(
            "ledger_outbox_depth",
            "Closed rounds the ledger does not hold yet.",
            lambda s: outbox.depth,
        )
        yield gauge(
            "ledger_outbox_oldest_age_seconds",
            "How long the oldest round waiting for the ledger has waited (0: none waits).",
            lambda s: 0.0 if (t := outbox.oldest_since) is None else time.monotonic() - t,
        )
        yield gauge(
            "ledger_refused_round",
            "The round the ledger contract refuses (later rounds wait behind it); -1: none.",
            lambda s: -1 if outbox.refused_round is None else outbox.refused_round,
        )
        protocol = None if gateway is None else gateway.protocol
        yield gauge(
            "dp_epsilon",
            "Privacy spent so far (epsilon at the task's delta, RDP accountant) of a task with"
            " differential privacy; -1: the task has none.",
            lambda s: getattr(protocol, "epsilon", -1.0),
        )
        yield gauge(
            "current_round",
            "The round being run; the task's round count once the final model is published.",
            lambda s: s.current_round,
        )
        yield gauge(
            "last_round_participants",
            "Devices whose updates went into the last closed round.",
            lambda s: s.last_participants,
        )
        yield gauge(
            "global_model_accuracy_ratio",
            "Accuracy (0..1) of the last global model on the held-out evaluation data.",
            lambda s: s.last_accuracy,
        )
        yield from _clinical(gauge, stats)
        yield gauge(
            "devices_registered",
            "Devices in the gateway's registry.",
            lambda s: len(registered),
        )
        yield gauge(
            "devices_online",
            "Registered devices whose last presence message said online.",
            lambda s: sum(1 for device in registered if device in s.online),
        )

    # ------------------------------------------------------------------ HTTP
    def serve(self, port: int, *, host: str = "127.0.0.1") -> int:
        """Serve the registry at ``http://host:port/metrics`` from a daemon thread; returns the
        bound port (``port=0`` picks a free one). :meth:`close` stops it."""
        return self._endpoint.serve(port, host=host)

    @property
    def port(self) -> int | None:
        """The port metrics are served on, or None when not served."""
        return self._endpoint.port

    def close(self) -> None:
        """Stop serving metrics (no-op when not served)."""
        self._endpoint.close()
