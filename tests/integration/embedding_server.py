"""A loopback server that speaks the OpenAI embeddings API (`POST /v1/embeddings`) and
Ollama's (`POST /api/embed`), with scripted failures. Vectors are deterministic per text
(seeded by its hash) and deliberately not unit length, so normalisation is tested too."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


def vector(text: str, dimension: int) -> np.ndarray:
    if "ZERO-VECTOR" in text:  # what a broken model answers for an odd text
        return np.zeros(dimension)
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dimension) * 3


class EmbeddingServer:
    """`script` holds what the next requests get, in order: ("status", code, headers[, error]),
    ("sleep", seconds), ("dimension", n), ("raw", code, body, headers) (a body as given: JSON
    of the wrong shape, NaN, a redirect), ("trickle", seconds) (a valid answer, a byte at a
    time) or ("endless",) (a body that goes on for 64 MiB, then breaks off); when it is
    empty, embeddings of `dimension`."""

    def __init__(self, dimension: int = 16):
        self.dimension = dimension
        self.script: list[tuple] = []
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                server.serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def serve(self, request: BaseHTTPRequestHandler) -> None:
        body = json.loads(request.rfile.read(int(request.headers["Content-Length"])))
        with self._lock:
            self.requests.append(
                {
                    "path": request.path,
                    "body": body,
                    "at": time.monotonic(),
                    "auth": request.headers.get("Authorization"),
                }
            )
            action = self.script.pop(0) if self.script else ("dimension", self.dimension)
        try:
            if action[0] == "sleep":
                time.sleep(action[1])
                action = ("dimension", self.dimension)
            if action[0] == "status":  # ("status", code, headers[, more fields of the error])
                _, code, headers, *more = action
                error = {"message": f"scripted {code}", **(more[0] if more else {})}
                self._send(request, code, {"error": error}, headers)
            elif action[0] == "html":  # ("html", code, page): a proxy's error page
                page = action[2].encode()
                request.send_response(action[1])
                request.send_header("Content-Type", "text/html")
                request.send_header("Content-Length", str(len(page)))
                request.end_headers()
                request.wfile.write(page)
            elif action[0] == "raw":  # ("raw", code, body, headers)
                _, code, body, headers = action
                self._send(request, code, body, headers)
            elif action[0] == "trickle":  # a valid answer whose bytes come one at a time
                data = [{"index": 0, "embedding": [1.0] * self.dimension}]  # for one text
                payload = json.dumps({"data": data}).encode()
                request.send_response(200)
                request.send_header("Content-Type", "application/json")
                request.send_header("Content-Length", str(len(payload)))
                request.end_headers()
                for byte in payload:
                    request.wfile.write(bytes([byte]))
                    request.wfile.flush()
                    time.sleep(action[1])
            elif action[0] == "endless":  # a body that never ends (until the client leaves)
                request.send_response(200)
                request.send_header("Content-Type", "application/json")
                request.send_header("Transfer-Encoding", "chunked")
                request.end_headers()
                chunk = b" " * 65536
                for _ in range(1024):  # 64 MiB, then the connection breaks off
                    request.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            elif request.path == "/v1/embeddings":
                data = [
                    {
                        "object": "embedding",
                        "index": i,
                        "embedding": vector(text, action[1]).tolist(),
                    }
                    for i, text in enumerate(body["input"])
                ]
                data.reverse()  # the index decides the order, not the position
                self._send(request, 200, {"object": "list", "data": data, "model": body["model"]})
            elif request.path == "/api/embed":
                embeddings = [vector(text, action[1]).tolist() for text in body["input"]]
                self._send(request, 200, {"model": body["model"], "embeddings": embeddings})
            else:
                self._send(request, 404, {"error": "not found"})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)

    @staticmethod
    def _send(request, status: int, payload: object, headers: dict | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.end_headers()
        request.wfile.write(data)
