"""Prometheus metrics, on the admin listener's /metrics.

The hot path only bumps plain numbers in dicts (one event loop, so no locks): a
prometheus_client ``labels().inc()`` takes a lock and re-validates its arguments, several
microseconds per request for nothing. At scrape time one collector turns the dicts into
metric families and prometheus_client renders the text format.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["Counter", "Gauge", "Histogram", "Metrics"]

# Latency buckets from 1 ms (a local origin) to 5 min (a long completion), in seconds.
DURATION_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)

Labels = tuple[str, ...]


class Counter:
    __slots__ = ("doc", "labelnames", "name", "values")

    def __init__(self, name: str, doc: str, labelnames: Labels) -> None:
        self.name, self.doc, self.labelnames = name, doc, labelnames
        self.values: dict[Labels, float] = {}

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def family(self) -> Metric:
        f = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for labels, v in self.values.items():
            f.add_metric(labels, v)
        return f


class Gauge(Counter):
    __slots__ = ()

    def set(self, labels: Labels, value: float) -> None:
        self.values[labels] = value

    def family(self) -> Metric:
        f = GaugeMetricFamily(self.name, self.doc, labels=self.labelnames)
        for labels, v in self.values.items():
            f.add_metric(labels, v)
        return f


class Histogram:
    __slots__ = ("buckets", "doc", "labelnames", "name", "values")

    def __init__(self, name: str, doc: str, labelnames: Labels, buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.name, self.doc, self.labelnames, self.buckets = name, doc, labelnames, buckets
        # labels -> [count per bucket (last is +Inf)..., sum]
        self.values: dict[Labels, list[float]] = {}

    def observe(self, labels: Labels, value: float) -> None:
        row = self.values.get(labels)
        if row is None:
            row = self.values[labels] = [0.0] * (len(self.buckets) + 2)
        row[bisect.bisect_left(self.buckets, value)] += 1
        row[-1] += value

    def family(self) -> Metric:
        f = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for labels, row in self.values.items():
            cumulative, buckets = 0.0, []
            for bound, n in zip((*self.buckets, float("inf")), row[:-1], strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
            f.add_metric(labels, buckets, row[-1])
        return f


class Metrics(Collector):
    """All edgeproxy metrics, in a registry of their own (tests run several proxies)."""

    def __init__(self) -> None:
        self.requests = Counter(
            "edgeproxy_requests", "Client requests by upstream and final status", ("upstream", "status")
        )
        self.duration = Histogram(
            "edgeproxy_request_duration_seconds", "Time from request received to response end", ("upstream",)
        )
        self.ttfb = Histogram(
            "edgeproxy_ttfb_seconds", "Time from request received to response headers sent to the client", ("upstream",)
        )
        self.active_streams = Gauge("edgeproxy_active_streams", "SSE streams being relayed now", ("upstream",))
        self.bytes = Counter(
            "edgeproxy_bytes", "Body bytes relayed (in: from clients, out: to clients)", ("upstream", "direction")
        )
        self.attempts = Counter("edgeproxy_attempts", "Attempts by path and outcome", ("upstream", "line", "outcome"))
        self.failovers = Counter(
            "edgeproxy_failovers", "Attempts retried on another path, by reason", ("upstream", "reason")
        )
        self.fallbacks = Counter(
            "edgeproxy_fallbacks",
            "Requests sent again with another model by upstreams.X.fallbacks (on: the entry's error"
            " code or status; model: its model)",
            ("upstream", "on", "model"),
        )
        self.hedges = Counter("edgeproxy_hedges", "Second attempts started by failover.hedge", ("upstream",))
        self.budget_exhausted = Counter(
            "edgeproxy_retry_budget_exhausted", "Retries refused by the retry budget", ("upstream",)
        )
        self.stream_errors = Counter(
            "edgeproxy_stream_errors", "Streams ended with an in-band error after commit", ("upstream", "reason")
        )
        # A line's ejection has model "*"; an origin's (one model at an endpoint, or "*": all of
        # them) has line "*".
        self.ejections = Counter(
            "edgeproxy_ejections",
            "Lines or models taken out of rotation after failing attempts",
            ("upstream", "endpoint", "line", "model"),
        )
        self.restores = Counter(
            "edgeproxy_restores",
            "Ejected lines or models back in rotation (a trial or a probe worked)",
            ("upstream", "endpoint", "line", "model"),
        )
        self.resumes = Counter(
            "edgeproxy_resumes",
            "Streams broken after commit that failover.resume tried to continue elsewhere, by result"
            " (ok: continued; refused: the continuation was answered with an error; unavailable: no path"
            " or no answer)",
            ("upstream", "result"),
        )
        self.rescues = Counter(
            "edgeproxy_rescues", "Waiting attempts failed over: a probe found the line dead", ("upstream", "line")
        )
        self.hop_bytes = Counter(
            "edgeproxy_hop_bytes",
            "Body bytes across the edge hop, before (raw) and after (wire) its compression"
            " (role: sidecar or edge; line: the sidecar's via line; direction: up = requests)",
            ("role", "line", "direction", "form"),
        )
        self.probes = Counter("edgeproxy_probes", "Probe results by path", ("upstream", "line", "result"))
        self.path_rtt = Gauge(
            "edgeproxy_path_rtt_seconds", "Smoothed RTT (SRTT) of each path", ("upstream", "endpoint", "line")
        )
        self.path_up = Gauge(
            "edgeproxy_path_up", "1 if the path is healthy (last probe answered)", ("upstream", "endpoint", "line")
        )
        self.key_requests = Counter(
            "edgeproxy_key_requests", "Attempts sent with each key of a pool", ("upstream", "endpoint", "key")
        )
        self.key_limited = Counter(
            "edgeproxy_key_rate_limited",
            "429s the origin answered for each key (it cools down)",
            ("upstream", "endpoint", "key"),
        )
        self.key_retries = Counter(
            "edgeproxy_key_retries", "Attempts sent again at once with another key, by status", ("upstream", "status")
        )
        self.key_checks = Counter(
            "edgeproxy_key_checks",
            "Checks of a key the origin refused (401/403): refused (disabled), ok (the refusal was"
            " about the request), error (no conclusion, left enabled)",
            ("upstream", "endpoint", "key", "result"),
        )
        self.queued = Counter("edgeproxy_key_queued", "Requests that waited for a rate-limited key", ("upstream",))
        self.keys_exhausted = Counter(
            "edgeproxy_keys_exhausted",
            "429s edgeproxy answered: every key rate-limited past queue_timeout",
            ("upstream",),
        )
        self.key_disabled = Gauge(
            "edgeproxy_key_disabled",
            "1 if the origin refused the key (401/403) until the next reload",
            ("upstream", "endpoint", "key"),
        )
        self.key_headroom = Gauge(
            "edgeproxy_key_remaining",
            "Requests or tokens left for the key, as the origin's rate-limit headers said (refilled since)",
            ("upstream", "endpoint", "key", "limit"),
        )
        self.tokens = Counter(
            "edgeproxy_tokens", "Tokens used, from the responses' usage", ("upstream", "model", "key", "type")
        )
        self.cache_requests = Counter(
            "edgeproxy_cache_requests",
            "Requests to caching upstreams by result (hit, miss, coalesced, bypass)",
            ("upstream", "result"),
        )
        self.tokens_saved = Counter(
            "edgeproxy_tokens_saved", "Tokens answers from the cache (hits, coalesced) did not spend", ("upstream",)
        )
        self.cache_entries = Gauge("edgeproxy_cache_entries", "Answers in the cache (memory store)", ("store",))
        self.cache_bytes = Gauge("edgeproxy_cache_bytes", "Bytes of answers in the cache (memory store)", ("store",))
        self.cache_evictions = Counter(
            "edgeproxy_cache_evictions", "Answers the memory store dropped for room", ("store",)
        )
        self.cache_errors = Counter(
            "edgeproxy_cache_store_errors", "Cache store calls that failed or timed out (each a miss)", ("store",)
        )
        self.admission_inflight = Gauge(
            "edgeproxy_admission_inflight", "Requests holding an admission slot (at the origins)", ("upstream",)
        )
        self.admission_depth = Gauge(
            "edgeproxy_admission_queue_depth", "Requests waiting in the admission queue", ("upstream", "priority")
        )
        self.admission_wait = Histogram(
            "edgeproxy_admission_wait_seconds",
            "Time requests waited in the admission queue (0: admitted at once)",
            ("upstream", "priority"),
        )
        self.admission_refused = Counter(
            "edgeproxy_admission_refused",
            "Requests the admission queue refused (queue_full, shed, timeout, rate_limited)",
            ("upstream", "priority", "reason"),
        )
        self.client_limits = Counter(
            "edgeproxy_client_limits",
            "Client connections or requests stopped by a limit (header_timeout, body_timeout,"
            " max_connections_per_address, buffer_memory)",
            ("limit",),
        )
        self.switches = Counter("edgeproxy_route_switches", "Times an upstream's preferred path changed", ("upstream",))
        self.reloads = Counter("edgeproxy_reloads", "Config reloads by result (ok, failed)", ("result",))
        self.reloads.values.update({("ok",): 0.0, ("failed",): 0.0})  # present from the start, for increase()
        self.generation = Gauge("edgeproxy_config_generation", "Config generation: 1 at start, +1 per reload", ())
        self.generation.set((), 1)
        self.log_dropped = Counter(
            "edgeproxy_log_dropped",
            "Log records dropped because the log's reader (stdout: access, stderr: process) was behind"
            " by more than log.buffer",
            ("log",),
        )
        self.log_dropped.values.update({("access",): 0.0, ("process",): 0.0})  # for increase()
        self.start_time = Gauge("edgeproxy_start_time_seconds", "Process start time", ())
        self.start_time.set((), time.time())
        self._all: tuple[Counter | Histogram, ...] = tuple(
            v for v in vars(self).values() if isinstance(v, Counter | Histogram)
        )
        # Called at each scrape to refresh gauges that describe current state (paths): they are
        # rebuilt from the state itself, so a path removed by a reload leaves no stale series.
        self.on_scrape: Callable[[], None] | None = None
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def count_hop(self, role: str, line: str, direction: str, raw: int, wire: int) -> None:
        """Bytes of one body before (raw) and after (wire) the edge hop's compression."""
        self.hop_bytes.inc((role, line, direction, "raw"), raw)
        self.hop_bytes.inc((role, line, direction, "wire"), wire)

    def collect(self) -> Iterator[Metric]:
        if self.on_scrape is not None:
            self.on_scrape()
        for metric in self._all:
            yield metric.family()

    def render(self) -> bytes:
        return generate_latest(self.registry)
