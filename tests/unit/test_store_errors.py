"""Driver errors become typed StoreErrors (store/faults.py); records are validated before any
driver sees them (store/base.py); undecodable file names are escaped reversibly."""

import errno
import os
import sqlite3

import numpy as np
import psycopg
import pytest
from psycopg import errors as pg

from imgembed.errors import (
    InvalidRecordError,
    StoreBusyError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
)
from imgembed.names import printable, restore
from imgembed.store import Record
from imgembed.store.base import checked_metadata, checked_record, checked_vector
from imgembed.store.faults import store_errors, translate

CAFE = os.fsdecode(b"caf\xe9.jpg")  # how Python hands us a Latin-1 name on a UTF-8 system


def _raise_in(exc: BaseException) -> StoreError:
    with pytest.raises(StoreError) as caught, store_errors("storing 8 items", "/data/postgres"):
        raise exc
    assert caught.value.__cause__ is exc  # the driver's error stays attached
    return caught.value


@pytest.mark.parametrize(
    "exc",
    [
        pg.DiskFull('could not extend file "base/5/1": No space left on device'),
        OSError(errno.ENOSPC, "No space left on device"),
        sqlite3.OperationalError("database or disk is full"),
    ],
)
def test_disk_full_names_the_place(exc):
    error = _raise_in(exc)
    assert type(error) is StoreFullError
    assert str(error).startswith("disk full at /data/postgres: storing 8 items failed")


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.OperationalError("consuming input failed: server closed the connection"),
        pg.AdminShutdown("terminating connection due to administrator command"),
        pg.CannotConnectNow("the database system is starting up"),
        psycopg.InterfaceError("the connection is closed"),
    ],
)
def test_lost_connections_are_unavailable(exc):
    error = _raise_in(exc)
    assert type(error) is StoreUnavailableError
    assert str(error).startswith("the database went away during storing 8 items")


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.OperationalError(
            'connection failed: connection to server at "127.0.0.1", port 1 failed: '
            "Connection refused"
        ),
        psycopg.OperationalError("connection timeout expired"),
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
    ],
)
def test_connections_never_made_are_unavailable_but_not_gone(exc):
    """A server never reached did not "go away" (a wrong URL, a server not started)."""
    error = _raise_in(exc)
    assert type(error) is StoreUnavailableError
    assert str(error).startswith("the database cannot be reached (/data/postgres) for storing")


def test_qdrant_without_answer_is_unavailable():
    from qdrant_client.http.exceptions import ResponseHandlingException

    error = _raise_in(ResponseHandlingException(ConnectionRefusedError("refused")))
    assert type(error) is StoreUnavailableError


@pytest.mark.parametrize(
    "exc",
    [
        UnicodeEncodeError("utf-8", CAFE, 3, 4, "surrogates not allowed"),
        pg.InvalidTextRepresentation("invalid input syntax for type vector"),
        pg.DataException("NaN not allowed in vector"),
    ],
)
def test_values_the_database_refuses_are_invalid_records(exc):
    assert type(_raise_in(exc)) is InvalidRecordError


@pytest.mark.parametrize(
    "exc",
    [
        pg.DeadlockDetected("deadlock detected DETAIL: Process 1 waits for ShareLock"),
        pg.SerializationFailure("could not serialize access"),
        pg.LockNotAvailable("could not obtain lock on relation"),
    ],
)
def test_contention_with_another_session_is_busy_and_can_run_again(exc):
    """Busy is a failure a rerun passes: a job stopped by it says how to resume."""
    error = _raise_in(exc)
    assert type(error) is StoreBusyError
    assert "another session" in str(error) and "can simply run again" in str(error)


def test_other_driver_errors_are_store_errors_and_ours_pass_through():
    error = _raise_in(pg.UndefinedTable('relation "imgembed_items" does not exist'))
    assert type(error) is StoreError and "UndefinedTable" in str(error)
    mine = StoreFullError("disk full at x")
    with pytest.raises(StoreFullError) as caught, store_errors("x", "y"):
        raise mine
    assert caught.value is mine


