"""`imgembed catalog` end to end: the Findly document's option spellings and output, exit
codes, the store's own models by default, and a run killed with -9 that resumes exactly."""

import hashlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg
from PIL import Image

from imgembed.catalog.product_indexes import INDEX_DDL
from imgembed.store import embedded
from tests.cli import IMGEMBED, run

TINY = ["--model", "imgembed-tiny", "--pretrained", "seed:0"]


def _catalogue(photos, folder: Path) -> Path:
    (folder / "img").mkdir(parents=True)
    lines = ["id,title,description,category,price,image_url"]
    for n, photo in enumerate(photos):
        (folder / "img" / photo.name).write_bytes(photo.read_bytes())
        category = ["kleding", "interieur", "tech"][n % 3]
        lines.append(
            f"p{n},{photo.stem} print,A photo of {photo.stem},{category},{5 * n},img/{photo.name}"
        )
    lines.append("broken,Broken image,x,,1,img/missing.jpg")
    lines.append(",No id,x,,1,")
    path = folder / "products.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_product_without_an_image_is_said_to_be_embedded_from_its_text(data_dir, tmp_path):
    csv = tmp_path / "products.csv"
    csv.write_text("id,title,description,category,price,image_url\nt1,Tea,Green tea,food,3,\n")
    assert run("catalog", "import", str(csv), "--store_id=tea").returncode == 0
    proc = run("catalog", "embed", "--store_id=tea", "--verbose", *TINY)
    assert proc.returncode == 0, proc.stderr
    # not "image embedding": it has no image
    assert "✅ Successfully generated text embedding for product t1 (no image)" in proc.stderr


