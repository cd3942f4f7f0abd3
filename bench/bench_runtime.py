"""Runtimes compared in one run: torch fp32 (open_clip, the reference) vs ONNX fp32 vs ONNX int8,
and torch bf16 where the CPU has bf16 instructions (avx512_bf16 / amx_bf16).

All on the full ViT-B-32 architecture with seeded random weights (speed does not depend on
the values; real weights cannot be fetched offline) over real photos of mixed sizes
(scikit-image photos and 3640x2400+ Debian wallpapers):

  model      encoder only, preprocessed batch in memory: images/s at batch 1 and 8, and
             the cosine to torch fp32 (min over the photos, images and texts)
  text       one query at a time: latency p50
  fresh      a new process per runtime: seconds to the first embedding, peak RSS, whether
             torch was imported
  pipeline   read + decode + preprocess + encode, cache off: images/s against the naive
             one-image-at-a-time open_clip loop, interleaved rounds (median round's ratio)

Prints a table and writes bench/results/runtime.json.
Run: .venv/bin/python bench/bench_runtime.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RUNTIMES = (("torch", "fp32"), ("onnx", "fp32"), ("onnx", "int8"))
BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # where torch's bf16 runs natively (oneDNN)
PROMPTS = ["a photo of a dog", "a red dress", "ein Fahrrad", "twee katten op een bank"]


def photos() -> list[Path]:
    files = sorted((ROOT / ".testdata" / "photos").glob("*")) + sorted(
        (ROOT / ".testdata" / "large").glob("*")
    )
    if not files:
        raise SystemExit("no photos: run scripts/setup.sh first")
    return files


def child(runtime: str, precision: str, checkpoint: str, model_dir: str, image: str) -> None:
    """A fresh process: time from its start to the first embedding, and its peak RSS
    (VmHWM: getrusage's maximum survives exec, so it would report the parent's)."""
    import psutil

    from imgembed import ImageEmbeddingService

    service = ImageEmbeddingService(
        model="ViT-B-32",
        pretrained=checkpoint,
        runtime=runtime,
        precision=precision,
        model_cache_dir=model_dir,
        cache_embeddings=False,
    )
    service.embed_image(image)
    first = time.time() - psutil.Process().create_time()
    print(
        json.dumps(
            {
                "first_embedding_s": first,
                "peak_rss_mb": _vm_hwm_kb() / 1024,
                "torch_imported": "torch" in sys.modules,
            }
        )
    )


def _vm_hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def model_only(encoders: dict, batch: np.ndarray, sizes: list[int], seconds: float) -> dict:
    rates: dict = {}
    for key, encoder in encoders.items():
        for size in sizes:
            chunk = batch[:size]
            encoder.encode_images(chunk)  # warm-up
            runs, started = 0, time.perf_counter()
            while runs < 2 or time.perf_counter() - started < seconds:
                encoder.encode_images(chunk)
                runs += 1
            rates[(key, size)] = runs * size / (time.perf_counter() - started)
    return rates


def text_p50(encoder, rounds: int = 20) -> float:
    encoder.encode_texts(PROMPTS[:1])
    latencies = []
    for i in range(rounds):
        started = time.perf_counter()
        encoder.encode_texts([PROMPTS[i % len(PROMPTS)]])
        latencies.append(time.perf_counter() - started)
    return statistics.median(latencies) * 1000


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64, help="images per pipeline run")
    parser.add_argument("--seconds", type=float, default=4.0, help="per model-only point")
    parser.add_argument("--batch-size", type=int, default=32, help="pipeline batch size")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved pipeline rounds")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    import open_clip
    import torch
    from bench_pipeline import naive_loop, timed

    from imgembed import ImageEmbeddingService
    from imgembed.models.auto import cpu_class, cpu_flags

    flags = cpu_flags()
    runtimes = RUNTIMES + ((("torch", "bf16"),) if flags & BF16_FLAGS else ())
    files = photos()
    paths = (files * (args.images // len(files) + 1))[: args.images]
    report: dict = {
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "cpu_class": cpu_class(flags),
        "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "images": len(paths),
        "rows": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "vit-b-32.pt"
        torch.manual_seed(0)
        torch.save(open_clip.create_model("ViT-B-32").state_dict(), checkpoint)
        common = {
            "model": "ViT-B-32",
            "pretrained": str(checkpoint),
            "cache_embeddings": False,
            "model_cache_dir": tmp,
            "data_dir": tmp,
            "batch_size": args.batch_size,
        }
        services = {
            (rt, p): ImageEmbeddingService(**common, runtime=rt, precision=p) for rt, p in runtimes
        }
        for key, service in services.items():
            started = time.perf_counter()
            service.encoder  # noqa: B018 - exports the ONNX models on first use
            report["rows"].setdefault(f"{key[0]} {key[1]}", {})["load_or_export_s"] = (
                time.perf_counter() - started
            )
        encoders = {key: s.encoder for key, s in services.items()}
        reference = encoders[("torch", "fp32")]
        intake = services[("torch", "fp32")].intake
        batch = np.stack(
            [
                reference.preprocessor(intake.read(f).decode(intake.limits, None).image)
                for f in files
            ]
        )
        batch8 = np.concatenate([batch] * (8 // len(batch) + 1))[:8]
        rates = model_only(encoders, batch8, [1, 8], args.seconds)
        ref_images = reference.encode_images(batch)
        ref_texts = reference.encode_texts(PROMPTS)
        for key, encoder in encoders.items():
            row = report["rows"][f"{key[0]} {key[1]}"]
            for size in (1, 8):
                row[f"model_img_s_b{size}"] = rates[(key, size)]
                row[f"model_ratio_b{size}"] = rates[(key, size)] / rates[(("torch", "fp32"), size)]
            row["image_cos_min"] = cosine_min(encoder.encode_images(batch), ref_images)
            row["text_cos_min"] = cosine_min(encoder.encode_texts(PROMPTS), ref_texts)
            row["text_p50_ms"] = text_p50(encoder)

        for rt, p in runtimes:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", rt, p, str(checkpoint), tmp, str(files[0])],
                capture_output=True,
                text=True,
                check=True,
            )
            report["rows"][f"{rt} {p}"].update(json.loads(proc.stdout.splitlines()[-1]))

        model, _, preprocess = open_clip.create_model_and_transforms(
            "ViT-B-32", pretrained=str(checkpoint)
        )
        model.eval()
        naive_loop(model, preprocess, paths[:2])
        for service in services.values():
            service.embed_images(paths[:4])  # warm-up
        # Interleaved rounds, each a ratio to the naive loop of the same round; the median
        # round is reported: on a shared machine the load drifts within a run.
        times: dict = {}
        for _ in range(args.rounds):
            runs = {"naive": lambda: naive_loop(model, preprocess, paths)}
            runs |= {key: (lambda s=s: s.embed_images(paths)) for key, s in services.items()}
            for key, run in runs.items():
                times.setdefault(key, []).append(timed(run, 1)[0])
        naive = times.pop("naive")
        report["naive_loop_img_s"] = len(paths) / statistics.median(naive)
        for key, seconds in times.items():
            row = report["rows"][f"{key[0]} {key[1]}"]
            ratios = [n / s for n, s in zip(naive, seconds, strict=True)]
            row["pipeline_img_s"] = len(paths) / statistics.median(seconds)
            row["pipeline_ratio_vs_naive"] = statistics.median(ratios)
            row["pipeline_ratio_range"] = [min(ratios), max(ratios)]
        for service in services.values():
            service.close()

    print_table(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runtime.json").write_text(json.dumps(report, indent=2))
    print(f"written to {RESULTS / 'runtime.json'}")


def print_table(report: dict) -> None:
    print(
        f"ViT-B-32 (random weights), {report['images']} real photos of mixed sizes, "
        f"{report['machine']}, torch {report['torch']}, onnxruntime {report['onnxruntime']}"
    )
    print(f"CPU class {report['cpu_class']}: {' '.join(report['cpu_flags'])}")
    columns = [
        ("model img/s b1", "model_img_s_b1", "{:.1f}"),
        ("x torch", "model_ratio_b1", "{:.2f}"),
        ("model img/s b8", "model_img_s_b8", "{:.1f}"),
        ("x torch", "model_ratio_b8", "{:.2f}"),
        ("cos img min", "image_cos_min", "{:.5f}"),
        ("cos text min", "text_cos_min", "{:.5f}"),
        ("text p50 ms", "text_p50_ms", "{:.1f}"),
        ("first emb s", "first_embedding_s", "{:.1f}"),
        ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
        ("torch loaded", "torch_imported", "{}"),
        ("end-to-end img/s", "pipeline_img_s", "{:.1f}"),
        ("x naive (median)", "pipeline_ratio_vs_naive", "{:.2f}"),
        ("x naive (rounds)", "pipeline_ratio_range", "{0[0]:.2f}-{0[1]:.2f}"),
    ]
    names = list(report["rows"])
    print(f"| {'':18} | " + " | ".join(names) + " |")
    print("|" + "---|" * (len(names) + 1))
    for title, key, fmt in columns:
        cells = [fmt.format(report["rows"][n][key]) for n in names]
        print(f"| {title:18} | " + " | ".join(cells) + " |")
    print(f"naive open_clip loop, one image at a time: {report['naive_loop_img_s']:.1f} img/s")


if __name__ == "__main__":
    main()
