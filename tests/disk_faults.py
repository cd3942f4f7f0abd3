"""Embeds images with the embedding cache on a small tmpfs that is full or read-only. Run as
root in a private mount namespace, so the mount is seen by nothing else:

    unshare -m python tests/disk_faults.py full|full-at-start|read-only MOUNTPOINT IMAGE...

Prints one JSON object: the vectors, which were cached, the errors and the cache's warnings."""

import gc
import json
import logging
import subprocess
import sys
from pathlib import Path

from imgembed import ImageEmbeddingService

TINY = {"model": "imgembed-tiny", "pretrained": "seed:0"}


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _fill(folder: Path) -> None:
    """Take every free byte of the file system."""
    with (folder / "filler").open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def _populate(cache_dir: Path, images: list[str]) -> None:
    with ImageEmbeddingService(**TINY, cache_dir=cache_dir) as service:
        service.embed_images(images)
    del service
    gc.collect()  # worker threads' connections close: the WAL is checkpointed and removed


def main(scenario: str, mount: Path, images: list[str]) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    cache_dir = mount / "cache"
    handler = _Warnings()
    logging.getLogger("imgembed.engine.cache").addHandler(handler)
    if scenario == "full":  # fills up while the cache is open and in use
        service = ImageEmbeddingService(**TINY, cache_dir=cache_dir)
        service.embed_images(images[:1])
        _fill(mount)
    else:
        _populate(cache_dir, images[:2])
        if scenario == "full-at-start":
            _fill(mount)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        service = ImageEmbeddingService(**TINY, cache_dir=cache_dir)
    results = service.embed_images(images)
    service.close()
    print(
        json.dumps(
            {
                "vectors": [None if r.error else r.embedding.tolist() for r in results],
                "cached": [r.cached for r in results],
                "errors": [str(r.error) for r in results if r.error],
                "warnings": handler.messages,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
