"""Errors to HTTP: one status table for every route, one body shape (the library's
`error_dict` plus the request id). OpenAI-compatible routes (/v1/...) wrap the same data
in OpenAI's `{"error": {"message", "type", "code"}}` so its SDKs read it."""

from __future__ import annotations

import email.message
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from imgembed.errors import (
    CategoryWeightsError,
    CollectionNotFoundError,
    ConfigurationError,
    DataDirError,
    EncodeError,
    FetchError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    ImgEmbedError,
    InvalidRecordError,
    InvalidSourceError,
    ModelUnavailableError,
    ProductNotFoundError,
    ProvenanceMismatchError,
    RequestTimeoutError,
    RequestTooLargeError,
    SourceNotAllowedError,
    StoreBusyError,
    StoreDamagedError,
    StoreError,
    StoreUnavailableError,
    TextApiSettingError,
    TextEmbeddingError,
    UnavailableError,
    UnknownModelError,
    UnsupportedFormatError,
    error_dict,
)

log = logging.getLogger("imgembed.api")
STORE_RETRY_SECONDS = 5.0  # what a store's 503 asks a client to wait


class NotFoundError(ImgEmbedError):
    """A resource of the service itself (a job, an item) does not exist."""


# First match wins: subclasses before their bases.
STATUS: list[tuple[type[ImgEmbedError], int]] = [
    (ImageNotFoundError, 404),
    (CollectionNotFoundError, 404),
    (ProductNotFoundError, 404),
    (NotFoundError, 404),
    (SourceNotAllowedError, 403),
    (ImageTooLargeError, 413),
    (RequestTooLargeError, 413),
    (RequestTimeoutError, 408),
    (UnsupportedFormatError, 415),
    (InvalidSourceError, 422),  # a malformed URL: the request, not the remote, is wrong
    (FetchError, 502),
    (ImageError, 400),  # invalid, truncated, too small
    (ProvenanceMismatchError, 409),
    (StoreBusyError, 409),  # another process embeds the store: retry when it is done
    (DataDirError, 503),  # the server's setting, not the request's
    (CategoryWeightsError, 503),  # the server's weights file, not the request
    (TextApiSettingError, 502),  # the server's text API settings (a refused key, a bad URL)
    (ConfigurationError, 422),  # the request cannot work with this model or these settings
    (UnknownModelError, 422),  # no such model: retrying will not help
    (InvalidRecordError, 422),  # a name, id, vector or metadata the store cannot hold
    (UnavailableError, 503),  # overloaded, loading, shutting down
    (ModelUnavailableError, 503),
    (TextEmbeddingError, 502),  # the catalogue's text embedder (an API) failed
    (EncodeError, 503),
    (StoreError, 503),
    (ImgEmbedError, 500),
]


def status_of(error: ImgEmbedError) -> int:
    return next(status for kind, status in STATUS if isinstance(error, kind))


def error_body(path: str, error: dict[str, Any], request_id: str | None) -> dict[str, Any]:
    """The one error shape: `error_dict` plus the request id (OpenAI's shape under /v1/)."""
    if path.startswith("/v1/"):
        code = "model_not_found" if error["error_type"] == "UnknownModelError" else None
        return {"error": {"message": error["error"], "type": error["error_type"], "code": code}}
    return {**error, "request_id": request_id}


def error_response(
    request: Request, status: int, error: dict[str, Any], headers: dict[str, str] | None = None
) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    return JSONResponse(error_body(request.url.path, error, request_id), status, headers=headers)


async def _imgembed_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ImgEmbedError)
    status = status_of(exc)
    if isinstance(exc, UnknownModelError) and request.url.path.startswith("/v1/"):
        status = 404  # as OpenAI answers a model it does not serve
    headers = None
    if isinstance(exc, UnavailableError):
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
    elif isinstance(exc, FetchError | TextEmbeddingError | StoreDamagedError | DataDirError):
        # a 502 after the server's own retries with backoff: OpenAI's SDKs would repeat the
        # whole request twice more (each with its retries) unless told not to (a text
        # embedder's error is an EncodeError too: it was answered Retry-After 1 instead); a
        # damaged store file or a data dir it cannot write waits for its operator, not time
        headers = {"x-should-retry": "false"}
    elif isinstance(exc, EncodeError):
        headers = {"Retry-After": "1"}
    elif isinstance(exc, StoreUnavailableError):
        # the database restarts, or is back soon
        headers = {"Retry-After": str(round(STORE_RETRY_SECONDS))}
    if status == 500:
        log.error("unexpected library error", exc_info=exc)
    return error_response(request, status, error_dict(exc), headers)


def _reason(message: str) -> str:
    """A validator's own words, without pydantic's "Value error, " before them."""
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    if _fastapi_refused_the_content_type(request, exc):
        exc = not_json(request)
    details = [
        f"{'.'.join(str(part) for part in error['loc'])}: {_reason(error['msg'])}"
        for error in exc.errors()
    ]
    body = {"error": "; ".join(details), "error_type": "ValidationError"}
    return error_response(request, 422, body)


def not_json(request: Request, multipart: bool = False) -> RequestValidationError:
    """A body sent under another content type than JSON (or multipart where taken). Not read
    as JSON all the same: a web page may send any site such a form without asking first."""
    given = request.headers.get("content-type") or "none"
    message = (
        f"send it as JSON with Content-Type: application/json (this request's: {given}; "
        "with curl: --json '{...}' or -H 'Content-Type: application/json')"
    )
    if multipart:
        message += " or as multipart/form-data (curl -F)"
    return RequestValidationError([{"loc": ("body",), "msg": message, "type": "content_type"}])


def is_json(request: Request) -> bool:
    """FastAPI's rule: application/json or application/...+json (not text/json)."""
    message = email.message.Message()
    message["content-type"] = request.headers.get("content-type", "")
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def _fastapi_refused_the_content_type(request: Request, exc: RequestValidationError) -> bool:
    """FastAPI reads a JSON body only under a JSON content type; any other arrives as bytes
    that are "not a valid dictionary"."""
    return not is_json(request) and any(
        tuple(error["loc"]) == ("body",) and error["type"] == "model_attributes_type"
        for error in exc.errors()
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    # FastAPI turns any failure while it reads a JSON body into a 400 "error parsing the
    # body"; what caused it says more: a body over our limit, or bytes that are not UTF-8
    cause = exc.__cause__
    if isinstance(cause, ClientDisconnect):
        raise cause  # no one to answer: the middleware logs it as a client gone
    if isinstance(cause, ImgEmbedError):
        return await _imgembed_error(request, cause)
    if isinstance(cause, UnicodeDecodeError):
        body = {"error": f"body: invalid JSON: {cause}", "error_type": "ValidationError"}
        return error_response(request, 422, body)
    if isinstance(cause, RecursionError):  # said as the routes that parse their own JSON do
        body = {"error": "body: invalid JSON: nested too deeply", "error_type": "ValidationError"}
        return error_response(request, 422, body)
    if exc.status_code == 400:  # FastAPI's "error parsing the body"
        body = {"error": f"body: {exc.detail}", "error_type": "ValidationError"}
        return error_response(request, 422, body)
    body = {"error": str(exc.detail), "error_type": "HTTPError"}
    return error_response(request, exc.status_code, body, exc.headers)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ImgEmbedError, _imgembed_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    # Anything else is a bug: the request-context middleware answers 500 and logs it.
