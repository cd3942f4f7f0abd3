"""`imgembed index` locally against `imgembed index --ray` on this machine, in one process.

The same real photos (the small ones and the large wallpapers, cycled; cache off), each under
its own id, into two collections of the embedded PostgreSQL: the local pipeline (decode
threads + encoder in one process), then a local Ray with the machine's CPUs (decode tasks +
one encoder actor per two CPUs). Reported: images/s over the whole run, time to the first
stored batch (Ray starts its workers and loads the model in each actor), and the rate over
the run's second half (steady state: what each further actor adds). What bounds a cluster's
store, its insert rate, is measured by bench/bench_store.py.

Run: .venv/bin/python bench/bench_ray.py [--images 192] [--model ViT-B-32|imgembed-tiny]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TESTDATA = ROOT / ".testdata"


class Clock:
    """Progress callbacks with their time: (seconds since start, items done)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.points: list[tuple[float, int]] = []

    def __call__(self, progress) -> None:
        self.points.append((time.perf_counter() - self.started, progress.done))

    def summary(self, total: int) -> dict:
        """Images/s over the whole run; and over its second half (steady: workers started,
        model loaded, images prepared during the start used up)."""
        seconds = time.perf_counter() - self.started
        first_at = self.points[0][0]
        mid_at, mid_done = next(p for p in self.points if p[1] >= total / 2)
        last_at, last_done = self.points[-1]
        steady = (last_done - mid_done) / (last_at - mid_at) if last_at > mid_at else None
        return {"images_per_s": total / seconds, "seconds": seconds,
                "first_batch_s": first_at, "steady_images_per_s": steady}  # fmt: skip


def bench_index(settings, paths: list[Path]) -> dict:
    import ray

    from imgembed import ImageEmbeddingService, distributed
    from imgembed.indexing import IndexItem

    items = [IndexItem(f"{n:05d}", str(path)) for n, path in enumerate(paths)]
    with ImageEmbeddingService(settings) as service:
        service.encoder  # noqa: B018 - both runs start with the model loaded here
        service.store  # noqa: B018
        clock = Clock()
        stats = service.index(items, "local", progress=clock)
        assert stats.successful == len(items), stats.failures
        local = clock.summary(len(items))

        started = time.perf_counter()
        ray.init(num_cpus=settings.workers, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)  # fmt: skip
        ray_start = time.perf_counter() - started
        try:
            clock = Clock()
            stats = distributed.index(service, items, "ray", progress=clock)
            assert stats.successful == len(items), stats.failures
            on_ray = clock.summary(len(items))
            actors = settings.ray_actors or max(1, settings.workers // 2)
        finally:
            ray.shutdown()
    steady = (on_ray["steady_images_per_s"], local["steady_images_per_s"])
    return {"images": len(items), "local": local, "ray": on_ray, "ray_init_s": ray_start,
            "actors": actors, "ratio": on_ray["images_per_s"] / local["images_per_s"],
            "steady_ratio": steady[0] / steady[1] if all(steady) else None}  # fmt: skip


def photos(count: int) -> list[Path]:
    found = sorted((TESTDATA / "photos").glob("*")) + sorted((TESTDATA / "large").glob("*"))
    if not found:
        raise SystemExit("no test images: run scripts/setup.sh first")
    return (found * (count // len(found) + 1))[:count]


def random_checkpoint(model: str, folder: Path) -> str:
    """The architecture with seeded random weights (speed does not depend on the values, and
    real weights cannot be had offline), saved as a checkpoint."""
    import open_clip
    import torch

    torch.manual_seed(0)
    path = folder / f"{model}-random.pt"
    torch.save(open_clip.create_model(model).state_dict(), path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--model", default="ViT-B-32", help="an open_clip architecture "
                        "(random weights) or imgembed-tiny")  # fmt: skip
    args = parser.parse_args()

    from imgembed.config import Settings
    from imgembed.store import embedded

    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        data_dir = Path(tmp)
        pretrained = "seed:0" if args.model == "imgembed-tiny" else None
        settings = Settings(
            model=args.model,
            pretrained=pretrained or random_checkpoint(args.model, data_dir),
            cache_embeddings=False,
            data_dir=data_dir,
        )
        try:
            indexing = bench_index(settings, photos(args.images))
        finally:
            embedded.stop(data_dir)
    load = os.getloadavg()
    result = {"indexing": indexing, "model": args.model,
              "cores": os.cpu_count(), "load_average": load, "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    local, ray = indexing["local"], indexing["ray"]
    print(f"indexing {indexing['images']} real photos with {args.model}, cache off, "
          f"{os.cpu_count()} cores (load {load[0]:.1f}):")  # fmt: skip
    print(f"  local:  {local['images_per_s']:5.1f} images/s  ({local['seconds']:.1f} s; first "
          f"batch stored at {local['first_batch_s']:.1f} s, second half "
          f"{local['steady_images_per_s'] or 0:.1f} images/s)")  # fmt: skip
    print(f"  Ray:    {ray['images_per_s']:5.1f} images/s  ({ray['seconds']:.1f} s; first "
          f"batch stored at {ray['first_batch_s']:.1f} s, second half "
          f"{ray['steady_images_per_s'] or 0:.1f} images/s with {indexing['actors']} encoder "
          f"actor(s)); ray.init {indexing['ray_init_s']:.1f} s")  # fmt: skip
    print(f"  Ray / local: {indexing['ratio']:.2f}x overall, "
          f"{indexing['steady_ratio'] or 0:.2f}x over the second half")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"ray-{args.model}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
