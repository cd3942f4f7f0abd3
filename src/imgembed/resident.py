"""The resident search process of `imgembed db start`: it holds the embedded server like the bare
keeper (store/keeper.py) and, until it lets go, answers searches with its models and
database connection already loaded. A new `imgembed search` process then only parses its
arguments, asks and prints (~0.3 s against ~0.7 s importing NumPy, the runtime, the
tokenizer and the driver and loading them itself).

It listens on a loopback port; `resident.json` in the data directory (readable by its owner
only) holds the address and a random key, which both sides prove with an HMAC challenge
before anything is unpickled (multiprocessing.connection). Whatever goes wrong on the way
(no process, a stale record, another version, a crash) the search runs in the asking
process instead; typed errors (no such collection, an unreadable image) come back as they
are.

    python -m imgembed.resident DATA_DIR UNTIL_EPOCH_SECONDS"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections import OrderedDict
from importlib.metadata import version
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from imgembed.errors import ImgEmbedError

if TYPE_CHECKING:
    from imgembed.config import Settings
    from imgembed.results import SimilarityResult
    from imgembed.service import ImageEmbeddingService

log = logging.getLogger(__name__)
RECORD = "resident.json"
PROTOCOL = 1
SERVICES = 4  # settings kept loaded at once (each its models and connection)


@dataclasses.dataclass(frozen=True)
class SearchQuery:
    """What `imgembed search` asks: a text or an image (path or URL) against a collection;
    `own_model` searches with the collection's model whatever the settings name."""

    text: str | None = None
    image: str | None = None
    collection: str | None = None
    top_k: int = 10
    filters: dict[str, Any] | None = None
    own_model: bool = True
    cwd: str = dataclasses.field(default_factory=os.getcwd)  # for a relative image path


def search(settings: Settings, query: SearchQuery) -> list[SimilarityResult]:
    """The hits, from the resident process for this data directory when one answers, else
    found in this process."""
    settings = absolute(settings)
    hits = ask(settings, query)
    if hits is not None:
        return hits
    from imgembed.service import ImageEmbeddingService

    with ImageEmbeddingService(settings) as service:
        return run(service, query)


def run(service: ImageEmbeddingService, query: SearchQuery) -> list[SimilarityResult]:
    name = query.collection or service.settings.collection
    if query.own_model:
        service = service.for_collection(name)
    if query.image is not None:
        image = _locate(query.image, query.cwd)
        return service.search_image(image, name, query.top_k, query.filters)
    return service.search_text(query.text or "", name, query.top_k, query.filters)


def _locate(image: str, cwd: str) -> str:
    from imgembed.intake.sources import is_data_uri, is_url

    if is_url(image) or is_data_uri(image) or os.path.isabs(image):
        return image
    return os.path.join(cwd, image)


def absolute(settings: Settings) -> Settings:
    """The settings with relative paths made absolute here (the resident process runs
    elsewhere)."""
    update: dict[str, Any] = {}
    for name, value in settings:
        if isinstance(value, Path) and not value.is_absolute():
            update[name] = value.absolute()
        elif isinstance(value, list) and any(isinstance(v, Path) for v in value):
            update[name] = [v.absolute() if isinstance(v, Path) else v for v in value]
    return settings.model_copy(update=update) if update else settings


# -- the asking side ---------------------------------------------------------------------


def ask(settings: Settings, query: SearchQuery) -> list[SimilarityResult] | None:
    """The resident process's answer, or None if none answers (then search here)."""
    record = _read_record(Path(settings.data_dir))
    if record is None:
        return None
    try:
        with Client(tuple(record["address"]), authkey=bytes.fromhex(record["key"])) as conn:
            conn.send((PROTOCOL, settings, query))
            while not conn.poll(1.0):  # a first search may load (or export) a model
                if not _running(record["pid"]):
                    raise EOFError("the resident search process exited")
            status, payload = conn.recv()
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        log.info("resident search process unavailable (%s): searching here", exc)
        return None
    except Exception as exc:  # e.g. AuthenticationError: a stale record
        log.info("resident search process refused (%r): searching here", exc)
        return None
    if status == "error":
        raise payload
    if status != "ok":
        log.warning("the resident search process failed (%s); searching here", payload)
        return None
    return payload


