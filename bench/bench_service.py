"""The HTTP service under concurrent load, with dynamic batching on and off, in one run.

Starts `imgembed serve` (tiny seeded CLIP by default, cache off) twice on loopback: one
with batches of up to 32 (dynamic batching) and one with batches of 1; at each level the
two are measured in turn, three times, and the median run counts (the machine is shared).
Each of 1, 4, 16 and 64 concurrent clients sends single-image requests (real photos by
path, by default downscaled to 256 px like product images, so decoding does not hide the
encoder) back to back for a fixed time; reports requests/s, p50 and p99 latency, errors,
mean batch size and encoder time per call, and the ratio of the two modes. Then a bounded
load run against the batching server (mixed endpoints, 64 clients) counts 5xx answers and
the server's RSS before and after.

Run: .venv/bin/python bench/bench_service.py [--images original]
       [--model ViT-B-32 --runtime onnx]
(results in bench/results/service-<model>-<runtime>-<images>.json)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PHOTOS = ROOT / ".testdata" / "photos"
IMGEMBED = str(Path(sys.executable).with_name("imgembed"))


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(env: dict[str, str], log: Path) -> Iterator[tuple[str, psutil.Process]]:
    port = _port()
    with log.open("w") as sink:
        process = subprocess.Popen(
            [IMGEMBED, "serve", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **env},
            stdout=sink,
            stderr=sink,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # the model loaded: an embedding answers
            if process.poll() is not None:
                raise SystemExit(f"the server exited; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                probe = httpx.post(f"{base}/api/v1/embeddings/text", json={"texts": ["x"]})
                if probe.status_code == 200:
                    break
            time.sleep(0.2)
        yield base, psutil.Process(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


class Connection:
    """A bare HTTP/1.1 keep-alive client. httpx's async client spends more CPU per request
    than the server does (57 against 604 req/s on /health here), so on a 2-core machine it
    would measure itself; this one keeps the load generator out of the way."""

    def __init__(self, base: str):
        parts = urlsplit(base)
        self.host, self.port = parts.hostname, parts.port

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: dict) -> int:
        data = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(data)}\r\n\r\n")  # fmt: skip
        self.writer.write(head.encode() + data)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


async def run_clients(
    base: str, clients: int, seconds: float, bodies: list[tuple[str, dict]]
) -> dict[str, float]:
    """`clients` connections sending requests back to back for `seconds`."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    stop = time.perf_counter() + seconds

    async def client(offset: int) -> None:
        connection = Connection(base)
        await connection.open()
        n = offset
        while time.perf_counter() < stop:
            path, body = bodies[n % len(bodies)]
            n += clients
            started = time.perf_counter()
            status = await connection.post(path, body)
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
        connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(latencies),
        "requests_per_second": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "errors": sum(count for status, count in statuses.items() if status != 200),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def thumbnails(photos: list[Path], folder: Path) -> list[Path]:
    """The real photos downscaled to 256 px (longest side), as JPEGs."""
    from PIL import Image

    folder.mkdir(parents=True)
    out = []
    for photo in photos:
        with Image.open(photo) as image:
            small = image.convert("RGB")
            small.thumbnail((256, 256))
            path = folder / f"{photo.stem}.jpg"
            small.save(path, quality=90)
            out.append(path)
    return out


def measure(base: str, clients: int, seconds: float, photos: list[Path]) -> dict:
    bodies = [("/api/v1/embeddings/image", {"image_path": str(p)}) for p in photos]
    before = encoder_totals(base)
    row = asyncio.run(run_clients(base, clients, seconds, bodies))
    after = encoder_totals(base)
    calls = after[0] - before[0]
    row["mean_batch"] = (after[1] - before[1]) / calls if calls else 0.0
    row["encode_ms_per_call"] = 1000 * (after[2] - before[2]) / calls if calls else 0.0
    return row


