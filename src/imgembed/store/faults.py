"""Driver errors into typed StoreErrors, in one place for every store (Postgres, Qdrant, and
any other table code): wrap each call in `with store_errors("storing 32 items", location)`.

    disk full (Postgres 53100, ENOSPC, SQLite "disk is full")  -> StoreFullError
    connection refused or not made in time ("cannot be reached"),
    connection lost, server shut down or starting ("went away") -> StoreUnavailableError
    text that is not UTF-8, NaN, values the database refuses   -> InvalidRecordError
    a deadlock or lock conflict with another session           -> StoreBusyError
    anything else the driver raises                            -> StoreError

`location` says where the data lives (the embedded server's folder, a host, a path), so a
full disk is named: "disk full at /home/me/.local/share/imgembed/postgres"."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from imgembed.errors import (
    ImgEmbedError,
    InvalidRecordError,
    StoreBusyError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
)

_NO_SPACE = ("no space left on device", "disk is full", "disk full")
# deadlock broken, serialization failure, lock not available: another session's work, not ours
_CONTENTION = ("40P01", "40001", "55P03")


@contextmanager
def store_errors(action: str, location: str) -> Iterator[None]:
    """Re-raise anything but our own errors as the StoreError that says what happened."""
    try:
        yield
    except ImgEmbedError:
        raise
    except Exception as exc:
        raise translate(exc, action, location) from exc


def translate(exc: BaseException, action: str, location: str) -> StoreError:
    orig = getattr(exc, "orig", None)  # SQLAlchemy (Alembic) wraps the driver's error
    if isinstance(orig, BaseException):
        exc = orig
    detail = _detail(exc)
    if disk_full(exc):
        return StoreFullError(
            f"disk full at {location}: {action} failed ({detail}); free some space there"
        )
    if _not_reached(exc):
        return StoreUnavailableError(
            f"the database cannot be reached ({location}) for {action}: {detail}"
        )
    if _connection_lost(exc):
        return StoreUnavailableError(
            f"the database went away during {action} ({location}): {detail}"
        )
    if isinstance(exc, UnicodeError):
        return InvalidRecordError(
            f"{action}: text is not valid UTF-8 ({detail}); undecodable file names must be "
            "escaped before they are stored"
        )
    if getattr(exc, "sqlstate", None) in _CONTENTION:
        return StoreBusyError(
            f"{action}: the database stopped it, as another session held what it needed (an "
            f"index build, another run) ({location}; {detail}); it can simply run again"
        )
    if _bad_value(exc):
        return InvalidRecordError(f"{action}: the database refused a value: {detail}")
    return StoreError(f"{action} failed ({location}): {type(exc).__name__}: {detail}")


def _detail(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # driver messages span lines (DETAIL, HINT)
    return text or type(exc).__name__


def disk_full(exc: BaseException) -> bool:
    """Whether an error says the disk (or the quota) is full."""
    if getattr(exc, "sqlstate", None) == "53100":  # Postgres disk_full
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _NO_SPACE)


def _not_reached(exc: BaseException) -> bool:
    """A connection that could not be made (refused, timed out): the server is down or
    elsewhere, which need not mean it went away during the work."""
    import psycopg

    if isinstance(exc, psycopg.OperationalError) and getattr(exc, "sqlstate", None) is None:
        return str(exc).startswith(("connection failed", "connection timeout expired"))
    if isinstance(exc, ConnectionRefusedError):
        return True
    try:
        import httpx
        from qdrant_client.http.exceptions import ResponseHandlingException
    except ImportError:  # pragma: no cover - qdrant-client (and httpx) are dependencies
        return False
    source = getattr(exc, "source", None)
    return isinstance(exc, ResponseHandlingException) and isinstance(
        source, httpx.ConnectError | httpx.ConnectTimeout | ConnectionRefusedError
    )


def _connection_lost(exc: BaseException) -> bool:
    import psycopg

    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        state = getattr(exc, "sqlstate", None)
        # No state: the socket broke or the connection could not be made. Class 08:
        # connection exceptions; 57P0x: server shut down, crashed, starting up.
        return state is None or state.startswith("08") or state.startswith("57P")
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    try:
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse
    except ImportError:  # pragma: no cover - qdrant-client is a dependency
        return False
    if isinstance(exc, ResponseHandlingException):  # no response: refused, reset, timed out
        return True
    return isinstance(exc, UnexpectedResponse) and exc.status_code in (502, 503, 504)


def _bad_value(exc: BaseException) -> bool:
    import psycopg

    # class 22: invalid text, NaN, out of range; class 23: a constraint refused the row;
    # 54000: a value over a limit (an index row over its page)
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(exc, psycopg.DataError | psycopg.IntegrityError) or sqlstate == "54000"
