"""`imgembed db start`'s resident search process: real processes, a real server, real photos."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from imgembed import ImageEmbeddingService, resident
from imgembed.config import load_settings
from imgembed.errors import CollectionNotFoundError
from imgembed.indexing import IndexItem
from imgembed.resident import SearchQuery
from tests.cli import run_process

TINY = {"model": "imgembed-tiny", "pretrained": "seed:0"}
HEAVY = {"numpy", "onnxruntime", "psycopg", "PIL", "torch", "tokenizers"}
# `imgembed search` as its own process, saying which heavy libraries it loaded.
CLIENT = """
import os
import sys
from imgembed.cli.app import main
sys.argv = ["imgembed", *sys.argv[1:]]
try:
    main()
finally:
    loaded = {name.split(".")[0] for name in sys.modules} & set(os.environ["HEAVY"].split(","))
    print("loaded:" + ",".join(sorted(loaded)), file=sys.stderr)
"""


@pytest.fixture
def shop(data_dir, photos):
    with ImageEmbeddingService(**TINY) as service:
        service.index([IndexItem(str(p), str(p)) for p in photos], "shop")
    return load_settings(**TINY)


def client(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", CLIENT, "search", *args]
    env = {**os.environ, "HEAVY": ",".join(HEAVY)}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def local(settings, query: SearchQuery) -> list:
    with ImageEmbeddingService(settings) as service:
        return resident.run(service, query)


def test_searches_through_the_resident_process_equal_those_made_here(shop, data_dir, photos):
    started = run_process("db", "start", "--for", "10m")
    assert started.returncode == 0 and "searches answered by" in started.stdout, started.stderr
    pid = resident.status(data_dir)
    status = run_process("db", "status").stdout
    assert pid is not None and f"searches answered by pid {pid}" in status, status
    assert oct((data_dir / resident.RECORD).stat().st_mode & 0o777) == "0o600"  # it holds a key

    by_text = SearchQuery(text="a photo of a cat", collection="shop", top_k=4)
    answered = resident.ask(shop, by_text)
    assert answered is not None, "the resident process did not answer"
    mine = local(shop, by_text)
    assert [(h.rank, h.image_path) for h in answered] == [(h.rank, h.image_path) for h in mine]
    assert [h.similarity_score for h in answered] == pytest.approx(
        [h.similarity_score for h in mine], abs=1e-6
    )
    # a relative image path is the asker's: its working directory goes with the query
    by_image = SearchQuery(image=photos[2].name, collection="shop", cwd=str(photos[2].parent))
    assert resident.ask(shop, by_image)[0].image_path == str(photos[2])
    # typed errors come back as they are
    with pytest.raises(CollectionNotFoundError, match="nothing"):
        resident.ask(shop, SearchQuery(text="x", collection="nothing"))

    # the command asks it and loads none of the heavy libraries itself
    ran = client("a photo of a cat", "-c", "shop", "-k", "4", "--json")
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr.rstrip().endswith("loaded:"), ran.stderr
    rows = json.loads(ran.stdout)
    assert [r["source"] for r in rows] == [h.image_path for h in mine]
    missing = client("x", "-c", "nothing")
    assert missing.returncode == 6 and "no collection 'nothing'" in missing.stderr

    assert run_process("db", "stop").returncode == 0
    assert resident.status(data_dir) is None and not (data_dir / resident.RECORD).exists()


def test_a_resident_process_that_died_leaves_the_search_to_the_asker(shop, data_dir):
    assert run_process("db", "start", "--for", "10m").returncode == 0
    pid = resident.status(data_dir)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while resident.status(data_dir) is not None:  # until it is reaped
        assert time.monotonic() < deadline, "the killed process is still there"
        time.sleep(0.05)
    assert (data_dir / resident.RECORD).exists()  # stale: it could not remove it

    query = SearchQuery(text="a photo", collection="shop", top_k=3)
    assert resident.ask(shop, query) is None
    assert [h.image_path for h in resident.search(shop, query)] == [
        h.image_path for h in local(shop, query)
    ]
    ran = client("a photo", "-c", "shop", "-k", "3", "--json")
    assert ran.returncode == 0 and len(json.loads(ran.stdout)) == 3, ran.stderr
    assert "numpy" in ran.stderr.rsplit("loaded:", 1)[1]  # it searched itself
