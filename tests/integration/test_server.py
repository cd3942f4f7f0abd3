"""`imgembed serve` as a real process on a loopback port: the endpoints over real HTTP, the
OpenAI SDK as a client, error statuses from real bad inputs, JSON access logs, several
workers, and a graceful SIGTERM (in-flight requests finish, then the process exits)."""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from imgembed.store import embedded
from tests.conftest import TESTDATA
from tests.serving import IMGEMBED, TINY_ENV, FileServer, serve_process

KEY = "test-key-7f3a9c"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def root(photos, tmp_path) -> Path:
    folder = tmp_path / "root"
    folder.mkdir()
    for path in photos:
        shutil.copy(path, folder / path.name)
    shutil.copy(TESTDATA / "pillow" / "broken.png", folder / "broken.png")
    return folder


def _cos(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_serve_end_to_end_with_the_openai_sdk_and_a_graceful_sigterm(
    data_dir, root, large_jpegs, tmp_path
):
    from openai import OpenAI, UnprocessableEntityError

    files = FileServer({"photo.jpg": (root / "rocket.jpg").read_bytes()})
    log = tmp_path / "server.log"
    env = {
        "IMGEMBED_ALLOWED_ROOTS": os.pathsep.join([str(root), str(TESTDATA.resolve())]),
        "IMGEMBED_ALLOW_PRIVATE_URLS": "true",  # the loopback file server
        "IMGEMBED_RETRY_DELAY": "0.01",
        "IMGEMBED_API_KEYS": KEY,
        "IMGEMBED_MAX_BODY_SIZE": str(2_000_000),
        "IMGEMBED_CACHE_EMBEDDINGS": "false",
        "IMGEMBED_EXACT": "true",  # full decodes: the in-flight batch below takes a while
    }
    try:
        with serve_process(env, log) as (base, process):
            http = httpx.Client(base_url=base, headers=AUTH, timeout=120)
            assert httpx.get(f"{base}/health").json() == {"status": "ok"}
            assert (
                httpx.post(f"{base}/api/v1/embeddings/text", json={"texts": ["x"]}).status_code
                == 401
            )

            one = http.post(
                "/api/v1/embeddings/image", json={"image_path": str(root / "rocket.jpg")}
            )
            assert one.status_code == 200 and one.json()["dimension"] == 64
            request_id = one.headers["x-request-id"]
            url = http.post("/api/v1/embeddings/image", json={"image_url": files.url("photo.jpg")})
            np.testing.assert_allclose(url.json()["embedding"], one.json()["embedding"], atol=1e-6)
            gone = http.post("/api/v1/embeddings/image", json={"image_url": files.url("nope.jpg")})
            assert gone.status_code == 502 and gone.json()["error_type"] == "FetchError"
            outside = http.post("/api/v1/embeddings/image", json={"image_path": "/etc/hostname"})
            assert outside.status_code == 403
            broken = http.post(
                "/api/v1/embeddings/image",
                files={"file": ("broken.png", (root / "broken.png").read_bytes())},
            )
            assert broken.status_code == 400 and broken.json()["error_type"] == "InvalidImageError"
            big = http.post("/api/v1/embeddings/image", json={"image_base64": "A" * 2_500_000})
            assert big.status_code == 413
            batch = http.post(
                "/api/v1/embeddings/image/batch",
                files=[("files", (p.name, p.read_bytes())) for p in
                       (root / "coffee.png", root / "broken.png", root / "chelsea.png")],
            ).json()  # fmt: skip
            assert [r["error_type"] for r in batch["results"]] == [None, "InvalidImageError", None]

            sdk = OpenAI(base_url=f"{base}/v1", api_key=KEY)
            assert [m.id for m in sdk.models.list()] == ["imgembed-tiny"]
            photo = (
                "data:image/jpeg;base64,"
                + base64.b64encode((root / "rocket.jpg").read_bytes()).decode()
            )
            answer = sdk.embeddings.create(model="imgembed-tiny", input=["a cat", photo])
            assert answer.usage.prompt_tokens == answer.usage.total_tokens == 4  # the photo: 0
            texts = http.post("/api/v1/embeddings/text", json={"texts": ["a cat"]}).json()
            assert _cos(answer.data[0].embedding, texts["embeddings"][0]) >= 0.99999
            assert _cos(answer.data[1].embedding, one.json()["embedding"]) >= 0.99999
            floats = sdk.embeddings.create(
                model="imgembed-tiny", input="a cat", encoding_format="float"
            )
            np.testing.assert_allclose(
                floats.data[0].embedding, answer.data[0].embedding, atol=1e-6
            )
            with pytest.raises(UnprocessableEntityError, match="64 dimensions"):
                sdk.embeddings.create(model="imgembed-tiny", input="a cat", dimensions=8)

            created = http.post("/api/v1/collections", json={"name": "photos"})
            assert created.status_code == 201
            job = http.post("/api/v1/collections/photos/index", json={"sources": [str(root)]})
            for _ in range(600):
                state = http.get(job.json()["url"]).json()
                if state["status"] == "done":
                    break
                time.sleep(0.1)
            assert state["stats"]["successful"] == 6 and state["stats"]["failed"] == 1
            hits = http.post("/api/v1/search/image", json={
                "query_image_path": str(root / "chelsea.png"), "collection": "photos", "top_k": 1,
            }).json()["results"]  # fmt: skip
            assert hits[0]["image_path"] == str(root / "chelsea.png")
            assert "imgembed_requests_total" in http.get("/metrics").text

            # SIGTERM while a slow batch is in flight: it finishes, then the process exits.
            slow = [str(p) for p in large_jpegs] * 4
            outcome = {}

            def long_request():
                outcome["response"] = http.post(
                    "/api/v1/embeddings/image/batch", json={"image_paths": slow}
                )

            thread = threading.Thread(target=long_request)
            thread.start()
            for _ in range(300):
                metrics = http.get("/metrics").text
                if "imgembed_inputs_in_flight 0.0" not in metrics:
                    break
                time.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            thread.join(timeout=120)
            response = outcome["response"]
            assert response.status_code == 200
            assert response.json()["successful"] == len(slow)
            _exited_after_sigterm(process)
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{base}/health")
            # its only user gone, the embedded server stopped (it stayed up after a SIGTERM)
            assert not embedded.status(data_dir).running
    finally:
        files.close()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "imgembed.access"]
    assert any(line["request_id"] == request_id and line["status"] == 200 for line in access)
    assert {"method", "path", "route", "status", "duration_ms", "client"} <= access[0].keys()
    assert KEY not in log.read_text()
    # the order of events: SIGTERM, the in-flight batch answered, then the app shut down
    messages = [line.get("request_id") or line["message"] for line in lines]
    slow_id = response.headers["x-request-id"]
    shutdown = messages.index("Shutting down")
    assert shutdown < messages.index(slow_id) < messages.index("Application shutdown complete.")