def test_import_embed_search_and_stats(data_dir, photos, tmp_path):
    csv = _catalogue(photos, tmp_path)
    imported = run("catalog", "import", str(csv), "--store_id=demo")
    assert imported.returncode == 1, imported.stderr  # one bad row
    assert f"{csv}:{len(photos) + 3}: no product id" in imported.stderr
    assert f"{len(photos) + 1} new, 0 updated, 0 unchanged, 1 bad" in imported.stderr

    proc = run("catalog", "embed", "--store_id=demo", "--batch_size=3", "--verbose", *TINY)
    assert proc.returncode == 1, proc.stderr  # the broken image
    total = len(photos) + 1
    for line in (
        "🚀 Starting image embedding generation for store: demo",  # the document's words
        f"📊 Total products to process: {total}",
        "[BATCH] Processing batch 1/3 (3 products)",
        "[BATCH] Processing batch 3/3 (1 product)",
        "📈 Progress: 0/7 products processed",
        "✅ Successfully generated image embedding for product p0",  # as the document
        "❌ Failed to generate embeddings for product broken: ",
        "📊 Progress: 42.9% complete",
        "📊 Progress: 100.0% complete",
        "🎉 Image embedding generation completed!",
        "📊 Final Statistics:",
        f"   Total products: {total}",
        f"   Processed: {total}",
        f"   Successful: {total - 1}",
        "   Failed: 1",
        "   Skipped: 0",
        "   Duration: ",
        "   Loading before it (models, database): ",  # not in Duration: 0.2 s beside 8 s
        "[TEXT] Generated 3 text embeddings (length: 384)",
        "[IMAGE] Generating image embedding for: ",
        "[COMBINED] Product p0: fashion weights 0.75/0.25 (length: 448)",
    ):
        assert line in proc.stderr, line

    # without --model: the store's own models; only the failed product is tried again
    again = run("catalog", "embed", "--store-id", "demo", "--json")
    assert again.returncode == 1, again.stderr
    stats = json.loads(again.stdout)
    assert (stats["total"], stats["processed"], stats["failed"], stats["skipped"]) == (
        total,
        1,
        1,
        total - 1,
    )
    assert stats["failures"][0]["error_type"] == "ImageNotFoundError"
    assert (
        run("catalog", "embed", "--store-id", "demo", "--only-missing", "--force").returncode == 2
    )
    # another run holds the store: nothing was written, so nothing is said to be kept
    with psycopg.connect(embedded.start(data_dir)) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtextextended('imgembed-catalog:demo', 0))")
        busy = run("catalog", "embed", "--store-id", "demo")
    assert busy.returncode == 6 and "another `catalog embed` is running" in busy.stderr
    assert "kept" not in busy.stderr, busy.stderr

    hits = json.loads(run("catalog", "search", "coffee", "--store-id", "demo", "--json").stdout)
    assert hits[0]["product_id"] == "p2" and hits[0]["ranked_by"] == "combined"
    assert {"score", "image_score", "text_score", "image_weight", "text_weight"} <= set(hits[0])
    by_image = run("catalog", "search", "--store-id", "demo", "--image", str(photos[4]), "--json")
    assert json.loads(by_image.stdout)[0]["product_id"] == "p4"
    every = run("catalog", "search", "a", "--store-id", "demo", "-k", str(2**64), "--json")
    assert every.returncode == 0, every.stderr  # was exit 6: "bigint out of range"
    assert len(json.loads(every.stdout)) == len(photos)  # all with vectors (not "broken")
    filters = ["--max_price", "10", "--category", "fashion", "--top_k", "5"]
    cheap = run("catalog", "search", "a photo", "--store-id", "demo", *filters)
    assert cheap.returncode == 0 and "ranked by the combined score" in cheap.stdout
    none = run("catalog", "search", "a photo", "--store-id", "demo", "--category", "nothing")
    assert (none.returncode, none.stdout) == (0, "")  # an empty table before, without a word
    assert "no product matches with category 'nothing'" in none.stderr
    # an 80-column terminal: the numbers one checks by hand stay whole, words wrap
    narrow = run("catalog", "search", "a photo", "--store-id", "demo", env={"COLUMNS": "80"})
    hit = json.loads(run("catalog", "search", "a photo", "--store-id", "demo", "--json").stdout)[0]
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80
    for number in (hit["score"], hit["image_score"], hit["text_score"]):
        assert f"{number:.4f}" in narrow.stdout
    assert f"{hit['image_weight']:.2f}/{hit['text_weight']:.2f}" in narrow.stdout
    assert "…" not in narrow.stdout
    assert "p0" in cheap.stdout and not {"p1", "p2", "p3"} & set(cheap.stdout.split())

    # a bulk load waiting for another session's turn at the stores' indexes says so, once
    run("catalog", "import", str(csv), "--store_id=bulk")
    with psycopg.connect(embedded.start(data_dir), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (INDEX_DDL,))
        # held past the command's start and the first half-second poll, even on a busy machine
        release = threading.Timer(4.0, holder.execute, ["SELECT pg_advisory_unlock_all()"])
        release.start()
        bulk = run("catalog", "embed", "--store-id", "bulk", *TINY,
                   env={"IMGEMBED_DEFER_INDEX_MIN": "2"})  # fmt: skip
        release.join()
    assert bulk.returncode == 1 and f"Successful: {total - 1}" in bulk.stderr, bulk.stderr
    waited = "⏳ Setting the store's indexes aside for a bulk load: waiting while another session"
    assert bulk.stderr.count(waited) == 1, bulk.stderr

    summary = json.loads(run("catalog", "stats", "--store-id", "demo", "--json").stdout)
    assert (summary["total"], summary["embedded"], summary["failed"]) == (total, total - 1, 1)
    assert summary["provenance"]["image_model"] == "imgembed-tiny"
    assert summary["errors"] == {"ImageNotFoundError": 1}
    assert "failed" in run("catalog", "stats", "--store-id", "demo").stdout

    other = run(
        "catalog",
        "embed",
        "--store-id",
        "demo",
        "--model",
        "imgembed-tiny",
        "--pretrained",
        "seed:1",
    )
    assert other.returncode == 6 and "--force" in other.stderr
    assert "run the same command again" not in other.stderr
    assert run("catalog", "search", "x", "--store-id", "nowhere").returncode == 6
    assert run("catalog", "embed", "--store-id", "nowhere", *TINY).returncode == 6
    assert run("catalog", "search", "--store-id", "demo").returncode == 2
    assert run("catalog", "import", str(tmp_path / "x.xml"), "--store-id", "s").returncode == 3


