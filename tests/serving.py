"""Helpers for the HTTP service tests: a loopback file server (with a 404), an app served by
a real uvicorn in a thread of the test process, and `imgembed serve` as a subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import uvicorn

from imgembed.api.protocol import IdleTimeoutProtocol

IMGEMBED = str(Path(sys.executable).with_name("imgembed"))
TINY_ENV = {"IMGEMBED_MODEL": "imgembed-tiny", "IMGEMBED_PRETRAINED": "seed:0"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FileServer:
    """Serves files by name from a dict over loopback HTTP; anything else is a 404."""

    def __init__(self, files: dict[str, bytes]):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = files.get(self.path.lstrip("/"))
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "image/jpeg" if body else "text/plain")
                payload = body if body is not None else b"not found"
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()


def wait_ready(
    base_url: str, process: subprocess.Popen | None = None, timeout=180, path="/ready"
) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            last = httpx.get(f"{base_url}{path}", timeout=10)
            if last.status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"{base_url} not ready: {last.text if last else 'no answer'}")


@contextlib.contextmanager
def serve_in_thread(app, ready="/ready") -> Iterator[str]:
    """The app on a real uvicorn server, in this process (so tests can patch the encoder);
    yielded once `ready` answers 200 ("/health" for a server that will not be ready)."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", http=IdleTimeoutProtocol
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, path=ready)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def serve_process(
    env: dict[str, str], log: Path, *args: str
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`imgembed serve` in a subprocess on a loopback port, its JSON logs in `log`; stopped
    with SIGTERM at the end (if the test has not stopped it)."""
    port = free_port()
    with log.open("w") as sink:
        process = subprocess.Popen(
            [IMGEMBED, "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            env={**os.environ, **TINY_ENV, **env},
            stdout=sink,
            stderr=sink,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process)
        yield base, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
