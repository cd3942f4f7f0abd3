"""The resident search process's guards, without a server: whatever is wrong with the record
or the process, `ask` says so with None (the asker then searches itself)."""

import json
import os
import threading
from multiprocessing.connection import Listener
from pathlib import Path

import pytest

from imgembed import resident
from imgembed.config import load_settings
from imgembed.resident import PROTOCOL, Resident, SearchQuery


@pytest.fixture
def settings(tmp_path):
    return load_settings(data_dir=tmp_path)


def listening(key: bytes, answers: list) -> Listener:
    """A listener that replies once with the next of `answers` (a stand-in resident)."""
    listener = Listener(("127.0.0.1", 0), authkey=key)

    def serve():
        try:
            with listener.accept() as conn:
                conn.recv()
                conn.send(answers.pop(0))
        except Exception:  # a client with the wrong key
            pass

    threading.Thread(target=serve, daemon=True).start()
    return listener


def write_record(folder: Path, listener: Listener, secret: bytes, **changes) -> None:
    record = {"pid": os.getpid(), "address": list(listener.address), "key": secret.hex(),
              "protocol": PROTOCOL, "version": resident.version("imgembed"), **changes}  # fmt: skip
    (folder / resident.RECORD).write_text(json.dumps(record))


def test_no_record_no_answer(settings):
    assert resident.ask(settings, SearchQuery(text="x")) is None
    assert resident.status(settings.data_dir) is None


def test_an_answer_from_the_recorded_process_is_returned(settings, tmp_path):
    key = os.urandom(32)
    with listening(key, [("ok", ["hit"])]) as listener:
        write_record(tmp_path, listener, key)
        assert resident.status(tmp_path) == os.getpid()
        assert resident.ask(settings, SearchQuery(text="x")) == ["hit"]


@pytest.mark.parametrize(
    "change",
    [
        {"key": os.urandom(32).hex()},
        {"version": "0.0.0"},
        {"protocol": PROTOCOL + 1},
        {"pid": 2**22 + 1},
        {"address": ["127.0.0.1", 1]},
    ],
    ids=["another key", "another version", "another protocol", "dead process", "no listener"],
)
def test_a_stale_or_foreign_record_is_not_asked(settings, tmp_path, change):
    key = os.urandom(32)
    with listening(key, [("ok", ["hit"])]) as listener:
        write_record(tmp_path, listener, key, **change)
        assert resident.ask(settings, SearchQuery(text="x")) is None


def test_a_failure_inside_the_process_leaves_the_search_to_the_asker(settings, tmp_path):
    key = os.urandom(32)
    with listening(key, [("failed", "RuntimeError('boom')")]) as listener:
        write_record(tmp_path, listener, key)
        assert resident.ask(settings, SearchQuery(text="x")) is None


def test_the_process_refuses_another_protocol_and_reports_bugs_as_failures(settings):
    process = Resident()
    assert process.answer((PROTOCOL + 1, settings, SearchQuery()))[0] == "refused"
    assert process.answer("not a request")[0] == "failed"


def test_settings_differing_only_in_a_secret_get_their_own_service(tmp_path):
    one = load_settings(data_dir=tmp_path, database_url="postgresql://u:one@h/db")
    two = load_settings(data_dir=tmp_path, database_url="postgresql://u:two@h/db")
    assert resident._key(one) != resident._key(two)
    assert resident._key(one) == resident._key(load_settings(one))


def test_relative_paths_are_made_absolute_for_the_other_process(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    settings = resident.absolute(load_settings(data_dir="data", allowed_roots="pics"))
    assert settings.data_dir == tmp_path / "data"
    assert settings.allowed_roots == [tmp_path / "pics"]
