"""End-to-end images/s of imgembed's batch pipeline against the naive loop, in one process.

Naive loop (what most code does): for each file, PIL open + convert, open_clip's
preprocess, encode one image, normalise. Both run the full ViT-B-32 architecture
(random weights: speed does not depend on the values) over real photos of mixed sizes
(scikit-image photos and 3640x2400+ Debian wallpapers), cache off. Reports the ratio and
the peak RSS of the process during each phase. Run: .venv/bin/python bench/bench_pipeline.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


class PeakRss:
    """Peak resident memory of this process while the block runs (sampled every 5 ms)."""

    def __enter__(self) -> PeakRss:
        self._process = psutil.Process()
        self.start = self._process.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def naive_loop(model, preprocess, paths: list[Path]) -> np.ndarray:
    import torch
    from PIL import Image

    out = []
    with torch.no_grad():
        for path in paths:
            pixels = preprocess(Image.open(path).convert("RGB")).unsqueeze(0)
            out.append(torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)[0].numpy())
    return np.stack(out)


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """Best wall time over `repeats`, the peak RSS, and the last output."""
    best, peak, output = float("inf"), 0.0, None
    for _ in range(repeats):
        with PeakRss() as rss:
            started = time.perf_counter()
            output = fn()
            best = min(best, time.perf_counter() - started)
        peak = max(peak, rss.peak_mb)
    return best, peak, output


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64, help="images per timed run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import open_clip
    import torch

    from imgembed import ImageEmbeddingService

    files = sorted((ROOT / ".testdata" / "photos").glob("*")) + sorted(
        (ROOT / ".testdata" / "large").glob("*")
    )
    if not files:
        raise SystemExit("no photos: run scripts/setup.sh first")
    paths = (files * (args.images // len(files) + 1))[: args.images]

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "vit-b-32.pt"
        torch.manual_seed(0)
        torch.save(open_clip.create_model("ViT-B-32").state_dict(), checkpoint)
        model, _, preprocess = open_clip.create_model_and_transforms(
            "ViT-B-32", pretrained=str(checkpoint)
        )
        model.eval()
        common = {"model": "ViT-B-32", "pretrained": str(checkpoint), "cache_embeddings": False}
        ours = ImageEmbeddingService(**common, batch_size=args.batch_size, data_dir=tmp)
        exact = ImageEmbeddingService(
            **common, batch_size=args.batch_size, exact=True, data_dir=tmp
        )
        ours.encoder  # noqa: B018 - load outside the clock
        # Warm-up: first calls allocate and pick kernels.
        naive_loop(model, preprocess, paths[:4])
        ours.embed_images(paths[:4])

        rows = {}
        for name, fn in {
            "naive loop (open_clip, 1 image at a time)": lambda: naive_loop(
                model, preprocess, paths
            ),
            f"imgembed exact (batch {args.batch_size})": lambda: np.stack(
                [r.embedding for r in exact.embed_images(paths)]
            ),
            f"imgembed default (batch {args.batch_size})": lambda: np.stack(
                [r.embedding for r in ours.embed_images(paths)]
            ),
        }.items():
            seconds, peak_mb, vectors = timed(fn, args.repeats)
            rows[name] = {
                "seconds": seconds,
                "images_per_s": len(paths) / seconds,
                "peak_rss_mb": peak_mb,
                "vectors": vectors,
            }

    baseline = next(iter(rows.values()))
    reference = baseline["vectors"]
    print(
        f"{len(paths)} images (mixed sizes), ViT-B-32 architecture, torch {torch.__version__}, "
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    )
    print(f"{'method':48} {'img/s':>7} {'ratio':>6} {'peak RSS MB':>12} {'min cos':>10}")
    report = {"images": len(paths), "cores": os.cpu_count(), "torch": torch.__version__, "rows": []}
    for name, row in rows.items():
        ratio = row["images_per_s"] / baseline["images_per_s"]
        cosine = float(np.min(np.sum(row["vectors"] * reference, axis=1)))
        print(
            f"{name:48} {row['images_per_s']:7.2f} {ratio:6.2f} "
            f"{row['peak_rss_mb']:12.0f} {cosine:10.7f}"
        )
        report["rows"].append(
            {
                "method": name,
                "images_per_s": row["images_per_s"],
                "ratio": ratio,
                "peak_rss_mb": row["peak_rss_mb"],
                "min_cosine": cosine,
            }
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(report, indent=2))
    print(f"written to {RESULTS / 'pipeline.json'}")


if __name__ == "__main__":
    main()
