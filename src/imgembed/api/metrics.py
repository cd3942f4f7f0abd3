"""Prometheus metrics of one app (its own registry, so several apps can live in a process):
requests by route and status, latency, encoder batch sizes, queue depth, images by outcome
(cached = cache hits) and images/s over the last minute."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RATE_WINDOW = 60.0  # seconds


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "imgembed_requests", "HTTP requests", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "imgembed_request_seconds", "HTTP request latency", ["route"], registry=r
        )
        self.batch_size = Histogram(
            "imgembed_batch_size", "Inputs per encoder batch", ["kind"], buckets=BATCH_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.encode_seconds = Histogram(
            "imgembed_encode_seconds", "Time per encoder batch", ["kind"], registry=r
        )
        self.images = Counter(
            "imgembed_images", "Images by outcome (cached = cache hits)", ["outcome"], registry=r
        )
        self.queue_depth = Gauge(
            "imgembed_queue_depth", "Inputs waiting for the encoder", registry=r
        )
        self.in_flight = Gauge(
            "imgembed_inputs_in_flight", "Inputs admitted and not yet answered", registry=r
        )
        rate = Gauge(
            "imgembed_images_per_second", f"Images answered per second, last {RATE_WINDOW:.0f} s",
            registry=r,
        )  # fmt: skip
        rate.set_function(self._rate)
        self.jobs = Gauge("imgembed_jobs", "Background jobs by status", ["status"], registry=r)
        self._answered: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()

    def watch(
        self,
        queue_depth: Callable[[], float],
        in_flight: Callable[[], float],
        jobs: Callable[[str], float],
    ) -> None:
        """Read the gauges from the batchers and the jobs at scrape time."""
        self.queue_depth.set_function(queue_depth)
        self.in_flight.set_function(in_flight)
        for status in ("queued", "running"):
            self.jobs.labels(status).set_function(lambda status=status: jobs(status))

    # -- BatchObserver -----------------------------------------------------------------------

    def batch(self, kind: str, size: int, seconds: float) -> None:
        self.batch_size.labels(kind).observe(size)
        self.encode_seconds.labels(kind).observe(seconds)

    def outcome(self, outcome: str, count: int = 1) -> None:
        """`count` images with this outcome (a job reports a batch's at once)."""
        self.images.labels(outcome).inc(count)
        if outcome != "failed":
            now = time.monotonic()
            with self._lock:
                self._answered.extend([now] * count)
                self._trim(now)

    # -- requests ----------------------------------------------------------------------------

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _trim(self, now: float) -> None:
        while self._answered and self._answered[0] < now - RATE_WINDOW:
            self._answered.popleft()

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return len(self._answered) / RATE_WINDOW
