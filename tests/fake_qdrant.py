"""A Qdrant server faked at the socket: it answers what QdrantStore asks (a registry that
knows one collection, searches and upserts that find and store nothing), and the requests
whose path holds `trickle` get their answer one byte at a time, each well within a read
timeout, without end: a server broken in the way a per-read timeout never notices."""

from __future__ import annotations

import json
import socket
import threading
import time

from imgembed.store.qdrant_local import REGISTRY

PROVENANCE = {"model": "tiny", "pretrained": "seeded", "dimension": 4, "preprocess": "p1"}


class FakeQdrant:
    def __init__(self, trickle: str | None = None, every: float = 0.2, version: str = "1.20.0"):
        self.trickle = trickle  # a part of "METHOD /path" (" /" for every request)
        self.every = every
        self.version = version  # the server's, or "" for a root page that is not Qdrant's
        self.cut = threading.Event()  # the client closed a trickled connection
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # to see `_stop`
        self._threads: list[threading.Thread] = []
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def __enter__(self) -> FakeQdrant:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._accepting.join(5)
        self._listener.close()
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while (request := _read_request(conn)) is not None:
                method, path = request
                if self.trickle and self.trickle in f"{method} {path}":
                    self._trickle(conn)
                    return
                if path == "/":
                    answer = {"title": "qdrant - vector search engine", "version": self.version}
                    status = "200 OK" if self.version else "404 Not Found"
                else:
                    answer, status = _answer(method, path), "200 OK"
                body = json.dumps(answer).encode()
                head = (
                    f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(body)}\r\n\r\n"
                )
                conn.sendall(head.encode() + body)

    def _trickle(self, conn: socket.socket) -> None:
        data = b"HTTP/1.1 200 OK\r\nx-padding: "
        sent = 0
        while not self._stop.is_set():
            try:
                conn.sendall(data[sent : sent + 1] if sent < len(data) else b"a")
            except OSError:
                self.cut.set()
                return
            sent += 1
            time.sleep(self.every)


def _read_request(conn: socket.socket) -> tuple[str, str] | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        (int(line.split(":", 1)[1]) for line in lines[1:]
         if line.lower().startswith("content-length:")),
        0,
    )  # fmt: skip
    while len(body) < length:
        body += conn.recv(65536)
    method, target, _ = lines[0].split(" ", 2)
    return method, target.split("?", 1)[0]


def _answer(method: str, path: str) -> dict:
    result: object = True
    if path.endswith("/exists"):
        result = {"exists": True}
    elif path == f"/collections/{REGISTRY}/points" and method == "POST":  # retrieve
        point_id = "00000000-0000-0000-0000-000000000000"
        result = [{"id": point_id, "payload": {"name": "photos", **PROVENANCE}}]
    elif path.endswith("/points/query"):
        result = {"points": []}
    elif path.endswith("/points") and method == "PUT":  # upsert
        result = {"operation_id": 1, "status": "completed"}
    return {"result": result, "status": "ok", "time": 0.0}
