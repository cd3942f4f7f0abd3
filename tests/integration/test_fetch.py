"""URL intake against a real HTTP server on loopback: timeouts, redirects, size limits,
retries, status codes, content types, the private-address refusal and bounded concurrency."""

import base64
import contextlib
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from imgembed import (
    ConfigurationError,
    FetchError,
    ImageEmbeddingService,
    ImageTooLargeError,
    InvalidSourceError,
    SourceNotAllowedError,
)
from imgembed.intake.fetch import Fetcher, allow_all
from tests.conftest import TINY

FAST_RETRY = {"retry_delay": 0.01, "fetch_timeout": 2.0}


class ImageServer:
    """Routes: /photo.jpg, /slow.jpg, /redirect, /loop, /to/<host>, /big-declared.jpg,
    /big-streamed.jpg, /flaky.jpg (503 twice, then the photo), /busy.jpg (always 503),
    /missing.jpg (404), /page.html, /octet.jpg (application/octet-stream), /trickle.jpg and
    /trickle-headers.jpg (a byte every 50 ms of body or of headers, for a minute),
    /gate.jpg (answers only when GATE requests wait at once; measures their overlap)."""

    GATE = 3

    def __init__(self, photo: bytes):
        self.photo = photo
        self.hits: Counter[str] = Counter()
        self.hosts: list[str] = []
        self.waiting = 0  # requests at the gate: each holds one client connection
        self.peak = 0
        self._gate = threading.Barrier(self.GATE, timeout=60)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def serve(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path
        with self._lock:
            self.hits[path] += 1
            self.hosts.append(request.headers.get("Host", ""))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._route(request, path)  # a client may give up, as it should

    def _send(self, request, status, body=b"", content_type="image/jpeg", headers=None):
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.end_headers()
        request.wfile.write(body)

    def _route(self, request, path):
        if path == "/photo.jpg":
            self._send(request, 200, self.photo)
        elif path == "/octet.jpg":
            self._send(request, 200, self.photo, "application/octet-stream")
        elif path == "/slow.jpg":
            time.sleep(20)
            self._send(request, 200, self.photo)
        elif path == "/gate.jpg":
            self._pass_gate()
            self._send(request, 200, self.photo)
        elif path == "/trickle.jpg":
            request.send_response(200)
            request.send_header("Content-Type", "image/jpeg")
            request.send_header("Content-Length", str(len(self.photo)))
            request.end_headers()
            self._trickle(request, self.photo)
        elif path == "/trickle-headers.jpg":
            self._trickle(request, b"HTTP/1.1 200 OK\r\nX-Padding: " + b"x" * 10_000)
        elif path == "/redirect":
            self._send(request, 302, headers={"Location": "/photo.jpg"})
        elif path == "/loop":
            self._send(request, 302, headers={"Location": "/loop"})
        elif path == "/to-nowhere":
            self._send(request, 302, headers={"Location": "http://127.0.0.1:99999/x.jpg"})
        elif path.startswith("/to/"):
            target = f"http://{path.removeprefix('/to/')}:{self.port}/photo.jpg"
            self._send(request, 302, headers={"Location": target})
        elif path == "/big-declared.jpg":
            request.send_response(200)
            request.send_header("Content-Type", "image/jpeg")
            request.send_header("Content-Length", str(50_000_000))
            request.end_headers()
        elif path == "/big-streamed.jpg":
            request.send_response(200)
            request.send_header("Content-Type", "image/jpeg")
            request.end_headers()  # no length: HTTP/1.0 streams until close
            for _ in range(200):
                request.wfile.write(b"\xff" * 65536)
        elif path == "/flaky.jpg":
            if self.hits[path] <= 2:
                self._send(request, 503, b"busy", "text/plain")
            else:
                self._send(request, 200, self.photo)
        elif path == "/busy.jpg":
            self._send(request, 503, b"busy", "text/plain")
        elif path == "/page.html":
            self._send(request, 200, b"<html>login</html>", "text/html; charset=utf-8")
        else:
            self._send(request, 404, b"not found", "text/plain")

    def _trickle(self, request, data: bytes) -> None:
        """A byte every 50 ms for a minute: each read is quick, the whole never ends."""
        for i in range(min(len(data), 1200)):
            request.wfile.write(data[i : i + 1])
            time.sleep(0.05)

    def _pass_gate(self) -> None:
        """Counted from the request's arrival until before its answer: the client is waiting
        on its connection all that time, so the count never exceeds the connections it holds,
        whatever the scheduling. The barrier lets requests through only GATE at a time, so a
        client that cannot hold GATE connections at once fails (the barrier breaks)."""
        with self._lock:
            self.waiting += 1
            self.peak = max(self.peak, self.waiting)
        try:
            self._gate.wait()
        finally:
            with self._lock:
                self.waiting -= 1

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(photos):
    photo = next(p for p in photos if p.suffix == ".jpg")
    image_server = ImageServer(photo.read_bytes())
    yield image_server
    image_server.close()


@pytest.fixture
def service():
    with ImageEmbeddingService(**TINY, allow_private_urls=True, **FAST_RETRY) as s:
        yield s


def test_private_addresses_are_refused_by_default(server):
    with ImageEmbeddingService(**TINY) as service:
        (result,) = service.embed_images([server.url("/photo.jpg")])
    assert isinstance(result.error, SourceNotAllowedError)
    assert "IMGEMBED_ALLOW_PRIVATE_URLS" in str(result.error)
    assert server.hits["/photo.jpg"] == 0  # refused before connecting


def test_url_embeds_like_the_file(server, service, photos):
    photo = next(p for p in photos if p.suffix == ".jpg")
    from_url = service.embed_image(server.url("/photo.jpg"))
    np.testing.assert_allclose(from_url, service.embed_image(photo), atol=1e-7)
    assert service.embed_images([server.url("/octet.jpg")])[0].ok


async def test_generate_embedding_from_url(server, service):
    vector = await service.generate_embedding_from_url(server.url("/photo.jpg"))
    assert isinstance(vector, list) and len(vector) == 64
    detailed = await service.generate_embedding_from_url(
        server.url("/photo.jpg"), include_metadata=True
    )
    assert detailed["image_path"] == server.url("/photo.jpg")
    assert detailed["metadata"]["format"] == "JPEG"


def test_slow_response_times_out_and_is_retried(server):
    settings = {**TINY, "allow_private_urls": True, "retry_delay": 0.01, "fetch_deadline": 15}
    with ImageEmbeddingService(**settings, fetch_timeout=0.5, retry_attempts=2) as service:
        service.encoder  # noqa: B018 - load the model first: we time the download
        started = time.perf_counter()
        (result,) = service.embed_images([server.url("/slow.jpg")])
    assert isinstance(result.error, FetchError)
    assert "timed out" in str(result.error) and "after 2 attempts" in str(result.error)
    assert time.perf_counter() - started < 12  # the answer would come after 20 s
    assert server.hits["/slow.jpg"] == 2


def test_the_deadline_setting(monkeypatch):
    with ImageEmbeddingService(**TINY, fetch_timeout=12) as service:
        assert service.intake.fetcher.deadline == 12  # by default, the fetch timeout
    monkeypatch.setenv("IMGEMBED_FETCH_DEADLINE", "45")
    with ImageEmbeddingService(**TINY) as service:
        assert service.intake.fetcher.deadline == 45
    with pytest.raises(ConfigurationError, match="fetch_deadline"):
        ImageEmbeddingService(**TINY, fetch_deadline=0)


@pytest.mark.parametrize("path", ["/trickle.jpg", "/trickle-headers.jpg"])
def test_deadline_stops_a_trickling_download(server, path):
    """Every read returns within the per-read timeout; only the deadline ends it."""
    fetcher = Fetcher(max_bytes=10**7, address_allowed=allow_all, timeout=5, deadline=1.5)
    started = time.perf_counter()
    with pytest.raises(FetchError, match=r"deadline of 1\.5 s \(fetch_deadline; 1 attempt\)"):
        fetcher.fetch(server.url(path))
    elapsed = time.perf_counter() - started
    assert 1.5 <= elapsed < 10  # the server would trickle for a minute
    assert server.hits[path] == 1  # no retry once the deadline has passed
    assert fetcher.fetch(server.url("/photo.jpg")) == server.photo  # the client still works
    fetcher.close()


def test_close_ends_a_download_in_progress(server):
    """A server stopping must not wait on a slow download: the thread waiting on it gets a
    FetchError at once (else the process hangs at exit joining that thread)."""
    fetcher = Fetcher(max_bytes=10**7, address_allowed=allow_all, timeout=60)
    outcome = []

    def download():
        try:
            fetcher.fetch(server.url("/trickle.jpg"))
        except FetchError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=download)
    thread.start()
    while not server.hits.get("/trickle.jpg"):
        time.sleep(0.01)
    fetcher.close()
    thread.join(timeout=20)
    assert not thread.is_alive()  # the trickle would last a minute
    assert "the service stopped meanwhile" in str(outcome[0])
    with pytest.raises(FetchError, match="the service is stopping"):
        fetcher.fetch(server.url("/photo.jpg"))


