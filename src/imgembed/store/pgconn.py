"""One psycopg connection that outlives its server. Every call goes through `run`, which
turns driver errors into typed StoreErrors (store/faults.py) and, when the server went away,
reconnects (`reopen` starts the embedded server again if it died) and runs the call once
more. Calls must therefore be safe to repeat: ours are reads, upserts and deletes by id,
each in one transaction, so a repeat stores nothing twice (and one that counts what it
changed is not repeated if the server committed it before the connection went: `run`'s
`transaction`). Work that cannot be handed over as one function uses `cursor`: typed
errors, and the call after a lost connection reconnects (the failed one is not repeated:
the caller says how to resume). Before each call an idle
connection the server has closed meanwhile (restart, administrator) is made again first."""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from imgembed.errors import StoreBusyError, StoreError, StoreUnavailableError
from imgembed.store.faults import store_errors

log = logging.getLogger(__name__)
T = TypeVar("T")
RECONNECT_SECONDS = 30.0  # how long to wait for a server that went away to come back
DOWN_SECONDS = 10.0  # after that wait failed, calls fail at once for this long (no new wait)
RESTART_WAIT_SECONDS = 5.0  # how long a call queued behind that wait waits (then it fails)
CONNECT_TIMEOUT = 10  # seconds, per attempt
APPLICATION = "imgembed"  # pg_stat_activity.application_name of our connections
HNSW_MAX_EF_SEARCH = 1000  # pgvector's limit for hnsw.ef_search
LOCK_POLL_SECONDS = 0.2  # how often `alone` asks for a lock another session holds
LOCK_WAIT_SECONDS = 300.0  # and for how long at most
WATCH_SECONDS = 0.5  # how often long work asks its caller whether to go on
OUTCOME_WAIT_MS = 10_000  # how long a lost session ended at its COMMIT is waited for
XACT = "SELECT pg_current_xact_id(), pg_backend_pid()"  # a transaction's, to ask after it


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _unreachable(location: str, exc: Exception) -> StoreUnavailableError:
    return StoreUnavailableError(f"cannot connect to {location}: {_one_line(exc)}")


