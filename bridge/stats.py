"""What becomes of the STATS frames bridges send (docs/protocol.md, "STATS").

A bridge measures every request where it forwards it (time to first token, decode rate, token
counts) and samples its GPUs and host; it publishes both to the relay in STATS frames. The relay
turns them into Prometheus series on ``/_relay/metrics`` (labelled by node) and keeps the latest
sample and node facts for ``/_relay/status``; the bridge keeps the same series of its own for its
local endpoint's ``/_bridge/metrics``. Unknown kinds and fields are ignored, wrong types are
dropped field by field: a bridge cannot break the relay's metrics with a bad frame.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import prometheus_client as prom
from prometheus_client.core import CounterMetricFamily, Metric

from .affinity import Affinity

#: Label values are cut to this length and the number of distinct (route, model) pairs per node is
#: capped, so that a bridge cannot blow up the relay's memory through label cardinality.
MAX_LABEL = 64
MAX_SERIES_PER_NODE = 64
#: Nodes that left whose histograms and counters are still shown (the most recently departed);
#: the series of an older one are removed, so bridges that come and go cannot grow the relay.
DEPARTED_KEPT = 32


class AffinityCounts:
    """A Prometheus collector of conversation affinity's outcomes (:meth:`Affinity.counts`), read
    when scraped: ``sources()`` gives (label values, Affinity) pairs for ``labels``."""

    def __init__(
        self,
        name: str,
        labels: list[str],
        sources: Callable[[], Iterable[tuple[list[str], Affinity[Any]]]],
    ) -> None:
        self.name = name
        self.labels = labels
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            self.name,
            "Requests that continue or start a conversation, by how they were placed: new (a first "
            "turn), kept (the target of its previous turn), unknown (not remembered, or its node "
            "left), fallback (that target overloaded or not taking requests)",
            labels=[*self.labels, "outcome"],
        )
        for values, affinity in self.sources():
            for outcome, count in affinity.counts().items():
                family.add_metric([*values, outcome], count)
        yield family


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_RATE_BUCKETS = (1, 2.5, 5, 10, 20, 30, 40, 60, 80, 120, 200, 500, 1000, 2000, 5000)


def _num(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def _label(value: Any) -> str:
    return value[:MAX_LABEL] if isinstance(value, str) else ""


class RelayStats:
    """Prometheus series and the latest facts, fed by :meth:`publish`."""

    def __init__(self, registry: prom.CollectorRegistry) -> None:
        labels = ["node", "route", "model"]
        self.ttft = prom.Histogram(
            "bridge_request_ttft_seconds",
            "Time to first token measured by the bridge at the engine (excludes the tunnel)",
            labels,
            registry=registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.duration = prom.Histogram(
            "bridge_request_duration_seconds",
            "Whole request time measured by the bridge",
            labels,
            registry=registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.queue = prom.Histogram(
            "bridge_request_queue_seconds",
            "Time a request waited in the bridge before it reached the engine",
            labels,
            registry=registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.decode_rate = prom.Histogram(
            "bridge_request_decode_tokens_per_second",
            "Decoding rate of each request",
            labels,
            registry=registry,
            buckets=_RATE_BUCKETS,
        )
        self.prompt_tokens = prom.Counter(
            "bridge_prompt_tokens", "Prompt tokens processed", labels, registry=registry
        )
        self.completion_tokens = prom.Counter(
            "bridge_completion_tokens", "Tokens generated", labels, registry=registry
        )
        self.requests = prom.Counter(
            "bridge_node_requests", "Requests measured by bridges", [*labels, "status"], registry=registry
        )
        gpu = ["node", "gpu", "name"]
        self.gpu_used = prom.Gauge(
            "bridge_gpu_memory_used_bytes", "GPU memory in use", gpu, registry=registry
        )
        self.gpu_total = prom.Gauge("bridge_gpu_memory_total_bytes", "GPU memory", gpu, registry=registry)
        self.gpu_util = prom.Gauge(
            "bridge_gpu_utilization_ratio", "GPU utilisation (0..1)", gpu, registry=registry
        )
        self.gpu_temp = prom.Gauge(
            "bridge_gpu_temperature_celsius", "GPU temperature", gpu, registry=registry
        )
        self.gpu_power = prom.Gauge("bridge_gpu_power_watts", "GPU power draw", gpu, registry=registry)
        self.cpu = prom.Gauge(
            "bridge_host_cpu_utilization_ratio", "Host CPU utilisation (0..1)", ["node"], registry=registry
        )
        self.ram = prom.Gauge(
            "bridge_host_memory_used_bytes", "Host memory in use", ["node"], registry=registry
        )
        #: node -> the latest "sample" and "node" bodies, for /_relay/status.
        self.latest: dict[str, dict[str, Any]] = {}
        self._series: dict[str, set[tuple[str, str]]] = {}
        #: Names of nodes that left, oldest first (at most DEPARTED_KEPT).
        self._departed: OrderedDict[str, None] = OrderedDict()
        self._per_node = (
            self.ttft,
            self.duration,
            self.queue,
            self.decode_rate,
            self.prompt_tokens,
            self.completion_tokens,
            self.requests,
        )

    def publish(self, node: str, body: dict[str, Any]) -> None:
        """Take one STATS body from ``node``."""
        kind = body.get("kind")
        if kind == "request":
            self._request(node, body)
        elif kind == "sample":
            self._sample(node, body)
            self.latest.setdefault(node, {})["sample"] = {**_clean_sample(body), "received_at": time.time()}
        elif kind == "node":
            facts = {k: v for k, v in body.items() if k != "kind" and isinstance(v, str | int | float | list)}
            self.latest.setdefault(node, {})["facts"] = facts

    def arrived(self, node: str) -> None:
        """A node of this name is connected (again): its series are no longer a departed one's."""
        self._departed.pop(node, None)

    def forget(self, node: str) -> None:
        """The node left: its gauges would lie, so drop them. Its histograms and counters stay
        while it is one of the DEPARTED_KEPT nodes that left last; an older one's are removed."""
        self._departed[node] = None
        self._departed.move_to_end(node)
        while len(self._departed) > DEPARTED_KEPT:
            gone, _ = self._departed.popitem(last=False)
            self._remove_series(gone)
        self._drop_gauges(node)

    def _remove_series(self, node: str) -> None:
        for family in self._per_node:
            for labels in list(family._metrics):  # prometheus_client has no remove-by-prefix
                if labels[0] == node:
                    family.remove(*labels)
        self._series.pop(node, None)

    def _drop_gauges(self, node: str) -> None:
        self.latest.pop(node, None)
        for gauge in (self.gpu_used, self.gpu_total, self.gpu_util, self.gpu_temp, self.gpu_power):
            for labels in list(gauge._metrics):  # prometheus_client has no remove-by-prefix
                if labels[0] == node:
                    gauge.remove(*labels)
        for gauge in (self.cpu, self.ram):
            if (node,) in gauge._metrics:
                gauge.remove(node)

    def _request(self, node: str, body: dict[str, Any]) -> None:
        route, model = _label(body.get("route")), _label(body.get("model"))
        series = self._series.setdefault(node, set())
        if (route, model) not in series:
            if len(series) >= MAX_SERIES_PER_NODE:
                route, model = "other", "other"
            series.add((route, model))
        labels = (node, route, model)
        status = body.get("status")
        self.requests.labels(*labels, str(status) if isinstance(status, int) else "").inc()
        for key, hist in (
            ("ttft_s", self.ttft),
            ("total_s", self.duration),
            ("queue_s", self.queue),
            ("tokens_per_s", self.decode_rate),
        ):
            value = _num(body, key)
            if value is not None:
                hist.labels(*labels).observe(value)
        for key, counter in (
            ("prompt_tokens", self.prompt_tokens),
            ("completion_tokens", self.completion_tokens),
        ):
            value = _num(body, key)
            if value is not None:
                counter.labels(*labels).inc(value)

    def _sample(self, node: str, body: dict[str, Any]) -> None:
        gpus = body.get("gpus")
        for gpu in gpus[:16] if isinstance(gpus, list) else []:
            if not isinstance(gpu, dict):
                continue
            labels = (node, str(gpu.get("index", ""))[:8], _label(gpu.get("name")))
            for key, gauge, scale in (
                ("memory_used_bytes", self.gpu_used, 1.0),
                ("memory_total_bytes", self.gpu_total, 1.0),
                ("utilization_percent", self.gpu_util, 0.01),
                ("temperature_c", self.gpu_temp, 1.0),
                ("power_w", self.gpu_power, 1.0),
            ):
                value = _num(gpu, key)
                if value is not None:
                    gauge.labels(*labels).set(value * scale)
        cpu = _num(body, "cpu_percent")
        if cpu is not None:
            self.cpu.labels(node).set(cpu / 100)
        ram = _num(body, "ram_used_bytes")
        if ram is not None:
            self.ram.labels(node).set(ram)


def _clean_sample(body: dict[str, Any]) -> dict[str, Any]:
    gpus = body.get("gpus")
    keys = (
        "index",
        "name",
        "memory_used_bytes",
        "memory_total_bytes",
        "utilization_percent",
        "temperature_c",
    )
    return {
        "gpus": [
            {k: g[k] for k in keys if isinstance(g.get(k), str | int | float)}
            for g in (gpus[:16] if isinstance(gpus, list) else [])
            if isinstance(g, dict)
        ],
        **{
            k: body[k]
            for k in ("cpu_percent", "ram_used_bytes", "ram_total_bytes")
            if _num(body, k) is not None
        },
    }
