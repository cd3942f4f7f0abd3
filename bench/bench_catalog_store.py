"""The product catalogue's database side, in one process (no models: vectors are made here):

1. a bulk embed run's writes into a new store (N products: image 512-d, text 384-d, combined
   896-d), as `catalog embed` stores them batch by batch, its HNSW indexes set aside and built
   afterwards (`IMGEMBED_DEFER_INDEX_MIN`); then a smaller run into the grown store with the
   three indexes kept up to date, product by product;
2. search: latency p50/p99 and recall@10 by the combined vector (text + photo), the image
   vector alone, and combined with a category filter, against the true top 10 (NumPy).

Vectors lie near low-dimensional subspaces, as real embeddings do (see bench_store.py).
Run: .venv/bin/python bench/bench_catalog_store.py [--products 20000] [--grow 500]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_store import cpu_flags, embeddings_like, latency

ROOT = Path(__file__).resolve().parent.parent
IMAGE_WEIGHT = 0.6
CATEGORIES = ("kleding", "interieur", "tech", "sieraden")


def vectors(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = embeddings_like(n, 512, seed)
    text = embeddings_like(n, 384, seed + 100)
    combined = np.concatenate(
        [np.sqrt(IMAGE_WEIGHT) * image, np.sqrt(1 - IMAGE_WEIGHT) * text], axis=1
    )
    return image, text, combined.astype(np.float32)


def product(i: int, text, image, combined):
    from imgembed.catalog.records import EmbeddedProduct

    weights = (CATEGORIES[i % 4], IMAGE_WEIGHT, 1 - IMAGE_WEIGHT)
    return EmbeddedProduct(f"p{i}", text, image, combined, *weights, "t", "i", None)


def write(repo, provenance, first: int, image, text, combined, batch: int = 50) -> float:
    """As `catalog embed` does: products imported, then their vectors one batch at a time."""
    from imgembed.catalog.products import ProductInput

    started = time.perf_counter()
    for start in range(0, len(image), batch):
        ids = range(first + start, first + min(len(image), start + batch))
        repo.upsert_products(
            "bench",
            [ProductInput(f"p{i}", f"product {i}", category=CATEGORIES[i % 4]) for i in ids],
        )
        repo.save_batch(
            "bench",
            provenance,
            "v1",
            [product(i, text[i - first], image[i - first], combined[i - first]) for i in ids],
            [],
        )
    return time.perf_counter() - started


def searches(repo, part: str, queries: dict, truth: np.ndarray, ef: int, category=None):
    dimension = {"combined": 896, "image": 512}[part]
    kwargs = {"category": category, "category_key": category} if category else {}

    def one(q: int):
        return repo.search("bench", part=part, dimension=dimension, query=queries[part][q],
                           image_query=queries["image"][q], text_query=queries["text"][q],
                           top_k=10, ef_search=ef, **kwargs)  # fmt: skip

    for q in range(10):  # warm-up: plans prepared, pages in memory
        one(q)
    seconds, found = [], []
    for q in range(len(truth)):
        started = time.perf_counter()
        rows = one(q)
        seconds.append(time.perf_counter() - started)
        found.append([int(row["product_id"][1:]) for row in rows])
    return latency(seconds, found, truth)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--products", type=int, default=20_000)
    parser.add_argument("--grow", type=int, default=500, help="products with indexes kept")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()

    from imgembed.catalog.records import StoreProvenance
    from imgembed.catalog.repository import ProductRepository
    from imgembed.store import embedded

    began = time.perf_counter()
    image, text, combined = vectors(args.products, seed=1)
    extra = vectors(args.grow, seed=7)
    qi, qt, qc = vectors(args.queries, seed=3)
    queries = {"image": qi, "text": qt, "combined": qc}
    all_image = np.concatenate([image, extra[0]])
    all_combined = np.concatenate([combined, extra[2]])
    in_category = np.arange(len(all_image)) % 4 == 0  # CATEGORIES[0]
    truth = {
        "combined": np.argsort(-(qc @ all_combined.T), axis=1)[:, :10],
        "image": np.argsort(-(qi @ all_image.T), axis=1)[:, :10],
        "category": np.flatnonzero(in_category)[
            np.argsort(-(qc @ all_combined[in_category].T), axis=1)[:, :10]
        ],
    }
    provenance = StoreProvenance("bench", "random", "none", 512, "bench-text", 384)
    with tempfile.TemporaryDirectory() as tmp:
        url = embedded.start(Path(tmp))
        try:
            repo = ProductRepository(url, location="bench")
            repo.set_provenance("bench", provenance, "v1", reset=False)
            assert repo.bulk_load("bench", args.products, 5000)
            stored = write(repo, provenance, 0, image, text, combined)
            started = time.perf_counter()
            repo.refresh("bench", provenance)
            built = time.perf_counter() - started
            assert not repo.bulk_load("bench", args.grow, 5000)
            kept = write(repo, provenance, args.products, *extra)
            repo.refresh("bench", provenance)
            rows = []
            for ef in (40, 100):
                for kind, part, category in (("combined", "combined", None),
                                             ("image", "image", None),
                                             ("category", "combined", CATEGORIES[0])):  # fmt: skip
                    result = searches(repo, part, queries, truth[kind], ef, category)
                    rows.append({"search": kind, "ef_search": ef, **result})
            repo.close()
        finally:
            embedded.stop(Path(tmp))
    seconds = time.perf_counter() - began
    load = os.getloadavg()
    report = {
        "products": args.products,
        "bulk": {"write_s": stored, "index_build_s": built,
                 "products_per_s": args.products / (stored + built)},
        "maintained": {"products": args.grow, "products_per_s": args.grow / kept},
        "search": rows, "cpu_flags": cpu_flags(), "load_average": load, "seconds": seconds,
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    print(f"{args.products:,} products (896-d combined, 512-d image, 384-d text), embedded "
          f"PostgreSQL, {os.cpu_count()} cores ({cpu_flags()}), load {load[0]:.1f}")  # fmt: skip
    bulk = report["bulk"]
    print(f"  bulk run: writes {bulk['write_s']:.1f} s, three HNSW builds {built:.1f} s: "
          f"{bulk['products_per_s']:,.0f} products/s in all")  # fmt: skip
    print(f"  then {args.grow:,} products with the indexes kept up to date: "
          f"{report['maintained']['products_per_s']:,.0f} products/s")  # fmt: skip
    for row in rows:
        print(f"  search {row['search']:8} ef_search {row['ef_search']:3d}: p50 "
              f"{row['p50_ms']:5.2f} ms  p99 {row['p99_ms']:5.2f} ms  "
              f"recall@10 {row['recall_at_10']:.3f}")  # fmt: skip
    print(f"benchmark took {seconds:.0f} s")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "catalog_store.json").write_text(json.dumps(report, indent=2))
    print(f"written to {out / 'catalog_store.json'}")


if __name__ == "__main__":
    main()