class Connection:
    def __init__(
        self,
        url: str,
        location: str,
        reopen: Callable[[], str] | None = None,
        reconnect_seconds: float | None = None,
    ):
        """`location` names where the data lives, for messages; `reopen` gives the URL to
        connect to again after the server went away (and may start the server first), tried
        for `reconnect_seconds` (RECONNECT_SECONDS)."""
        self._reopen = reopen or (lambda: url)
        self._reconnect_seconds = reconnect_seconds
        self._url = url  # as last connected: `alone` connects there too
        self.location = location
        self._lock = threading.RLock()
        self._lost: StoreUnavailableError | None = None
        self._down: tuple[float, StoreUnavailableError] | None = None  # a reconnect that failed
        self._reconnecting: float | None = None  # since when (monotonic) a call reconnects
        self._search: tuple[psycopg.Connection | None, int, str] = (None, 0, "")  # as made
        self._held: dict[str, Callable[[], StoreBusyError]] = {}  # session locks: key -> busy
        try:
            self._connection = _connect(url)
        except psycopg.OperationalError as exc:
            if reopen is None:
                raise _unreachable(location, exc) from exc
            # the server died since its URL was had (a job's own session, made after minutes
            # of loading): started again, as for a connection lost later
            log.warning("cannot connect to %s: %s; starting it again", location, _one_line(exc))
            self._url = reopen()
            try:
                self._connection = _connect(self._url)
            except psycopg.OperationalError as again:
                raise _unreachable(location, again) from again

    def run(
        self, action: str, work: Callable[[psycopg.Connection], T], transaction: bool = False
    ) -> T:
        """`work(connection)` under the lock; reconnects and retries it once if the
        connection was lost (a StoreUnavailableError if that fails too). With `transaction`,
        in one; lost at its COMMIT, the server is asked whether it committed all the same
        (the answer lost with the connection): then its result stands and it is not repeated,
        as a repeat would find its own writes (rows counted unchanged, counters counted twice)."""
        done: list[Any] = []  # its result and transaction id, once work is done

        def attempt(connection: psycopg.Connection) -> T:
            if not transaction:
                return work(connection)
            with connection.transaction():
                result = work(connection)
                done[:] = [result, connection.execute(XACT).fetchone()]
            return result

        with self._locked(action):
            self._check(action)
            try:
                with store_errors(action, self.location):
                    return attempt(self._connection)
            except StoreUnavailableError as lost:
                log.warning("%s; reconnecting and trying once more", lost)
                self._reconnect(lost)
            with store_errors(action, self.location):
                if done and _committed(self._connection, *done[1]):
                    log.warning("%s was committed before the connection was lost: done", action)
                    return done[0]
                return attempt(self._connection)

    def alone(
        self,
        action: str,
        work: Callable[[psycopg.Connection], T],
        lock: str | None = None,
        waiting: Callable[[str], None] | None = None,
    ) -> T:
        """`work(connection)` on a connection of its own, closed afterwards: long work (an
        index build, which also waits for other sessions' transactions) would otherwise hold
        every call on this connection, searches of other collections and stores too, behind
        it until it ends. Not repeated after a lost connection: the caller's next run does.
        With `lock`, one such work at a time across sessions: a session advisory lock, asked
        for until it is free (a session blocked in pg_advisory_lock holds a snapshot, which a
        CONCURRENTLY build holding the lock waits for: a deadlock), for LOCK_WAIT_SECONDS at
        most (then StoreBusyError). `waiting(what)` is called every WATCH_SECONDS meanwhile
        (on another thread while the work runs): what it raises (a job stopped) cancels the
        statement running and is raised here, so a job stops within a second, not when a
        build of minutes ends. What a cancelled build leaves is built by the next `refresh`."""
        with store_errors(action, self.location):
            connection = _connect(self._url)
        watch = _Watch(connection, action, waiting)
        try:
            with store_errors(action, self.location):
                deadline = time.monotonic() + LOCK_WAIT_SECONDS
                while lock is not None and not _try_lock(connection, lock):
                    if time.monotonic() > deadline:
                        raise StoreBusyError(
                            f"{action}: another session held {lock!r} for over "
                            f"{LOCK_WAIT_SECONDS:g} s ({self.location}); run it again later"
                        )
                    watch.about = f"{action}: waiting while another session holds {lock!r}"
                    watch.check()
                    time.sleep(LOCK_POLL_SECONDS)
                watch.about = action
                watch.check()
                return work(connection)
        except StoreError:
            watch.check()  # a cancel asked for by `waiting`, not a fault of the database
            raise
        finally:
            watch.close()
            connection.close()  # and with it the lock

    @contextlib.contextmanager
    def cursor(self, action: str, transaction: bool = False) -> Iterator[psycopg.Cursor[Any]]:
        """A cursor (in one transaction if asked) under the lock, with typed errors."""
        with self._locked(action):
            self._check(action)
            try:
                with store_errors(action, self.location):
                    tx = self._connection.transaction() if transaction else None
                    with tx or contextlib.nullcontext(), self._connection.cursor() as cursor:
                        yield cursor
            except StoreUnavailableError as lost:
                self._lost = lost
                raise

    @contextlib.contextmanager
    def session_lock(
        self, key: str, action: str, busy: Callable[[], StoreBusyError]
    ) -> Iterator[None]:
        """A session advisory lock for the block (`busy()` if another session holds it). A
        killed process's goes with its connection; so does one whose connection is lost:
        the connection made again takes it again before any other call, and if another
        run took it meanwhile, this one stops with StoreBusyError instead of both working."""
        with self._locked(action):  # a reconnect meanwhile takes again what `_held` lists
            if not self.run(action, lambda c: _try_lock(c, key)):
                raise busy()
            self._held[key] = busy
        try:
            yield
        finally:
            with self._lock:
                del self._held[key]
            with contextlib.suppress(StoreError):  # a server gone took the lock with it
                self.run(
                    action.replace("locking", "unlocking", 1),
                    lambda c: c.execute(
                        "SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (key,)
                    ),
                )

    def search_settings(self, connection: psycopg.Connection, ef: int, filtered: bool) -> None:
        """HNSW search settings, made on a connection when they change (not per query: a
        round trip each; a transaction with SET LOCALs cost ~1 ms a search). A `filtered`
        search keeps walking the graph until k rows match (iterative scan); an unfiltered one
        does not need that, and is 8-10% faster without (100k x 512, ef_search 100). The
        connection is in autocommit: a SET made stays made."""
        scan = "relaxed_order" if filtered or ef > HNSW_MAX_EF_SEARCH else "off"
        ef = min(ef, HNSW_MAX_EF_SEARCH)  # beyond it, the iterative scan finds the k rows
        if self._search[0] is not connection:
            connection.execute("SET jit = off")  # compiling a plan costs more than a search
            self._search = (connection, 0, "")
        if self._search[1] != ef:
            connection.execute(sql.SQL("SET hnsw.ef_search = {}").format(sql.Literal(ef)))
            self._search = (connection, ef, self._search[2])
        if self._search[2] != scan:
            connection.execute(sql.SQL("SET hnsw.iterative_scan = {}").format(sql.SQL(scan)))
            self._search = (connection, ef, scan)

    @contextlib.contextmanager
    def _locked(self, action: str) -> Iterator[None]:
        """The lock, waited for as long as the call before holds it, but behind a reconnect
        (the server restarting) RESTART_WAIT_SECONDS at most: then StoreUnavailableError. A
        server's requests queue here: each would otherwise wait in turn, up to the whole
        reconnect, before its answer (a 503 all the same if the server stays away)."""
        asked = time.monotonic()
        while not self._lock.acquire(timeout=LOCK_POLL_SECONDS):
            since = self._reconnecting
            # counted from the reconnect's start: the wait behind an ordinary call before is not
            if since is not None and time.monotonic() - max(asked, since) >= RESTART_WAIT_SECONDS:
                raise StoreUnavailableError(
                    f"the database is restarting ({self.location}): {action} waited "
                    f"{RESTART_WAIT_SECONDS:g} s for it to come back (it went away "
                    f"{time.monotonic() - since:.0f} s ago); try again in a few seconds"
                )
        try:
            yield
        finally:
            self._lock.release()

    def _check(self, action: str) -> None:
        """Reconnect first if the last call lost the connection, or if the server has closed
        it while it was idle (its socket is readable: the goodbye, or end of file)."""
        if self._down is not None and time.monotonic() < self._down[0]:
            raise StoreUnavailableError(  # queued callers: no new wait
                f"the database cannot be reached ({self.location}) for {action}: {self._down[1]}"
            )
        lost = self._lost
        if lost is None and _closed_by_server(self._connection):
            lost = StoreUnavailableError(
                f"the database went away before {action} ({self.location}): the server closed "
                "the connection"
            )
        if lost is not None:
            log.warning("%s; reconnecting", lost)
            self._reconnect(lost)
            self._lost = None

    def _reconnect(self, lost: StoreUnavailableError) -> None:
        self._reconnecting = time.monotonic()
        try:
            self._wait_for_server(lost)
        finally:
            self._reconnecting = None

    def _wait_for_server(self, lost: StoreUnavailableError) -> None:
        with contextlib.suppress(psycopg.Error):
            self._connection.close()
        seconds = self._reconnect_seconds or RECONNECT_SECONDS
        deadline = time.monotonic() + seconds
        while True:
            reopened = False
            try:
                with store_errors("reconnecting", self.location):
                    self._url = self._reopen()
                    reopened = True
                    self._connection = _connect(self._url)
                    taken = {key: _try_lock(self._connection, key) for key in list(self._held)}
                break
            except StoreUnavailableError as exc:
                # `reopen` failing has had its wait (the embedded server's start tries for
                # REVIVE_SECONDS, or failed a start this call waited for): not another here,
                # which made the other store of a process wait again, up to twice as long
                late = time.monotonic() > deadline
                if late or not reopened:
                    self._lost = lost  # the next call after the pause tries again
                    tried = "started again"
                    if late:
                        tried = f"reached again within {seconds:g} s"
                    down = StoreUnavailableError(f"{lost}; it could not be {tried}: {exc}")
                    self._down = (time.monotonic() + DOWN_SECONDS, down)
                    raise down from exc
            time.sleep(1.0)
        self._down = None
        for key, free in taken.items():
            if not free:
                raise StoreBusyError(
                    f"{self._held[key]()}; this run's hold on it went with its lost database "
                    "connection and the other run took it meanwhile, so this run stopped "
                    "(what it stored is kept)"
                )

    def close(self) -> None:
        with self._lock:
            self._connection.close()


