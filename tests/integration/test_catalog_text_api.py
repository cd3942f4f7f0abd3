"""Text embedders behind HTTP against a loopback server that speaks the OpenAI embeddings API
and Ollama's: batching, retries with backoff on 429/5xx (Retry-After respected), a rejected
key, a dimension change, timeouts, an unreachable server, an unknown model."""

import json
import socket
import threading
import time

import numpy as np
import pytest

from imgembed.catalog.text import create_text_embedder
from imgembed.catalog.text_api import OllamaEmbedder, OpenAIEmbedder
from imgembed.config import load_settings
from imgembed.errors import ConfigurationError, ModelUnavailableError, TextEmbeddingError
from tests.integration.embedding_server import EmbeddingServer, vector


@pytest.fixture
def server():
    server = EmbeddingServer(dimension=16)
    yield server
    server.close()


def _openai(server, model="test-embed", **overrides):
    settings = load_settings(
        **{
            "text_api_base": f"{server.url}/v1",
            "openai_api_key": "sk-test",
            "retry_delay": 0.01,
            "text_batch_size": 2,
            **overrides,
        }
    )
    return OpenAIEmbedder(model, settings)


def _unit(v):
    return v / np.linalg.norm(v)


def test_batches_order_and_normalisation(server):
    embedder = _openai(server)
    texts = ["rode jurk", "blauwe lamp", "gouden ring", "zwarte tas", "witte vaas"]
    vectors = embedder.embed(texts)
    assert vectors.shape == (5, 16) and vectors.dtype == np.float32
    expected = np.stack([_unit(vector(t, 16)) for t in texts])
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    assert [len(r["body"]["input"]) for r in server.requests] == [2, 2, 1]
    first = server.requests[0]
    assert first["path"] == "/v1/embeddings" and first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "test-embed" and first["body"]["encoding_format"] == "float"
    assert embedder.dimension() == 16 and embedder.name == "openai:test-embed"
    embedder.close()


def test_an_unusable_vector_names_its_text_and_keeps_the_others(server):
    from imgembed.catalog.text_vectors import UnusableRowsError

    embedder = _openai(server)  # two texts per request: the odd one is in the second
    texts = ["rode jurk", "blauwe lamp", "ZERO-VECTOR lamp", "zwarte tas", "witte vaas"]
    with pytest.raises(UnusableRowsError) as caught:
        embedder.embed(texts)
    assert caught.value.bad == [2] and "for 1 of 5 texts" in str(caught.value)
    good = [0, 1, 3, 4]
    expected = np.stack([_unit(vector(texts[i], 16)) for i in good])
    np.testing.assert_allclose(caught.value.vectors[good], expected, atol=1e-6)
    assert len(server.requests) == 3  # no request was made again
    embedder.close()


def test_429_then_success_respects_retry_after(server):
    server.script = [("status", 429, {"Retry-After": "0.5"})]
    embedder = _openai(server)
    vectors = embedder.embed(["a"])
    np.testing.assert_allclose(vectors[0], _unit(vector("a", 16)), atol=1e-6)
    first, second = server.requests
    assert second["at"] - first["at"] >= 0.5  # waited as told, not the 0.01 s backoff
    embedder.close()


def test_5xx_is_retried_three_times_then_a_typed_error(server):
    server.script = [("status", 503, {})] * 4
    embedder = _openai(server)
    with pytest.raises(TextEmbeddingError, match=r"answered 503.*gave up after 4 attempts") as exc:
        embedder.embed(["a"])
    assert exc.value.status == 503 and len(server.requests) == 4
    server.script = [("status", 502, {}), ("status", 500, {})]
    assert embedder.embed(["b"]).shape == (1, 16)  # two failures, then success
    # a proxy's HTML error page: one line in the message (and in each retry's warning)
    page = "<html>\n<body>\n<h1>Bad Gateway</h1>\n</body>\n</html>\n"
    server.script = [("html", 502, page)] * 4
    with pytest.raises(TextEmbeddingError, match="<html> <body> <h1>Bad Gateway</h1>") as exc:
        embedder.embed(["c"])
    assert "\n" not in str(exc.value)
    embedder.close()


