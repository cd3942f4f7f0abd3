"""Vector store benchmark on the embedded PostgreSQL + pgvector, in one process:

1. search at N vectors (default 100k, 512-d): latency p50/p99 and recall@10 of the HNSW index
   against exact search (a full scan) on the same queries;
2. indexing throughput: `service.index` (batched pipeline, batched upserts) against a naive
   loop (embed one image, insert one row, commit) over the same real photos.

Vectors lie near a 32-dimensional subspace (plus noise), as real image embeddings do (their
intrinsic dimension is low). Uniformly random 512-d vectors, or tight clusters of equidistant
points, make "the" top 10 nearly arbitrary and are worst cases that real data does not pose.
Run: .venv/bin/python bench/bench_store.py [--vectors 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent


def embeddings_like(n: int, dim: int, seed: int) -> np.ndarray:
    basis = np.random.default_rng(0).normal(size=(32, dim)).astype(np.float32)  # shared
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 32)).astype(np.float32)
    vectors = latent @ basis + 0.3 * rng.normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(seconds, q) * 1000)


def bench_search(store, n: int, dim: int, queries: int) -> dict:
    from imgembed.store import Provenance, Record

    vectors = embeddings_like(n, dim, seed=1)
    store.create_collection("bench", Provenance("bench", "random", dim, "none"))
    started = time.perf_counter()
    for start in range(0, n, 2000):
        store.upsert("bench", [Record(f"v{i}", vectors[i], f"h{i}", f"s{i}")
                               for i in range(start, min(n, start + 2000))])  # fmt: skip
    store.analyze()  # what `imgembed index` does after a bulk load
    insert_seconds = time.perf_counter() - started
    probes = embeddings_like(queries, dim, seed=2)

    def run(exact: bool) -> tuple[list[float], list[list[str]]]:
        store.search("bench", probes[0], 10, exact=exact)  # warm-up
        seconds, ids = [], []
        for probe in probes:
            t = time.perf_counter()
            hits = store.search("bench", probe, 10, exact=exact)
            seconds.append(time.perf_counter() - t)
            ids.append([h.id for h in hits])
        return seconds, ids

    exact_seconds, truth = run(exact=True)
    rows = []
    for ef in (40, 100, 200):  # the default IMGEMBED_HNSW_EF_SEARCH is 100
        store.ef_search = ef
        seconds, found = run(exact=False)
        pairs = zip(found, truth, strict=True)
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in pairs]))
        p50, p99 = percentile_ms(seconds, 50), percentile_ms(seconds, 99)
        rows.append({"ef_search": ef, "p50_ms": p50, "p99_ms": p99, "recall_at_10": recall})
    return {
        "vectors": n, "dimension": dim, "queries": queries,
        "insert_vectors_per_s": n / insert_seconds, "hnsw": rows,
        "exact_p50_ms": percentile_ms(exact_seconds, 50),
        "exact_p99_ms": percentile_ms(exact_seconds, 99),
    }  # fmt: skip


def bench_indexing(data_dir: Path, url: str) -> dict:
    import psycopg
    from pgvector.psycopg import register_vector

    from imgembed import ImageEmbeddingService
    from imgembed.indexing import IndexItem

    photos = sorted((ROOT / ".testdata" / "photos").glob("*")) + sorted(
        (ROOT / ".testdata" / "large").glob("*")
    )
    paths = (photos * 4)[:40]
    settings = {"model": "efficientnet-lite0", "cache_embeddings": False, "data_dir": data_dir,
                "batch_size": 8}  # fmt: skip
    with ImageEmbeddingService(**settings) as service:
        service.encoder  # noqa: B018 - load outside the clock
        with psycopg.connect(url) as connection:  # naive: one image, one row, one commit
            register_vector(connection)
            connection.execute("CREATE TABLE naive (id text PRIMARY KEY, embedding vector)")
            connection.commit()
            started = time.perf_counter()
            for n, path in enumerate(paths):
                vector = service.embed_image(path)
                connection.execute("INSERT INTO naive VALUES (%s, %s)", (f"{n}", vector))
                connection.commit()
            naive = time.perf_counter() - started
        items = [IndexItem(f"{n}", str(p)) for n, p in enumerate(paths)]
        started = time.perf_counter()
        stats = service.index(items, "indexing")
        ours = time.perf_counter() - started
        assert stats.successful == len(paths)
    return {
        "images": len(paths), "model": "efficientnet-lite0",
        "naive_images_per_s": len(paths) / naive, "index_images_per_s": len(paths) / ours,
        "ratio": naive / ours,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--dimension", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()

    from imgembed.store import embedded
    from imgembed.store.postgres import PostgresStore

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        url = embedded.start(data_dir)
        try:
            store = PostgresStore(url)
            search = bench_search(store, args.vectors, args.dimension, args.queries)
            store.close()
            indexing = bench_indexing(data_dir, url)
        finally:
            embedded.stop(data_dir)
    print(f"search over {search['vectors']:,} {search['dimension']}-d vectors, "
          f"{search['queries']} queries, top 10, embedded PostgreSQL + pgvector, "
          f"{os.cpu_count()} cores")  # fmt: skip
    exact_p50 = search["exact_p50_ms"]
    for row in search["hnsw"]:
        print(f"  HNSW ef_search {row['ef_search']:3d}: p50 {row['p50_ms']:6.2f} ms  "
              f"p99 {row['p99_ms']:6.2f} ms  recall@10 {row['recall_at_10']:.3f}  "
              f"({exact_p50 / row['p50_ms']:.0f}x faster than exact at p50)")  # fmt: skip
    print(f"  exact search:      p50 {exact_p50:6.2f} ms  p99 {search['exact_p99_ms']:6.2f} ms")
    print(f"  inserts: {search['insert_vectors_per_s']:,.0f} vectors/s (HNSW maintained)")
    print(f"indexing {indexing['images']} real photos with {indexing['model']}: "
          f"{indexing['index_images_per_s']:.1f} images/s vs naive loop "
          f"{indexing['naive_images_per_s']:.1f} ({indexing['ratio']:.2f}x)")  # fmt: skip
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "store.json").write_text(json.dumps({"search": search, "indexing": indexing}, indent=2))
    print(f"written to {out / 'store.json'}")


if __name__ == "__main__":
    main()
