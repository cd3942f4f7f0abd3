"""URL intake against a real HTTP server on loopback: timeouts, redirects, size limits,
retries, status codes, content types, the private-address refusal and bounded concurrency."""

import base64
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from imgembed import (
    FetchError,
    ImageEmbeddingService,
    ImageTooLargeError,
    SourceNotAllowedError,
)
from imgembed.intake.fetch import Fetcher
from tests.conftest import TINY

FAST_RETRY = {"retry_delay": 0.01, "fetch_timeout": 2.0}


class ImageServer:
    """Routes: /photo.jpg, /slow.jpg, /redirect, /loop, /to/<host>, /big-declared.jpg,
    /big-streamed.jpg, /flaky.jpg (503 twice, then the photo), /missing.jpg (404),
    /page.html, /octet.jpg (application/octet-stream), /pause.jpg (0.3 s, counts overlap)."""

    def __init__(self, photo: bytes):
        self.photo = photo
        self.hits: Counter[str] = Counter()
        self.hosts: list[str] = []
        self.active = 0
        self.peak = 0
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
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            self._route(request, path)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should
        finally:
            with self._lock:
                self.active -= 1

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
            time.sleep(3)
            self._send(request, 200, self.photo)
        elif path == "/pause.jpg":
            time.sleep(0.3)
            self._send(request, 200, self.photo)
        elif path == "/redirect":
            self._send(request, 302, headers={"Location": "/photo.jpg"})
        elif path == "/loop":
            self._send(request, 302, headers={"Location": "/loop"})
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
        elif path == "/page.html":
            self._send(request, 200, b"<html>login</html>", "text/html; charset=utf-8")
        else:
            self._send(request, 404, b"not found", "text/plain")

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
    settings = {**TINY, "allow_private_urls": True, "retry_delay": 0.01}
    with ImageEmbeddingService(**settings, fetch_timeout=0.5, retry_attempts=2) as service:
        started = time.perf_counter()
        (result,) = service.embed_images([server.url("/slow.jpg")])
    assert isinstance(result.error, FetchError)
    assert "timed out" in str(result.error) and "after 2 attempts" in str(result.error)
    assert time.perf_counter() - started < 3
    assert server.hits["/slow.jpg"] == 2


def test_redirects_are_followed_and_bounded(server, service):
    ok, loop = service.embed_images([server.url("/redirect"), server.url("/loop")])
    assert ok.ok and server.hits["/photo.jpg"] == 1
    assert isinstance(loop.error, FetchError) and "redirects" in str(loop.error)


def test_oversize_bodies_are_refused_without_retry(server):
    settings = {**TINY, "allow_private_urls": True, **FAST_RETRY, "max_file_size": 1_000_000}
    with ImageEmbeddingService(**settings) as service:
        declared, streamed = service.embed_images(
            [server.url("/big-declared.jpg"), server.url("/big-streamed.jpg")]
        )
    assert isinstance(declared.error, ImageTooLargeError) and "announced" in str(declared.error)
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
    settings = {**TINY, "allow_private_urls": True, **FAST_RETRY, "max_concurrent_fetches": 3}
    urls = [server.url("/pause.jpg") for _ in range(12)]
    with ImageEmbeddingService(**settings, batch_size=12) as service:
        started = time.perf_counter()
        results = service.embed_images(urls)
        elapsed = time.perf_counter() - started
    assert all(r.ok for r in results)
    assert server.peak <= 3
    assert elapsed < 12 * 0.3  # but faster than one at a time


def test_malformed_urls_are_fetch_errors(service):
    bad = service.embed_images(["http://127.0.0.1:99999/x.jpg", "http://exa mple.com/x.jpg"])
    for result in bad:
        assert isinstance(result.error, FetchError), result.error


def test_batches_mix_paths_bytes_urls_and_data_uris(server, service, photos):
    uri = "data:image/png;base64," + base64.b64encode(photos[0].read_bytes()).decode()
    sources = [photos[0], photos[1].read_bytes(), server.url("/photo.jpg"), uri,
               server.url("/missing.jpg")]  # fmt: skip
    results = service.embed_images(sources)
    assert [r.ok for r in results] == [True, True, True, True, False]
    np.testing.assert_allclose(results[0].embedding, results[3].embedding, atol=1e-7)
    assert isinstance(results[4].error, FetchError)
