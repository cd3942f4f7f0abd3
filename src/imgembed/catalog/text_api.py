"""Text embedders behind HTTP: any OpenAI-compatible `/v1/embeddings` endpoint (OpenAI,
Ollama's /v1, vLLM, infinity, `imgembed serve`) and Ollama's own `/api/embed`.

Requests carry up to `text_batch_size` texts. Timeouts, connection errors, 429 and 5xx are
retried `text_retries` times with exponential backoff from `retry_delay` (a server's
Retry-After is respected, up to a minute); other failures are typed at once: a rejected key
(401/403) is a TextApiSettingError (a ConfigurationError), an unknown model a
ModelUnavailableError, anything else and vectors of a different dimension than before a
TextEmbeddingError.

One deadline, `text_timeout`, bounds each request whole: connecting, sending, the status
line and headers, the body. A per-read timeout alone cannot stop a server that trickles a
byte at a time, so requests run on an event-loop thread of the embedder's own, where the
deadline cancels whatever is in progress (and the connection is closed, never reused).
An answer is read up to a size no embeddings answer reaches; a redirect is not followed but
named. A base URL or an API key that cannot work is a
TextApiSettingError when the embedder is made, before any request."""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import logging
import time
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np
import tenacity

from imgembed.catalog.text_vectors import UnusableRowsError, checked_rows
from imgembed.config import Settings
from imgembed.errors import ModelUnavailableError, TextApiSettingError, TextEmbeddingError
from imgembed.loop_thread import LoopThread

log = logging.getLogger(__name__)

OPENAI_BASE = "https://api.openai.com/v1"
KNOWN_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
MAX_WAIT = 60.0
_UNKNOWN_MODEL = ("model_not_found", "UnknownModelError")  # OpenAI's code, imgembed serve's
# An answer's bytes at most: ~8,000 floats per text even as pretty-printed JSON.
ANSWER_BYTES_BASE = 1 << 20
ANSWER_BYTES_PER_TEXT = 256 << 10


class _Retryable(Exception):
    def __init__(self, error: TextEmbeddingError, retry_after: float | None = None):
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


