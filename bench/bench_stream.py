"""Memory over a long run: 100,000 images streamed through the pipeline, RSS sampled as it goes.

The tiny seeded model on the ONNX runtime keeps the encoder cheap, so the run measures the
pipeline itself (reading, decoding, preprocessing, queues); inputs cycle through the real
photos (cache off, every image decoded). Results are consumed and dropped, as `imgembed
index` and `embed -o x.jsonl` do. Prints RSS at each tenth and writes
bench/results/stream.json. Run: .venv/bin/python bench/bench_stream.py [--images N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100_000)
    args = parser.parse_args()

    from imgembed import ImageEmbeddingService

    files = sorted((ROOT / ".testdata" / "photos").glob("*"))
    if not files:
        raise SystemExit("no photos: run scripts/setup.sh first")
    sources = [files[i % len(files)] for i in range(args.images)]
    process = psutil.Process()
    samples = []
    with tempfile.TemporaryDirectory() as tmp:
        # Export in another process, so this one never imports torch (as in production).
        imgembed = Path(sys.executable).with_name("imgembed")
        export = [imgembed, "models", "export", "imgembed-tiny", "--pretrained", "seed:0"]
        subprocess.run(export, check=True, env={**os.environ, "IMGEMBED_DATA_DIR": tmp})
        service = ImageEmbeddingService(
            model="imgembed-tiny",
            pretrained="seed:0",
            runtime="onnx",
            cache_embeddings=False,
            data_dir=tmp,
        )
        service.embed_images(files)  # warm-up
        started = time.perf_counter()
        ok = 0
        for done, result in enumerate(service.iter_images(sources), start=1):
            ok += result.ok
            if done % (args.images // 10) == 0:
                rss = process.memory_info().rss / 2**20
                samples.append({"done": done, "rss_mb": round(rss, 1)})
                rate = done / (time.perf_counter() - started)
                print(f"{done:>8} images  RSS {rss:7.1f} MB  {rate:6.0f} images/s", flush=True)
        seconds = time.perf_counter() - started
    growth = samples[-1]["rss_mb"] - samples[0]["rss_mb"]
    report = {
        "images": args.images,
        "ok": ok,
        "seconds": seconds,
        "images_per_s": args.images / seconds,
        "samples": samples,
        "rss_growth_after_first_tenth_mb": growth,
    }
    print(f"RSS growth from the first tenth to the end: {growth:+.1f} MB")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stream.json").write_text(json.dumps(report, indent=2))
    print(f"written to {RESULTS / 'stream.json'}")


if __name__ == "__main__":
    main()
