"""The resident search process of `imgembed db start`: it holds the embedded server like any
user (until the time is up, or SIGTERM from `db stop`) and meanwhile answers searches with its
models and database connection already loaded. A new `imgembed search` process then only
parses its arguments, asks and prints: `imgembed search` ~0.3 s against ~0.7 s importing
NumPy, the runtime, the tokenizer and the driver and loading them itself; `imgembed catalog
search` likewise against ~6.5 s (two models, one of them on torch).

It listens on a loopback port; `resident.json` in the data directory (the owner's, readable by
the owner only) holds the address and a random key, which both sides prove with an HMAC
challenge before anything is unpickled (multiprocessing.connection), each step under a
deadline. It answers only askers whose environment (IMGEMBED_* settings, Hugging Face cache,
proxies, thread counts) equals its own, and only stores it can share (not Qdrant's local
mode, which locks its folder). Whatever goes wrong on the way (no process, a stale record, another
version, a crash, a refusal) the search runs in the asking process instead; typed errors (no
such collection, an unreadable image) come back as they are. Failures inside it are logged
to `resident.log` in the data directory.

    python -m imgembed.resident DATA_DIR UNTIL_EPOCH_SECONDS"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from multiprocessing.connection import (
    Client,
    Connection,
    Listener,
    answer_challenge,
    deliver_challenge,
)
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from imgembed.errors import ImgEmbedError

if TYPE_CHECKING:
    from imgembed.catalog import Catalog
    from imgembed.config import Settings
    from imgembed.results import SimilarityResult
    from imgembed.service import ImageEmbeddingService

log = logging.getLogger(__name__)
RECORD = "resident.json"
PROTOCOL = 3
SERVICES = 4  # services and catalogues kept at once (each its models and connection)
HANDSHAKE_SECONDS = 10.0  # for each read before the question is in
REFUSED = ("refused", f"already serving {SERVICES} other settings")
# What decides the settings (a catalogue reads them again for a store), model files,
# downloads and threads of a process.
ENVIRONMENT = ("IMGEMBED_", "CLIP_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH_",
               "XDG_CACHE_HOME", "OMP_", "MKL_", "OPENBLAS_", "HTTP_PROXY", "HTTPS_PROXY",
               "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "SSL_CERT_",
               "REQUESTS_CA_BUNDLE")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SearchQuery:
    """What `imgembed search` asks: a text or an image (path or URL) against a collection;
    `own_model` searches with the collection's model whatever the settings name; `cwd`
    anchors a relative image path (set when the query is sent elsewhere)."""

    text: str | None = None
    image: str | None = None
    collection: str | None = None
    top_k: int = 10
    filters: dict[str, Any] | None = None
    own_model: bool = True
    cwd: str | None = None


@dataclasses.dataclass(frozen=True)
class ProductQuery:
    """What `imgembed catalog search` asks: a text, an image or both against a store's
    products, with the store's own models for whatever the settings do not name."""

    store_id: str
    text: str | None = None
    image: str | None = None
    top_k: int = 10
    category: str | None = None
    max_price: float | None = None
    cwd: str | None = None


def search(settings: Settings, query: SearchQuery) -> list[SimilarityResult]:
    """The hits, from the resident process for this data directory when one answers, else
    found in this process."""
    hits = ask(settings, query)
    if hits is not None:
        return hits
    from imgembed.service import ImageEmbeddingService

    with ImageEmbeddingService(settings) as service:
        return run(service, query)


def search_products(settings: Settings, query: ProductQuery) -> list[dict[str, Any]]:
    """The products found (as `ProductHit.to_dict()`), from the resident process when one
    answers, else found in this process."""
    hits = ask(settings, query)
    if hits is not None:
        return hits
    from imgembed.catalog import Catalog

    with Catalog.for_store(query.store_id, settings) as catalog:
        return run_products(catalog, query)


def run(service: ImageEmbeddingService, query: SearchQuery) -> list[SimilarityResult]:
    name = query.collection or service.settings.collection
    if query.own_model:
        service = service.for_collection(name)
    if query.image is not None:
        image = _locate(query.image, query.cwd)
        return service.search_image(image, name, query.top_k, query.filters)
    return service.search_text(query.text or "", name, query.top_k, query.filters)


def run_products(catalog: Catalog, query: ProductQuery) -> list[dict[str, Any]]:
    image = None if query.image is None else _locate(query.image, query.cwd)
    hits = catalog.search(query.store_id, query.text, image=image, top_k=query.top_k,
                          category=query.category, max_price=query.max_price)  # fmt: skip
    return [hit.to_dict() for hit in hits]