class _Watch:
    """Asks `waiting` every WATCH_SECONDS, on a thread of its own, whether to go on; what it
    raises is kept (`check` raises it) and cancels the connection's running statement."""

    def __init__(
        self, connection: psycopg.Connection, about: str, waiting: Callable[[str], None] | None
    ):
        self.about = about
        self._connection = connection
        self._waiting = waiting
        self._stop: BaseException | None = None
        self._done = threading.Event()
        self._thread = None
        if waiting is not None:
            self._thread = threading.Thread(target=self._watch, name="imgembed-watch", daemon=True)
            self._thread.start()

    def check(self) -> None:
        if self._stop is not None:
            raise self._stop

    def close(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        assert self._waiting is not None
        while not self._done.wait(WATCH_SECONDS):
            if self._stop is None:
                try:
                    self._waiting(self.about)
                    continue
                except Exception as exc:
                    self._stop = exc
            # again until the work ends: a cancel that arrives between statements is dropped
            with contextlib.suppress(psycopg.Error):
                self._connection.cancel_safe(timeout=5.0)


def _try_lock(connection: psycopg.Connection, key: str) -> bool:
    query = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"
    return bool(connection.execute(query, (key,)).fetchone()[0])  # type: ignore[index]


def _committed(connection: psycopg.Connection, xid: Any, pid: int) -> bool:
    """Whether transaction `xid` of the lost session `pid` committed. One still in progress
    (its COMMIT on its way, or never come: the server still waits for its client) was taken
    for not committed and repeated: the repeat waited for its row locks, for hours if the
    server had not noticed the client gone, and if it committed then, found its writes (rows
    counted unchanged, attempts twice). That session is ended (it is ours, its client gone)
    and its outcome waited for: a COMMIT it had begun still commits."""
    query = "SELECT pg_xact_status(%s)"
    status = connection.execute(query, (xid,)).fetchone()[0]  # type: ignore[index]
    if status == "in progress":
        connection.execute("SELECT pg_terminate_backend(%s, %s)", (pid, OUTCOME_WAIT_MS))
        status = connection.execute(query, (xid,)).fetchone()[0]  # type: ignore[index]
    if status == "in progress":
        raise StoreUnavailableError(
            f"the connection was lost at a COMMIT and its session (pid {pid}) did not end "
            f"within {OUTCOME_WAIT_MS / 1000:g} s: whether it committed is not known"
        )
    return status == "committed"


def _closed_by_server(connection: psycopg.Connection) -> bool:
    if connection.closed:
        return True
    try:  # an idle connection gets nothing from the server unless it is being closed
        poll = select.poll()  # not select(): a server holds descriptors over 1,024
        poll.register(connection.fileno(), select.POLLIN)
        return bool(poll.poll(0))
    except (OSError, ValueError, psycopg.Error):
        return True


def _connect(url: str) -> psycopg.Connection:
    connection = psycopg.connect(
        url, autocommit=True, connect_timeout=CONNECT_TIMEOUT, application_name=APPLICATION
    )
    try:
        register_vector(connection)
    except BaseException:
        connection.close()
        raise
    return connection
