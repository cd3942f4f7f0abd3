"""A Qdrant server's client whose every call ends within one deadline.

qdrant-client's `timeout` bounds each network wait (httpx: connecting, each read), so a
server that sends its answer a byte at a time, each within that wait, holds a call without
end; httpx (which qdrant-client's REST client is built on, and takes its extra keywords) has
no deadline for a whole request. Calls here run on qdrant-client's async client, on an
event-loop thread of the store's own, each under `asyncio.timeout`: the deadline cancels
whatever is in progress, and the connection is closed, never reused (as
imgembed.intake.fetch and catalog.text_api do)."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any

from imgembed.loop_thread import LoopThread

log = logging.getLogger(__name__)


class DeadlineClient:
    """QdrantClient's calls (`client.search(...)`, ...) taking their usual arguments, each
    answered within `deadline` seconds or failing with TimeoutError; from any thread but
    this client's own."""

    def __init__(self, url: str, api_key: str | None, deadline: float):
        from qdrant_client import AsyncQdrantClient

        self.deadline = deadline
        # qdrant-client checks the server's version on a thread of its own with a per-read
        # timeout only (left waiting on such a server): checked here, within the deadline
        self._client = AsyncQdrantClient(
            url=url, api_key=api_key, timeout=math.ceil(deadline), check_compatibility=False
        )
        self._loop = LoopThread("imgembed-qdrant")

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):  # not set yet, or not the client's to give
            raise AttributeError(name)
        method = getattr(self._client, name)
        return lambda *args, **kwargs: self._wait(method(*args, **kwargs))

    def _wait(self, call: Coroutine[Any, Any, Any]) -> Any:
        running = self._loop.submit(self._within_deadline(call))
        if running is None:
            call.close()  # never started: no "never awaited" warning
            raise RuntimeError("the Qdrant client is closed")
        try:
            return running.result()
        except BaseException:  # Ctrl-C while waiting: the call stops too
            running.cancel()
            raise

    async def _within_deadline(self, call: Coroutine[Any, Any, Any]) -> Any:
        try:
            async with asyncio.timeout(self.deadline):
                return await call
        except TimeoutError as exc:
            raise TimeoutError(
                f"no whole answer within {self.deadline:g} s (IMGEMBED_QDRANT_TIMEOUT)"
            ) from exc

    def check_version(self) -> None:
        """A warning if the server's version is one qdrant-client does not work with."""
        from pydantic import ValidationError
        from qdrant_client.common.version_check import is_compatible
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        try:
            server = self.info().version
        except (UnexpectedResponse, ResponseHandlingException) as exc:
            if isinstance(exc, ResponseHandlingException) and not isinstance(
                exc.source, ValidationError
            ):
                raise  # no answer: the server's to be reached first
            log.debug("the Qdrant server's version is not known: %s", exc)  # (a proxy's page)
            return
        client = importlib.metadata.version("qdrant-client")
        if server and not is_compatible(client, server):
            log.warning(
                "the Qdrant server's version %s is not one qdrant-client %s works with (major "
                "versions equal, minor ones at most 1 apart): upgrade one of them",
                server, client,
            )  # fmt: skip

    def close(self) -> None:
        """Calls still running end at once; the connections close, the thread ends."""
        self._loop.close(self._client.close)
