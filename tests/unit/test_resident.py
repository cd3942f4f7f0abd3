"""The resident search process's guards, without a server: whatever is wrong with the record,
the connection or the process, `ask` says so with None (the asker then searches itself)."""

import json
import os
import socket
import struct
import threading
from multiprocessing.connection import Listener
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest

from imgembed import resident
from imgembed.config import load_settings
from imgembed.resident import PROTOCOL, SERVICES, ProductQuery, Resident, SearchQuery


@pytest.fixture
def settings(tmp_path):
    return load_settings(data_dir=tmp_path)


class Answers:
    """A stand-in for Resident: the same answer to every question."""

    def __init__(self, answer):
        self.answer = lambda request: answer


@pytest.fixture
def serving(tmp_path):
    """The resident's own accept loop with a stand-in answer; its record written."""
    key, closing = os.urandom(32), threading.Event()
    with Listener(("127.0.0.1", 0)) as listener:
        args = (listener, key, Answers(("ok", ["hit"])), closing)
        threading.Thread(target=resident._serve, args=args, daemon=True).start()
        resident._write_record(tmp_path, listener.address, key)
        yield listener.address
        closing.set()


def write_record(folder: Path, address, secret: bytes, mode: int = 0o600, **changes) -> None:
    record = {"pid": os.getpid(), "address": list(address), "key": secret.hex(),
              "protocol": PROTOCOL, "version": resident._version(), **changes}  # fmt: skip
    path = folder / resident.RECORD
    path.write_text(json.dumps(record))
    path.chmod(mode)


def test_no_record_no_answer(settings):
    assert resident.ask(settings, SearchQuery(text="x")) is None
    assert resident.status(settings.data_dir) is None


def test_the_recorded_process_answers(settings, serving, tmp_path):
    assert oct((tmp_path / resident.RECORD).stat().st_mode & 0o777) == "0o600"
    assert resident.status(tmp_path) == os.getpid()
    assert resident.ask(settings, SearchQuery(text="x")) == ["hit"]


def test_a_silent_or_vanished_caller_does_not_stop_it_answering(settings, serving):
    silent = socket.create_connection(serving)  # connects, never says a word
    reset = socket.create_connection(serving)
    reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reset.close()  # gone with a reset, mid-handshake
    assert resident.ask(settings, SearchQuery(text="x")) == ["hit"]
    silent.close()


def test_a_silent_resident_is_given_up(settings, tmp_path, monkeypatch):
    monkeypatch.setattr(resident, "HANDSHAKE_SECONDS", 1.0)
    with socket.create_server(("127.0.0.1", 0)) as mute:  # accepts, never answers
        write_record(tmp_path, mute.getsockname(), os.urandom(32))
        assert resident.ask(settings, SearchQuery(text="x")) is None


@pytest.mark.parametrize(
    "change",
    [
        {"key": os.urandom(32).hex()},
        {"version": "0.0.0"},
        {"protocol": PROTOCOL + 1},
        {"pid": 2**22 + 1},
        {"mode": 0o644},
    ],
    ids=["another key", "another version", "another protocol", "dead process", "readable"],
)
def test_a_stale_or_foreign_record_is_not_asked(settings, serving, tmp_path, change):
    key = bytes.fromhex(json.loads((tmp_path / resident.RECORD).read_text())["key"])
    write_record(tmp_path, serving, key, **change)
    assert resident.ask(settings, SearchQuery(text="x")) is None