class HttpTextEmbedder:
    """The request loop shared by both protocols; subclasses say what to send and read."""

    name: str
    url: str
    setting: str  # the setting that names the endpoint

    def __init__(self, settings: Settings, headers: dict[str, str], dimension: int | None):
        _check_url(self.url, self.setting)
        self._timeout = settings.text_timeout
        self._retries = settings.text_retries
        self._delay = settings.retry_delay
        self._batch_size = settings.text_batch_size
        self._dimension = dimension
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self._timeout), headers=headers)
        self._loop = LoopThread("imgembed-text-api")

    def payload(self, texts: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def vectors(self, body: Any, count: int) -> list[Any]:
        """The rows of an answer for `count` texts, in their order."""
        raise NotImplementedError

    def refused(self, status: int, detail: str, kind: str = "") -> Exception | None:
        """A typed error for a status that retrying cannot fix, else None (`kind`: the
        error's type or code in an OpenAI-style body)."""
        if status in (401, 403):
            return TextApiSettingError(
                f"{self.name}: {self.url} refused the API key ({status}: "
                f"{detail}); check OPENAI_API_KEY"
            )
        return None

    def dimension(self) -> int:
        if self._dimension is None:
            self.embed(["dimension"])
        assert self._dimension is not None
        return self._dimension

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.empty((0, self.dimension()), dtype=np.float32)
        size = self._batch_size
        parts, bad = [], []
        for start in range(0, len(texts), size):
            try:
                parts.append(self._embed_batch(texts[start : start + size]))
            except UnusableRowsError as exc:  # the other requests' vectors are kept
                parts.append(exc.vectors)
                bad += [start + i for i in exc.bad]
        vectors = np.concatenate(parts)
        if bad:
            raise UnusableRowsError(self.name, vectors, bad)
        return vectors

    def close(self) -> None:
        """Stop: requests still running end at once with TextEmbeddingError."""
        self._loop.close(self._client.aclose)

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self._retries + 1),
            wait=self._wait,
            retry=tenacity.retry_if_exception_type(_Retryable),
            before_sleep=self._log_retry,
            reraise=True,
        )
        started = time.perf_counter()
        try:
            for attempt in retrying:
                with attempt:
                    rows = self._request(texts)
        except _Retryable as exc:
            raise TextEmbeddingError(
                f"{exc.error} (gave up after {self._retries + 1} attempts)", exc.error.status
            ) from exc
        matrix = _as_matrix(rows, self.name)
        width = matrix.shape[1] if matrix.ndim == 2 else None
        if self._dimension is not None and width is not None and width != self._dimension:
            # before the rows are checked: the others of such an answer must not be kept either
            raise TextEmbeddingError(
                f"{self.name} at {self.url} returned {width}-d vectors where {self._dimension}-d "
                "were expected: the endpoint serves another model (or `dimensions` changed). "
                "Vectors of different models cannot be mixed; point IMGEMBED_TEXT_API_BASE back "
                "at the original model, or re-embed the store with --force"
            )
        vectors = checked_rows(matrix, len(texts), self.name)
        if self._dimension is None:
            self._dimension = width
        log.debug(
            "[TEXT] %d texts from %s in %.2f s (length: %d)",
            len(texts),
            self.name,
            time.perf_counter() - started,
            width,
        )
        return vectors

    def _request(self, texts: list[str]) -> list[Any]:
        try:
            response = self._answer(texts)
        except (TimeoutError, httpx.TimeoutException) as exc:  # the deadline, or one read's
            raise _Retryable(
                TextEmbeddingError(
                    f"{self.name}: no complete answer from {self.url} within "
                    f"{self._timeout} s (IMGEMBED_TEXT_TIMEOUT)"
                )
            ) from exc
        except httpx.TransportError as exc:
            raise _Retryable(
                TextEmbeddingError(f"{self.name}: cannot reach {self.url}: {exc}")
            ) from exc
        except httpx.DecodingError as exc:  # a compressed body that does not decompress
            raise TextEmbeddingError(
                f"{self.name}: {self.url} sent an answer that cannot be decoded: {exc}"
            ) from exc
        status = response.status_code
        if response.is_redirect:  # a POST is not sent on to wherever a server points
            where = response.headers.get("Location")  # httpx: any 3xx, with one or not
            target = f"to {response.url.join(where)}" if where else "without a Location"
            raise TextEmbeddingError(
                f"{self.name}: {self.url} answered {status}, a redirect {target}; "
                f"set {self.setting} to the address the API has moved to",
                status,
            )
        if status == 429 or status >= 500:
            error = TextEmbeddingError(
                f"{self.name}: {self.url} answered {status}: {_detail(response)}", status
            )
            raise _Retryable(error, _retry_after(response.headers.get("Retry-After")))
        if status >= 400:
            detail = _detail(response)
            raise self.refused(status, detail, _error_kind(response)) or TextEmbeddingError(
                f"{self.name}: {self.url} answered {status}: {detail}", status
            )
        try:
            return self.vectors(response.json(), len(texts))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TextEmbeddingError(
                f"{self.name}: {self.url} sent an answer that is not an embeddings response"
            ) from exc

    def _answer(self, texts: list[str]) -> httpx.Response:
        """The response with its whole body, read within `text_timeout` (TimeoutError)."""
        request = self._loop.submit(self._read(texts))
        if request is None:
            raise TextEmbeddingError(f"{self.name}: not embedded: the embedder is closed")
        try:
            return request.result()
        except concurrent.futures.CancelledError as exc:
            raise TextEmbeddingError(
                f"{self.name}: not embedded: the embedder was closed meanwhile"
            ) from exc

    async def _read(self, texts: list[str]) -> httpx.Response:
        """On the loop: the request, up to a size no embeddings answer for these texts
        reaches, all within the deadline."""
        limit = ANSWER_BYTES_BASE + ANSWER_BYTES_PER_TEXT * len(texts)
        async with (
            asyncio.timeout(self._timeout),
            self._client.stream("POST", self.url, json=self.payload(texts)) as response,
        ):
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise TextEmbeddingError(
                        f"{self.name}: {self.url} sent more than {limit:,} bytes for "
                        f"{len(texts)} text{'s' if len(texts) > 1 else ''}, more than any "
                        f"embeddings answer; is {self.setting} an embeddings API?",
                        response.status_code,
                    )
                chunks.append(chunk)
        # the body as read is decompressed already: without its Content-Encoding, or the
        # new response would decompress it a second time (a DecodingError)
        headers = [(k, v) for k, v in response.headers.multi_items() if k != "content-encoding"]
        return httpx.Response(
            response.status_code,
            headers=headers,
            content=b"".join(chunks),
            request=response.request,
        )

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        backoff = self._delay * 2 ** (state.attempt_number - 1)
        retry_after = exc.retry_after if isinstance(exc, _Retryable) else None
        return min(MAX_WAIT, max(backoff, retry_after or 0.0))

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "[TEXT] %s; retry %d of %d in %.1f s", exc, state.attempt_number, self._retries, wait
        )


