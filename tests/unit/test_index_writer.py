"""The indexing run's writer thread: batches stored in order while the caller goes on; an
error in the thread reaches the caller (never a silent loss, never a blocked put)."""

import threading

import numpy as np
import pytest

from imgembed.errors import StoreUnavailableError
from imgembed.indexing.run import IndexStats, Writer
from imgembed.store.base import Record


class Store:
    def __init__(self, fail_at: int | None = None, error: BaseException | None = None):
        self.batches: list[list[str]] = []
        self.threads: set[str] = set()
        self.fail_at, self.error = fail_at, error

    def upsert(self, name, records):
        self.threads.add(threading.current_thread().name)
        if len(self.batches) == self.fail_at:
            raise self.error
        self.batches.append([r.id for r in records])


def _batch(start: int, size: int = 2) -> list[Record]:
    return [Record(f"{i}", np.ones(4, np.float32), "h", "s") for i in range(start, start + size)]


def test_batches_are_stored_in_order_on_the_writer_thread():
    store, stats = Store(), IndexStats()
    with Writer(store, "c", stats) as writer:
        for start in range(0, 20, 2):
            writer.put(_batch(start))
        writer.put([])  # nothing to store: no call
    assert store.batches == [[f"{i}", f"{i + 1}"] for i in range(0, 20, 2)]
    assert store.threads == {"imgembed-writer"} and stats.successful == 20


@pytest.mark.parametrize("error", [StoreUnavailableError("gone"), TypeError("a bug")])
def test_an_error_in_the_writer_reaches_the_caller_with_the_counts(error):
    store, stats = Store(fail_at=1, error=error), IndexStats()
    with pytest.raises(type(error)), Writer(store, "c", stats) as writer:
        for start in range(0, 40, 2):  # far more than the queue holds: put must not block
            writer.put(_batch(start))
    assert store.batches == [["0", "1"]] and stats.successful == 2


def test_a_conflict_the_database_broke_says_what_was_kept_a_refused_lock_is_as_it_is():
    import contextlib

    from imgembed.errors import StoreBusyError
    from imgembed.indexing import IndexStats
    from imgembed.indexing.run import guarded

    class Held:
        def writing(self, collection):
            return contextlib.nullcontext()

    stats = IndexStats(total=6, processed=4, successful=2)
    conflict = StoreBusyError("storing 2 items: the database stopped it")
    conflict.__cause__ = RuntimeError("deadlock detected")  # as store_errors chains it
    with pytest.raises(StoreBusyError) as caught, guarded(Held(), "c", stats, cached=False):
        raise conflict
    assert "Indexing stopped after 4 of 6 items" in str(caught.value)
    refused = StoreBusyError("another indexing run holds collection 'c'")
    with pytest.raises(StoreBusyError) as caught, guarded(Held(), "c", stats, cached=False):
        raise refused
    assert caught.value is refused


def test_the_resume_advice_names_the_cache_only_when_it_is_on():
    from imgembed.errors import StoreUnavailableError
    from imgembed.indexing import IndexStats
    from imgembed.indexing.run import interrupted

    stats = IndexStats(total=6, processed=4, successful=2)
    on = str(interrupted(StoreUnavailableError("gone"), stats, cached=True))
    off = str(interrupted(StoreUnavailableError("gone"), stats, cached=False))
    assert "embedding cache" in on and "embedding cache" not in off
    assert off.endswith("stored items are skipped by content hash.")
