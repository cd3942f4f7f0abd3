"""Vector store benchmark, in one process (the machine's CPU flags and load are printed):

1. loading N vectors (default 100k, 512-d) into a new collection through the store's API, as
   `imgembed index` does: a bulk load (COPY into the table, the HNSW index built afterwards);
   then inserts into the grown collection with the index maintained, batch by batch;
2. search: latency p50/p99 and recall@10 of the HNSW index at several ef_search, against the
   true top 10 (computed exactly in NumPy), and the store's exact search (a full scan);
3. Qdrant's local mode (the default without a server: exact search in the process) on the
   same vectors and queries;
4. indexing real photos: `imgembed index`'s pipeline (`service.index`) against plain
   `embed_images` (same model, nothing stored; the two alternated twice) and a naive loop
   (embed one image, insert one row, commit);
5. the CLI: `imgembed search` as a new process each time, on the ONNX runtime, the embedded
   server kept up by `imgembed db start` (median of several runs).

Vectors lie near a 32-dimensional subspace (plus noise), as real image embeddings do (their
intrinsic dimension is low). Uniformly random 512-d vectors, or tight clusters of equidistant
points, make "the" top 10 nearly arbitrary and are worst cases that real data does not pose.
Run: .venv/bin/python bench/bench_store.py [--vectors 100000] [--qdrant-vectors 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
IMGEMBED = str(Path(sys.executable).with_name("imgembed"))


def embeddings_like(n: int, dim: int, seed: int) -> np.ndarray:
    basis = np.random.default_rng(0).normal(size=(32, dim)).astype(np.float32)  # shared
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 32)).astype(np.float32)
    vectors = latent @ basis + 0.3 * rng.normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def records(vectors: np.ndarray, start: int, stop: int) -> list:
    from imgembed.store import Record

    return [Record(f"v{i}", vectors[i - start], f"h{i}", f"s{i}") for i in range(start, stop)]


def upsert_all(store, name: str, vectors: np.ndarray, first: int, batch: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(vectors), batch):
        chunk = vectors[start : start + batch]
        store.upsert(name, records(chunk, first + start, first + start + len(chunk)))
    return time.perf_counter() - started


def timed_searches(store, name: str, probes: np.ndarray, exact: bool = False):
    for probe in probes[:10]:  # warm-up: plans prepared, pages in memory
        store.search(name, probe, 10, exact=exact)
    seconds, found = [], []
    for probe in probes:
        started = time.perf_counter()
        hits = store.search(name, probe, 10, exact=exact)
        seconds.append(time.perf_counter() - started)
        found.append([int(hit.id[1:]) for hit in hits])
    return seconds, found


def latency(seconds: list[float], found, truth: np.ndarray) -> dict:
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    return {"p50_ms": float(np.percentile(seconds, 50) * 1000),
            "p99_ms": float(np.percentile(seconds, 99) * 1000),
            "recall_at_10": float(recall)}  # fmt: skip


def true_top10(probes: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    return np.argsort(-(probes @ vectors.T), axis=1)[:, :10]


def bench_postgres(store, vectors, probes, grow: int) -> dict:
    from imgembed.store import Provenance

    n, dim = vectors.shape
    store.create_collection("bench", Provenance("bench", "random", dim, "none"))
    started = time.perf_counter()
    assert store.bulk_load("bench", n)
    loaded = upsert_all(store, "bench", vectors, 0, batch=5000)
    built_at = time.perf_counter()
    store.refresh("bench")  # the index built once, over every row
    built = time.perf_counter() - built_at
    total = time.perf_counter() - started
    extra = embeddings_like(grow, dim, seed=3)
    maintained = upsert_all(store, "bench", extra, n, batch=500)  # index kept up to date
    store.refresh("bench")
    truth = true_top10(probes, np.concatenate([vectors, extra]))  # ids v0.. in this order
    rows = []
    for ef in (40, 64, 100, 200):  # the default IMGEMBED_HNSW_EF_SEARCH is 100
        store.ef_search = ef
        rows.append({"ef_search": ef, **latency(*timed_searches(store, "bench", probes), truth)})
    store.ef_search = 100
    exact = latency(*timed_searches(store, "bench", probes[:20], exact=True), truth[:20])
    return {
        "bulk_load": {"vectors": n, "copy_s": loaded, "index_build_s": built,
                      "vectors_per_s": n / total},
        "maintained_inserts": {"vectors": grow, "vectors_per_s": grow / maintained},
        "hnsw": rows, "exact": exact,
    }  # fmt: skip


def bench_qdrant(folder: Path, vectors, probes, truth) -> dict:
    from imgembed.store import Provenance
    from imgembed.store.qdrant import QdrantStore

    store = QdrantStore(path=folder)
    store.create_collection("bench", Provenance("bench", "random", vectors.shape[1], "none"))
    loaded = upsert_all(store, "bench", vectors, 0, batch=1000)
    result = latency(*timed_searches(store, "bench", probes[:50]), truth[:50])
    store.close()
    return {"vectors": len(vectors), "vectors_per_s": len(vectors) / loaded, **result}


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
        service.embed_images(paths[:2])  # model loaded and warm outside the clock
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
        embed = ours = 0.0
        for round_ in range(2):  # alternated: the machine's load drifts within a run
            started = time.perf_counter()
            assert all(r.error is None for r in service.embed_images(paths))
            embed += (time.perf_counter() - started) / 2
            items = [IndexItem(f"{round_}-{n}", str(p)) for n, p in enumerate(paths)]
            started = time.perf_counter()
            stats = service.index(items, "indexing")  # new ids: every image stored
            ours += (time.perf_counter() - started) / 2
            assert stats.successful == len(paths)
    return {"images": len(paths), "model": "efficientnet-lite0",
            "naive_images_per_s": len(paths) / naive,
            "embed_images_per_s": len(paths) / embed,
            "index_images_per_s": len(paths) / ours,
            "index_vs_naive": naive / ours, "index_vs_embed_images": embed / ours}  # fmt: skip


def bench_cli(data_dir: Path, runs: int = 4) -> dict:
    """`imgembed search` by text as a new process, ONNX runtime, tiny model, warm server
    (`imgembed db start`: its resident process answers; the first search loads the model)."""
    env = {**os.environ, "IMGEMBED_DATA_DIR": str(data_dir), "IMGEMBED_RUNTIME": "onnx",
           "IMGEMBED_MODEL": "imgembed-tiny", "IMGEMBED_PRETRAINED": "seed:0",
           "IMGEMBED_COLLECTION": "cli"}  # fmt: skip

    def imgembed(*args: str) -> float:
        started = time.perf_counter()
        subprocess.run([IMGEMBED, *args], env=env, check=True, capture_output=True, timeout=600)
        return time.perf_counter() - started

    imgembed("db", "start", "--for", "10m")
    from imgembed import resident

    assert resident.status(data_dir) is not None, "no resident search process"
    try:
        photos = ROOT / ".testdata" / "photos"
        imgembed("index", str(photos))  # exports the ONNX model once
        seconds = [imgembed("search", "a photo of a cat", "--top-k", "5") for _ in range(runs)]
        bare = imgembed("--help")
    finally:
        imgembed("db", "stop")
    return {"runs": runs, "search_median_s": statistics.median(seconds[1:]),
            "search_min_s": min(seconds), "help_s": bare}  # fmt: skip


def cpu_flags() -> str:
    from imgembed.models.auto import cpu_flags

    flags = cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")
    return " ".join(flag for flag in wanted if flag in flags) or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--dimension", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--grow", type=int, default=500, help="inserts with the index kept")
    parser.add_argument("--qdrant-vectors", type=int, default=2000)
    args = parser.parse_args()

    from imgembed.store import embedded
    from imgembed.store.postgres import PostgresStore

    began = time.perf_counter()
    vectors = embeddings_like(args.vectors, args.dimension, seed=1)
    probes = embeddings_like(args.queries, args.dimension, seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        url = embedded.start(data_dir)
        try:
            store = PostgresStore(url)
            postgres = bench_postgres(store, vectors, probes, args.grow)
            store.close()
            indexing = bench_indexing(data_dir, url)
        finally:
            embedded.stop(data_dir)
        few = vectors[: args.qdrant_vectors]
        qdrant = bench_qdrant(data_dir / "qdrant", few, probes, true_top10(probes, few))
        cli = bench_cli(data_dir / "cli")
    seconds = time.perf_counter() - began
    load = os.getloadavg()
    print(f"{args.vectors:,} {args.dimension}-d vectors, embedded PostgreSQL + pgvector, "
          f"{os.cpu_count()} cores ({cpu_flags()}), load {load[0]:.1f}")  # fmt: skip
    bulk = postgres["bulk_load"]
    print(f"  bulk load: COPY {bulk['copy_s']:.1f} s, HNSW build {bulk['index_build_s']:.1f} s: "
          f"{bulk['vectors_per_s']:,.0f} vectors/s in all")  # fmt: skip
    grown = postgres["maintained_inserts"]
    print(f"  then {grown['vectors']:,} inserts with the index maintained: "
          f"{grown['vectors_per_s']:,.0f} vectors/s")  # fmt: skip
    for row in postgres["hnsw"]:
        print(f"  HNSW ef_search {row['ef_search']:3d}: p50 {row['p50_ms']:6.2f} ms  "
              f"p99 {row['p99_ms']:6.2f} ms  recall@10 {row['recall_at_10']:.3f}")  # fmt: skip
    exact = postgres["exact"]
    print(f"  exact search:        p50 {exact['p50_ms']:6.2f} ms  p99 {exact['p99_ms']:6.2f} ms")
    print(f"Qdrant local mode, {qdrant['vectors']:,} vectors: upsert "
          f"{qdrant['vectors_per_s']:,.0f} vectors/s, search p50 {qdrant['p50_ms']:.2f} ms "
          f"p99 {qdrant['p99_ms']:.2f} ms recall@10 {qdrant['recall_at_10']:.3f}")  # fmt: skip
    print(f"indexing {indexing['images']} real photos with {indexing['model']}: index "
          f"{indexing['index_images_per_s']:.1f} images/s, embed_images "
          f"{indexing['embed_images_per_s']:.1f} ({indexing['index_vs_embed_images']:.2f}x), "
          f"naive loop {indexing['naive_images_per_s']:.1f} "
          f"({indexing['index_vs_naive']:.2f}x)")  # fmt: skip
    print(
        f"CLI `imgembed search` (ONNX, tiny model, warm server): median "
        f"{cli['search_median_s']:.2f} s (`imgembed --help`: {cli['help_s']:.2f} s)"
    )
    print(f"benchmark took {seconds:.0f} s")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    result = {"postgres": postgres, "qdrant": qdrant, "indexing": indexing, "cli": cli,
              "cpu_flags": cpu_flags(), "load_average": load, "seconds": seconds,
              "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    (out / "store.json").write_text(json.dumps(result, indent=2))
    print(f"written to {out / 'store.json'}")


if __name__ == "__main__":
    main()
