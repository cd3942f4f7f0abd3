"""Products/s of `catalog embed` against a naive per-product loop, in one process, same models.

Naive loop (what the Findly document's script does): for each product, download its image,
embed it, embed its text, combine, UPDATE its row (one transaction per product). The bulk
job: one image stream with downloads and decoding ahead of the encoder, one text call per
batch, one transaction per batch. Both run EfficientNet-Lite0 (or --model) for the images
and all-MiniLM-L6-v2 for the texts, embedding cache off, into the embedded PostgreSQL, over
real photos (1024 px crops of the Debian wallpapers and scikit-image's photos, JPEG) served
over loopback HTTP, optionally with a per-response latency like a CDN's. Rounds alternate
(naive, bulk, naive, bulk, ...) so a busy machine slows both alike.

Run: .venv/bin/python bench/bench_catalog.py [--products 64] [--rounds 2] [--latency 0.05]
     [--model ViT-B-32 --pretrained random]     # the Findly document's image model
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TESTDATA = ROOT / ".testdata"


def images(count: int) -> list[bytes]:
    """Distinct real photos as JPEGs of shop size: the small photos, then 1024 px crops."""
    from PIL import Image

    out = []
    for path in sorted((TESTDATA / "photos").glob("*")):
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    large = [Image.open(p).convert("RGB") for p in sorted((TESTDATA / "large").glob("*"))]
    k = 0
    while len(out) < count:
        photo = large[k % len(large)]
        step = k // len(large)
        x = (step * 397) % (photo.width - 1024)
        y = (step * 211) % (photo.height - 1024)
        buffer = io.BytesIO()
        photo.crop((x, y, x + 1024, y + 1024)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
        k += 1
    return out[:count]


class Server:
    def __init__(self, files: list[bytes], latency: float):
        server = self
        self.files, self.latency = files, latency

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                time.sleep(server.latency)
                body = server.files[int(self.path.strip("/").split(".")[0])]
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


def random_checkpoint(model: str, folder: Path) -> str:
    """The architecture with seeded random weights (speed does not depend on the values, and
    real weights cannot be had offline), saved as a checkpoint."""
    import open_clip
    import torch

    torch.manual_seed(0)
    path = folder / f"{model}-random.pt"
    torch.save(open_clip.create_model(model).state_dict(), path)
    return str(path)


def naive(catalog, store_id: str) -> float:
    """Per product: download, embed image, embed text, combine, UPDATE its row."""
    import httpx
    import psycopg
    from pgvector.psycopg import register_vector

    from imgembed.catalog.fusion import fuse
    from imgembed.catalog.products import product_text

    connection = psycopg.connect(catalog.repository.url, autocommit=True)
    register_vector(connection)
    rows = connection.execute(
        "SELECT product_id, title, description, category, price, currency, image_url"
        " FROM imgembed_products"
        " WHERE store_id = %s ORDER BY product_id",
        (store_id,),
    ).fetchall()
    started = time.perf_counter()
    with httpx.Client() as client:
        for product_id, title, description, category, price, currency, url in rows:
            data = client.get(url).raise_for_status().content
            image = catalog.service.embed_image(data)
            text_input = product_text(title, description, category, price, currency)
            text = catalog.text_embedder.embed([text_input])[0]
            _, weights = catalog.weights.weights(category)
            combined = fuse(image, text, weights, image.shape[0])
            connection.execute(
                "UPDATE imgembed_products SET image_embedding = %s, text_embedding = %s,"
                " combined_embedding = %s, status = 'embedded' WHERE store_id = %s"
                " AND product_id = %s",
                (image, text, combined, store_id, product_id),
            )
    seconds = time.perf_counter() - started
    connection.close()
    return seconds


def bulk(catalog, store_id: str, batch_size: int) -> float:
    started = time.perf_counter()
    stats = catalog.embed(store_id, batch_size=batch_size, mode="force")
    seconds = time.perf_counter() - started
    assert stats.successful == stats.total, stats.failures
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per image response")
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument(
        "--pretrained", default=None, help="'random': the architecture with seeded random weights"
    )
    parser.add_argument("--text-model", default="minilm")
    args = parser.parse_args()

    from imgembed.catalog import Catalog

    files = images(args.products)
    server = Server(files, args.latency)
    categories = ["fashion", "interior", "sieraden", "tech", None]
    rows = [
        {
            "id": f"p{n:04d}",
            "title": f"Product {n}",
            "description": f"A print of photo {n}",
            "category": categories[n % len(categories)],
            "image_url": f"{server.url}/{n}.jpg",
        }
        for n in range(args.products)
    ]
    data_dir = Path(tempfile.mkdtemp(prefix="bench-catalog-"))
    os.environ["IMGEMBED_DATA_DIR"] = str(data_dir)
    settings = {
        "model": args.model,
        **({"pretrained": random_checkpoint(args.model, data_dir)} if args.pretrained else {}),
        "text_model": args.text_model,
        "cache_embeddings": False,
        "allow_private_urls": True,
    }
    with Catalog(**settings) as catalog:
        for store in ("naive", "bulk"):
            catalog.upsert_products(store, rows)
        catalog.embed("bulk", mode="force")  # loads both models, builds the store's indexes
        catalog.embed("naive", mode="force")
        rounds = []
        for number in range(1, args.rounds + 1):
            naive_s = naive(catalog, "naive")
            bulk_s = bulk(catalog, "bulk", args.batch_size)
            rounds.append(
                {
                    "naive_products_per_s": args.products / naive_s,
                    "bulk_products_per_s": args.products / bulk_s,
                    "ratio": naive_s / bulk_s,
                    "load_average_1min": os.getloadavg()[0],
                }
            )
            print(
                f"round {number}: naive {args.products / naive_s:.2f} products/s, "
                f"catalog embed {args.products / bulk_s:.2f} products/s, "
                f"{naive_s / bulk_s:.2f}x"
            )
    from imgembed.store import embedded

    embedded.stop(data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)
    result = {
        "bench": "catalog",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "model": args.model,
        "text_model": args.text_model,
        "products": args.products,
        "batch_size": args.batch_size,
        "latency_s": args.latency,
        "rounds": rounds,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"catalog-{args.model}" + (f"-latency-{args.latency:g}" if args.latency else "")
    name += ".json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(f"written to {RESULTS / name}")


if __name__ == "__main__":
    main()
