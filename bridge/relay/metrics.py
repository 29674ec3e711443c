"""The relay's own Prometheus series (requests, bytes, time to first byte, retries, joins, nodes),
the bridges' series from their STATS frames (:class:`~bridge.stats.RelayStats`), and the counts
of what is in flight, which ``/_relay/health`` and the drain read."""

from __future__ import annotations

import prometheus_client as prom

from ..config import ROUTE_NAME
from ..stats import RelayStats

#: Distinct route labels of ``bridge_relay_requests``; later ones, and names no bridge could
#: serve, count as ``other``: any client may ask for ``/r/<anything>/`` (a 404), and each new label
#: is a series kept for the relay's life (300 long names took /_relay/metrics from 5 KB to 24 MB).
MAX_ROUTE_LABELS = 64


class RelayMetrics:
    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        registry = self.registry
        #: Requests forwarded and not finished (HTTP, including shared answers and jobs).
        self.in_flight = 0
        self._route_labels: set[str] = set()
        #: Client WebSockets open.
        self.websockets = 0
        self.requests = prom.Counter(
            "bridge_relay_requests",
            "Requests proxied, by route and status",
            ["route", "status"],
            registry=registry,
        )
        self.in_flight_gauge = prom.Gauge(
            "bridge_relay_requests_in_flight", "Requests in flight", registry=registry
        )
        self.nodes = prom.Gauge("bridge_relay_nodes_connected", "Bridges connected", registry=registry)
        self.body_bytes = prom.Counter(
            "bridge_relay_body_bytes", "Body bytes proxied", ["direction"], registry=registry
        )
        #: The two children of ``body_bytes``, looked up once (``labels()`` costs a lock and a dict).
        self.request_bytes = self.body_bytes.labels("request")
        self.response_bytes = self.body_bytes.labels("response")
        self.ttfb = prom.Histogram(
            "bridge_relay_time_to_first_byte_seconds",
            "From request to the first response body byte, seen by the relay",
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.stats = RelayStats(registry)
        self.retries = prom.Counter(
            "bridge_relay_retries",
            "Requests retried on another node after theirs vanished",
            registry=registry,
        )
        self.joins = prom.Counter(
            "bridge_relay_idempotent_joins",
            "Repeated requests served from a generation in flight or finished",
            registry=registry,
        )

    def started(self) -> None:
        """A request is in flight."""
        self.in_flight += 1
        self.in_flight_gauge.inc()

    def finished(self, route: str, status: int) -> None:
        """A request ended with ``status`` (0: before any was decided; 599: cut mid-response)."""
        self.in_flight -= 1
        self.in_flight_gauge.dec()
        if status:
            self.requests.labels(self._route_label(route), str(status)).inc()

    def _route_label(self, route: str) -> str:
        if route in self._route_labels:
            return route
        if len(self._route_labels) < MAX_ROUTE_LABELS and ROUTE_NAME.match(route):
            self._route_labels.add(route)
            return route
        return "other"

    def exposition(self) -> tuple[bytes, bytes]:
        """The Prometheus text format: its content type and the series."""
        return prom.CONTENT_TYPE_LATEST.encode(), prom.generate_latest(self.registry)