def _locate(image: str, cwd: str | None) -> str:
    from imgembed.intake.sources import is_data_uri, is_url

    if cwd is None or is_url(image) or is_data_uri(image) or os.path.isabs(image):
        return image
    return os.path.join(cwd, image)


def absolute(settings: Settings) -> Settings:
    """The settings with relative paths made absolute here (the resident process has its own
    working directory): path settings, a checkpoint file, a `local-dir:` model."""

    def here(value: Any) -> Any:
        if isinstance(value, Path):
            return value.expanduser().absolute()
        if isinstance(value, list):
            return [here(v) for v in value]
        return value

    made = {name: (value, here(value)) for name, value in settings}
    update = {name: new for name, (old, new) in made.items() if new != old}
    pretrained = settings.pretrained
    if pretrained and not os.path.isabs(pretrained) and os.path.isfile(pretrained):
        update["pretrained"] = os.path.abspath(pretrained)
    folder = settings.model.removeprefix("local-dir:")
    if folder != settings.model and not os.path.isabs(folder):
        update["model"] = "local-dir:" + os.path.abspath(folder)
    return settings.model_copy(update=update) if update else settings


# -- the asking side ---------------------------------------------------------------------


def ask(settings: Settings, query: SearchQuery | ProductQuery) -> list[Any] | None:
    """The resident process's answer, or None if none answers (then search here)."""
    if settings.store == "qdrant" and not settings.qdrant_url:
        return None  # local mode: the folder is locked by whoever opens it
    record = _read_record(Path(settings.data_dir))
    if record is None:
        return None
    try:
        if query.image is not None and query.cwd is None:  # a path is the asker's
            query = dataclasses.replace(query, cwd=os.getcwd())
        with Client(tuple(record["address"])) as conn:
            _deadline(conn, HANDSHAKE_SECONDS)
            key = bytes.fromhex(record["key"])
            answer_challenge(conn, key)
            deliver_challenge(conn, key)
            conn.send((PROTOCOL, absolute(settings), query, _environment()))
            while not conn.poll(1.0):  # a first search may load (or export) a model
                if not _running(record["pid"]):
                    raise EOFError("the resident search process exited")
            status, payload = conn.recv()
    except Exception as exc:  # refused, reset, stale, ...: search here
        log.info("no answer from the resident search process (%r): searching here", exc)
        return None
    if status == "error" and isinstance(payload, ImgEmbedError):
        raise payload
    if status != "ok":
        log.info("the resident search process did not answer (%s): searching here", payload)
        return None
    return payload


def _read_record(data_dir: Path) -> dict[str, Any] | None:
    """The record, if this user wrote it, nobody else can read it, and its process runs."""
    path = data_dir.expanduser().resolve() / RECORD
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd) as file:
            info = os.fstat(file.fileno())
            if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
                log.warning("ignoring %s: not this user's, or readable by others", path)
                return None
            record = json.load(file)
    except (OSError, ValueError):
        return None
    same = record.get("protocol") == PROTOCOL and record.get("version") == _version()
    return record if same and _running(record.get("pid")) else None


