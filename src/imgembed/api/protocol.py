"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for each request's head. uvicorn has
none: a client that connects and sends nothing, or trickles its headers (slowloris), held a
connection for ever, and enough of them every file the process may open."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_SECONDS = 30.0  # from a connection's first byte (or its opening) to a whole head
log = logging.getLogger("imgembed.api")


class HeadTimeoutProtocol(H11Protocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watching()
        super().connection_lost(exc)

    def _watch_head(self) -> None:
        """While a head is awaited, one deadline (not renewed by each byte); idle keep-alive
        connections are closed by uvicorn's own timer before any byte comes."""
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(HEAD_SECONDS, self._head_timed_out)
        else:
            self._stop_watching()

    def _stop_watching(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        message = f"no whole request head came within {HEAD_SECONDS:g} s"
        body = json.dumps({"error": message, "error_type": "RequestTimeoutError"}).encode()
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()
        peer = "{}:{}".format(*self.client) if self.client else "a client"
        log.info("closed a connection from %s: %s", peer, message)
