"""Prometheus metrics of one app (its own registry, so several apps can live in a process):
requests by route and status, latency, encoder batch sizes, queue depth, images by outcome
(cached = cache hits) and images/s over the last minute.

Under `serve --workers N` each worker process writes its values to files in
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, chosen when it is imported)
and /metrics, whichever worker answers, reports their sum: the gauges are those of the live
workers, each refreshed every second."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as shared

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RATE_WINDOW = 60.0  # seconds
REFRESH_SECONDS = 1.0  # how often a worker writes its gauges for the others' /metrics


# as prometheus_client decides it, when both are imported (a worker starts with the variable)
MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ


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
        live = {"registry": r, "multiprocess_mode": "livesum"}  # the sum over live workers
        self.queue_depth = Gauge("imgembed_queue_depth", "Inputs waiting for the encoder", **live)
        self.in_flight = Gauge(
            "imgembed_inputs_in_flight", "Inputs admitted and not yet answered", **live
        )
        rate = Gauge(
            "imgembed_images_per_second", f"Images answered per second, last {RATE_WINDOW:.0f} s",
            **live,
        )  # fmt: skip
        self.jobs = Gauge("imgembed_jobs", "Background jobs by status", ["status"], **live)
        self._gauges: list[tuple[Gauge, Callable[[], float]]] = [(rate, self._rate)]
        self._answered: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if MULTIPROCESS:
            threading.Thread(
                target=self._refresh_often, name="imgembed-metrics", daemon=True
            ).start()

    def watch(
        self,
        queue_depth: Callable[[], float],
        in_flight: Callable[[], float],
        jobs: Callable[[str], float],
    ) -> None:
        """Read the gauges from the batchers and the jobs (at scrape time, and every second
        for the other workers' scrapes)."""
        self._gauges += [(self.queue_depth, queue_depth), (self.in_flight, in_flight)]
        for status in ("queued", "running"):
            self._gauges.append((self.jobs.labels(status), lambda status=status: jobs(status)))

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
        self._refresh()
        if not MULTIPROCESS:
            return generate_latest(self.registry)
        _forget_dead_workers()
        workers = CollectorRegistry()
        shared.MultiProcessCollector(workers)
        return generate_latest(workers)

    def close(self) -> None:
        """A worker that stops leaves the live gauges (its counters stay in the totals)."""
        self._stop.set()
        if MULTIPROCESS:
            shared.mark_process_dead(os.getpid())

    def _refresh(self) -> None:
        for gauge, read in self._gauges:
            gauge.set(read())

    def _refresh_often(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            try:
                self._refresh()
            except Exception:  # a gauge read while the app closes: try again, or stop
                log.debug("cannot refresh the gauges", exc_info=True)

    def _trim(self, now: float) -> None:
        while self._answered and self._answered[0] < now - RATE_WINDOW:
            self._answered.popleft()

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return len(self._answered) / RATE_WINDOW


_LIVE_FILE = re.compile(r"gauge_live\w*?_(\d+)\.db")


def _forget_dead_workers() -> None:
    """The live gauges of a worker that ended without `close` (killed, out of memory; one
    that uvicorn starts again has another pid): they stayed in every sum for good."""
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if (match := _LIVE_FILE.fullmatch(name)) and not psutil.pid_exists(int(match[1])):
            with contextlib.suppress(OSError):  # another worker's scrape removed it first
                shared.mark_process_dead(int(match[1]), folder)
