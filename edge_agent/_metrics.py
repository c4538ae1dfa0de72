"""Every Prometheus metric the edge agent exports, in one place.

Counters are read at scrape time from what the agent counts anyway; only training time is
observed. The device id is never a label: a scraper knows which device it scrapes.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fedcore import MetricsEndpoint

from ._agent import AgentError

if TYPE_CHECKING:
    from ._agent import EdgeAgent

PREFIX = "fedledger_agent"

#: Local training on a small device: from a fraction of a second to minutes.
_TRAINING_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def _version() -> str:
    try:
        return importlib.metadata.version("fedledger")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _resident_memory_bytes() -> int | None:
    """This process's resident set size from ``/proc/self/statm``; None where there is none."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class AgentMetrics:
    """The agent's metrics on the registry it is given (never the global default).

    A collector itself: registered on ``registry`` at construction, it reads the bound
    agent's counters at each scrape. Pass it to ``EdgeAgent(metrics=...)``, which binds it;
    :meth:`serve` exposes the registry over HTTP.
    """

    def __init__(self, *, registry: CollectorRegistry, version: str | None = None):
        self.registry = registry
        self.version = version or _version()
        self.training = Histogram(
            f"{PREFIX}_training_seconds",
            "Time to train one round locally.",
            buckets=_TRAINING_BUCKETS,
            registry=registry,
        )
        self._agent: EdgeAgent | None = None
        self._endpoint = MetricsEndpoint(registry, error=AgentError)
        registry.register(self)

    def bind(self, agent: EdgeAgent) -> None:
        """Export ``agent``'s counters from now on (a later agent replaces an earlier one)."""
        self._agent = agent

    # ------------------------------------------------------------------ collector
    def describe(self) -> Iterator[Metric]:
        """The families :meth:`collect` yields (build info aside, without samples): lets the
        registry refuse a second collector with the same names."""
        return self._families(None, describe=True)

    def collect(self) -> Iterator[Metric]:
        return self._families(self._agent, describe=False)

    def _families(self, agent: EdgeAgent | None, *, describe: bool) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            f"{PREFIX}_build_info",
            "Always 1; labelled with the fedledger version.",
            labels=["version"],
        )
        info.add_metric([self.version], 1)
        yield info
        rounds = CounterMetricFamily(
            f"{PREFIX}_rounds_trained_total", "Rounds this agent trained and sent an update for."
        )
        sent = CounterMetricFamily(
            f"{PREFIX}_update_sent_bytes_total", "Bytes of signed update messages published."
        )
        if agent is not None:
            rounds.add_metric([], agent.rounds_trained)
            sent.add_metric([], agent.bytes_sent)
        yield rounds
        yield sent
        memory = GaugeMetricFamily(
            f"{PREFIX}_resident_memory_bytes", "Resident memory of the agent's process."
        )
        if not describe and (rss := _resident_memory_bytes()) is not None:
            memory.add_metric([], rss)
        yield memory

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