def test_401_is_a_configuration_error_without_retries(server):
    server.script = [("status", 401, {})]
    embedder = _openai(server)
    with pytest.raises(ConfigurationError, match=r"refused the API key \(401.*OPENAI_API_KEY"):
        embedder.embed(["a"])
    assert len(server.requests) == 1
    server.script = [("status", 400, {})]
    with pytest.raises(TextEmbeddingError, match="answered 400: scripted 400"):
        embedder.embed(["a"])
    server.script = [("status", 404, {})]
    wrong_path = "or it is no embeddings endpoint: check IMGEMBED_TEXT_API_BASE"
    with pytest.raises(ModelUnavailableError, match=f"serve the model 'test-embed'.*{wrong_path}"):
        embedder.embed(["a"])
    # an unknown model as OpenAI (400, code) and imgembed serve (422, type) say it
    for status, error in ((400, {"code": "model_not_found"}), (422, {"type": "UnknownModelError"})):
        server.script = [("status", status, {}, error)]
        with pytest.raises(ModelUnavailableError, match="does not serve the model") as exc:
            embedder.embed(["a"])
        assert "endpoint" not in str(exc.value)  # it said so itself
    embedder.close()


def test_a_dimension_change_is_a_typed_error(server):
    known = _openai(server, model="text-embedding-3-small")  # 1536-d by its name
    with pytest.raises(TextEmbeddingError, match="returned 16-d vectors where 1536-d"):
        known.embed(["a"])
    embedder = _openai(server)
    assert embedder.embed(["a"]).shape == (1, 16)
    server.script = [("dimension", 8)]  # the endpoint now serves another model
    with pytest.raises(TextEmbeddingError, match="returned 8-d vectors where 16-d"):
        embedder.embed(["b"])
    known.close()
    embedder.close()


def test_timeouts_and_an_unreachable_server(server):
    server.script = [("sleep", 1.0), ("sleep", 1.0)]
    embedder = _openai(server, text_timeout=0.2, text_retries=1)
    with pytest.raises(TextEmbeddingError, match=r"no complete answer .* within 0\.2 s \(IMGEMBED"):
        embedder.embed(["a"])
    assert len(server.requests) == 2
    embedder.close()
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = load_settings(
        text_api_base=f"http://127.0.0.1:{port}/v1", retry_delay=0.01, text_retries=1
    )
    started = time.monotonic()
    embedder = OpenAIEmbedder("m", settings)
    with pytest.raises(TextEmbeddingError, match="cannot reach"):
        embedder.embed(["a"])
    assert time.monotonic() - started < 30
    embedder.close()


def test_openai_without_a_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ConfigurationError, match="set OPENAI_API_KEY"):
        OpenAIEmbedder("text-embedding-3-small", load_settings())


def test_ollama_api_embed(server, monkeypatch):
    monkeypatch.setenv("CLIP_OLLAMA_ENDPOINT", server.url)  # the GenericRAG seed's variable
    settings = load_settings(text_model="ollama:nomic-embed-text", retry_delay=0.01)
    embedder = create_text_embedder(settings, service=None)
    assert isinstance(embedder, OllamaEmbedder) and embedder.name == "ollama:nomic-embed-text"
    vectors = embedder.embed(["een rode jurk", "a lamp"])
    np.testing.assert_allclose(vectors[1], _unit(vector("a lamp", 16)), atol=1e-6)
    request = server.requests[-1]
    assert request["path"] == "/api/embed"
    assert request["body"] == {"model": "nomic-embed-text", "input": ["een rode jurk", "a lamp"]}
    server.script = [("status", 404, {})]
    with pytest.raises(ModelUnavailableError, match="ollama pull nomic-embed-text"):
        embedder.embed(["x"])
    seed_style = load_settings({"ollama_endpoint": "http://ollama.example:11434"})
    assert seed_style.ollama_url == "http://ollama.example:11434"
    embedder.close()