def test_retries_stay_within_the_deadline(server):
    """Back-off never sleeps past the deadline: without it, 10 attempts would take minutes."""
    fetcher = Fetcher(
        max_bytes=10**7, address_allowed=allow_all, deadline=2, attempts=10, retry_delay=0.4
    )
    started = time.perf_counter()
    # Usually the back-off stops first (0.4 + 0.8 s fit in 2 s, 1.6 more do not); on a very
    # busy machine the deadline may end the last attempt instead.
    with pytest.raises(FetchError, match=r"503 \(after [1-3] attempts?\)|deadline of 2 s"):
        fetcher.fetch(server.url("/busy.jpg"))
    assert time.perf_counter() - started < 6
    assert 1 <= server.hits["/busy.jpg"] <= 3
    fetcher.close()


def test_a_trickling_url_holds_its_batch_only_until_the_deadline(server):
    """Ten good URLs and two trickling ones, over several chunks: the batch ends soon after
    the deadline, every good URL embedded, the trickling ones failed with the deadline."""
    settings = {**TINY, "allow_private_urls": True, "fetch_timeout": 5, "fetch_deadline": 2}
    good = [server.url("/photo.jpg")] * 10
    urls = [server.url("/trickle.jpg"), *good[:5], server.url("/trickle-headers.jpg"), *good[5:]]
    with ImageEmbeddingService(**settings, batch_size=4) as service:
        service.encoder  # noqa: B018 - load the model first: we time the batch
        started = time.perf_counter()
        results = service.embed_images(urls)
        elapsed = time.perf_counter() - started
        expected = service.embed_image(server.photo)
    slow = [results[0], results[6]]
    assert all(isinstance(r.error, FetchError) and "fetch_deadline" in str(r.error) for r in slow)
    good = results[1:6] + results[7:]
    assert [r.ok for r in good] == [True] * 10
    np.testing.assert_allclose(np.stack([r.embedding for r in good]), [expected] * 10, atol=1e-6)
    assert 2 <= elapsed < 15  # not the minute the two servers would trickle for