def test_sqlalchemy_wrapped_errors_are_unwrapped():
    import sqlalchemy.exc

    wrapped = sqlalchemy.exc.OperationalError("UPGRADE", {}, pg.DiskFull("No space left"))
    assert type(translate(wrapped, "migrating", "/d")) is StoreFullError


def test_vectors_must_be_finite_and_of_the_dimension():
    assert checked_vector([1, 2, 3], 3, "x").dtype == np.float32
    with pytest.raises(InvalidRecordError, match=r"non-finite values .* first 1"):
        checked_vector([0.0, np.nan, 1.0], 3, "x")
    with pytest.raises(InvalidRecordError, match="non-finite"):
        checked_vector([0.0, np.inf, 1.0], 3, "x")
    with pytest.raises(InvalidRecordError, match="non-finite"):
        checked_vector([0.0, 1e39, 1.0], 3, "x")  # overflows float32 to infinity
    with pytest.raises(InvalidRecordError, match="3 dimensions"):
        checked_vector([1, 2], 3, "x")
    with pytest.raises(InvalidRecordError, match="not a vector of numbers"):
        checked_vector(["a", "b", "c"], 3, "x")


def test_records_with_text_the_store_cannot_hold_are_refused():
    ok = Record("a.jpg", np.ones(3), "hash", "/x/a.jpg", {"k": ["v", {"n": 1}]})
    _, metadata = checked_record(ok, 3)
    assert metadata == '{"k": ["v", {"n": 1}]}'
    bad_id = Record(CAFE, np.ones(3), "hash", "/x/a.jpg")
    with pytest.raises(InvalidRecordError, match=r"id is not valid UTF-8: 'caf\\xe9\.jpg'"):
        checked_record(bad_id, 3)
    with pytest.raises(InvalidRecordError, match=r"source of a\.jpg is not valid UTF-8"):
        checked_record(Record("a.jpg", np.ones(3), "h", CAFE), 3)
    with pytest.raises(InvalidRecordError, match="NUL"):
        checked_record(Record("a\x00b", np.ones(3), "h", "s"), 3)
    with pytest.raises(InvalidRecordError, match=r"metadata of a\.jpg"):
        checked_metadata({"note": ["x", CAFE]}, "a.jpg")
    with pytest.raises(InvalidRecordError, match=r"metadata of a\.jpg"):
        checked_metadata({"price": float("nan")}, "a.jpg")
    with pytest.raises(InvalidRecordError, match=r"metadata of a\.jpg"):
        checked_metadata({"a\x00": 1}, "a.jpg")


def test_printable_names_round_trip():
    assert printable("plain/é.jpg") == "plain/é.jpg"  # valid names never change
    assert printable(CAFE) == "caf\\xe9.jpg"
    assert restore(printable(CAFE)) == CAFE
    assert os.fsencode(restore(printable(CAFE))) == b"caf\xe9.jpg"
    mixed = os.fsdecode(b"d\xc3\xa9j\xe0/\xff\xfe.png")  # valid UTF-8 next to invalid bytes
    assert printable(mixed) == "déj\\xe0/\\xff\\xfe.png" and restore(printable(mixed)) == mixed
    assert printable("\ud800x") == "\\ud800x"  # a lone surrogate that is no escaped byte
    assert restore("no escapes") == "no escapes"


def test_status_reads_a_half_written_postmaster_pid(tmp_path):
    """A server killed while it started leaves postmaster.pid without its last lines; the
    library reading it asserted, and `db status`, `db stop` and the tests' clean-up failed."""
    import subprocess
    import sys

    from imgembed.store import embedded

    folder = embedded.pgdata(tmp_path)
    folder.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid, running in ((sleeper.pid, True), (2**22 + 7, False)):  # live; no such pid
            lines = [str(pid), str(folder), "1796544439", "5432", "", "", "  3803215   1507373"]
            (folder / "postmaster.pid").write_text("\n".join(lines) + "\n")
            found = embedded.status(tmp_path)
            assert (found.running, found.pid) == (running, pid if running else None)
    finally:
        sleeper.kill()
        sleeper.wait()
