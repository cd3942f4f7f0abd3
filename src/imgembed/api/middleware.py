"""What every request passes through (plain ASGI, so bodies stream): a request id echoed as
X-Request-ID, the body size limit, API keys, metrics, a JSON access log line, and a 500 with
the request id for anything that is a bug."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import urllib.parse
import uuid
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgembed.api.errors import error_body, status_of
from imgembed.api.metrics import Metrics
from imgembed.catalog.catalog import checked_store_id
from imgembed.config import Settings
from imgembed.errors import ImgEmbedError, RequestTimeoutError, RequestTooLargeError, error_dict
from imgembed.store.base import checked_name

access_log = logging.getLogger("imgembed.access")
log = logging.getLogger("imgembed.api")

# Open without an API key: liveness/readiness, and the page and docs (no data in them).
OPEN_PATHS = ("/health", "/ready", "/", "/docs", "/docs/oauth2-redirect", "/openapi.json")
OPEN_PREFIXES = ("/static/", "/docs-static/")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CLIENT_GONE = 499  # nginx's status for a client that closed the connection first
BODY_IDLE_SECONDS = 30.0  # a request body with no byte for this long is refused (408)


class RequestContext:
    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics, routes: list[BaseRoute]):
        self.app = app
        self.routes = routes
        self.max_body = settings.max_body_size
        self.keys = [key.get_secret_value().encode() for key in settings.api_keys or []]
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            refusal = self._refusal(scope, headers)
            if refusal is None:
                await self.app(scope, self._limited(receive), send_with_id)
            else:
                await _answer(scope, send_with_id, request_id, *refusal)
        except ClientDisconnect:  # gone before its body arrived: no one to answer, no bug
            status = CLIENT_GONE
        except asyncio.CancelledError:
            # uvicorn cancels what still runs when its shutdown grace (IMGEMBED_SHUTDOWN_TIMEOUT)
            # is over: the client learns to retry elsewhere, not a bare 500 and a traceback
            log.warning("request cut off by the shutdown", extra={"fields": {"id": request_id}})
            if not response_started:
                error = {"error": "the server shut down before this request was done; retry it",
                         "error_type": "UnavailableError"}  # fmt: skip
                await _answer(scope, send_with_id, request_id, 503, error)
        except Exception:
            log.exception("bug while serving a request", extra={"fields": {"id": request_id}})
            if not response_started:
                error = {"error": "internal error; the log names it by request id",
                         "error_type": "InternalError"}  # fmt: skip
                await _answer(scope, send_with_id, request_id, 500, error)
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route") or self._route(scope)
            template = getattr(route, "path", None) or "<unmatched>"
            self.metrics.request(template, scope["method"], status, seconds)
            client = scope.get("client")
            access_log.info(
                "request",
                extra={
                    "fields": {
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": scope["path"],
                        "route": template,
                        "status": status,
                        "duration_ms": round(seconds * 1000, 2),
                        "client": client[0] if client else None,
                    }
                },
            )

    def _route(self, scope: Scope) -> BaseRoute | None:
        """The route a request refused before routing (413, 401) was meant for."""
        return next((r for r in self.routes if r.matches(scope)[0] is Match.FULL), None)

    def _refusal(self, scope: Scope, headers: Headers) -> tuple[int, dict[str, Any]] | None:
        try:  # else the server reads %FF as U+FFFD: two store ids would be one
            urllib.parse.unquote_to_bytes(scope.get("raw_path") or b"").decode("utf-8")
        except UnicodeDecodeError:
            error = {"error": "the path is not UTF-8 once its %-escapes are decoded",
                     "error_type": "ValidationError"}  # fmt: skip
            return 422, error
        refused = _named_with_a_slash(scope.get("raw_path") or b"")
        if refused is not None:
            return status_of(refused), error_dict(refused)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return 413, _too_large(int(length), self.max_body)
        if self.keys and not _is_open(scope["path"]) and scope["method"] != "OPTIONS":
            scheme, _, token = headers.get("authorization", "").partition(" ")
            given = token.strip().encode()
            valid = (
                scheme.lower() == "bearer"
                and bool(given)
                and any(hmac.compare_digest(given, key) for key in self.keys)
            )
            if not valid:
                error = {"error": "a valid API key is required: Authorization: Bearer <key>",
                         "error_type": "Unauthorized"}  # fmt: skip
                return 401, error
        return None

    def _limited(self, receive: Receive) -> Receive:
        """Counts body bytes as they arrive (chunked uploads carry no length), and ends a body
        that stops arriving: a client trickling a byte now and then would hold its
        connection, and what it is sent for, for ever."""
        seen, complete = 0, False

        async def receive_limited() -> Message:
            nonlocal seen, complete
            if complete:  # after the body: waiting for a disconnect may take any time
                return await receive()
            try:
                async with asyncio.timeout(BODY_IDLE_SECONDS):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeoutError(
                    f"the request body stopped arriving: nothing came for {BODY_IDLE_SECONDS:g} "
                    f"s after {seen:,} bytes"
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_body:
                    raise RequestTooLargeError(_too_large(seen, self.max_body)["error"])
            return message

        return receive_limited


# Routes that name a collection or store in one path segment, and the library's check of it.
_NAMED = ((b"/api/v1/collections/", checked_name), (b"/api/v1/stores/", checked_store_id))


def _named_with_a_slash(raw_path: bytes) -> ImgEmbedError | None:
    """The library's refusal of a collection name or store id given with an encoded "/"
    (%2F), which no collection or store has: the path is decoded before routing, so "a%2F"
    was redirected (307) to collection "a" (a DELETE too), "%2F" to the list, and
    "a%2Fitems" was a's items."""
    for prefix, check in _NAMED:
        if raw_path.startswith(prefix):
            segment = raw_path[len(prefix) :].split(b"/", 1)[0]
            name = urllib.parse.unquote(segment.decode("utf-8"))
            if "/" in name:
                try:
                    check(name)
                except ImgEmbedError as exc:
                    return exc
    return None


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _too_large(size: int, limit: int) -> dict[str, str]:
    return {
        "error": f"request body of {size:,} bytes or more is over the limit of {limit:,} "
        "(IMGEMBED_MAX_BODY_SIZE)",
        "error_type": "RequestTooLargeError",
    }


async def _answer(
    scope: Scope, send: Send, request_id: str, status: int, error: dict[str, Any]
) -> None:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status == 503:
        headers = {"Retry-After": "1"}
    response = JSONResponse(error_body(scope["path"], error, request_id), status, headers)
    await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