def _exited_after_sigterm(process: subprocess.Popen) -> None:
    """uvicorn finishes its graceful shutdown, then re-raises SIGTERM on itself: a stop
    asked for and done is exit 0 (the process's exit handlers let the store go)."""
    assert process.wait(timeout=60) == 0


def test_a_request_still_running_after_the_shutdown_grace_gets_a_503(data_dir, tmp_path):
    """SIGTERM with a download that never ends in flight: after IMGEMBED_SHUTDOWN_TIMEOUT the
    request is answered 503 + Retry-After (JSON, no traceback), and the process exits 0 and
    lets the embedded server go (the download's thread used to keep it alive for good)."""
    silent = socket.socket()  # accepts connections (backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/photo.jpg"
    env = {"IMGEMBED_ALLOW_PRIVATE_URLS": "true", "IMGEMBED_FETCH_TIMEOUT": "300",
           "IMGEMBED_SHUTDOWN_TIMEOUT": "1"}  # fmt: skip
    log = tmp_path / "server.log"
    with serve_process(env, log) as (base, process):
        assert httpx.get(f"{base}/ready").json()["store"] is True  # the store is in use
        outcome = {}

        def stuck_request():
            outcome["response"] = httpx.post(
                f"{base}/api/v1/embeddings/image", json={"image_url": url}, timeout=120
            )

        thread = threading.Thread(target=stuck_request)
        thread.start()
        while "imgembed_inputs_in_flight 1.0" not in httpx.get(f"{base}/metrics").text:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        thread.join(timeout=120)
        response = outcome["response"]
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"].startswith("the server shut down before this request")
        _exited_after_sigterm(process)
        assert not embedded.status(data_dir).running
    silent.close()
    assert "Traceback" not in log.read_text()


