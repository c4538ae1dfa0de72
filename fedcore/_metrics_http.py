"""Serving a Prometheus registry over HTTP, shared by the agent's and the gateway's metrics."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server

from ._errors import FedledgerError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer


class MetricsEndpoint:
    """``/metrics`` for one registry, from a daemon thread; stoppable (tests, shutdown).

    ``error`` is the component's own exception type, raised when the port cannot be bound.
    """

    def __init__(self, registry: CollectorRegistry, *, error: type[FedledgerError]):
        self.registry = registry
        self._error = error
        self._server: tuple[WSGIServer, threading.Thread] | None = None

    def serve(self, port: int, *, host: str = "127.0.0.1") -> int:
        """Serve at ``http://host:port/metrics``; returns the bound port (0 picks one)."""
        if self._server is not None:
            raise self._error(f"metrics are already served on port {self.port}")
        try:
            self._server = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise self._error(f"cannot serve metrics on {host}:{port}: {exc}") from None
        return self._server[0].server_port

    @property
    def port(self) -> int | None:
        """The port metrics are served on, or None when not served."""
        return None if self._server is None else self._server[0].server_port

    def close(self) -> None:
        """Stop serving (no-op when not served)."""
        if self._server is None:
            return
        server, thread = self._server
        self._server = None
        server.shutdown()
        server.server_close()
        thread.join(5)
