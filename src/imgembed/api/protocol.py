"""uvicorn's HTTP/1.1 protocol (h11) with a deadline while no request is in service. uvicorn
has none: a client that connects and sends nothing, trickles its headers (slowloris), or
trickles a body the server already answered (a 413 or 401 sent before reading it), held a
connection for ever, and enough of them every file the process may open. A request in
service reads its body under the middleware's own deadline (BODY_IDLE_SECONDS)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

IDLE_SECONDS = 30.0  # from a connection's opening, or a byte while idle, to a whole request
log = logging.getLogger("imgembed.api")


class IdleTimeoutProtocol(H11Protocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watching()
        super().connection_lost(exc)

    def _idle(self) -> bool:
        """No request in service: a head awaited, or the rest of an answered request."""
        served = self.cycle is not None and not self.cycle.response_complete
        return not served and not self.transport.is_closing()

    def _watch(self) -> None:
        """While idle, one deadline (not renewed by each byte); a keep-alive connection that
        sends nothing is closed by uvicorn's own timer first."""
        if self._idle():
            if self._idle_timer is None:
                self._idle_timer = self.loop.call_later(IDLE_SECONDS, self._timed_out)
        else:
            self._stop_watching()

    def _stop_watching(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _timed_out(self) -> None:
        self._idle_timer = None
        if not self._idle():
            return
        message = f"no whole request came within {IDLE_SECONDS:g} s"
        body = json.dumps({"error": message, "error_type": "RequestTimeoutError"}).encode()
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()
        peer = "{}:{}".format(*self.client) if self.client else "a client"
        log.info("closed a connection from %s: %s", peer, message)