def test_serve_with_two_workers(data_dir, root, tmp_path):
    env = {"IMGEMBED_ALLOWED_ROOTS": str(root)}
    with serve_process(env, tmp_path / "log", "--workers", "2") as (base, process):
        workers = [p for p in psutil.Process(process.pid).children() if "python" in p.name()]
        assert len(workers) >= 2
        assert embedded.status(data_dir).running  # /ready asked the store
        statuses = []
        deadline = time.monotonic() + 120
        while statuses[-10:] != [200] * 10 and time.monotonic() < deadline:
            response = httpx.post(
                f"{base}/api/v1/embeddings/image", json={"image_path": str(root / "rocket.jpg")}
            )
            statuses.append(response.status_code)
            assert response.status_code in (200, 503), response.text  # 503: still loading
        assert statuses[-10:] == [200] * 10
        # a job is known to every answer, whichever process took it (before: mostly 404)
        index = f"{base}/api/v1/collections/w2/index"
        job = httpx.post(index, json={"sources": [str(root)]}, timeout=60).json()
        answers = [httpx.get(f"{base}{job['url']}", timeout=60) for _ in range(8)]
        assert [answer.status_code for answer in answers] == [200] * 8
        deadline = time.monotonic() + 120
        while httpx.get(f"{base}{job['url']}", timeout=60).json()["status"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for _ in range(6):
            listed = httpx.get(f"{base}/api/v1/jobs", timeout=60).json()["jobs"]
            assert [j["job_id"] for j in listed] == [job["job_id"]]
        # /metrics sums the workers, whichever answers (before: each its own share)
        listings = 'imgembed_requests_total{method="GET",route="/api/v1/jobs",status="200"} 6.0'
        for _ in range(6):
            assert listings in httpx.get(f"{base}/metrics", timeout=60).text.splitlines()
        process.send_signal(signal.SIGTERM)
        _exited_after_sigterm(process)
        psutil.wait_procs(workers, timeout=30)
        assert not any(worker.is_running() for worker in workers)
        # the workers (ended by uvicorn's re-raised SIGTERM, no exit handlers) let it go
        assert embedded.status(data_dir).running is False


def test_serve_refuses_settings_that_cannot_work(tmp_path):
    env = {**os.environ, **TINY_ENV, "IMGEMBED_MODEL": "no-such-architecture"}
    proc = subprocess.run(
        [IMGEMBED, "serve", "--port", "0"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 4 and "unknown model architecture" in proc.stderr
    env = {**os.environ, **TINY_ENV, "IMGEMBED_QUEUE_SIZE": "100"}
    proc = subprocess.run(
        [IMGEMBED, "serve", "--port", "0"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "IMGEMBED_QUEUE_SIZE=100 is under" in proc.stderr
    with socket.socket() as taken:  # a port in use: said at once, before the model loads
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        proc = subprocess.run(
            [IMGEMBED, "serve", "--port", port], env={**os.environ, **TINY_ENV},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in proc.stderr
    assert "loading imgembed-tiny" not in proc.stderr


def test_serve_takes_the_hard_limit_of_open_files():
    """At a soft limit of 1,024 a few idle connections made the server refuse everyone."""
    import resource

    from imgembed.cli.serve_command import MAX_OPEN_FILES, _more_open_files

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        _more_open_files()
        unlimited = hard == resource.RLIM_INFINITY
        expected = MAX_OPEN_FILES if unlimited else min(hard, MAX_OPEN_FILES)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (expected, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_serve_refuses_workers_that_cannot_share_local_qdrant_files(tmp_path):
    """Each worker is a process; Qdrant's local files serve one: the first worker held them
    and every request the other took that touched the store was a 409 StoreBusyError
    ("wait for it to finish"), for as long as the server ran."""
    env = {**os.environ, **TINY_ENV, "IMGEMBED_STORE": "qdrant", "IMGEMBED_WORKERS": "2"}
    proc = subprocess.run(
        [IMGEMBED, "serve", "--port", "0"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3, proc.stderr
    assert "2 processes cannot share Qdrant's local files" in proc.stderr
    assert "--workers 1, or set IMGEMBED_QDRANT_URL" in proc.stderr
