"""One psycopg connection that outlives its server. Every call goes through `run`, which
turns driver errors into typed StoreErrors (store/faults.py) and, when the server went away,
reconnects (`reopen` starts the embedded server again if it died) and runs the call once
more. Calls must therefore be safe to repeat: ours are reads, upserts and deletes by id,
each in one transaction, so a repeat stores nothing twice."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
from pgvector.psycopg import register_vector

from imgembed.errors import StoreUnavailableError
from imgembed.store.faults import store_errors

log = logging.getLogger(__name__)
T = TypeVar("T")
RECONNECT_SECONDS = 30.0  # how long to wait for a server that went away to come back
CONNECT_TIMEOUT = 10  # seconds, per attempt
APPLICATION = "imgembed"  # pg_stat_activity.application_name of our connections


class Connection:
    def __init__(self, url: str, location: str, reopen: Callable[[], str] | None = None):
        """`location` names where the data lives, for messages; `reopen` gives the URL to
        connect to again after the server went away (and may start the server first)."""
        self._reopen = reopen or (lambda: url)
        self.location = location
        self._lock = threading.Lock()
        try:
            self._connection = _connect(url)
        except psycopg.OperationalError as exc:
            detail = " ".join(str(exc).split())
            raise StoreUnavailableError(f"cannot connect to {location}: {detail}") from exc

    def run(self, action: str, work: Callable[[psycopg.Connection], T]) -> T:
        """`work(connection)` under the lock; reconnects and retries it once if the
        connection was lost (a StoreUnavailableError if that fails too)."""
        with self._lock:
            try:
                with store_errors(action, self.location):
                    return work(self._connection)
            except StoreUnavailableError as lost:
                log.warning("%s; reconnecting and trying once more", lost)
                self._reconnect(lost)
            with store_errors(action, self.location):
                return work(self._connection)

    def _reconnect(self, lost: StoreUnavailableError) -> None:
        with contextlib.suppress(psycopg.Error):
            self._connection.close()
        deadline = time.monotonic() + RECONNECT_SECONDS
        while True:
            try:
                with store_errors("reconnecting", self.location):
                    self._connection = _connect(self._reopen())
                return
            except StoreUnavailableError as exc:
                if time.monotonic() > deadline:
                    raise StoreUnavailableError(
                        f"{lost}; it could not be reached again within "
                        f"{RECONNECT_SECONDS:.0f} s: {exc}"
                    ) from exc
            time.sleep(1.0)

    def close(self) -> None:
        with self._lock:
            self._connection.close()


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