class SlowImages:
    """Serves files, each after a pause: a run lasts long enough to be killed midway."""

    def __init__(self, folder: Path, pause: float):
        self.folder, self.pause = folder, pause
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                time.sleep(server.pause)
                body = (server.folder / self.path.lstrip("/")).read_bytes()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client was killed

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _tiles(large_jpegs, folder: Path, count: int, size: int = 256) -> list[Path]:
    """Distinct real images: tiles cut from the large photos."""
    folder.mkdir()
    paths = []
    photos = {}  # each decoded once: a crop of an unloaded JPEG decodes all of it (~0.2 s)
    for n in range(count):
        source = large_jpegs[n % len(large_jpegs)]
        photo = photos.get(source) or photos.setdefault(source, Image.open(source).convert("RGB"))
        k = n // len(large_jpegs)
        columns = photo.width // size
        path = folder / f"tile-{n:03d}.png"
        x, y = (k % columns) * size, (k // columns) * size
        photo.crop((x, y, x + size, y + size)).save(path)
        paths.append(path)
    return paths


def _embedded(url: str) -> dict[str, tuple[int, str]]:
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT product_id, attempts, image_hash FROM imgembed_products"
            " WHERE store_id = 'big' AND status = 'embedded'"
        ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def test_embed_killed_with_9_resumes_and_embeds_every_product_once(
    data_dir, large_jpegs, tmp_path, monkeypatch
):
    count = 120
    tiles = _tiles(large_jpegs, tmp_path / "tiles", count)
    server = SlowImages(tmp_path / "tiles", pause=0.15)
    monkeypatch.setenv("IMGEMBED_ALLOW_PRIVATE_URLS", "true")
    monkeypatch.setenv("IMGEMBED_MAX_CONCURRENT_FETCHES", "2")  # >= 9 s for the whole run
    rows = [
        {"id": f"t{n:03d}", "title": f"Tile {n}", "image_url": f"{server.url}/{p.name}"}
        for n, p in enumerate(tiles)
    ]
    jsonl = tmp_path / "tiles.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    try:
        assert run("catalog", "import", str(jsonl), "--store-id", "big").returncode == 0
        command = [IMGEMBED, "catalog", "embed", "--store-id", "big", "--batch-size", "8", *TINY]
        first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = embedded.start(data_dir)  # the server the import created, joined
        deadline = time.time() + 240
        done: dict[str, tuple[int, str]] = {}
        while time.time() < deadline and first.poll() is None and len(done) < 16:
            time.sleep(0.2)
            done = _embedded(url)
        assert first.poll() is None, "the first run ended before it could be killed"
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        killed = _embedded(url)
        assert 16 <= len(killed) < count and len(killed) % 8 == 0  # whole batches only
        assert all(attempts == 1 for attempts, _ in killed.values())

        # SIGTERM (or Ctrl-C): the run says how far it got and how to go on, exit 130
        stopped = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)  # fmt: skip
        while time.time() < deadline and stopped.poll() is None and len(done) < len(killed) + 8:
            time.sleep(0.2)
            done = _embedded(url)
        assert stopped.poll() is None, "the second run ended before it could be stopped"
        stopped.send_signal(signal.SIGTERM)
        _, said = stopped.communicate(timeout=120)
        assert stopped.returncode == 130, said
        told = rf"Interrupted after \d+ of {count - len(killed)} products: the \d+ batches"
        assert re.search(told + " written are kept; run the same command again", said), said
        before = _embedded(url)
        assert len(before) % 8 == 0 and all(attempts == 1 for attempts, _ in before.values())

        second = run(*command[1:])  # the rerun may as well run in this process
        assert second.returncode == 0, second.stderr
        for line in (
            f"Total products: {count}",
            f"Processed: {count - len(before)}",
            f"Successful: {count - len(before)}",
            "Failed: 0",
            f"Skipped: {len(before)}",
        ):
            assert f"   {line}\n" in second.stderr, line
        after = _embedded(url)
        assert len(after) == count
        assert all(attempts == 1 for attempts, _ in after.values())  # each embedded once
        for n, tile in enumerate(tiles):
            assert after[f"t{n:03d}"][1] == hashlib.sha256(tile.read_bytes()).hexdigest()

        # a --force run to other weights, stopped: it has cleared the old vectors, so the way
        # on is a run without --force (with it, everything would be done again)
        moved = [*command[:-1], "seed:1"]
        forced = subprocess.Popen([*moved, "--force"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)  # fmt: skip
        done, reset = after, False
        while (
            time.time() < deadline + 120
            and forced.poll() is None
            and not (reset and len(done) >= 16)
        ):
            time.sleep(0.2)
            done = _embedded(url)
            reset = reset or len(done) < count  # the old vectors cleared, then new ones
        assert forced.poll() is None, "the --force run ended before it could be stopped"
        forced.send_signal(signal.SIGTERM)
        _, said = forced.communicate(timeout=120)
        assert forced.returncode == 130 and "run it again without --force to go on" in said, said
        kept = _embedded(url)
        rest = run(*moved[1:])
        assert rest.returncode == 0, rest.stderr
        assert f"   Processed: {count - len(kept)}\n" in rest.stderr, rest.stderr
    finally:
        server.close()