def test_redirects_are_followed_and_bounded(server, service):
    ok, loop = service.embed_images([server.url("/redirect"), server.url("/loop")])
    assert ok.ok and server.hits["/photo.jpg"] == 1
    assert isinstance(loop.error, FetchError) and "redirects" in str(loop.error)


def test_a_malformed_url_is_the_callers_error_a_bad_redirect_the_servers(server, service):
    port, host, redirect = service.embed_images(
        ["http://127.0.0.1:99999/x.png", "http:///x.png", server.url("/to-nowhere")]
    )
    assert isinstance(port.error, InvalidSourceError) and "Port out of range" in str(port.error)
    assert isinstance(host.error, InvalidSourceError) and "with a host" in str(host.error)
    assert type(redirect.error) is FetchError  # the server sent it there: a 502, not a 422


def test_oversize_bodies_are_refused_without_retry(server):
    settings = {**TINY, "allow_private_urls": True, **FAST_RETRY, "max_file_size": 1_000_000}
    with ImageEmbeddingService(**settings) as service:
        declared, streamed = service.embed_images(
            [server.url("/big-declared.jpg"), server.url("/big-streamed.jpg")]
        )
    assert isinstance(declared.error, ImageTooLargeError)
    assert "50,000,000 bytes announced, over the limit of 1,000,000" in str(declared.error)
    assert isinstance(streamed.error, ImageTooLargeError) and "passed" in str(streamed.error)
    assert server.hits["/big-declared.jpg"] == server.hits["/big-streamed.jpg"] == 1