def test_the_findly_documents_text_model_by_its_own_name():
    """IMGEMBED_TEXT_MODEL=text-embedding-3-small (as the document names it) was "unknown
    text model"; it is openai:text-embedding-3-small, recorded under that name."""
    server = EmbeddingServer(dimension=1536)  # the model's own width
    settings = load_settings(
        text_model="text-embedding-3-small",
        text_api_base=f"{server.url}/v1",
        openai_api_key="sk-test",
        retry_delay=0.01,
    )
    embedder = create_text_embedder(settings, service=None)
    assert isinstance(embedder, OpenAIEmbedder)
    assert embedder.name == "openai:text-embedding-3-small"
    embedder.embed(["een rode jurk"])
    assert server.requests[-1]["body"]["model"] == "text-embedding-3-small"
    embedder.close()
    server.close()


def test_unknown_text_models_are_clear_errors(tmp_path):
    with pytest.raises(ConfigurationError, match="unknown text model 'bert'"):
        create_text_embedder(load_settings(text_model="bert"), service=None)
    with pytest.raises(ModelUnavailableError, match="not a sentence-transformers model folder"):
        create_text_embedder(load_settings(text_model=str(tmp_path)), service=None)


def _answer(rows, indices=None):
    indices = range(len(rows)) if indices is None else indices
    return {"data": [{"index": i, "embedding": row} for i, row in zip(indices, rows, strict=True)]}


def test_answers_of_the_wrong_shape_are_typed_errors(server):
    embedder = _openai(server, text_batch_size=8)
    row = [1.0] * 16
    for body, message in (
        (_answer([None, row]), "not lists of numbers"),
        (_answer([5, row]), "not lists of numbers"),
        (_answer(["AAAA", row]), "not lists of numbers"),
        (_answer([row, row], [0, 0]), r"indices \[0, 0\] for 2 texts"),
        (_answer([row, row], ["1", "0"]), r"indices \['1', '0'\] for 2 texts"),
    ):
        server.script = [("raw", 200, body, {})]
        with pytest.raises(TextEmbeddingError, match=message):
            embedder.embed(["a", "b"])
    embedder.close()
    ollama = OllamaEmbedder("m", load_settings(ollama_url=server.url, retry_delay=0.01))
    server.script = [("raw", 200, {"embeddings": 5}, {})]
    with pytest.raises(TextEmbeddingError, match="not lists of numbers"):
        ollama.embed(["a"])
    ollama.close()
    assert len(server.requests) == 6  # none of them retried


def test_another_dimension_with_an_unusable_row_is_still_a_dimension_change(server):
    from imgembed.catalog.text_vectors import UnusableRowsError

    embedder = _openai(server)  # two texts per request
    assert embedder.embed(["a"]).shape == (1, 16)
    nan = float("nan")  # written as NaN, as Python's json writes it
    narrow = json.dumps(_answer([[nan] * 8, [1.0] * 8])).encode()
    server.script = [("raw", 200, narrow, {})]
    with pytest.raises(TextEmbeddingError, match="returned 8-d vectors where 16-d") as caught:
        embedder.embed(["b", "c"])
    assert not isinstance(caught.value, UnusableRowsError)
    # in the second request of one call: not a crash while the requests' rows are joined
    server.script = [("dimension", 16), ("raw", 200, narrow, {})]
    with pytest.raises(TextEmbeddingError, match="returned 8-d vectors where 16-d"):
        embedder.embed(["d", "e", "f", "g"])
    embedder.close()