def sweep(bases: dict[str, str], levels: list[int], args, photos: list[Path]) -> dict:
    """Each level: the modes in turn, `reps` times (the machine is shared, so load drifts;
    alternating gives both modes the same conditions); the median run per mode counts."""
    for base in bases.values():  # warm-up: threads, caches, allocator
        asyncio.run(run_clients(base, 4, 2.0, [("/api/v1/embeddings/image",
                                                 {"image_path": str(photos[0])})]))  # fmt: skip
    out: dict = {mode: [] for mode in bases}
    for clients in levels:
        runs: dict[str, list[dict]] = {mode: [] for mode in bases}
        for _ in range(args.reps):
            for mode, base in bases.items():
                runs[mode].append(measure(base, clients, args.seconds, photos))
        for mode, rows in runs.items():
            rows.sort(key=lambda row: row["requests_per_second"])
            row = {**rows[len(rows) // 2], "runs_requests_per_second":
                   [r["requests_per_second"] for r in rows]}  # fmt: skip
            row["errors"] = sum(r["errors"] for r in rows)
            out[mode].append(row)
            print(
                f"  {mode:9s} {clients:3d} clients: {row['requests_per_second']:7.1f} req/s  "
                f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
                f"errors {row['errors']}  batch {row['mean_batch']:5.1f}  "
                f"encode {row['encode_ms_per_call']:6.1f} ms/call",
                flush=True,
            )
    return out


def encoder_totals(base: str) -> tuple[float, float, float]:
    """(encoder calls, images encoded, seconds encoding) so far, from /metrics."""
    values = {}
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        for name in ("imgembed_batch_size_count", "imgembed_batch_size_sum",
                     "imgembed_encode_seconds_sum"):  # fmt: skip
            if line.startswith(name + '{kind="image"}'):
                values[name] = float(line.split()[-1])
    return (
        values.get("imgembed_batch_size_count", 0.0),
        values.get("imgembed_batch_size_sum", 0.0),
        values.get("imgembed_encode_seconds_sum", 0.0),
    )


def load_run(
    base: str, process: psutil.Process, seconds: float, photos: list[Path], model: str
) -> dict:
    """Mixed endpoints from 64 clients; RSS of the server before and after each half."""
    data = base64.b64encode(photos[0].read_bytes()).decode()
    bodies = [
        ("/api/v1/embeddings/image", {"image_path": str(photos[1])}),
        ("/api/v1/embeddings/image", {"image_base64": data}),
        ("/api/v1/embeddings/image/batch", {"image_paths": [str(p) for p in photos[:4]]}),
        ("/api/v1/embeddings/text", {"texts": ["a red bicycle", "a cat on a sofa"]}),
        ("/v1/embeddings", {"model": model, "input": ["a photo of the sea"]}),
        ("/api/v1/search/image", {"query_text": "coffee",
                                  "candidate_image_paths": [str(p) for p in photos[:3]]}),
    ]  # fmt: skip
    rss = [process.memory_info().rss / 2**20]
    halves = []
    for _ in range(2):
        halves.append(asyncio.run(run_clients(base, 64, seconds / 2, bodies)))
        rss.append(process.memory_info().rss / 2**20)
    statuses: dict[str, int] = {}
    for half in halves:
        for status, count in half["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    return {
        "clients": 64,
        "seconds": seconds,
        "requests": sum(half["requests"] for half in halves),
        "statuses": statuses,
        "server_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
        "rss_mb": rss,  # after warm-up, after the first half, after the second
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="imgembed-tiny")
    parser.add_argument("--pretrained", default="seed:0")
    parser.add_argument("--runtime", default="torch", choices=["torch", "onnx"])
    parser.add_argument("--seconds", type=float, default=8.0, help="per concurrency level")
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--load-seconds", type=float, default=40.0)
    parser.add_argument("--reps", type=int, default=3, help="runs per level and mode")
    parser.add_argument(
        "--images",
        choices=["small", "original"],
        default="small",
        help="small: the photos as 256-px JPEGs (product-image size); original: as they are",
    )
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",")]
    originals = sorted(PHOTOS.glob("*"))
    if not originals:
        raise SystemExit(f"no photos in {PHOTOS}: run scripts/setup.sh first")
    work = Path(tempfile.mkdtemp(prefix="bench-service-"))
    photos = originals if args.images == "original" else thumbnails(originals, work / "small")
    env = {
        "IMGEMBED_MODEL": args.model,
        "IMGEMBED_PRETRAINED": args.pretrained,
        "IMGEMBED_RUNTIME": args.runtime,
        # ONNX exports are kept between runs (seeded weights: always the same export)
        "IMGEMBED_MODEL_CACHE_DIR": str(Path(tempfile.gettempdir()) / "imgembed-bench-models"),
        "IMGEMBED_CACHE_EMBEDDINGS": "false",  # every request is embedded
        "IMGEMBED_ALLOWED_ROOTS": str(photos[0].parent.resolve()),
        "IMGEMBED_DATA_DIR": str(work / "data"),
        "HF_HUB_OFFLINE": "1",
    }
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_at_start": os.getloadavg()},
        "model": f"{args.model} ({args.pretrained}), {args.runtime}",
        "images": args.images,
        "seconds_per_level": args.seconds,
        "modes": {},
    }  # fmt: skip
    with contextlib.ExitStack() as stack:
        servers = {
            mode: stack.enter_context(
                server({**env, "IMGEMBED_BATCH_SIZE": batch}, work / f"{mode}.log")
            )
            for mode, batch in (("batching", "32"), ("batch_1", "1"))
        }
        bases = {mode: base for mode, (base, _) in servers.items()}
        results["modes"] = sweep(bases, levels, args, photos)
        on, off = results["modes"]["batching"], results["modes"]["batch_1"]
        results["ratio_requests_per_second"] = {
            str(a["clients"]): a["requests_per_second"] / b["requests_per_second"]
            for a, b in zip(on, off, strict=True)
        }
        ratios = {k: round(v, 2) for k, v in results["ratio_requests_per_second"].items()}
        print("ratio (batching / batch 1):", ratios)
        print(f"bounded load run ({args.load_seconds:.0f} s, 64 clients, mixed endpoints):")
        base, process = servers["batching"]
        results["load"] = load = load_run(base, process, args.load_seconds, photos, args.model)
        print(f"  {load['requests']} requests, statuses {load['statuses']}, "
              f"server RSS MB {[round(r, 1) for r in load['rss_mb']]}")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"service-{args.model}-{args.runtime}-{args.images}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
