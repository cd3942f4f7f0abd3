"""Fetch real test images from packages into .testdata/ (never committed). Idempotent.

photos/   CC0 / public-domain photos that scikit-image ships (licences in its _fetchers.py)
large/    3640x2400+ JPEG wallpapers from Debian's ukui-wallpapers package
pillow/   Pillow's own test images (its source distribution's Tests/images): every format,
          EXIF and GPS, 16-bit, animations, broken and hostile files
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / ".testdata"
SKIMAGE_PHOTOS = [  # all CC0 or public domain
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "rocket.jpg",
]
UKUI_JPEGS = ["2004default.jpg", "firstgeneration.jpg", "rhythm.jpg", "string.jpg", "the-mouse.jpg"]


def photos() -> None:
    import skimage.data

    target = ROOT / "photos"
    target.mkdir(parents=True, exist_ok=True)
    source = Path(skimage.data.__file__).parent
    for name in SKIMAGE_PHOTOS:
        if not (target / name).exists():
            shutil.copy(source / name, target / name)


def debian_jpegs() -> None:
    target = ROOT / "large"
    if all((target / name).exists() for name in UKUI_JPEGS):
        return
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        download = ["apt-get", "download", "ukui-wallpapers"]
        if subprocess.run(download, cwd=tmp, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            subprocess.run(download, cwd=tmp, check=True, capture_output=True)
        (deb,) = Path(tmp).glob("*.deb")
        subprocess.run(["dpkg", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        for name in UKUI_JPEGS:
            shutil.copy(Path(tmp) / "x/usr/share/backgrounds" / name, target / name)


def pillow_images() -> None:
    import PIL

    target = ROOT / "pillow"
    if (target / "hopper.jpg").exists():
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             f"pillow=={PIL.__version__}", "-d", tmp],
            check=True,
        )  # fmt: skip
        (sdist,) = Path(tmp).glob("*.tar.gz")
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/Tests/images/"
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                if member.isfile() and member.name.startswith(prefix):
                    out = target / member.name.removeprefix(prefix)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(archive.extractfile(member).read())


def main() -> int:
    photos()
    debian_jpegs()
    pillow_images()
    count = sum(1 for p in ROOT.rglob("*") if p.is_file())
    print(f"test data ready: {count} files in {ROOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