def _deadline(conn: Connection, seconds: float) -> None:
    """Reads on this connection fail after `seconds` instead of waiting for ever."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:  # the same socket, its own fd
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(seconds), 0))


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(ENVIRONMENT)}


def _version() -> str:
    try:
        return version("imgembed")
    except PackageNotFoundError:  # run from a source tree
        return "unknown"


def _running(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def status(data_dir: Path) -> int | None:
    """The pid of the resident search process for this data directory, if one runs."""
    record = _read_record(Path(data_dir))
    return record["pid"] if record else None


# -- the resident side -------------------------------------------------------------------


class Resident:
    """Answers queries with a service per settings, and a catalogue per settings and store
    (up to SERVICES of them in all; beyond, a catalogue serves one query and is closed)."""

    def __init__(self) -> None:
        self._services: dict[str, ImageEmbeddingService] = {}
        self._catalogs: dict[str, tuple[Catalog, str | None]] = {}  # with its weights' hash
        self._lock = threading.Lock()

    def answer(self, request: Any) -> tuple[str, Any]:
        try:
            protocol, settings, query, environment = request
            if protocol != PROTOCOL:
                return "refused", f"protocol {protocol!r}, not {PROTOCOL}"
            if environment != _environment():
                return "refused", "another environment (settings, model cache, proxies, threads)"
            if isinstance(query, ProductQuery):
                return "ok", self._products(settings, query)
            service = self._service(settings)
            return REFUSED if service is None else ("ok", run(service, query))
        except ImgEmbedError as exc:
            return "error", exc
        except Exception as exc:  # the asker searches itself instead
            log.exception("search failed")
            return "failed", repr(exc)

    def _service(self, settings: Settings) -> ImageEmbeddingService | None:
        from imgembed.service import ImageEmbeddingService

        key = _key(settings)
        with self._lock:
            if key not in self._services:
                if self._full():
                    return None
                self._services[key] = ImageEmbeddingService(settings)  # loads nothing yet
            return self._services[key]

    def _products(self, settings: Settings, query: ProductQuery) -> list[dict[str, Any]]:
        """With the kept catalogue if it still fits (same weights file, the store's models
        unchanged), else with a new one, kept if it found the store."""
        from imgembed.catalog import Catalog
        from imgembed.errors import ProvenanceMismatchError

        key, weights = json.dumps([_key(settings), query.store_id]), _hash(settings)
        with self._lock:
            catalog, kept_weights = self._catalogs.get(key, (None, None))
        if catalog is not None and kept_weights == weights:
            try:
                return run_products(catalog, query)
            except ProvenanceMismatchError:  # embedded again with other models since
                pass
        fresh = Catalog.for_store(query.store_id, settings)
        try:
            hits = run_products(fresh, query)
        except BaseException:
            fresh.close()
            raise
        with self._lock:
            old = self._catalogs.pop(key, (None, None))[0]
            keep = not self._full()
            if keep:
                self._catalogs[key] = (fresh, weights)
        for done in (old, None if keep else fresh):
            if done is not None:
                done.close()  # a search still running on it fails over to its asker
        return hits

    def _full(self) -> bool:
        return len(self._services) + len(self._catalogs) >= SERVICES

    def close(self) -> None:
        with self._lock:
            for kept in [*self._services.values(), *(c for c, _ in self._catalogs.values())]:
                kept.close()
            self._services.clear()
            self._catalogs.clear()


def _hash(settings: Settings) -> str | None:
    """The weights file's content hash (its aliases map categories), None without one."""
    if settings.category_weights is None:
        return None
    try:
        return hashlib.sha256(Path(settings.category_weights).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def _key(settings: Settings) -> str:
    # The dump hides secrets (API keys): they are part of the key.
    from pydantic import SecretStr

    def reveal(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        return [reveal(v) for v in value] if isinstance(value, list) else value

    fields = {name: reveal(value) for name, value in settings}
    explicit = sorted(settings.model_fields_set)
    return json.dumps([fields, explicit], sort_keys=True, default=str)


def _serve(listener: Listener, key: bytes, resident: Resident, closing: threading.Event) -> None:
    while not closing.is_set():
        try:
            conn = listener.accept()  # no handshake here: a silent caller blocks only its own
        except OSError:  # closed (the process is ending), or a caller gone at once
            continue
        threading.Thread(target=_reply, args=(conn, key, resident), daemon=True).start()


def _reply(conn: Connection, key: bytes, resident: Resident) -> None:
    with conn, contextlib.suppress(Exception):  # a caller without the key, or gone
        _deadline(conn, HANDSHAKE_SECONDS)
        deliver_challenge(conn, key)
        answer_challenge(conn, key)
        request = conn.recv()
        conn.send(resident.answer(request))


def _write_record(data_dir: Path, address: tuple[str, int], key: bytes) -> None:
    record = {"pid": os.getpid(), "address": list(address), "key": key.hex(),
              "protocol": PROTOCOL, "version": _version()}  # fmt: skip
    fd, temporary = tempfile.mkstemp(dir=data_dir, prefix=f".{RECORD}.")  # new, mode 0600
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
    data_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=data_dir / "resident.log", level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")  # fmt: skip
    key, closing, resident = secrets.token_bytes(32), threading.Event(), Resident()
    with Listener(("127.0.0.1", 0)) as listener:
        _write_record(data_dir, listener.address, key)
        try:
            embedded.start(data_dir)  # `db start` returns once this process holds the server
            serving = (listener, key, resident, closing)
            threading.Thread(target=_serve, args=serving, daemon=True).start()
            import imgembed.service  # noqa: F401 - loaded before the first search asks

            time.sleep(max(0.0, until - time.time()))
        finally:
            closing.set()
            _remove_record(data_dir)
            resident.close()


if __name__ == "__main__":
    # Run as imgembed.resident, not __main__: the queries unpickled here are of its classes.
    from imgembed import resident

    resident.main(sys.argv[1:])