def _read_record(data_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((data_dir / RECORD).read_text())
    except (OSError, ValueError):
        return None
    same = record.get("protocol") == PROTOCOL and record.get("version") == version("imgembed")
    return record if same and _running(record.get("pid")) else None


def _running(pid: Any) -> bool:
    return isinstance(pid, int) and pid > 0 and psutil.pid_exists(pid)


def status(data_dir: Path) -> int | None:
    """The pid of the resident search process for this data directory, if one runs."""
    record = _read_record(Path(data_dir).expanduser().resolve())
    return record["pid"] if record else None


# -- the resident side -------------------------------------------------------------------


class Resident:
    """Answers queries with services kept per settings (the last few used)."""

    def __init__(self) -> None:
        self._services: OrderedDict[str, ImageEmbeddingService] = OrderedDict()
        self._lock = threading.Lock()

    def answer(self, request: Any) -> tuple[str, Any]:
        try:
            protocol, settings, query = request
            if protocol != PROTOCOL:
                return "refused", f"protocol {protocol!r}, not {PROTOCOL}"
            return "ok", run(self._service(settings), query)
        except ImgEmbedError as exc:
            return "error", exc
        except Exception as exc:  # the asker searches itself instead
            log.exception("search failed")
            return "failed", repr(exc)

    def _service(self, settings: Settings) -> ImageEmbeddingService:
        from imgembed.service import ImageEmbeddingService

        key = _key(settings)
        with self._lock:
            if key in self._services:
                self._services.move_to_end(key)
                return self._services[key]
            service = self._services[key] = ImageEmbeddingService(settings)
            if len(self._services) > SERVICES:
                _, oldest = self._services.popitem(last=False)
                oldest.close()  # a search still running on it reconnects
            return service

    def close(self) -> None:
        with self._lock:
            for service in self._services.values():
                service.close()
            self._services.clear()


def _key(settings: Settings) -> str:
    # The dump hides secrets (a database password, API keys): they are part of the key.
    from pydantic import SecretStr

    def reveal(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        return [reveal(v) for v in value] if isinstance(value, list) else value

    fields = {name: reveal(value) for name, value in settings}
    explicit = sorted(settings.model_fields_set)
    return json.dumps([fields, explicit], sort_keys=True, default=str)


def _serve(listener: Listener, resident: Resident) -> None:
    while True:
        try:
            conn = listener.accept()
        except OSError:  # closed: the process is ending
            return
        except Exception:  # a caller without the key
            continue
        threading.Thread(target=_reply, args=(conn, resident), daemon=True).start()


def _reply(conn: Connection, resident: Resident) -> None:
    with conn, contextlib.suppress(OSError, EOFError):  # the asker may have given up
        conn.send(resident.answer(conn.recv()))


def _write_record(data_dir: Path, address: tuple[str, int], key: bytes) -> None:
    record = {"pid": os.getpid(), "address": list(address), "key": key.hex(),
              "protocol": PROTOCOL, "version": version("imgembed")}  # fmt: skip
    temporary = data_dir / f".{RECORD}.{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(record, file)
    os.replace(temporary, data_dir / RECORD)


def _remove_record(data_dir: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        if json.loads((data_dir / RECORD).read_text())["pid"] == os.getpid():
            (data_dir / RECORD).unlink()


def main(argv: list[str]) -> None:
    from imgembed.store import embedded

    data_dir, until = Path(argv[0]).expanduser().resolve(), float(argv[1])
    # SIGTERM (`db stop`, a new `db start`) ends the wait through SystemExit: the record is
    # removed and this process leaves the server's list of users (at exit) like any other.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    key = secrets.token_bytes(32)
    resident = Resident()
    with Listener(("127.0.0.1", 0), authkey=key) as listener:
        data_dir.mkdir(parents=True, exist_ok=True)
        _write_record(data_dir, listener.address, key)
        try:
            embedded.start(data_dir)  # `db start` returns once this process holds the server
            threading.Thread(target=_serve, args=(listener, resident), daemon=True).start()
            import imgembed.service  # noqa: F401 - loaded before the first search asks

            time.sleep(max(0.0, until - time.time()))
        finally:
            _remove_record(data_dir)
            resident.close()


if __name__ == "__main__":
    main(sys.argv[1:])