def test_nothing_listening_is_not_asked(settings, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as closed:
        address = closed.getsockname()
    write_record(tmp_path, address, os.urandom(32))
    assert resident.ask(settings, SearchQuery(text="x")) is None


def test_qdrant_local_mode_is_never_sent(tmp_path, serving):
    local = load_settings(data_dir=tmp_path, store="qdrant")
    assert resident.ask(local, SearchQuery(text="x")) is None


def test_a_failure_inside_it_leaves_the_search_to_the_asker(settings, tmp_path):
    key, closing = os.urandom(32), threading.Event()
    with Listener(("127.0.0.1", 0)) as listener:
        args = (listener, key, Answers(("failed", "RuntimeError('boom')")), closing)
        threading.Thread(target=resident._serve, args=args, daemon=True).start()
        resident._write_record(tmp_path, listener.address, key)
        assert resident.ask(settings, SearchQuery(text="x")) is None
        closing.set()


def test_it_refuses_another_protocol_another_environment_and_too_many_settings(
    settings, monkeypatch
):
    process = Resident()
    query = SearchQuery(text="x")
    assert process.answer((PROTOCOL + 1, settings, query, {}))[0] == "refused"
    monkeypatch.setenv("HF_HOME", "/models/here")
    refused = process.answer((PROTOCOL, settings, query, {"HF_HOME": "/models/elsewhere"}))
    assert refused[0] == "refused" and "environment" in refused[1]
    assert process.answer("not a request")[0] == "failed"
    for size in range(1, SERVICES + 1):
        assert process._service(settings.model_copy(update={"batch_size": size})) is not None
    assert process._service(settings) is None  # one more: the asker searches itself
    process.close()


def test_settings_differing_only_in_a_secret_get_their_own_service(tmp_path):
    one = load_settings(data_dir=tmp_path, openai_api_key="sk-one")
    two = load_settings(data_dir=tmp_path, openai_api_key="sk-two")
    assert resident._key(one) != resident._key(two)
    assert resident._key(one) == resident._key(load_settings(one))


def test_relative_paths_are_made_absolute_for_the_other_process(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "w.pt").write_bytes(b"")
    settings = resident.absolute(
        load_settings(
            data_dir="~/data",
            allowed_roots="pics",
            pretrained="w.pt",
            model="local-dir:models/tiny",
        )
    )
    assert settings.data_dir == tmp_path / "home" / "data"
    assert settings.allowed_roots == [tmp_path / "pics"]
    assert settings.pretrained == str(tmp_path / "w.pt")
    assert settings.model == f"local-dir:{tmp_path}/models/tiny"
    assert resident.absolute(load_settings(pretrained="openai")).pretrained == "openai"


class FakeCatalog:
    """Catalog.for_store's stand-in: counts what is made and closed."""

    made: ClassVar[list["FakeCatalog"]] = []
    mismatch: ClassVar[set[str]] = set()  # stores "embedded again with other models"

    def __init__(self, store_id: str):
        self.store_id, self.closed = store_id, False
        FakeCatalog.made.append(self)

    @classmethod
    def for_store(cls, store_id, settings):
        return cls(store_id)

    def search(self, store_id, text, **options):
        from imgembed.errors import CollectionNotFoundError, ProvenanceMismatchError

        if store_id == "nope":
            raise CollectionNotFoundError("store 'nope' has no embeddings")
        if store_id in FakeCatalog.mismatch:
            FakeCatalog.mismatch.discard(store_id)
            raise ProvenanceMismatchError("embedded with other models")
        return [SimpleNamespace(to_dict=lambda: {"product_id": "p1", "store": store_id})]

    def close(self):
        self.closed = True


def test_catalogues_are_kept_per_store_and_weights_and_never_pile_up(monkeypatch, tmp_path):
    import imgembed.catalog

    monkeypatch.setattr(imgembed.catalog, "Catalog", FakeCatalog)
    FakeCatalog.made = []
    weights = tmp_path / "weights.yaml"
    weights.write_text("a: 1\n")
    settings = load_settings(data_dir=tmp_path, category_weights=weights)
    process = Resident()

    def ask(store):
        return process.answer(
            (PROTOCOL, settings, ProductQuery(store, "x"), resident._environment())
        )

    assert ask("nope")[0] == "error" and FakeCatalog.made[0].closed  # not kept
    assert ask("a") == ("ok", [{"product_id": "p1", "store": "a"}])
    assert ask("a")[0] == "ok" and len(FakeCatalog.made) == 2  # the kept one answered
    weights.write_text("a: 2\n")  # edited: its aliases may map categories otherwise
    assert ask("a")[0] == "ok" and len(FakeCatalog.made) == 3 and FakeCatalog.made[1].closed
    FakeCatalog.mismatch.add("a")  # the store embedded again with other models
    assert ask("a")[0] == "ok" and len(FakeCatalog.made) == 4 and FakeCatalog.made[2].closed
    for store in "bcde":  # more stores than SERVICES: answered all the same, not all kept
        assert ask(store)[0] == "ok"
    assert len(process._catalogs) == SERVICES and FakeCatalog.made[-1].closed
    process.close()
    assert all(catalog.closed for catalog in FakeCatalog.made)
