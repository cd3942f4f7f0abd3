"""The store commands end to end: index, search, duplicates, collections, db."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from imgembed.store import embedded
from imgembed.store.postgres import SCHEMA
from tests.cli import IMGEMBED, run, run_process

TINY = ["--model", "imgembed-tiny", "--pretrained", "seed:0"]


def test_index_search_collections_and_db(data_dir, photos, tmp_path):
    failures = tmp_path / "failures.jsonl"
    missing = tmp_path / "missing.jpg"
    proc = run("index", str(photos[0].parent), str(missing), "-c", "shop", "--failures",
               str(failures), *TINY)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    for line in ("Total: 7", "Processed: 7", "Successful: 6", "Failed: 1", "Skipped: 0"):
        assert line in proc.stderr
    assert "Images/s:" in proc.stderr and "Duration:" in proc.stderr
    (failure,) = [json.loads(line) for line in failures.read_text().splitlines()]
    assert failure["source"] == str(missing) and failure["error_type"] == "ImageNotFoundError"

    again = run("index", str(photos[0].parent), "-c", "shop", *TINY)
    assert again.returncode == 0 and "Skipped: 6 (unchanged)" in again.stderr
    assert "Images/s: 0.0" in again.stderr  # skipped images are not work done

    # search uses the collection's own model without being told
    hits = json.loads(run("search", "--image", str(photos[2]), "-c", "shop", "--json").stdout)
    assert hits[0]["source"] == str(photos[2]) and hits[0]["rank"] == 1
    assert hits[0]["score"] == pytest.approx(1, abs=1e-5) and len(hits) == 6
    texts = json.loads(run("search", "a photo", "-c", "shop", "-k", "2", "--json").stdout)
    assert len(texts) == 2 and texts[0]["score"] >= texts[1]["score"]
    table = run("search", "--image", str(photos[2]), "-c", "shop", "-k", "1")
    assert table.returncode == 0 and photos[2].name in table.stdout
    # a k beyond any collection asks for all of it, not a store error (PostgreSQL's bigint)
    every = run("search", "a photo", "-c", "shop", "-k", str(2**64), "--json")
    assert every.returncode == 0, every.stderr
    assert len(json.loads(every.stdout)) == 6

    listed = json.loads(run("collections", "--json").stdout)
    assert listed == [{"name": "shop", "backend": "postgres", "model": "imgembed-tiny",
                       "pretrained": "seed:0", "dimension": 64, "count": 6}]  # fmt: skip
    # a command run as its own process is the last one out: it stops the shared server
    embedded.stop(data_dir)  # held by this process since the commands above
    assert json.loads(run_process("collections", "--json").stdout)[0]["count"] == 6
    assert run_process("db", "status").stdout.strip().endswith(": stopped")
    assert f"revision {SCHEMA}" in run("db", "upgrade").stderr
    assert run("collections", "drop", "shop").returncode == 0
    assert json.loads(run("collections", "--json").stdout) == []


def test_store_errors_and_image_only_text(data_dir, photos, tmp_path):
    assert run("search", "x", "-c", "nothing").returncode == 6  # no such collection
    assert run("search").returncode == 2  # neither text nor --image
    assert run("search", "x", "--filter", "novalue", "-c", "c").returncode == 2  # usage
    not_an_image = tmp_path / "text.jpg"
    not_an_image.write_text("not an image")
    bad = run("search", "--image", str(not_an_image), "-c", "c", *TINY)
    assert bad.returncode == 1, bad.stderr  # the input failed: not a usage or internal error
    assert f"error: {not_an_image}: not a recognised image" in bad.stderr
    blank = run("search", "  ", "-c", "c", *TINY)
    assert blank.returncode == 3 and "search text is empty" in blank.stderr
    run("index", str(photos[0]), "-c", "pictures", "--model", "efficientnet-lite0")
    proc = run("search", "a cat", "-c", "pictures")
    assert proc.returncode == 3 and "image-only" in proc.stderr
    dupes = json.loads(run("duplicates", "-c", "pictures", "--json").stdout)
    assert dupes == []
    # a re-run without --model goes on with the collection's model (the default has no weights)
    again = run("index", str(photos[0]), "-c", "pictures")
    assert again.returncode == 0 and "Skipped: 1 (unchanged)" in again.stderr, again.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    emptied = run("index", str(empty), "-c", "pictures", "--prune")
    assert emptied.returncode == 1 and "Failed: 1" in emptied.stderr, emptied.stderr
    assert "folder holds no images" in emptied.stderr
    assert json.loads(run("collections", "--json").stdout)[0]["count"] == 1  # nothing pruned
    # so do list files naming no image (an export that wrote nothing, or its header alone)
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "header.csv").write_text("id,image\n")
    lists = run("index", str(tmp_path / "empty.txt"), str(tmp_path / "header.csv"), "-c",
                "pictures", "--prune")  # fmt: skip
    assert lists.returncode == 1 and "Failed: 2" in lists.stderr, lists.stderr
    assert f"{tmp_path / 'header.csv'}: list holds no images" in lists.stderr
    assert json.loads(run("collections", "--json").stdout)[0]["count"] == 1


def test_filters_match_text_and_json_values(data_dir, photos, tmp_path):
    """`key=value` matches text (as CSV lists store it), `key:=JSON` numbers and booleans
    (as JSONL lists and the HTTP API store them)."""
    rows = [
        {"id": "a", "image": str(photos[0]), "year": 2020, "in_stock": True, "tag": "2020"},
        {"id": "b", "image": str(photos[1]), "year": 2021, "in_stock": False, "tag": "x"},
    ]
    listing = tmp_path / "items.jsonl"
    listing.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert run("index", str(listing), "-c", "typed", *TINY).returncode == 0

    def ids(*filters: str) -> list[str]:
        args = [a for f in filters for a in ("--filter", f)]
        proc = run("search", "x", "-c", "typed", "--json", *args)
        assert proc.returncode == 0, proc.stderr
        return [hit["id"] for hit in json.loads(proc.stdout)]

    assert ids("year:=2020") == ["a"]
    assert ids("in_stock:=false") == ["b"]
    assert ids("tag=2020") == ["a"] and ids("tag:=2020") == []  # text is not the number
    assert ids("year:=2021", "in_stock:=false") == ["b"]
    none = run("search", "x", "-c", "typed", "--filter", "year:=1999")
    assert (none.returncode, none.stdout) == (0, "") and "no item matches these" in none.stderr
    bad = run("search", "x", "-c", "typed", "--filter", "year:=20x")
    assert bad.returncode == 2 and "not JSON" in bad.stderr


def test_db_start_keeps_the_server_up_between_commands_until_stopped(data_dir, photos):
    """Commands as processes of their own: without `db start` the last one out stops the
    server; with it the server stays up, used or not, until `db stop` or the time is up."""
    started = run_process("db", "start", "--for", "10m")
    assert started.returncode == 0 and "kept up until" in started.stdout, started.stderr
    indexed = run_process("index", str(photos[0]), "-c", "kept", *TINY)
    assert indexed.returncode == 0, indexed.stderr
    status = run_process("db", "status").stdout
    assert ": running (pid" in status and "kept up until" in status
    pid = embedded.status(data_dir).pid
    assert run_process("collections").returncode == 0
    assert embedded.status(data_dir).pid == pid  # the same server throughout: no restart
    assert run_process("db", "stop").stdout.strip() == "stopped"
    assert run_process("db", "status").stdout.strip().endswith(": stopped")

    assert run_process("db", "start", "--for", "1s").returncode == 0
    deadline = time.monotonic() + 60  # the keeper lets go; it was the last user
    while time.monotonic() < deadline and embedded.status(data_dir).running:
        time.sleep(0.2)
    assert not embedded.status(data_dir).running
    assert run_process("db", "start", "--for", "soon").returncode == 2


def test_db_start_and_status_refuse_what_cannot_be(data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("IMGEMBED_DATABASE_URL", "postgresql://u@127.0.0.1:1/none")
    external = run_process("db", "start")  # started an embedded server nothing would use
    assert external.returncode == 3 and "no embedded server to start" in external.stderr
    assert not embedded.status(data_dir).initialised
    monkeypatch.delenv("IMGEMBED_DATABASE_URL")
    for keep in ("nan", "inf", "1e400s"):  # not durations: they ended in a traceback
        proc = run("db", "start", "--for", keep)
        assert proc.returncode == 2 and "give a duration" in proc.stderr, proc.stderr
    for keep in ("1e300s", "99999999999h"):  # "kept up until 11409972-10-18", but the keeper
        proc = run("db", "start", "--for", keep)  # could not sleep so long and let go at once
        assert proc.returncode == 3 and "at most 87600 h (ten years)" in proc.stderr, proc.stderr
    assert not embedded.status(data_dir).initialised  # refused before a server was started
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("IMGEMBED_DATA_DIR", str(tmp_path / "afile" / "sub"))
    status = run_process("db", "status")  # said "not created yet"
    assert status.returncode == 3 and "is a file" in status.stderr


def test_db_status_says_when_the_keeper_was_killed(data_dir):
    """kill -9 of the keeper (OOM killer, a careless pkill): the server is no longer kept up,
    and `db status` says so instead of "kept up until" a time that will not hold."""
    assert run_process("db", "start", "--for", "10m").returncode == 0
    keeper = json.loads((embedded.pgdata(data_dir) / ".kept_until.json").read_text())["pid"]
    os.kill(keeper, signal.SIGKILL)
    deadline = time.monotonic() + 30  # gone, or a zombie until whoever adopted it reaps it
    while psutil.pid_exists(keeper) and time.monotonic() < deadline:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(keeper).status() == psutil.STATUS_ZOMBIE:
                break
        time.sleep(0.05)
    status = run_process("db", "status").stdout
    assert ": running (pid" in status and "kept up until" not in status, status
    assert f"its keeper (imgembed db start, pid {keeper}) was ended before its time" in status
    assert embedded.kept_until(data_dir) is None
    stop = run_process("db", "stop")  # no wait on the dead keeper
    assert stop.stdout.strip() == "stopped", stop.stderr
    assert run_process("db", "status").stdout.strip().endswith(": stopped")


USER = "import sys, time; from imgembed.store import embedded; embedded.start(sys.argv[1]); "
USER += "print('up', flush=True); time.sleep(600)"


def test_db_start_twice_at_once_and_db_stop_while_the_server_is_used(data_dir):
    """Two `db start` at the same moment both succeed, the later keeper replacing the
    earlier; `db stop` leaves a server another process uses to it, unless --force."""
    both = [subprocess.Popen([IMGEMBED, "db", "start", "--for", "10m"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    for started in both:
        out, errors = started.communicate(timeout=300)
        assert started.returncode == 0 and "kept up until" in out, errors
    assert embedded.kept_until(data_dir) is not None
    mine = ["imgembed.resident", str(data_dir.resolve())]  # other data folders' keepers aside
    keepers = [p for p in psutil.process_iter(["cmdline"])
               if (p.info["cmdline"] or [])[2:4] == mine]  # fmt: skip
    assert len(keepers) == 1  # the earlier one was ended, not left running as well

    user = subprocess.Popen([sys.executable, "-c", USER, str(data_dir)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert user.stdout is not None and user.stdout.readline().strip() == "up"
        refused = run_process("db", "stop")
        assert refused.returncode == 6, refused.stderr
        assert f"still used by pid {user.pid} (-c import" in refused.stderr
        assert "--force" in refused.stderr
        assert embedded.status(data_dir).running  # left to its user
        assert embedded.kept_until(data_dir) is None  # the keeper let go
        assert run_process("db", "stop", "--force").stdout.strip() == "stopped"
        assert not embedded.status(data_dir).running
    finally:
        user.kill()
        user.wait()


def test_a_collection_name_no_store_takes_is_refused_before_the_run(data_dir, photos):
    for name in ("../x", "a/b", "tab\there"):
        proc = run("index", str(photos[0]), "-c", name, *TINY)
        assert proc.returncode == 6 and "collection name" in proc.stderr, proc.stderr
        assert "run again" not in proc.stderr.lower() and "Indexing stopped" not in proc.stderr
        assert "Indexing 1 images" not in proc.stderr  # refused before the work, not after
    # sources that all fail leave no new, empty collection behind
    missing = run("index", str(photos[0].parent / "nope"), "-c", "fresh", *TINY)
    assert missing.returncode == 1 and "no such file" in missing.stderr, missing.stderr
    assert "fresh" not in run("collections", "--json").stdout
    not_images = photos[0].parent.parent / "pillow" / "broken.png"  # exists, does not decode
    assert run("index", str(not_images), "-c", "fresh", *TINY).returncode == 1
    assert "fresh" not in run("collections", "--json").stdout
    assert run("index", str(photos[0]), "-c", "fresh", *TINY).returncode == 0
    assert run("index", str(photos[0].parent / "nope"), "-c", "fresh", *TINY).returncode == 1
    listed = json.loads(run("collections", "--json").stdout)
    assert [c["count"] for c in listed if c["name"] == "fresh"] == [1]  # an existing one stays


def test_an_empty_source_names_nothing_not_the_current_folder(data_dir, photos, tmp_path,
                                                              monkeypatch):  # fmt: skip
    assert run("index", str(photos[0].parent), "-c", "shop", *TINY).returncode == 0
    here = tmp_path / "here"  # Path("") is ".": this folder would be indexed and the rest pruned
    here.mkdir()
    (here / "other.png").write_bytes(photos[0].read_bytes())
    monkeypatch.chdir(here)
    proc = run("index", "", "-c", "shop", "--prune", *TINY)
    assert proc.returncode == 1, proc.stderr
    assert "'': empty path: give a file, a URL or image data" in proc.stderr
    assert "Successful: 0" in proc.stderr and "Pruned: 0 (not pruned" in proc.stderr
    listed = json.loads(run("collections", "--json").stdout)
    assert [c["count"] for c in listed] == [len(photos)]
    too_long = run("index", str(tmp_path / ("a" * 300 + ".txt")), "-c", "shop", *TINY)
    assert too_long.returncode == 1 and "Failed: 1" in too_long.stderr, too_long.stderr


def test_index_says_once_what_it_waits_for(data_dir, photos, monkeypatch):
    """A run whose collection's index build waits (a minute per 100k images; here for another
    session's open transaction) says so once instead of a bar standing still, and ends with
    the index built when the build could go on."""
    import psycopg
    from psycopg import sql

    from imgembed.store.postgres import PostgresStore, items_table
    from tests.integration.test_stores import waits_for_lock

    refresh = PostgresStore.refresh

    def held(self, name, changed=True, waiting=None):
        table = items_table(name)
        with psycopg.connect(self.url) as blocker:
            blocker.execute(
                sql.SQL("LOCK TABLE {} IN ROW EXCLUSIVE MODE").format(sql.Identifier(table))
            )

            def release():
                try:
                    waits_for_lock(self.url, "CREATE INDEX")
                    time.sleep(2)  # a few of the run's half-second reports
                finally:
                    blocker.rollback()

            releasing = threading.Thread(target=release)
            releasing.start()
            try:
                refresh(self, name, changed, waiting)
            finally:
                releasing.join()

    monkeypatch.setattr(PostgresStore, "refresh", held)
    bulk = {"IMGEMBED_DEFER_INDEX_MIN": "2"}  # a new collection: its index is built at the end
    proc = run("index", str(photos[0].parent), "-c", "held", *TINY, env=bulk)
    assert proc.returncode == 0 and "Successful: 6" in proc.stderr, proc.stderr
    assert proc.stderr.count("⏳ Building the search index of 'held' ...") == 1, proc.stderr
    with psycopg.connect(embedded.start(data_dir)) as admin:
        index = admin.execute("SELECT to_regclass(%s)", (f"{items_table('held')}_hnsw",))
        assert index.fetchone()[0] is not None


def test_index_into_a_name_qdrant_cannot_hold_is_refused_not_stopped(photos):
    """Not "Indexing stopped after 0 of 6 items ... To continue, index the same sources
    again": a run again fails alike."""
    proc = run("index", str(photos[0].parent), "-c", "a:b", *TINY, env={"IMGEMBED_STORE": "qdrant"})
    assert proc.returncode == 6, proc.stderr
    assert "error: collection name 'a:b': Qdrant takes no : in names" in proc.stderr
    assert "To continue" not in proc.stderr and "Traceback" not in proc.stderr
