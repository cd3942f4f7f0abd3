"""A Qdrant server that sends its answers a byte at a time, each byte well within a read
timeout: every call still ends, within IMGEMBED_QDRANT_TIMEOUT (tried once more), with
StoreUnavailableError naming the server and the time, and the store goes on once the server
answers again. Bounds are generous: a 1 s timeout must end well within 30 s."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from imgembed.config import load_settings
from imgembed.errors import StoreUnavailableError
from imgembed.store import Record, open_store
from imgembed.store.qdrant import QdrantStore
from tests.fake_qdrant import FakeQdrant

VECTOR = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)


def _failure_within(seconds: float, work: Callable[[], object]) -> BaseException | None:
    """What `work` raised, failing the test if it is still waiting after `seconds`."""
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            work()
            raised.append(None)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert raised, f"still waiting after {seconds:g} s"
    return raised[0]


def _store_threads_end() -> None:
    deadline = time.monotonic() + 10
    while any(t.name == "imgembed-qdrant" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the store's thread is left behind"
        time.sleep(0.05)


def test_opening_against_a_server_trickling_every_answer_ends_in_its_timeout(caplog):
    with (
        FakeQdrant(trickle=" /") as server,
        caplog.at_level(logging.WARNING, logger="imgembed.store.qdrant"),
    ):
        failure = _failure_within(30, lambda: QdrantStore(url=server.url, timeout=1))
        assert isinstance(failure, StoreUnavailableError)
        assert str(failure) == (
            f"the database went away during opening Qdrant (Qdrant at {server.url}): "
            "no whole answer within 1 s (IMGEMBED_QDRANT_TIMEOUT)"
        )
        assert [r.getMessage().endswith("trying once more") for r in caplog.records] == [True]
        assert server.cut.wait(10), "the trickled connection was not closed"
    _store_threads_end()


@pytest.mark.parametrize(
    ("trickled", "work"),
    [
        ("/points/query", lambda store: store.search("photos", VECTOR)),
        (
            "PUT /collections/photos/points",
            lambda store: store.upsert("photos", [Record("a.jpg", VECTOR, "hash", "a.jpg", {})]),
        ),
    ],
    ids=["search", "upsert"],
)
def test_a_call_the_server_trickles_is_unavailable_then_goes_on(trickled, work, caplog):
    with FakeQdrant() as server:
        settings = load_settings(store="qdrant", qdrant_url=server.url, qdrant_timeout=1)
        store = open_store(settings)
        try:
            work(store)  # answered
            server.trickle = trickled
            with caplog.at_level(logging.WARNING, logger="imgembed.store.qdrant"):
                failure = _failure_within(30, lambda: work(store))
            assert isinstance(failure, StoreUnavailableError)
            assert f"(Qdrant at {server.url}): no whole answer within 1 s" in str(failure)
            assert [r.getMessage().endswith("trying once more") for r in caplog.records] == [True]
            assert server.cut.wait(10), "the trickled connection was not closed"
            server.trickle = None
            assert _failure_within(30, lambda: work(store)) is None  # the store goes on
        finally:
            store.close()
    _store_threads_end()


@pytest.mark.parametrize("version", ["1.20.0", "0.9.0", ""], ids=["same", "older", "no-page"])
def test_the_servers_version_is_checked_within_the_timeout(version, caplog):
    """qdrant-client's own check waits on a thread of its own with a per-read timeout only;
    the store checks on opening: a warning for a version it does not work with, and a root
    page that is not Qdrant's (a proxy's) is no failure."""
    with (
        FakeQdrant(version=version) as server,
        caplog.at_level(logging.WARNING, logger="imgembed.store.qdrant_server"),
    ):
        QdrantStore(url=server.url, timeout=1).close()
    warned = [r.getMessage() for r in caplog.records]
    if version == "0.9.0":
        assert len(warned) == 1 and warned[0].startswith("the Qdrant server's version 0.9.0")
    else:
        assert warned == []
    _store_threads_end()