def test_an_endless_or_trickling_answer_is_cut_off(server):
    embedder = _openai(server, text_retries=0, text_timeout=0.5)
    server.script = [("endless",)]
    with pytest.raises(TextEmbeddingError, match=r"more than .* bytes for 1 text"):
        embedder.embed(["a"])
    # each byte within the timeout of a read, the whole answer not within text_timeout
    server.script = [("trickle", 0.05)]
    with pytest.raises(TextEmbeddingError, match=r"no complete answer .* within 0\.5 s"):
        embedder.embed(["a"])
    assert len(server.requests) == 2
    assert embedder.embed(["a"]).shape == (1, 16)  # the next answer is read as ever
    embedder.close()


class _SlowHeaderServer:
    """A socket-level server: connection n gets `answers[n]`: "status" (its status line a
    byte every 0.3 s), "headers" (the status line, then a header byte every 0.3 s: each
    within a read timeout of 1 s, for a minute) or "ok" (an embeddings answer)."""

    def __init__(self, answers):
        self.answers, self.connections = list(answers), 0
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(
                target=self._serve, args=(conn, self.answers.pop(0)), daemon=True
            ).start()

    def _serve(self, conn, answer):
        with conn:
            try:
                conn.recv(65536)
                if answer == "ok":
                    body = json.dumps(_answer([[1.0] * 16])).encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                    conn.recv(65536)  # kept open, as a server keeps an idle connection
                    return
                head, trickle = b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"a" * 200
                if answer == "status":
                    trickle = head + trickle
                else:
                    conn.sendall(head)
                for byte in trickle:
                    if self._stop.wait(0.3):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                pass  # the client cut the connection

    def close(self):
        self._stop.set()
        self._listener.close()


def test_a_trickling_status_line_or_headers_are_cut_off_at_the_deadline():
    """The deadline bound only the body: a server trickling its status line or its headers a
    byte at a time (each read within the per-read timeout) held an embed for as long as it
    went on (a minute here, without end in general); now the whole request ends at
    text_timeout, is retried like any timeout, and the next request gets a new connection."""
    server = _SlowHeaderServer(["status", "status", "headers", "headers", "ok"])
    settings = load_settings(text_api_base=f"{server.url}/v1", openai_api_key="sk-test",
                             text_timeout=1, text_retries=1, retry_delay=0.01)  # fmt: skip
    before = set(threading.enumerate())
    embedder = OpenAIEmbedder("m", settings)
    own = set(threading.enumerate()) - before  # its event loop's
    try:
        for _ in range(2):  # the status line; the headers (two attempts each)
            started = time.monotonic()
            with pytest.raises(
                TextEmbeddingError,
                match=r"no complete answer from .* within 1\.0 s \(IMGEMBED_TEXT_TIMEOUT\) "
                r"\(gave up after 2 attempts\)",
            ):
                embedder.embed(["a"])
            assert time.monotonic() - started < 30
        assert embedder.embed(["a"]).shape == (1, 16)  # on a new connection, read as ever
        assert server.connections == 5
    finally:
        embedder.close()
        server.close()
    assert own and not any(thread.is_alive() for thread in own)


def test_a_compressed_answer_is_read_as_before(server):
    """httpx asks for gzip: an answer sent compressed (a proxy's, a CDN's) was decoded a
    second time after the streamed read (httpx.DecodingError, untyped)."""
    import gzip

    embedder = _openai(server, text_retries=0)
    body = gzip.compress(json.dumps(_answer([[3.0, 4.0] + [0.0] * 14])).encode())
    server.script = [("raw", 200, body, {"Content-Encoding": "gzip"})]
    np.testing.assert_allclose(embedder.embed(["a"])[0][:2], [0.6, 0.8], atol=1e-6)
    server.script = [("raw", 200, b"not gzip at all", {"Content-Encoding": "gzip"})]
    with pytest.raises(TextEmbeddingError, match="cannot be decoded"):
        embedder.embed(["a"])
    embedder.close()


