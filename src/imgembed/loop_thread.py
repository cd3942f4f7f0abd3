"""An asyncio event loop on a thread of its own, for callers without one: each call of an
async HTTP client runs there under one deadline (`asyncio.timeout`), which cancels whatever
is in progress, where httpx's timeouts bound each read alone (a server sending a byte at a
time holds them without end). Used by intake.fetch, catalog.text_api and store.qdrant_server."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any


class LoopThread:
    def __init__(self, name: str):
        self._closing = False
        self._scheduling = threading.Lock()  # nothing is started on a stopping loop
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=_run, args=(self._loop,), name=name, daemon=True)
        self._thread.start()
        # an owner dropped without close() does not leave the thread behind
        self._stop_loop = weakref.finalize(self, self._loop.call_soon_threadsafe, self._loop.stop)

    def submit(self, call: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any] | None:
        """`call` started on the loop (from any other thread); None once closing, the call
        not run."""
        with self._scheduling:
            if self._closing:
                call.close()
                return None
            return asyncio.run_coroutine_threadsafe(call, self._loop)

    def close(self, last: Callable[[], Awaitable[Any]] | None = None) -> None:
        """Calls still running are cancelled (their futures raise CancelledError), then
        `last` (a client's close) is awaited there, and the thread ends."""
        with self._scheduling:
            if self._closing:
                return
            self._closing = True
        asyncio.run_coroutine_threadsafe(_cancel_all(last), self._loop).result()
        self._stop_loop()
        self._thread.join()


async def _cancel_all(last: Callable[[], Awaitable[Any]] | None) -> None:
    running = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    if last is not None:
        await last()


def _run(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.run_forever()
    finally:
        loop.close()
