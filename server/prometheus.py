"""Prometheus metrics of one server process (its own registry, so apps in one process don't clash).

Under several worker processes each one exposes its own numbers on ``/metrics``; scrape every
worker (or replica) and sum in the query, e.g. ``sum(rate(collafuse_handoff_images_total[1m]))``.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("collafuse_requests", "HTTP requests by route and status",
                                ["route", "method", "status"], registry=r)
        self.bytes_in = Counter("collafuse_bytes_in", "request body bytes received", registry=r)
        self.bytes_out = Counter("collafuse_bytes_out", "response body bytes sent", registry=r)
        self.queue_waiting = Gauge("collafuse_queue_waiting", "handoff requests waiting to be admitted",
                                   registry=r)
        self.queue_active = Gauge("collafuse_queue_active", "handoff requests in the running batch",
                                  registry=r)
        self.batch_rows = Histogram("collafuse_batch_rows", "rows (images) per model forward",
                                    buckets=_ROW_BUCKETS, registry=r)
        self.batch_requests = Histogram("collafuse_batch_requests", "requests per model forward",
                                        buckets=_ROW_BUCKETS, registry=r)
        self.step_seconds = Histogram("collafuse_step_seconds", "one engine step: forward + per-row steps",
                                      buckets=_STEP_BUCKETS, registry=r)
        self.handoff_seconds = Histogram("collafuse_handoff_seconds", "POST /v1/handoff latency, queue included",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.images = Counter("collafuse_handoff_images", "handoff samples returned, by client",
                              ["client"], registry=r)

    # engine hooks
    def observe_step(self, rows: int, requests: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)
        self.step_seconds.observe(seconds)

    def set_queue(self, waiting: int, active: int) -> None:
        self.queue_waiting.set(waiting)
        self.queue_active.set(active)

    def render(self) -> bytes:
        return generate_latest(self.registry)
