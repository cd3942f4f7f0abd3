"""Background jobs (indexing a collection, embedding a store's products), progress readable
while they run. The jobs of one collection or store run one after the other, in order; those
of different ones side by side, up to WORKERS at once: a long backfill does not hold a small
job for another store back (they share the cores: the encoder takes one batch at a time).
Their state is also on a board in the data folder (api/board.py) that the worker processes
of `serve --workers` share: each answers for all jobs, and one collection's jobs run one at a
time, in order, across them. Both kinds are idempotent, so after a restart the same request
resumes where the last stored batch ended."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from imgembed.api.board import KEEP, PUBLISH_SECONDS, Board
from imgembed.api.errors import NotFoundError
from imgembed.api.metrics import Metrics
from imgembed.engine.pipeline import Progress, ProgressCallback
from imgembed.errors import (
    EncodeError,
    ImgEmbedError,
    OverloadedError,
    StoreBusyError,
    StoreFullError,
    StoreUnavailableError,
    UnavailableError,
    error_dict,
)

WORKERS = 2  # collections or stores whose jobs run at once; more wait for a free worker
QUEUED = 100  # jobs waiting at most in a process (each holds its request's item list)
QUEUE_RETRY_SECONDS = 30.0  # what a 503 for a full queue asks a client to wait
# failures that a later run may not meet: a job failed by them says how to go on
TRANSIENT = (StoreUnavailableError, StoreBusyError, StoreFullError, EncodeError)
log = logging.getLogger("imgembed.api")
Runner = Callable[[ProgressCallback], Any]
JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]


@dataclass
class Job:
    id: str
    kind: str  # index | catalog-embed
    target: str  # the collection, or the store
    total: int
    status: JobStatus = "queued"
    progress: Progress | None = None
    stats: Any = None  # IndexStats or EmbedStats
    error: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    resume: str = ""  # how to go on after a failure or a stop: what was stored stays
    key: str = ""  # what the job does: an equal request while it is queued gets this job
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def to_dict(self) -> dict[str, Any]:
        stats = None
        if hasattr(self.stats, "to_dict"):
            stats = self.stats.to_dict()
        elif self.stats is not None:
            rate = self.stats.images_per_second
            stats = {**dataclasses.asdict(self.stats), "images_per_second": rate}
        return {
            "job_id": self.id,  # as in the 202 that started it
            "kind": self.kind,
            "store_id" if self.kind == "catalog-embed" else "collection": self.target,
            "status": self.status,
            "total": self.total,
            "progress": dataclasses.asdict(self.progress) if self.progress else None,
            "stats": stats,
            "error": self.error,
            "created": self.created,
            "finished": self.finished,
            "resume": (self.resume or None) if self.status in ("failed", "cancelled") else None,
        }


def job_key(*parts: Any) -> str:
    """What a job does, as a short digest (a listing of 100k files is not kept per job)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class Jobs:
    def __init__(self, metrics: Metrics | None = None, board: Board | None = None) -> None:
        self._metrics = metrics  # a job's images count in the server's image metrics too
        self._board = board  # shared with the other worker processes, if any
        self._published: dict[str, float] = {}  # job id -> when its progress was written
        # a job's state is read and written under it: a request thread's snapshot (a DELETE)
        # cannot land on the board after the job thread's later one ("done" back to "running")
        self._publishing = threading.Lock()
        self._pool = ThreadPoolExecutor(WORKERS, "imgembed-job")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        # per (kind, target): its jobs in order, the first running; a lane exists while busy
        self._lanes: dict[tuple[str, str], deque[tuple[Job, Runner]]] = {}
        self._lock = threading.Lock()
        self._submitting = threading.Lock()
        self._stopping = threading.Event()

    def submit(
        self,
        kind: str,
        target: str,
        total: int,
        run: Runner,
        resume: str = "",
        key: str = "",
    ) -> Job:
        """A new job, or the queued one that does the same (`key`): a client that repeats
        its request (a retry loop) does not queue the same work many times. One queued by
        another worker process is returned as a copy of its state: that process runs it."""
        with self._submitting:  # two equal requests at once: the second gets the first's
            with self._lock:
                same = [
                    q for q in self._jobs.values() if key and q.key == key and q.status == "queued"
                ]
            for queued in same:  # unless cancelled meanwhile through another worker process
                if not self._shared(
                    lambda board, queued=queued: board.cancel_asked(queued.id), False
                ):
                    return queued
                self._cancelled_before_start(queued)
            with self._lock:
                if sum(queued.status == "queued" for queued in self._jobs.values()) >= QUEUED:
                    raise OverloadedError(
                        f"{QUEUED} jobs are waiting already; send it again when some have run",
                        QUEUE_RETRY_SECONDS,
                    )
            job = Job(uuid.uuid4().hex, kind, target, total, resume=resume, key=key)
            # queued on the board, before it may start and say "running"; or another process's
            other = self._shared(lambda board: board.enqueue(job.to_dict(), resume, key), None)
            if other:
                return Job(other["job_id"], kind, target, other["total"], created=other["created"])
            with self._lock:
                self._jobs[job.id] = job
                finished = [old.id for old in self._jobs.values() if old.finished]
                for old_id in finished[: max(0, len(finished) - KEEP)]:  # the oldest go
                    del self._jobs[old_id]
        with self._lock:
            lane = (kind, target)
            if lane in self._lanes:  # behind the target's running job
                self._lanes[lane].append((job, run))
                return job
            self._lanes[lane] = deque([(job, run)])
        self._pool.submit(self._drain, lane)
        return job

    def _drain(self, lane: tuple[str, str]) -> None:
        """A target's jobs, one after the other, until none is left."""
        while not self._stopping.is_set():
            with self._lock:
                job, run = self._lanes[lane][0]
            if self._waits(job):  # its turn comes after another process's job: not on a
                self._later(lane)  # worker of ours, which that job's own may wait for
                return
            self._run(job, run)
            with self._lock:
                self._lanes[lane].popleft()
                if not self._lanes[lane]:
                    del self._lanes[lane]
                    return

    def active(self, kind: str, target: str) -> bool:
        """Whether a job of this kind for this target is queued or running in this server
        (in any of its worker processes)."""
        with self._lock:
            if any(
                job.kind == kind and job.target == target and job.finished is None
                for job in self._jobs.values()
            ):
                return True
        return self._shared(lambda board: board.active(kind, target), False)

    def count(self, status: str) -> int:
        with self._lock:
            return sum(job.status == status for job in self._jobs.values())

    def listing(self, status: str | None = None) -> list[Job]:
        """This process's jobs (queued, running, and the last KEEP finished), newest first."""
        with self._lock:
            jobs = list(self._jobs.values())
        return [job for job in reversed(jobs) if status is None or job.status == status]

    def shown(self, status: str | None = None) -> list[dict[str, Any]]:
        """`listing` as GET /api/v1/jobs shows it: the jobs of every worker process."""
        shared = self._shared(lambda board: board.listing(status), None)
        return shared if shared is not None else [job.to_dict() for job in self.listing(status)]

    def get(self, job_id: str) -> Job:
        """One of this process's jobs."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(
                f"no job {job_id!r} (the last {KEEP} finished jobs are kept, and those a "
                "restart ended; without a writable data folder, jobs are kept in memory)"
            )
        return job

    def status(self, job_id: str) -> dict[str, Any]:
        """A job of any worker process, as GET /api/v1/jobs/<id> shows it."""
        shared = self._shared(lambda board: board.get(job_id), None)
        return shared if shared is not None else self.get(job_id).to_dict()

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Stops a job: a queued one at once, a running one after its batch in progress is
        stored (what it stored stays; see `resume`). A finished one is left as it is."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:  # another worker process's: it reads the cancel from the board
            asked = self._shared(lambda board: board.ask_cancel(job_id), None)
            return asked if asked is not None else self.get(job_id).to_dict()
        with self._lock:
            job.cancel.set()
            if job.status == "queued":
                job.status, job.finished = "cancelled", time.time()
                job.error = error_dict(UnavailableError("cancelled before it started"))
        self._publish(job)
        return job.to_dict()

    def _run(self, job: Job, run: Runner) -> None:
        def progress(state: Progress) -> None:
            last, job.progress = job.progress or Progress(state.total), state
            if self._metrics is not None:
                for outcome in ("embedded", "cached", "failed"):
                    if (count := getattr(state, outcome) - getattr(last, outcome)) > 0:
                        self._metrics.outcome(outcome, count)
            self._publish(job, every=PUBLISH_SECONDS)  # and reads a cancel from the board
            if self._stopping.is_set():  # stored batches stay; a rerun resumes after them
                raise UnavailableError("the server is shutting down")
            if job.cancel.is_set():
                raise UnavailableError("cancelled by a request (DELETE of the job)")

        if not self._take(job):  # cancelled while it was queued
            with self._publishing:
                self._published.pop(job.id, None)
            return
        self._publish(job)
        try:
            if job.cancel.is_set():  # asked as it was taken: not even its first batch
                raise UnavailableError("cancelled by a request (DELETE of the job)")
            job.stats = run(progress)
            job.status = "done"
        except UnavailableError as exc:
            job.status, job.error = "cancelled", error_dict(exc)
            done = job.progress.done if job.progress else 0
            # jobs live in memory: the log is what is left of this one after the restart
            log.warning(
                "%s job %s for %r cancelled after %d of %d items (%s); to go on: %s",
                job.kind, job.id, job.target, done, job.total, exc, job.resume,
            )  # fmt: skip
        except ImgEmbedError as exc:
            job.status, job.error = "failed", error_dict(exc)
            if not isinstance(exc, TRANSIENT):  # the same request would fail the same way
                job.resume = ""
        except Exception as exc:  # a bug: the job says so instead of hanging as "running"
            log.exception("%s job %s failed", job.kind, job.id)
            job.status, job.error = "failed", {**error_dict(exc), "error_type": "InternalError"}
        job.finished = time.time()
        self._publish(job)

    def _take(self, job: Job) -> bool:
        """The job marked running, here and on the board, unless it was cancelled first: in
        this process, or through another one (the board's take and cancel cannot both win)."""
        with self._lock:
            if job.cancel.is_set():
                return False
            # its progress from the start (all to do), not null until its first batch is done
            progress = dataclasses.asdict(job.progress or Progress(job.total))
            start = {**job.to_dict(), "status": "running", "progress": progress}
        if not self._shared(lambda board: board.take(start, job.resume, job.key), True):
            self._cancelled_before_start(job)
            self._publish(job)
            return False
        with self._lock:
            if job.cancel.is_set():  # a DELETE of this process meanwhile: it published it
                return False
            job.status = "running"
            job.progress = job.progress or Progress(job.total)
        return True

    def _waits(self, job: Job) -> bool:
        """Whether another worker process runs (or queued before) a job for the same target:
        one collection's or store's jobs run one at a time, in order, in the whole server. A
        cancel asked meanwhile through another process is seen here."""
        if job.cancel.is_set() or self._stopping.is_set():
            return False
        if self._shared(lambda board: board.cancel_asked(job.id), False):
            self._cancelled_before_start(job)
            self._publish(job)
            return False
        return bool(self._shared(lambda board: board.ahead(job.to_dict()), False))

    def _later(self, lane: tuple[str, str]) -> None:
        """The lane looked at again in PUBLISH_SECONDS, its worker free meanwhile: two
        processes whose workers all waited for each other's queued jobs never went on."""
        timer = threading.Timer(PUBLISH_SECONDS, self._resubmit, (lane,))
        timer.daemon = True
        timer.start()

    def _resubmit(self, lane: tuple[str, str]) -> None:
        with contextlib.suppress(RuntimeError):  # shut down meanwhile: close() drops the jobs
            self._pool.submit(self._drain, lane)

    def _cancelled_before_start(self, job: Job) -> None:
        """A queued job whose cancel was asked on the board (through another process)."""
        job.cancel.set()
        with self._lock:
            if job.status == "queued":
                job.status, job.finished = "cancelled", time.time()
                job.error = error_dict(UnavailableError("cancelled before it started"))

    def _publish(self, job: Job, every: float = 0.0) -> None:
        """The job's state on the board (progress at most `every` seconds), and a cancel
        asked there for it (through another worker process) set here."""
        if self._board is None:
            return

        def publish(board: Board) -> bool:
            board.publish(job.to_dict(), job.resume, job.key)  # as it is now, under the lock
            return board.cancel_asked(job.id)

        with self._publishing:
            now = time.monotonic()
            if now - self._published.get(job.id, -every) < every:
                return
            if job.finished is not None:
                self._published.pop(job.id, None)  # its last write
            else:
                self._published[job.id] = now
            asked = self._shared(publish, False)
        if asked:
            job.cancel.set()

    def _shared(self, call: Callable[[Board], Any], otherwise: Any) -> Any:
        """`call(board)`, or `otherwise` without a board or when it fails (a disk full, a
        file locked too long): jobs then go on as this process sees them."""
        if self._board is None:
            return otherwise
        try:
            return call(self._board)
        except sqlite3.Error as exc:
            log.warning("the jobs board of the worker processes failed: %s", exc)
            return otherwise

    def close(self) -> None:
        """Drop queued jobs and wait for running ones to stop at their next stored batch
        (blocking: call it in a thread). Jobs live in memory: the log says what each
        dropped one was and how to go on."""
        self._stopping.set()
        with self._lock:
            dropped = [job for job in self._jobs.values() if job.status == "queued"]
            for job in dropped:
                job.cancel.set()  # a worker about to start it leaves it
                job.status, job.finished = "cancelled", time.time()
                job.error = error_dict(UnavailableError("the server shut down before it started"))
        for job in dropped:
            self._publish(job)
            log.warning("%s job %s for %r dropped at shutdown before it started; to go on: %s",
                        job.kind, job.id, job.target, job.resume)  # fmt: skip
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._shared(Board.close, None)
