"""Prometheus metrics of one serving process, in a registry of its own.

Each :class:`ServingMetrics` owns a ``CollectorRegistry`` (several servers can
live in one test process). Request counters and latencies are recorded by the
HTTP layer; swaps and reload failures arrive through the
:class:`serving.reloader.ReloadListener` hooks; queue and cache figures are
read at scrape time from the objects that own them.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["ServingMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class _ScrapeCollector:
    """Figures owned by other objects, read when /metrics is scraped."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def collect(self) -> Iterable[Any]:
        data = self.read()
        log = data.get("logger")
        if log is not None:
            for name, help_text in (
                ("enqueued", "Impressions queued for Kafka"),
                ("produced", "Impressions handed to the Kafka producer"),
                ("dropped", "Impressions dropped (still held at a shutdown that could not drain)"),
                ("failed", "Impressions the broker refused for good"),
                ("rejected", "Rank requests refused (503) because the impression buffer was full"),
                ("waits", "Waits of the logger on a full producer queue (broker away or slow)"),
            ):
                c = CounterMetricFamily(f"em3_serving_impressions_{name}", help_text)
                c.add_metric([], float(getattr(log, name)))
                yield c
            g = GaugeMetricFamily("em3_serving_impression_queue", "Impressions waiting in the buffer")
            g.add_metric([], float(log.queued))
            yield g
            g = GaugeMetricFamily("em3_serving_impressions_in_flight",
                                  "Impressions accepted and not yet acknowledged by the broker (buffer, hand-over "
                                  "and the producer's queue, which clicks share)")
            g.add_metric([], float(log.in_flight))
            yield g
        version = GaugeMetricFamily("em3_serving_model_version", "Snapshot version served", labels=["source", "line"])
        pointer = GaugeMetricFamily("em3_serving_pointer_version", "Latest version seen in Redis", labels=["source", "line"])
        ready = GaugeMetricFamily("em3_serving_source_ready", "1 once a snapshot is loaded", labels=["source", "line"])
        stale = GaugeMetricFamily("em3_serving_source_stale", "1 when Redis points at a version not served",
                                  labels=["source", "line"])
        cache = GaugeMetricFamily("em3_serving_item_cache_rows", "Cached item rows of the served version",
                                  labels=["source", "line"])
        for status, rows in data.get("sources", []):
            labels = [status.key, status.model_line]
            version.add_metric(labels, float(status.version or 0))
            pointer.add_metric(labels, float(status.pointer or 0))
            ready.add_metric(labels, float(status.ready))
            stale.add_metric(labels, float(status.stale))
            cache.add_metric(labels, float(rows))
        yield from (version, pointer, ready, stale, cache)
        errors = CounterMetricFamily("em3_serving_store_errors", "Failed Redis lookups on the request path",
                                     labels=["store"])
        for store, n in data.get("store_errors", {}).items():
            errors.add_metric([store], float(n))
        yield errors
        yield CounterMetricFamily("em3_serving_explain_errors",
                                  "Rankings served without their explanations because explaining failed",
                                  value=float(data.get("explain_errors", 0)))
        yield CounterMetricFamily("em3_serving_fresh_promotions",
                                  "Rankings in which the fresh slot showed a new item above its score's place",
                                  value=float(data.get("fresh_promotions", 0)))


class ServingMetrics:
    """Counters, histograms and gauges of one server (also a ``ReloadListener``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("em3_serving_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("em3_serving_request_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.model_seconds = Histogram("em3_serving_model_seconds", "Model scoring time per /v1/rank",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.arm_requests = Counter("em3_serving_arm_requests", "Ranked requests per arm", ["arm"], registry=r)
        self.unknown_candidates = Counter("em3_serving_unknown_candidates", "Candidates without registered content",
                                          registry=r)
        self.swaps = Counter("em3_serving_swaps", "Snapshot swaps", ["source", "line"], registry=r)
        self.swap_seconds = Histogram("em3_serving_swap_seconds", "Load + precompute time per swap",
                                      buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=r)
        self.reload_failures = Counter("em3_serving_reload_failures", "Failed reloads by reason",
                                       ["source", "line", "reason"], registry=r)
        self.redis_up = Gauge("em3_serving_redis_up", "1 if the last Redis poll succeeded", registry=r)
        self.redis_up.set(1)
        self.clicks = Counter("em3_serving_clicks", "Clicks produced to Kafka", registry=r)
        self.conversions = Counter("em3_serving_conversions", "Conversions produced to Kafka", registry=r)
        self.deletions = Counter("em3_serving_deletions", "User deletion requests written to Kafka", registry=r)
        self.items_registered = Counter("em3_serving_items_registered", "Items registered or updated", registry=r)

    def attach(self, read: Callable[[], dict[str, Any]]) -> None:
        """Export figures owned elsewhere, read at scrape time."""
        self.registry.register(_ScrapeCollector(read))

    # ReloadListener -----------------------------------------------------------------
    def on_swap(self, key: str, line: str, version: int, seconds: float) -> None:
        self.swaps.labels(key, line).inc()
        self.swap_seconds.observe(seconds)

    def on_failure(self, key: str, line: str, reason: str, error: str) -> None:
        self.reload_failures.labels(key, line, reason).inc()

    def on_redis(self, ok: bool) -> None:
        self.redis_up.set(1 if ok else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
