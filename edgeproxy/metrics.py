"""Prometheus metrics, on the admin listener's /metrics.

Label children are looked up once and cached: ``labels()`` takes a lock and hashes its
arguments, a cost the hot path should not pay per request.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

__all__ = ["Metrics"]

# Latency buckets from 1 ms (a local origin) to 5 min (a long completion), in seconds.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """All edgeproxy metrics in one registry (its own, so tests can run several proxies)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "edgeproxy_requests", "Client requests by upstream and final status", ["upstream", "status"], registry=r
        )
        self.duration = Histogram(
            "edgeproxy_request_duration_seconds",
            "Time from request received to response end",
            ["upstream"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "edgeproxy_ttfb_seconds",
            "Time from request received to response headers sent to the client",
            ["upstream"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.active_streams = Gauge(
            "edgeproxy_active_streams", "SSE streams being relayed now", ["upstream"], registry=r
        )
        self.active_requests = Gauge("edgeproxy_active_requests", "Requests in progress", ["upstream"], registry=r)
        self.bytes = Counter(
            "edgeproxy_bytes",
            "Body bytes relayed (in: from clients, out: to clients)",
            ["upstream", "direction"],
            registry=r,
        )
        self.attempts = Counter(
            "edgeproxy_attempts", "Attempts by path and outcome", ["upstream", "line", "outcome"], registry=r
        )
        self.connects = Counter(
            "edgeproxy_upstream_connects", "New upstream connections opened", ["upstream", "line"], registry=r
        )
        self.probes = Counter("edgeproxy_probes", "Probe results by path", ["upstream", "line", "result"], registry=r)
        self.path_rtt = Gauge(
            "edgeproxy_path_rtt_seconds",
            "Smoothed RTT (SRTT) of each path",
            ["upstream", "endpoint", "line"],
            registry=r,
        )
        self.path_up = Gauge(
            "edgeproxy_path_up",
            "1 if the path is healthy (last probe answered)",
            ["upstream", "endpoint", "line"],
            registry=r,
        )
        self.switches = Counter(
            "edgeproxy_route_switches", "Times an upstream's preferred path changed", ["upstream"], registry=r
        )
        self.start_time = Gauge("edgeproxy_start_time_seconds", "Process start time", registry=r)
        self.start_time.set(time.time())
        self._cache: dict[tuple[object, ...], MetricWrapperBase] = {}

    def child(self, metric: MetricWrapperBase, *labels: str) -> MetricWrapperBase:
        """``metric.labels(*labels)``, cached."""
        key = (id(metric), *labels)
        c = self._cache.get(key)
        if c is None:
            c = self._cache[key] = metric.labels(*labels)
        return c

    def render(self) -> bytes:
        return generate_latest(self.registry)
