"""The jobs of every worker process of a server, in one SQLite file in the data folder. With
`serve --workers 2` a request reaches either process: a job's status, its DELETE, the listing
and the order of one collection's jobs must not depend on which one answers. Each process
runs its own jobs and writes their state here (at each change, progress at most every
PUBLISH_SECONDS); it reads here the jobs of the others and the cancels asked for its own.
A job whose process has gone (a restart, a crash) is shown cancelled, with how to go on."""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from imgembed.errors import UnavailableError, error_dict

log = logging.getLogger("imgembed.api")
KEEP = 100  # finished jobs kept
SETUP_SECONDS = 10.0  # how long a board may take to open while other workers open it
PUBLISH_SECONDS = 0.5  # a running job's progress is written (and its cancel read) this often
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,      -- the process running it: pid:start time:tag
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    finished REAL,
    resume TEXT NOT NULL,
    cancel INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,      -- the job as GET /api/v1/jobs/<id> shows it (JSON)
    key TEXT NOT NULL DEFAULT ''  -- what it does: the same request again gets this job
)"""
ACTIVE = ("queued", "running")


def this_process() -> str:
    """An owner name that a later process with the same pid does not share."""
    return f"{os.getpid()}:{_started(os.getpid())}:{uuid.uuid4().hex[:8]}"


def alive(owner: str) -> bool:
    pid, started, _ = owner.split(":")
    try:
        return _started(int(pid)) == started
    except ValueError:
        return False


def _started(pid: int) -> str | None:
    """When the process started, as a mark that does not change while it runs: on Linux its
    clock ticks since boot (psutil's create_time adds the boot time, which moves when the
    system clock is set: a step by NTP or a VM's resume made every live worker look gone,
    its jobs "cancelled" and run twice); None for no such process."""
    if os.path.exists("/proc/self/stat"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            return None
        return "t" + stat[stat.rindex(b")") + 2 :].split()[19].decode()  # field 22
    try:
        return f"{psutil.Process(pid).create_time():.3f}"
    except psutil.Error:
        return None


class Board:
    def __init__(self, path: Path, owner: str | None = None):
        self.owner = owner or this_process()
        self._lock = threading.Lock()
        # autocommit; a writer waits up to 10 s for another process's write
        self._db = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
        # Workers start together: SQLite answers one of two first setups "database is locked"
        # at once, without waiting (its deadlock rule), and that worker shared no jobs.
        deadline = time.monotonic() + SETUP_SECONDS
        while True:
            try:
                self._prepare()
                break
            except sqlite3.OperationalError as exc:
                if not _locked(exc) or time.monotonic() > deadline:  # a disk I/O error: now
                    raise
                time.sleep(random.uniform(0.02, 0.1))

    def _prepare(self) -> None:
        with self._lock:
            self._db.execute("PRAGMA journal_mode = WAL")  # readers do not wait for a writer
            self._db.execute(_SCHEMA)
            columns = [row[1] for row in self._db.execute("PRAGMA table_info(jobs)")]
            if "key" not in columns:  # a board of an earlier version
                self._db.execute("ALTER TABLE jobs ADD COLUMN key TEXT NOT NULL DEFAULT ''")
        self._end_orphans()

    def publish(self, job: dict[str, Any], resume: str, key: str = "") -> None:
        """The job's state as its owner has it."""
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, owner, kind, target, status, created, finished, resume,"
                " state, key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE"
                " SET status = excluded.status, finished = excluded.finished,"
                " resume = excluded.resume, state = excluded.state",
                (job["job_id"], self.owner, job["kind"], _target(job), job["status"],
                 job["created"], job["finished"], resume, json.dumps(job), key),
            )  # fmt: skip
            if job["finished"] is not None:
                self._db.execute(
                    "DELETE FROM jobs WHERE finished IS NOT NULL AND id NOT IN (SELECT id FROM"
                    " jobs WHERE finished IS NOT NULL ORDER BY finished DESC LIMIT ?)",
                    (KEEP,),
                )

    def take(self, job: dict[str, Any], resume: str, key: str = "") -> bool:
        """The queued job shown running, unless a cancel was asked first (through another
        process): then False, and it must not run. One conditional statement: a DELETE
        through another process answered "cancelled before it started" as the owner took
        the job (both had read it queued), which ran a batch all the same, and the board
        showed it ended while it ran."""
        with self._lock:
            taken = self._db.execute(
                "UPDATE jobs SET status = ?, state = ? WHERE id = ? AND status = 'queued'"
                " AND cancel = 0",
                (job["status"], json.dumps(job), job["job_id"]),
            ).rowcount
            row = self._db.execute("SELECT 1 FROM jobs WHERE id = ?", (job["job_id"],))
            known = taken or row.fetchone()
        if not known:  # its queued state never got here (the board failed then)
            self.publish(job, resume, key)
        return bool(taken or not known)

    def get(self, job_id: str) -> dict[str, Any] | None:
        rows = self._rows("WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    def listing(self, status: str | None = None) -> list[dict[str, Any]]:
        """Newest first."""
        jobs = self._rows("ORDER BY created DESC, id DESC", ())
        return [job for job in jobs if status is None or job["status"] == status]

    def ask_cancel(self, job_id: str) -> dict[str, Any] | None:
        """Marks the job to stop: its owner stops a running one within PUBLISH_SECONDS or at
        its next batch; a queued one is cancelled here at once (its owner leaves it)."""
        with self._lock:
            self._db.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))
        job = self.get(job_id)
        if job is not None and job["status"] == "queued":
            stopped = error_dict(UnavailableError("cancelled before it started"))
            change = {"status": "cancelled", "finished": time.time(), "error": stopped}
            self._finish(job_id, change, only_if="queued")
            job = self.get(job_id)
        return job

    def enqueue(self, job: dict[str, Any], resume: str, key: str = "") -> dict[str, Any] | None:
        """The new job written queued; or, if a live process has one still queued and not
        cancelled that does `key` (the same request), that one instead, and nothing written.
        Both in one transaction: two equal requests reaching two processes at once each
        found none and queued the work twice (a forced embed of a store ran twice)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # waits (up to 10 s) for another's write
            try:
                rows = self._db.execute(
                    "SELECT state, owner FROM jobs WHERE kind = ? AND target = ? AND key = ?"
                    " AND status = 'queued' AND cancel = 0 ORDER BY created",
                    (job["kind"], _target(job), key),
                ).fetchall()
                same = next((json.loads(s) for s, owner in rows if key and alive(owner)), None)
                if same is None:
                    self._db.execute(
                        "INSERT INTO jobs (id, owner, kind, target, status, created, finished,"
                        " resume, state, key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (job["job_id"], self.owner, job["kind"], _target(job), job["status"],
                         job["created"], job["finished"], resume, json.dumps(job), key),
                    )  # fmt: skip
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return same

    def cancel_asked(self, job_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def ahead(self, job: dict[str, Any]) -> bool:
        """Whether another process has an older job of the same kind and target still queued
        or running: this one waits for it (one collection's jobs run in order)."""
        with self._lock:
            owners = self._db.execute(
                "SELECT owner FROM jobs WHERE kind = ? AND target = ? AND owner != ? AND"
                " status IN (?, ?) AND (created < ? OR (created = ? AND id < ?))",
                (job["kind"], _target(job), self.owner, *ACTIVE, job["created"],
                 job["created"], job["job_id"]),
            ).fetchall()  # fmt: skip
        return any(alive(owner) for (owner,) in owners)

    def active(self, kind: str, target: str) -> bool:
        """Whether a job of this kind for this target is queued or running in any process."""
        with self._lock:
            owners = self._db.execute(
                "SELECT owner FROM jobs WHERE kind = ? AND target = ? AND status IN (?, ?)",
                (kind, target, *ACTIVE),
            ).fetchall()
        return any(alive(owner) for (owner,) in owners)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _rows(self, where: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT state, owner, resume FROM jobs {where}", params
            ).fetchall()
        jobs = []
        for state, owner, resume in rows:
            job = json.loads(state)
            if job["status"] in ACTIVE and not alive(owner):
                job.update(_gone(), resume=resume or None)
            jobs.append(job)
        return jobs

    def _end_orphans(self) -> None:
        """Jobs whose process has gone, finished as cancelled (and so, in time, forgotten)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, owner FROM jobs WHERE status IN (?, ?)", ACTIVE
            ).fetchall()
        for job_id, owner in rows:
            if not alive(owner):
                self._finish(job_id, _gone(), only_if=None)

    def _finish(self, job_id: str, change: dict[str, Any], only_if: str | None) -> None:
        """The job's stored state with `change` made (if its status is still `only_if`):
        cancelled, with how to go on."""
        with self._lock:
            row = self._db.execute(
                "SELECT state, resume FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None:
                return
            job = json.loads(row[0])
            if only_if is not None and job["status"] != only_if:
                return
            job.update(change, resume=row[1] or None)
            self._db.execute(
                "UPDATE jobs SET status = ?, finished = ?, state = ? WHERE id = ?",
                (job["status"], job["finished"], json.dumps(job), job_id),
            )


def _locked(exc: sqlite3.OperationalError) -> bool:
    """Another connection holds the file (worth a wait), not a file that cannot be used."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc)


def _target(job: dict[str, Any]) -> str:
    return job.get("collection") or job["store_id"]


def _gone() -> dict[str, Any]:
    stopped = UnavailableError(
        "the server process that ran it stopped (a restart or a crash) before it ended"
    )
    return {"status": "cancelled", "error": error_dict(stopped), "finished": time.time()}


def board_path(data_dir: Path) -> Path:
    return data_dir / "jobs.sqlite3"


def open_board(data_dir: Path) -> Board | None:
    """The data folder's board, or None (with a warning) where it cannot be had: jobs are
    then seen only by the process that runs them, as with one worker."""
    try:
        os.makedirs(data_dir, exist_ok=True)
        return Board(board_path(data_dir))
    except (sqlite3.Error, OSError) as exc:
        log.warning("jobs are not shared between workers: cannot open %s: %s",
                    board_path(data_dir), exc)  # fmt: skip
        return None
