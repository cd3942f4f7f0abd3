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
from imgembed.resident import ProductQuery, SearchQuery
from tests.cli import run, run_process

TINY = {"model": "imgembed-tiny", "pretrained": "seed:0"}
HEAVY = {"numpy", "onnxruntime", "psycopg", "PIL", "torch", "tokenizers"}
# `imgembed ...` as its own process, saying which heavy libraries it loaded.
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
    command = [sys.executable, "-c", CLIENT, *args]
    env = {**os.environ, "HEAVY": ",".join(HEAVY)}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def local(settings, query: SearchQuery) -> list:
    with ImageEmbeddingService(settings) as service:
        return resident.run(service, query)


def same(products: list[dict], others: list[dict]) -> bool:
    """The same products in the same order with the same scores of each part."""

    def scores(hit):
        return [hit[k] or 0.0 for k in ("score", "image_score", "text_score")]

    ids = [(h["rank"], h["product_id"], h["ranked_by"]) for h in products]
    return ids == [(h["rank"], h["product_id"], h["ranked_by"]) for h in others] and all(
        scores(a) == pytest.approx(scores(b), abs=1e-6)
        for a, b in zip(products, others, strict=True)
    )


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
    ran = client("search", "a photo of a cat", "-c", "shop", "-k", "4", "--json")
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr.rstrip().endswith("loaded:"), ran.stderr
    rows = json.loads(ran.stdout)
    assert [r["source"] for r in rows] == [h.image_path for h in mine]
    missing = client("search", "x", "-c", "nothing")
    assert missing.returncode == 6 and "no collection 'nothing'" in missing.stderr

    # this test's process uses the server too: it is left running for it, the keeper ends
    stopped = run_process("db", "stop")
    assert stopped.returncode == 6 and f"still used by pid {os.getpid()} (" in stopped.stderr
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
    ran = client("search", "a photo", "-c", "shop", "-k", "3", "--json")
    assert ran.returncode == 0 and len(json.loads(ran.stdout)) == 3, ran.stderr
    assert "numpy" in ran.stderr.rsplit("loaded:", 1)[1]  # it searched itself


def test_catalogue_searches_through_the_resident_process_equal_those_made_here(
    data_dir, photos, tmp_path
):
    from imgembed.catalog import Catalog
    from tests.integration.test_catalog_cli import TINY as TINY_ARGS
    from tests.integration.test_catalog_cli import _catalogue

    csv = _catalogue(photos, tmp_path)
    assert run("catalog", "import", str(csv), "--store-id", "demo").returncode == 1  # a bad row
    assert run("catalog", "embed", "--store-id", "demo", *TINY_ARGS).returncode == 1  # one image
    assert run_process("db", "start", "--for", "10m").returncode == 0
    settings = load_settings()  # the store's own models

    by_text = ProductQuery("demo", text="a photo of a cat", top_k=3)
    answered = resident.ask(settings, by_text)
    assert answered is not None, "the resident process did not answer"
    with Catalog.for_store("demo", settings) as catalog:
        mine = resident.run_products(catalog, by_text)
        both = ProductQuery("demo", "a cat", image=f"img/{photos[2].name}", cwd=str(tmp_path))
        mine_both = resident.run_products(catalog, both)
    assert same(answered, mine)
    assert same(resident.ask(settings, both), mine_both)  # the image path is the asker's
    (own,) = [h for h in mine_both if h["product_id"] == "p2"]  # the query's own photo
    assert own["ranked_by"] == "combined" and own["image_score"] == pytest.approx(1, abs=1e-5)
    with pytest.raises(CollectionNotFoundError, match="nope"):
        resident.ask(settings, ProductQuery("nope", text="x"))

    ran = client("catalog", "search", "a photo of a cat", "--store-id", "demo", "-k", "3",
                 "--json")  # fmt: skip
    assert ran.returncode == 0 and ran.stderr.rstrip().endswith("loaded:"), ran.stderr
    assert same(json.loads(ran.stdout), mine)
    table = client("catalog", "search", "a cat", "--store-id", "demo", "--category", "tech")
    assert table.returncode == 0 and "ranked by the combined score" in table.stdout, table.stderr
    assert "(tech)" in table.stdout and "(kleding)" not in table.stdout  # the filter held

    # embedded again with another image model: the process follows the store
    again = run("catalog", "embed", "--store-id", "demo", "--force", "--model",
                "efficientnet-lite0")  # fmt: skip
    assert again.returncode == 1, again.stderr  # the same broken image (once refused: the
    # new indexes were built in the reset's own transaction, over the old 448-d row versions)
    stats = json.loads(run("catalog", "stats", "--store-id", "demo", "--json").stdout)
    assert stats["provenance"]["image_model"] == "efficientnet-lite0"
    assert stats["indexes_missing"] == []  # built at the run's end
    followed = resident.ask(settings, by_text)
    assert followed is not None and followed[0]["ranked_by"] == "text"  # no text tower now
    with Catalog.for_store("demo", settings) as catalog:
        assert same(followed, resident.run_products(catalog, by_text))
