"""What verifying an ONNX export costs: the sha256 of every file (towers + tokenizer) against
the manifest, once per process, then a stat per file; compared with loading the same towers
into onnxruntime sessions, which every process on the ONNX runtime pays anyway.

Full ViT-B-32 architecture with seeded random weights (the file sizes are those of real
weights), exported to fp32 and int8 in a temporary folder. Files are in the page cache (just
written); the first read after a reboot costs the disk's read time in both columns alike.

Prints a table and writes bench/results/export_verify.json.
Run: .venv/bin/python bench/bench_export_verify.py
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
REPEATS = 3


def _best(run) -> float:
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(ref, settings, precision: str) -> dict:
    import onnxruntime as ort

    from imgembed.models import onnx_manifest
    from imgembed.models.onnx_export import export

    folder = export(ref, precision, settings)

    def cold() -> None:
        onnx_manifest._DIGESTS.clear()  # as a fresh process
        assert onnx_manifest.check_export(folder, ref)[1] is None

    def warm() -> None:
        assert onnx_manifest.check_export(folder, ref)[1] is None

    def sessions() -> None:
        manifest = onnx_manifest.read_manifest(folder)
        for name in manifest["towers"].values():
            ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])

    manifest = onnx_manifest.read_manifest(folder)
    size = sum(record["bytes"] for record in manifest["files"].values())
    verify, again, load = _best(cold), _best(warm), _best(sessions)
    return {
        "precision": precision,
        "files": sorted(manifest["files"]),
        "megabytes": round(size / 1e6, 1),
        "verify_first_s": round(verify, 3),
        "verify_again_ms": round(again * 1e3, 2),
        "sha256_mb_per_s": round(size / 1e6 / verify),
        "load_sessions_s": round(load, 3),
        "verify_to_load": round(verify / load, 2),
    }


def main() -> None:
    import open_clip
    import torch

    from imgembed.config import load_settings
    from imgembed.models import registry

    with tempfile.TemporaryDirectory() as work:
        torch.manual_seed(1234)
        checkpoint = Path(work) / "vit-b-32-random.pt"
        torch.save(open_clip.create_model("ViT-B-32").state_dict(), checkpoint)
        ref = registry.ModelRef("ViT-B-32", str(checkpoint))
        settings = load_settings(model_cache_dir=Path(work), runtime="onnx")
        rows = [measure(ref, settings, precision) for precision in ("fp32", "int8")]
    print(f"{'':6} {'MB':>7} {'verify 1st':>11} {'again':>9} {'MB/s':>6} {'load':>8} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['precision']:6} {r['megabytes']:7.1f} {r['verify_first_s']:10.3f}s "
            f"{r['verify_again_ms']:7.2f}ms {r['sha256_mb_per_s']:6d} "
            f"{r['load_sessions_s']:7.3f}s {r['verify_to_load']:6.2f}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"machine": platform.machine(), "cpus": os.cpu_count(), "exports": rows}
    (RESULTS / "export_verify.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