class OpenAIEmbedder(HttpTextEmbedder):
    def __init__(self, model: str, settings: Settings):
        base = (settings.text_api_base or OPENAI_BASE).rstrip("/")
        secret = settings.openai_api_key
        key = secret.get_secret_value().strip() if secret else None  # a .env's line end too
        if key and not (key.isascii() and key.isprintable() and " " not in key):
            raise TextApiSettingError(  # never shown: it is a secret
                "OPENAI_API_KEY holds characters an HTTP header cannot carry (spaces, line "
                "breaks or non-ASCII letters); copy the key again"
            )
        if not key and base == OPENAI_BASE:
            raise TextApiSettingError(
                f"openai:{model} needs an API key: set OPENAI_API_KEY (or point "
                "IMGEMBED_TEXT_API_BASE at an OpenAI-compatible server that needs none)"
            )
        self.name = f"openai:{model}"
        self.model = model
        self.url = f"{base}/embeddings"
        self.setting = "IMGEMBED_TEXT_API_BASE"
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        super().__init__(settings, headers, KNOWN_DIMENSIONS.get(model))

    def payload(self, texts: list[str]) -> dict[str, Any]:
        return {"model": self.model, "input": texts, "encoding_format": "float"}

    def vectors(self, body: Any, count: int) -> list[Any]:
        data = body["data"]
        indices = [item["index"] for item in data]
        wrong = any(type(index) is not int for index in indices)
        if wrong or sorted(indices) != list(range(len(data))):
            # a text would get another text's vector, or none
            raise TextEmbeddingError(
                f"{self.name}: {self.url} answered indices {indices[:10]}"
                f"{' ...' if len(indices) > 10 else ''} for {count} texts; each must come "
                "once, from 0 on"
            )
        return [item["embedding"] for item in sorted(data, key=lambda item: item["index"])]

    def refused(self, status: int, detail: str, kind: str = "") -> Exception | None:
        # OpenAI: 404 or code model_not_found; imgembed serve: 422 UnknownModelError
        if status == 404 or kind in _UNKNOWN_MODEL:
            message = f"{self.name}: {self.url} does not serve the model {self.model!r} ({detail})"
            if kind not in _UNKNOWN_MODEL:  # a bare 404 may be a path that is no endpoint
                message += (
                    f"; or it is no embeddings endpoint: check {self.setting} (an "
                    "OpenAI-compatible base usually ends in /v1)"
                )
            return ModelUnavailableError(message)
        return super().refused(status, detail)


class OllamaEmbedder(HttpTextEmbedder):
    def __init__(self, model: str, settings: Settings):
        self.name = f"ollama:{model}"
        self.model = model
        self.url = f"{settings.ollama_url.rstrip('/')}/api/embed"
        self.setting = "IMGEMBED_OLLAMA_URL"
        super().__init__(settings, {}, None)

    def payload(self, texts: list[str]) -> dict[str, Any]:
        return {"model": self.model, "input": texts}

    def vectors(self, body: Any, count: int) -> list[Any]:
        return body["embeddings"]

    def refused(self, status: int, detail: str, kind: str = "") -> Exception | None:
        if status == 404:
            return ModelUnavailableError(
                f"{self.name}: Ollama has no model {self.model!r} ({detail}); "
                f"run `ollama pull {self.model}`"
            )
        return super().refused(status, detail)


def _check_url(url: str, setting: str) -> None:
    """A TextApiSettingError for an endpoint no request can go to (retrying cannot help)."""
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except httpx.InvalidURL as exc:
        raise TextApiSettingError(f"{setting}: {url} is not a valid URL ({exc})") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host or not 0 < (port or 80) < 65536:
        raise TextApiSettingError(
            f"{setting}: {url} is not an http(s) URL with a host and port; write it as "
            "http://localhost:11434 or https://api.example.com/v1"
        )


def _as_matrix(rows: list[Any], name: str) -> np.ndarray:
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        raise TextEmbeddingError(f"{name}: embeddings that are not lists of numbers")
    widths = {len(row) for row in rows}
    if len(widths) > 1:
        raise TextEmbeddingError(f"{name}: vectors of different lengths in one answer: {widths}")
    try:
        return np.asarray(rows, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise TextEmbeddingError(f"{name}: embeddings that are not lists of numbers") from exc


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        text = " ".join(response.text.split())  # one line: an HTML error page has many
        return text[:200] or response.reason_phrase
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        error = error.get("message", error)
    return " ".join(str(error).split())[:200]


def _error_kind(response: httpx.Response) -> str:
    """`code`, else `type`, of an OpenAI-style {"error": {...}} body ("" without one)."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(error, dict):
        return ""
    return str(error.get("code") or error.get("type") or "")


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())