def test_a_redirect_names_where_it_points(server):
    embedder = _openai(server)
    for status, body in ((307, b""), (308, json.dumps(_answer([[1.0] * 16])).encode())):
        server.script = [("raw", status, body, {"Location": "https://elsewhere.example/v1"})]
        with pytest.raises(
            TextEmbeddingError,
            match=rf"answered {status}, a redirect to https://elsewhere.example/v1\b.*"
            "IMGEMBED_TEXT_API_BASE",
        ):
            embedder.embed(["a"])
    assert len(server.requests) == 2  # not retried, not followed
    # httpx calls every 3xx a redirect: one without a Location was an untyped KeyError
    for status in (300, 304):
        server.script = [("raw", status, b"", {})]
        with pytest.raises(TextEmbeddingError, match=rf"answered {status}, a redirect without"):
            embedder.embed(["a"])
    embedder.close()


def test_settings_that_cannot_work_are_configuration_errors(server):
    for base in ("http://[::1/v1", "ftp://127.0.0.1/v1", "localhost:8000/v1", "http://h:99999"):
        with pytest.raises(ConfigurationError, match="IMGEMBED_TEXT_API_BASE"):
            _openai(server, text_api_base=base)
    with pytest.raises(ConfigurationError, match=r"IMGEMBED_OLLAMA_URL.*http://localhost:11434"):
        OllamaEmbedder("m", load_settings(ollama_url="localhost:11434"))
    for key in ("sk-ä", "sk-a\nb", "sk a"):
        with pytest.raises(ConfigurationError, match="OPENAI_API_KEY") as caught:
            _openai(server, openai_api_key=key)
        assert key not in str(caught.value)  # a secret is never shown
    assert server.requests == []
    embedder = _openai(server, openai_api_key=" sk-test\r\n")  # as a file or .env may hold it
    assert embedder.embed(["a"]).shape == (1, 16)
    assert server.requests[0]["auth"] == "Bearer sk-test"
    embedder.close()


def test_the_servers_text_api_failing_is_a_502_the_client_is_not_told_to_retry(server):
    """A key the text API refuses is the server's setting: a 502 (it was a 422, as if the
    request were wrong); a text API down is a 502 that OpenAI's SDKs are told not to repeat
    (it was answered as an encoder hiccup, Retry-After 1). The CLI still says: a setting."""
    from fastapi.testclient import TestClient

    from imgembed.api.app import create_app
    from imgembed.cli.common import EXIT_CODES
    from imgembed.errors import TextApiSettingError
    from tests.conftest import TINY

    settings = load_settings(**TINY, text_model="openai:test-embed", openai_api_key="sk-test",
                             text_api_base=f"{server.url}/v1", text_retries=0)  # fmt: skip
    products = [{"id": "p1", "title": "a red poster"}]
    with TestClient(create_app(settings)) as client:
        job = client.post("/api/v1/stores/shop/products", json={"products": products}).json()
        for _ in range(600):
            state = client.get(job["job"]["url"]).json()
            if state["status"] not in ("queued", "running"):
                break
            time.sleep(0.1)
        assert state["status"] == "done", state
        server.script = [("status", 401, {})]
        refused = client.post("/api/v1/stores/shop/search", json={"query": "poster"})
        assert (refused.status_code, refused.json()["error_type"]) == (
            502, "TextApiSettingError"), refused.text  # fmt: skip
        assert "refused the API key" in refused.json()["error"]
        assert refused.headers["x-should-retry"] == "false"
        server.script = [("status", 503, {})]
        down = client.post("/api/v1/stores/shop/search", json={"query": "poster"})
        assert (down.status_code, down.json()["error_type"]) == (502, "TextEmbeddingError")
        assert down.headers["x-should-retry"] == "false" and "retry-after" not in down.headers
    error = TextApiSettingError("refused the API key", 401)
    assert next(code for kind, code in EXIT_CODES if isinstance(error, kind)) == 3