def test_transient_errors_are_retried_until_success(server, service):
    (result,) = service.embed_images([server.url("/flaky.jpg")])
    assert result.ok
    assert server.hits["/flaky.jpg"] == 3  # 503, 503, 200 within the default 3 attempts


def test_retries_run_out_with_the_last_status(server):
    settings = {**TINY, "allow_private_urls": True, **FAST_RETRY, "retry_attempts": 2}
    with ImageEmbeddingService(**settings) as service:
        (result,) = service.embed_images([server.url("/flaky.jpg")])
    assert isinstance(result.error, FetchError) and result.error.status == 503
    assert server.hits["/flaky.jpg"] == 2


def test_client_errors_are_not_retried(server, service):
    missing, page = service.embed_images([server.url("/missing.jpg"), server.url("/page.html")])
    assert isinstance(missing.error, FetchError) and missing.error.status == 404
    assert server.hits["/missing.jpg"] == 1
    assert isinstance(page.error, FetchError) and "text/html is not an image" in str(page.error)
    assert server.hits["/page.html"] == 1


def test_every_redirect_is_checked(server):
    """127.0.0.1 stands in for a public address, 127.0.0.2 for a private one."""
    fetcher = Fetcher(max_bytes=10**7, address_allowed=lambda a: str(a) == "127.0.0.1")
    assert fetcher.fetch(server.url("/photo.jpg")) == server.photo
    with pytest.raises(SourceNotAllowedError, match=r"127\.0\.0\.2"):
        fetcher.fetch(server.url("/to/127.0.0.2"))
    assert server.hits["/photo.jpg"] == 1  # the redirect target was never requested
    fetcher.close()


def test_requests_go_to_the_checked_address_with_the_original_host(server):
    """DNS is resolved once and the connection goes to that address, so a second
    lookup cannot switch it (DNS rebinding); the Host header keeps the name."""
    lookups = []

    def resolve(host, port):
        lookups.append(host)
        return ["127.0.0.1"]

    fetcher = Fetcher(max_bytes=10**7, address_allowed=lambda a: True, resolve=resolve)
    url = server.url("/photo.jpg", host="images.shop.example")
    assert fetcher.fetch(url) == server.photo
    assert lookups == ["images.shop.example"]
    assert server.hosts[-1] == f"images.shop.example:{server.port}"
    fetcher.close()


def test_many_urls_use_bounded_connections(server):
    """Exactly GATE downloads at once: never more (the peak), and really that many (the gate
    opens only for GATE waiting requests). No timing is involved."""
    settings = {**TINY, "allow_private_urls": True, "fetch_timeout": 60, "fetch_deadline": 120}
    urls = [server.url("/gate.jpg") for _ in range(4 * server.GATE)]
    with ImageEmbeddingService(**settings, max_concurrent_fetches=server.GATE) as service:
        results = service.embed_images(urls)
    assert all(r.ok for r in results), [str(r.error) for r in results if r.error]
    assert server.peak == server.GATE
    assert server.hits["/gate.jpg"] == len(urls)


def test_batches_mix_paths_bytes_urls_and_data_uris(server, service, photos):
    uri = "data:image/png;base64," + base64.b64encode(photos[0].read_bytes()).decode()
    sources = [photos[0], photos[1].read_bytes(), server.url("/photo.jpg"), uri,
               server.url("/missing.jpg")]  # fmt: skip
    results = service.embed_images(sources)
    assert [r.ok for r in results] == [True, True, True, True, False]
    np.testing.assert_allclose(results[0].embedding, results[3].embedding, atol=1e-7)
    assert isinstance(results[4].error, FetchError)
