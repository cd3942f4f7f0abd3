"""The search page in a real headless Chromium (Playwright, Debian's chromium): load it,
search by text, see scored results with thumbnails, "more like this", search by an
uploaded image, the near-duplicates view, the product view and the API docs."""

import contextlib
import functools
import json
import re
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from imgembed import ImageEmbeddingService
from imgembed.api import create_app
from imgembed.catalog import Catalog
from imgembed.config import load_settings
from imgembed.indexing import IndexItem
from tests.conftest import TINY
from tests.serving import serve_in_thread

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
TIMEOUT = 60_000  # ms; the machine is shared


@contextlib.contextmanager
def browser_on(settings, ready="/ready") -> Iterator[tuple[Any, list[str]]]:
    """Headless Chromium on the page of a real server (on loopback) made from `settings`:
    the page, and the script errors it raised."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium")
    with serve_in_thread(create_app(settings), ready) as base, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{base}/")
        yield page, errors
        browser.close()


@pytest.fixture
def indexed(data_dir, photos, tmp_path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    for photo in photos:
        shutil.copy(photo, root / photo.name)
    shutil.copy(root / "rocket.jpg", root / "rocket-copy.jpg")
    files = sorted(root.iterdir())
    with ImageEmbeddingService(**TINY) as service:
        service.index([IndexItem(str(f), str(f), {"shop": "demo"}) for f in files], "photos")
    return root


def store_a_mug(indexed: Path, *stores: str) -> None:
    """One embedded product ("Coffee mug", the coffee photo) in each store named."""
    with Catalog(**TINY) as catalog:
        for store in stores:
            mug = {"id": "mug", "title": "Coffee mug", "image_url": str(indexed / "coffee.png")}
            catalog.upsert_products(store, [mug])
            assert catalog.embed(store).successful == 1


def test_the_search_page_in_a_real_browser(indexed):
    with ImageEmbeddingService(**TINY) as service:
        rocket = str(indexed / "rocket.jpg")
        service.index([IndexItem(rocket, rocket, {})], "photos2")
    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings) as (page, errors):
        page.wait_for_selector("#collection option", state="attached")
        assert page.locator("#collection").input_value() == "photos"
        assert "imgembed-tiny" in page.locator("#collection-info").inner_text()

        page.fill("#query", "a cup of coffee")
        page.click("#search")
        page.wait_for_function("document.querySelectorAll('#results .card').length === 7")
        scores = [
            float(text.split()[-1])
            for text in page.locator("#results .card .score").all_inner_texts()
        ]
        assert scores == sorted(scores, reverse=True)
        assert "results for" in page.locator("#status").inner_text()
        page.wait_for_function(
            "[...document.querySelectorAll('#results .card img')]"
            ".every(img => img.complete && img.naturalWidth > 0)"
        )  # every thumbnail arrived through the API
        assert "shop" in page.locator("#results .card dl").first.inner_text()

        coffee = page.locator("#results .card", has_text="coffee.png")
        coffee.locator(".more").click()
        page.wait_for_function(
            "document.querySelector('#status').textContent.includes('results for this image')"
        )
        first = page.locator("#results .card").first
        assert first.get_attribute("data-id") == str(indexed / "coffee.png")
        assert first.locator(".score").inner_text().endswith("1.0000")

        page.set_input_files("#file", str(indexed / "chelsea.png"))
        page.wait_for_function(
            "document.querySelector('#status').textContent.includes('results like \u2068chelsea')"
        )
        assert page.locator("#results .card").first.get_attribute("data-id") == str(
            indexed / "chelsea.png"
        )
        # the same photo again, chosen from the keyboard: a new search, not silence
        with page.expect_file_chooser() as chooser:
            page.focus("#drop")
            page.keyboard.press("Enter")
        with page.expect_response(lambda r: r.url.endswith("/api/v1/search/image")) as again:
            chooser.value.set_files(str(indexed / "chelsea.png"))
        assert again.value.status == 200
        # another collection: the results shown were the other one's, so they go
        page.select_option("#collection", "photos2")
        assert page.locator("#results .card").count() == 0
        page.select_option("#collection", "photos")

        page.click("#duplicates")
        page.wait_for_selector("#results .group")
        groups = page.locator("#results .group").all_inner_texts()
        assert any("rocket.jpg" in g and "rocket-copy.jpg" in g for g in groups)
        assert errors == []


def test_the_page_says_what_it_shows(indexed, tmp_path):
    """A long query does not widen the page; a failed search takes the last results away
    (they were another query's); a thumbnail that cannot be had is a box saying why, not a
    broken image; the page asks for nothing that is not there (no /favicon.ico 404)."""
    (indexed / "rocket-copy.jpg").unlink()  # indexed, then deleted
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings) as (page, errors):
        missing: list[str] = []
        page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
        page.reload()  # with the listener from the first request on
        page.wait_for_selector("#collection option", state="attached")
        page.fill("#query", "a cup of coffee " * 400)
        page.click("#search")
        page.wait_for_function("document.querySelectorAll('#results .card').length === 7")
        assert len(page.locator("#status").inner_text()) < 200
        wide = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert wide <= 0, f"the page scrolls sideways by {wide} px"
        box = page.locator("#results .card .no-image")
        box.wait_for()
        gone = indexed / "rocket-copy.jpg"
        assert box.inner_text() == f"no thumbnail: \u2068{gone}: no such file\u2069"
        assert missing and all("/thumbnail?" in url for url in missing), missing

        page.set_input_files("#file", str(broken))
        page.wait_for_function("document.querySelector('#status').classList.contains('error')")
        assert "broken.png" in page.locator("#status").inner_text()
        assert page.locator("#results .card").count() == 0
        assert errors == []


def test_the_page_asks_for_an_api_key_when_the_server_wants_one(indexed):
    with ImageEmbeddingService(**TINY) as service:
        rocket = str(indexed / "rocket.jpg")
        service.index([IndexItem(rocket, rocket, {})], "photos2")
    settings = load_settings(**TINY, allowed_roots=[indexed], api_keys="page-key")
    with browser_on(settings) as (page, _):
        page.wait_for_function("document.querySelector('#status').textContent.includes('401')")
        assert page.get_attribute("#query", "placeholder").startswith("No collection to search")
        # where to give the key is said, and the box is open (it was a folded "API key")
        assert (
            page.locator("#status").inner_text().endswith("(enter the key under “API key” above)")
        )
        assert page.locator("#api-key").is_visible()
        page.fill("#api-key", "ключ")  # no header can carry it: said so, not fetch's words
        page.press("#api-key", "Enter")
        page.wait_for_function(
            "document.querySelector('#status').textContent.includes('cannot carry')"
        )
        page.fill("#api-key", "page-key")
        page.press("#api-key", "Enter")
        page.wait_for_selector("#collection option", state="attached")
        # the 401 of before the key is not left on the status line
        page.wait_for_function("!document.querySelector('#status').textContent.includes('401')")
        page.fill("#query", "a rocket")
        page.click("#search")
        page.wait_for_function("document.querySelectorAll('#results .card').length === 7")
        page.wait_for_function(
            "[...document.querySelectorAll('#results .card img')]"
            ".every(img => img.complete && img.naturalWidth > 0)"
        )  # thumbnails fetched with the key
        # the key given again (e.g. pasted anew): the chosen collection and its results stay
        page.select_option("#collection", "photos2")
        page.click("#search")
        page.wait_for_function("document.querySelectorAll('#results .card').length === 1")
        with page.expect_response(lambda r: r.url.endswith("/api/v1/collections")):
            page.fill("#api-key", " page-key")
            page.press("#api-key", "Enter")
        page.wait_for_function("document.querySelector('#collection').options.length === 2")
        assert page.locator("#collection").input_value() == "photos2"
        assert page.locator("#results .card").count() == 1


def test_the_page_says_at_once_when_the_model_cannot_load(indexed, monkeypatch):
    """Not only at the first search: the collections still list, the failure is said."""
    import imgembed.service
    from imgembed.errors import ModelUnavailableError

    def missing(ref, settings):
        raise ModelUnavailableError("no weights for this model here")

    monkeypatch.setattr(imgembed.service, "create_encoder", missing)
    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings, ready="/health") as (page, errors):
        page.wait_for_selector("#collection option", state="attached")
        page.wait_for_function(
            "document.querySelector('#status').textContent.includes('no weights for this model')"
        )
        assert "cannot load" in page.locator("#status").inner_text()
        assert "error" in page.locator("#status").get_attribute("class")
        assert errors == []


def test_the_page_says_while_the_model_loads(indexed, monkeypatch):
    """Searches answer 503 while the model loads: the page says it is loading as it opens
    (it said nothing until a search failed), and no more once it has loaded."""
    import threading

    from playwright.sync_api import expect

    import imgembed.service

    loaded = threading.Event()
    create = imgembed.service.create_encoder

    def slow(ref, settings):
        loaded.wait(TIMEOUT / 1000)
        return create(ref, settings)

    monkeypatch.setattr(imgembed.service, "create_encoder", slow)
    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings, ready="/health") as (page, errors):
        expect(page.locator("#status")).to_have_text(
            "The server's model is loading: searches work once it is loaded.", timeout=TIMEOUT
        )
        loaded.set()
        expect(page.locator("#status")).to_have_text("", timeout=TIMEOUT)
        page.fill("#query", "a cup of coffee")
        page.press("#query", "Enter")
        expect(page.locator("#results .card")).to_have_count(7, timeout=TIMEOUT)
        assert errors == []


def test_the_product_view_in_a_real_browser(data_dir, photos, tmp_path):
    """Products of a store: text search with per-part scores, a photo plus text, thumbnails."""
    root = tmp_path / "root"
    root.mkdir()
    rows = []
    for n, photo in enumerate(photos):
        shutil.copy(photo, root / photo.name)
        rows.append({"id": photo.stem, "title": f"{photo.stem} poster", "price": 10 + n,
                     "category": "fashion", "image_url": str(root / photo.name)})  # fmt: skip
    rows.append({"id": "gift", "title": "Gift card", "category": "tech"})
    with Catalog(**TINY) as catalog:
        catalog.upsert_products("demo", rows)
        assert catalog.embed("demo").successful == len(rows)
    settings = load_settings(**TINY, allowed_roots=[root], api_keys="shop-key")
    with browser_on(settings) as (page, errors):
        page.click("#view-products")
        page.fill("#api-key", "shop-key")  # the box opened itself at the 401
        page.press("#api-key", "Enter")
        page.wait_for_selector("#store option", state="attached")
        assert page.locator("#store").input_value() == "demo"
        assert page.locator("#text-form").is_hidden()

        page.fill("#product-query", "poster")
        page.click("#product-search")
        count = len(rows)
        page.wait_for_function(f"document.querySelectorAll('#results .product').length === {count}")
        parts = page.locator("#results .product .parts").all_inner_texts()
        assert all(text.startswith("image ") and " + text " in text for text in parts)
        assert "no image" in page.locator("#results .product", has_text="Gift card").inner_text()
        page.wait_for_function(
            "[...document.querySelectorAll('#results .product img')].filter(img =>"
            f" img.complete && img.naturalWidth > 0).length === {count - 1}"
        )  # every product photo arrived through the API; the gift card has none

        page.fill("#product-query", "chelsea poster")
        page.set_input_files("#product-file", str(root / "chelsea.png"))
        page.wait_for_function(
            "document.querySelector('#status').textContent"
            ".includes('products for “\u2068chelsea poster\u2069” + \u2068chelsea.png\u2069')"
        )
        assert page.locator("#results .product").first.get_attribute("data-id") == "chelsea"
        assert "ranked by combined" in page.locator("#status").inner_text()

        page.fill("#max-price", "1")  # every product costs more: said, not "ranked by -"
        page.click("#product-search")
        page.wait_for_function(
            "document.querySelector('#status').textContent.startsWith('No products for')"
        )
        assert "with price ≤ 1: try without the filter" in page.locator("#status").inner_text()
        assert page.locator("#results .product").count() == 0

        page.fill("#max-price", "")
        page.click("#product-search")
        page.wait_for_function(f"document.querySelectorAll('#results .product').length === {count}")
        page.fill("#api-key", "wrong-key")  # the stores this key cannot open are not offered
        page.press("#api-key", "Enter")
        page.wait_for_function("document.querySelector('#store').options.length === 0")
        assert "Cannot list stores: 401" in page.locator("#status").inner_text()
        assert "(check the key under “API key” above)" in page.locator("#status").inner_text()
        assert page.locator("#results .product").count() == 0
        assert errors == []


def test_the_api_docs_render_offline_in_a_real_browser(tmp_path):
    """/docs draws every route with scripts and styles from the server itself (no CDN), opens
    without the API key the rest of the API asks for, and takes the key for "Try it out"."""
    settings = load_settings(**TINY, allowed_roots=[tmp_path], api_keys="docs-key")
    with browser_on(settings) as (page, errors):
        base = page.url.rstrip("/")
        outside: list[str] = []

        def only_the_server(route: Any) -> None:
            if route.request.url.startswith(base):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        page.route("**/*", only_the_server)
        page.goto(f"{base}/docs")
        page.wait_for_selector(".opblock-summary-path", state="attached")
        paths = set(page.locator(".opblock-summary-path").all_inner_texts())
        assert {"/api/v1/search/image", "/v1/embeddings", "/api/v1/stores/{store_id}/search"} <= {
            path.replace("\u200b", "") for path in paths
        }
        # "Authorize" with the key, then "Try it out": the call carries the key
        page.click("button.authorize")
        page.fill(".auth-container input", "docs-key")
        page.click(".auth-btn-wrapper button.authorize")
        page.click(".auth-btn-wrapper button.btn-done")
        collections = page.locator(".opblock-get", has_text="/api/v1/collections").first
        collections.locator(".opblock-summary").click()
        collections.locator("button.try-out__btn").click()
        collections.locator("button.execute").click()
        status = collections.locator(".live-responses-table tr.response .response-col_status").first
        status.wait_for()
        assert status.inner_text().strip() == "200"
        assert outside == [] and errors == []


def test_a_late_answer_never_replaces_a_newer_search(indexed):
    """Searches are not queued on the page: a new one (or another view, collection or store)
    aborts the one still running, so its late answer shows nowhere; a search the server does
    not answer says that it is still waiting; each view clears when its store changes."""
    store_a_mug(indexed, "demo", "other")
    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings) as (page, errors):
        page.wait_for_selector("#collection option", state="attached")
        held: list[Any] = []  # searches the "server" does not answer until the test says

        def hold_text_searches(route: Any) -> None:
            body = route.request.post_data or ""
            if "query_text" in body or 'name="query"' in body:
                held.append(route)
            else:
                route.continue_()

        searches = re.compile(r"/api/v1/(search/image|stores/[^/]+/search)$")
        page.route(searches, hold_text_searches)
        page.click("#search")  # nothing typed: said so, nothing sent
        assert "Type what to look for" in page.locator("#status").inner_text()

        page.fill("#query", "a cup of coffee")
        page.click("#search")
        page.wait_for_function("document.querySelector('#results').ariaBusy === 'true'")
        page.wait_for_function(
            "document.querySelector('#status').textContent.includes('still waiting')"
        )
        with page.expect_event("requestfailed") as aborted:  # the text search gives way
            page.set_input_files("#file", str(indexed / "chelsea.png"))
        assert "query_text" in (aborted.value.post_data or "")
        page.wait_for_function(
            "document.querySelector('#status').textContent.includes('results like \u2068chelsea')"
        )
        assert len(held) == 1
        with contextlib.suppress(Exception):  # the browser gave up on it: nothing to answer
            held[0].continue_()
        first = page.locator("#results .card").first
        assert first.get_attribute("data-id") == str(indexed / "chelsea.png")
        assert page.locator("#results").get_attribute("aria-busy") is None

        # a product search left running when the view changes shows in neither view
        page.click("#view-products")
        page.wait_for_selector("#store option", state="attached")
        page.fill("#product-query", "coffee")
        page.click("#product-search")
        page.wait_for_function("document.querySelector('#results').ariaBusy === 'true'")
        with page.expect_event("requestfailed"):
            page.click("#view-images")
        assert len(held) == 2
        with contextlib.suppress(Exception):
            held[1].continue_()
        assert page.locator("#results .card").count() == 0
        assert page.locator("#status").inner_text() == ""

        page.unroute(searches)
        page.click("#view-products")
        page.wait_for_selector("#store option", state="attached")
        page.fill("#product-query", "coffee")
        page.click("#product-search")
        page.wait_for_function("document.querySelectorAll('#results .product').length === 1")
        page.select_option("#store", "other")  # demo's results would read as other's
        assert page.locator("#results .product").count() == 0
        assert page.locator("#status").inner_text() == ""
        assert errors == []


def test_a_failed_answer_is_said_in_words(indexed):
    """Whatever comes back (a proxy's HTML page, JSON cut short, an error object without a
    message, a 503 with Retry-After), the status line says it in words, never as a script's
    error or "[object Object]", and the next search works."""
    from playwright.sync_api import expect

    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings) as (page, errors):
        page.wait_for_selector("#collection option", state="attached")
        overloaded = '{"error": "server overloaded", "error_type": "OverloadedError"}'
        answers = [
            (503, "application/json", overloaded, {"Retry-After": "30"}),
            (502, "text/html", "<html><title>502 Bad Gateway</title>nginx</html>", {}),
            (400, "application/json", '{"error": {"type": "odd"}}', {}),
            (500, "application/json", '{"error": "cut sh', {}),
            (200, "text/html", "<html>Please log in to the Wi-Fi</html>", {}),
            (200, "application/json", '{"results": [', {}),
        ]
        searching = re.compile("^Searching")

        def fulfil(answer: dict[str, Any], route: Any) -> None:
            route.fulfill(**answer)

        said = []
        for status, kind, body, extra in answers:
            answer = {"status": status, "content_type": kind, "body": body, "headers": extra}
            page.route("**/api/v1/search/image", functools.partial(fulfil, answer))
            page.fill("#query", f"answer {len(said)}")
            with page.expect_response(lambda r: r.url.endswith("/search/image")):
                page.press("#query", "Enter")  # Enter in the field searches
            expect(page.locator("#status")).not_to_have_text(searching, timeout=TIMEOUT)
            assert "error" in page.locator("#status").get_attribute("class")
            said.append(page.locator("#status").inner_text())
            page.unroute("**/api/v1/search/image")
        assert said[0] == "503: \u2068server overloaded\u2069 (try again in 30 seconds)"
        assert said[1] == "502: \u2068Bad Gateway\u2069"  # the reason phrase, as the server's words
        assert said[2] == "400: \u2068Bad Request\u2069"
        assert said[3] == "500: \u2068Internal Server Error\u2069"
        proxy = "the server answered 200 without the JSON imgembed sends: is a proxy in between?"
        assert said[4] == said[5] == proxy
        page.fill("#query", "a cup of coffee")
        page.press("#query", "Enter")
        expect(page.locator("#results .card")).to_have_count(7, timeout=TIMEOUT)
        assert errors == []


def test_the_page_comes_back_with_the_server(indexed):
    """A list the server cannot give now (unreachable, or a 503 while it restarts) is asked
    for again by the page itself: when the server is back, so is the page, without a reload
    (the empty list left nothing to search with but reloading the page)."""
    from playwright.sync_api import expect

    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings) as (page, errors):
        page.route("**/api/v1/collections", lambda route: route.abort("connectionrefused"))
        page.reload()
        expect(page.locator("#status")).to_contain_text(
            "Cannot list collections: cannot reach the server", timeout=TIMEOUT
        )
        assert "asking again in 5 seconds" in page.locator("#status").inner_text()
        assert page.locator("#collection option").count() == 0
        page.unroute("**/api/v1/collections")  # the server is back
        expect(page.locator("#collection option")).to_have_count(1, timeout=TIMEOUT)
        expect(page.locator("#status")).to_have_text("", timeout=TIMEOUT)
        page.fill("#query", "a cup of coffee")
        page.press("#query", "Enter")
        expect(page.locator("#results .card")).to_have_count(7, timeout=TIMEOUT)

        unreachable = {"error": "the store is unreachable", "error_type": "StoreUnavailableError"}
        restarting = {"status": 503, "headers": {"Retry-After": "1"}, "json": unreachable}
        page.route("**/api/v1/stores", lambda route: route.fulfill(**restarting))
        page.click("#view-products")
        expect(page.locator("#status")).to_have_text(
            "Cannot list stores: 503: \u2068the store is unreachable\u2069;"
            " asking again in 5 seconds",
            timeout=TIMEOUT,
        )
        page.unroute("**/api/v1/stores")
        expect(page.locator("#store-info")).to_have_text(
            "no stores: import products first", timeout=TIMEOUT
        )
        expect(page.locator("#status")).to_have_text("", timeout=TIMEOUT)
        assert errors == []


def test_a_thumbnail_that_cannot_be_had_says_why(indexed):
    """The box says the server's reason (it said "not a local file inside the allowed roots"
    for any failure, a busy server too); an answer that is no picture is a box, not a broken
    image; the thumbnails of results that go are not fetched any further (a new search
    waited behind them: a browser opens 6 connections to a server)."""
    from playwright.sync_api import expect

    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings) as (page, errors):
        page.wait_for_selector("#collection option", state="attached")
        held: list[Any] = []

        def thumbnails(route: Any) -> None:
            url = route.request.url
            if "coffee.png" in url:
                busy = {"error": "server overloaded", "error_type": "OverloadedError"}
                route.fulfill(status=503, json=busy, headers={"Retry-After": "30"})
            elif "chelsea.png" in url:
                route.fulfill(status=200, content_type="image/jpeg", body=b"<html>no</html>")
            else:
                held.append(route)  # a slow server: answered when the test is over

        page.route("**/thumbnail?*", thumbnails)
        page.fill("#query", "a cup of coffee")
        page.press("#query", "Enter")
        expect(page.locator("#results .card")).to_have_count(7, timeout=TIMEOUT)
        coffee = page.locator("#results .card", has_text="coffee.png")
        expect(coffee.locator(".no-image")).to_have_text(
            "no thumbnail: \u2068server overloaded\u2069", timeout=TIMEOUT
        )
        chelsea = page.locator("#results .card", has_text="chelsea.png")
        chelsea.scroll_into_view_if_needed()  # a lazy image is drawn when it is seen
        expect(chelsea.locator(".no-image")).to_have_text(
            "no thumbnail: the server sent no picture", timeout=TIMEOUT
        )
        assert len(held) == 5
        failed: list[str] = []
        page.on("requestfailed", lambda request: failed.append(request.url))
        page.fill("#query", "a rocket")
        with page.expect_response(lambda r: r.url.endswith("/search/image")):
            page.press("#query", "Enter")
        page.wait_for_function(
            "document.querySelector('#status').textContent.includes('results for')"
        )
        assert sorted(failed) == sorted(route.request.url for route in held[:5])
        assert errors == []


# The status line's last character is drawn rightmost: nothing in it runs right-to-left to its end.
LAST_IS_RIGHTMOST = """() => {
    const text = document.querySelector('#status').firstChild;
    const range = document.createRange();
    range.setStart(text, text.length - 1);
    range.setEnd(text, text.length);
    const last = range.getBoundingClientRect().right;
    range.setStart(text, 0);
    return Math.abs(range.getBoundingClientRect().right - last) < 1;
}"""


def test_right_to_left_text_cannot_turn_the_page_s_words_around(indexed):
    """A query or file name is set apart for the bidirectional algorithm (an isolate): a
    right-to-left override in it (a name like "photo\u202egnp.exe") turned the rest of the
    status line around, "(0.01 s)" read "(s 10.0)"."""
    settings = load_settings(**TINY, allowed_roots=[indexed])
    spoof = indexed / "evil\u202egnp.exe.png"
    shutil.copy(indexed / "chelsea.png", spoof)
    with browser_on(settings) as (page, errors):
        page.wait_for_selector("#collection option", state="attached")
        page.fill("#query", "a cat \u202eon a sofa")
        page.press("#query", "Enter")
        page.wait_for_function("document.querySelector('#status').textContent.endsWith(' s)')")
        assert page.evaluate(LAST_IS_RIGHTMOST), page.locator("#status").inner_text()
        page.set_input_files("#file", str(spoof))
        page.wait_for_function(
            "document.querySelector('#status').textContent.includes('results like')"
        )
        assert page.evaluate(LAST_IS_RIGHTMOST), page.locator("#status").inner_text()
        # a long query is cut between characters, not inside an emoji's surrogate pair
        page.fill("#query", "a" * 78 + "\U0001f6b2" * 5)
        page.press("#query", "Enter")
        page.wait_for_function("document.querySelector('#status').textContent.endsWith(' s)')")
        assert "a" * 78 + "\U0001f6b2…" in page.locator("#status").inner_text()
        assert errors == []


def test_an_empty_or_a_dropped_collection_is_said(indexed):
    """A search in an empty collection said "0 results for ..." as if nothing matched; one in
    a collection dropped meanwhile said its 404 but kept offering it."""
    from playwright.sync_api import expect

    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings) as (page, errors):
        base = page.url.rstrip("/")
        for name in ("empty", "doomed"):
            assert page.request.post(f"{base}/api/v1/collections", data={"name": name}).ok
        page.reload()
        expect(page.locator("#collection option")).to_have_count(3, timeout=TIMEOUT)
        page.select_option("#collection", "empty")
        page.fill("#query", "a cup of coffee")
        page.press("#query", "Enter")
        expect(page.locator("#status")).to_have_text(
            "No results: \u2068empty\u2069 holds no images yet; index some into it first.",
            timeout=TIMEOUT,
        )
        page.set_input_files("#file", str(indexed / "chelsea.png"))
        expect(page.locator("#status")).to_have_text(
            "No results like \u2068chelsea.png\u2069: \u2068empty\u2069 holds no images yet;"
            " index some into it first.",
            timeout=TIMEOUT,
        )
        # of several files dropped, which one was taken is said as with results
        chelsea = list((indexed / "chelsea.png").read_bytes())
        dropped = [("a.png", "image/png", chelsea), ("b.png", "image/png", chelsea)]
        page.evaluate(DROP, ["#drop", dropped])
        expect(page.locator("#status")).to_have_text(
            "2 files dropped, a search takes one image: No results like \u2068a.png\u2069:"
            " \u2068empty\u2069 holds no images yet; index some into it first.",
            timeout=TIMEOUT,
        )

        page.select_option("#collection", "doomed")
        assert page.request.delete(f"{base}/api/v1/collections/doomed").ok  # another client
        page.press("#query", "Enter")
        expect(page.locator("#collection option")).to_have_count(2, timeout=TIMEOUT)
        expect(page.locator("#status")).to_have_text(
            "404: \u2068no collection 'doomed'\u2069: it was dropped;"
            " the list of collections is reloaded",
            timeout=TIMEOUT,
        )
        assert "error" in page.locator("#status").get_attribute("class")
        page.select_option("#collection", "photos")
        page.press("#query", "Enter")
        expect(page.locator("#results .card")).to_have_count(7, timeout=TIMEOUT)
        assert errors == []


def test_the_page_by_keyboard_and_by_label(indexed):
    """Every field has a name of its own (a placeholder is no label, and it changes); each
    "More like this" says which image; Enter searches and presses the focused button."""
    from playwright.sync_api import expect

    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings) as (page, errors):
        page.wait_for_selector("#collection option", state="attached")
        expect(page.get_by_label("API key")).to_have_count(1)
        page.get_by_label("Search text").fill("a cup of coffee")
        page.get_by_label("Search text").press("Enter")
        expect(page.locator("#results .card")).to_have_count(7, timeout=TIMEOUT)
        more = page.get_by_role("button", name=f"More like this: {indexed / 'coffee.png'}")
        more.focus()
        page.keyboard.press("Enter")
        expect(page.locator("#status")).to_contain_text("results for this image", timeout=TIMEOUT)
        first = page.locator("#results .card").first
        assert first.get_attribute("data-id") == str(indexed / "coffee.png")
        page.get_by_role("button", name="Products").press("Enter")
        expect(page.get_by_label("Search products")).to_be_visible(timeout=TIMEOUT)
        expect(page.get_by_label("Category")).to_be_visible()
        expect(page.get_by_label("Max price")).to_be_visible()
        assert errors == []


def test_a_card_shows_all_its_metadata_within_it(indexed):
    """A long key without a break took the card's whole width: the values were pushed out of
    sight (the card overflowed by its own width); a list of tags was not shown at all."""
    from playwright.sync_api import expect

    key = "averyveryverylongmetadatakeywithoutanybreak" * 2
    with ImageEmbeddingService(**TINY) as service:
        coffee = str(indexed / "coffee.png")
        tags = ["sale", "<b>new</b>"]  # a list (as JSONL and the API store): shown, as text
        service.index([IndexItem(coffee, coffee, {key: "v", "tags": tags})], "meta")
    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings) as (page, errors):
        page.wait_for_selector("#collection option", state="attached")
        page.select_option("#collection", "meta")
        page.fill("#query", "a cup of coffee")
        page.press("#query", "Enter")
        card = page.locator("#results .card")
        expect(card).to_have_count(1, timeout=TIMEOUT)
        assert card.evaluate("c => c.scrollWidth <= c.clientWidth")
        inside = card.bounding_box()
        for value in card.locator("dd").all():
            box = value.bounding_box()
            assert box and box["x"] + box["width"] <= inside["x"] + inside["width"]
            assert box["width"] > 0, value.inner_text()
        assert card.locator("dt", has_text="tags").count() == 1
        assert "sale, <b>new</b>" in card.locator("dd").all_inner_texts()
        assert errors == []


def test_a_file_the_browser_cannot_read_is_said_so(indexed, tmp_path):
    """A file deleted or moved since it was chosen (or a folder dropped) failed its upload,
    and the page said "cannot reach the server: is imgembed serve still running?"."""
    from playwright.sync_api import expect

    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings) as (page, errors):
        page.wait_for_selector("#collection option", state="attached")
        page.evaluate("document.body.append(Object.assign(document.createElement('input'),"
                      " {type: 'file', id: 'elsewhere'}))")  # fmt: skip
        for size_known in (True, False):  # the browser read its size before, or not
            vanishing = tmp_path / "vanishing.png"
            shutil.copy(indexed / "chelsea.png", vanishing)
            page.set_input_files("#elsewhere", str(vanishing))  # chosen ...
            if size_known:
                assert page.evaluate("document.querySelector('#elsewhere').files[0].size") > 0
            vanishing.unlink()  # ... then deleted, and dropped on the page
            page.evaluate("""() => {
                const files = new DataTransfer();
                files.items.add(document.querySelector('#elsewhere').files[0]);
                document.querySelector('#drop').dispatchEvent(
                    new DragEvent('drop', {dataTransfer: files, bubbles: true, cancelable: true}));
            }""")
            expect(page.locator("#status")).to_have_text(
                "Cannot read \u2068vanishing.png\u2069: a folder, or a file moved or deleted"
                " since? Choose an image file.",
                timeout=TIMEOUT,
            )
            page.set_input_files("#file", str(indexed / "chelsea.png"))
            expect(page.locator("#status")).to_contain_text("results like", timeout=TIMEOUT)
        assert errors == []


def test_a_long_collection_name_does_not_widen_the_page(indexed):
    """A name of 200 characters (the most a collection may have) made its list as wide, and
    the page scrolled sideways, on a phone by four screens."""
    settings = load_settings(**TINY, allowed_roots=[indexed])
    long = "a-collection-of-holiday-photos-" * 6 + "x" * 14
    with browser_on(settings) as (page, errors):
        base = page.url.rstrip("/")
        assert page.request.post(f"{base}/api/v1/collections", data={"name": long}).ok
        for width in (1280, 375):
            page.set_viewport_size({"width": width, "height": 800})
            page.reload()
            page.wait_for_function("document.querySelector('#collection').options.length === 2")
            page.select_option("#collection", long)
            page.fill("#query", "a cup of coffee")
            page.press("#query", "Enter")
            page.wait_for_function("document.querySelector('#status').textContent.endsWith('.')")
            wide = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert wide <= 0, f"at {width} px the page scrolls sideways by {wide} px"
        assert errors == []


def test_a_long_product_title_stays_in_its_card(indexed):
    """A title or category without a break ran out of its card, over the next ones."""
    long = "VeryLongProductTitleWithoutSpaces" * 4
    with Catalog(**TINY) as catalog:
        mug = {"id": "mug", "title": long, "category": long, "price": 5,
               "image_url": str(indexed / "coffee.png")}  # fmt: skip
        catalog.upsert_products("demo", [mug])
        assert catalog.embed("demo").successful == 1
    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings) as (page, errors):
        page.click("#view-products")
        page.wait_for_selector("#store option", state="attached")
        page.fill("#product-query", "a mug")
        page.press("#product-query", "Enter")
        card = page.locator("#results .product")
        card.wait_for()
        assert card.evaluate("c => c.scrollWidth <= c.clientWidth")
        wide = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert wide <= 0, f"the page scrolls sideways by {wide} px"
        assert errors == []


def test_a_browser_that_refuses_storage_can_use_the_page(indexed):
    """With every cookie blocked, reading localStorage throws: the page stopped at its first
    line (no list, no search); now the key is kept for the page's life instead."""
    from playwright.sync_api import expect

    settings = load_settings(**TINY, allowed_roots=[indexed], api_keys="page-key")
    with browser_on(settings) as (page, errors):
        page.add_init_script("""Object.defineProperty(window, "localStorage", {get() {
            throw new DOMException("Access is denied for this document.", "SecurityError"); }})""")
        page.reload()
        expect(page.locator("#status")).to_contain_text("401", timeout=TIMEOUT)
        page.fill("#api-key", "page-key")
        page.press("#api-key", "Enter")
        expect(page.locator("#collection option")).to_have_count(1, timeout=TIMEOUT)
        page.fill("#query", "a cup of coffee")
        page.press("#query", "Enter")
        expect(page.locator("#results .card")).to_have_count(7, timeout=TIMEOUT)
        page.wait_for_function(
            "[...document.querySelectorAll('#results .card img')]"
            ".every(img => img.complete && img.naturalWidth > 0)"
        )  # thumbnails fetched with the key
        assert errors == []


def test_markup_from_the_server_is_shown_as_text(indexed):
    """Sources, metadata, collection names and error messages holding markup are text on
    the page: no element is made from them, no script runs."""
    from playwright.sync_api import expect

    evil = "<img src=x onerror=window.ran=1>"
    name = indexed / f"{evil}.png"
    shutil.copy(indexed / "coffee.png", name)
    with ImageEmbeddingService(**TINY) as service:
        service.index([IndexItem(str(name), str(name), {"note": evil})], f"<b>{evil}")
    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings) as (page, errors):
        page.wait_for_selector("#collection option", state="attached")
        page.select_option("#collection", f"<b>{evil}")
        page.fill("#query", evil)
        page.press("#query", "Enter")
        card = page.locator("#results .card")
        expect(card).to_have_count(1, timeout=TIMEOUT)
        expect(card.locator(".source")).to_have_text(str(name))
        expect(card.locator("dd", has_text="onerror")).to_have_text(evil)
        answer = {"error": evil, "error_type": "InvalidImageError"}
        page.route("**/api/v1/search/image", lambda route: route.fulfill(status=400, json=answer))
        page.press("#query", "Enter")
        expect(page.locator("#status")).to_have_text(f"400: \u2068{evil}\u2069", timeout=TIMEOUT)
        assert page.evaluate("document.querySelectorAll('img[src=x], b').length") == 0
        assert page.evaluate("window.ran") is None
        assert errors == []


def test_thumbnails_are_asked_for_as_their_cards_come_in_sight(indexed):
    """Of 60 results, every thumbnail was asked for at once (each one an image the server
    reads and decodes): now those near the screen, the rest as the page scrolls to them."""
    from playwright.sync_api import expect

    coffee = str(indexed / "coffee.png")
    with ImageEmbeddingService(**TINY) as service:
        items = [IndexItem(f"cup-{n:02d}", coffee, {"n": n}) for n in range(60)]
        service.index(items, "cups")
    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings) as (page, errors):
        page.wait_for_selector("#collection option", state="attached")
        page.select_option("#collection", "cups")
        asked: list[str] = []
        page.on("request", lambda r: asked.append(r.url) if "/thumbnail?" in r.url else None)
        page.fill("#top-k", "60")
        page.fill("#query", "a cup of coffee")
        page.press("#query", "Enter")
        cards = page.locator("#results .card")
        expect(cards).to_have_count(60, timeout=TIMEOUT)
        page.wait_for_function(
            "document.querySelector('#results .card img').naturalWidth > 0"
        )  # the first is in sight
        assert 0 < len(asked) < 30, len(asked)
        last = cards.last
        last.scroll_into_view_if_needed()
        page.wait_for_function(
            "(card => card.querySelector('img').naturalWidth > 0)"
            "([...document.querySelectorAll('#results .card')].at(-1))"
        )
        assert any(last.get_attribute("data-id") in url for url in asked)
        assert errors == []


def test_an_answer_of_the_wrong_shape_is_said_in_words(indexed):
    """A 200 with JSON that is not imgembed's (an older server, a proxy's own JSON: `{}`, `[]`,
    `{"results": null}`, a hit without its score) made the page throw: a script error, a list
    that stayed broken, "Cannot read properties of null" on the status line. Every answer the
    page reads is checked: said in words, and the page goes on working."""
    from playwright.sync_api import expect

    store_a_mug(indexed, "demo")
    settings = load_settings(**TINY, allowed_roots=[indexed])
    odd = "a proxy in between?"  # "is an older server or ...", or (JSON null) "is ..."
    script_words = re.compile(r"undefined|null|NaN|\[object|TypeError|Cannot read|is not")

    def answer_with(body: str, route: Any) -> None:
        route.fulfill(body=body, content_type="application/json")

    def said_in_words(page: Any, errors: list[str]) -> None:
        expect(page.locator("#status")).to_contain_text(odd, timeout=TIMEOUT)
        assert "error" in page.locator("#status").get_attribute("class")
        assert not script_words.search(page.locator("#status").inner_text())
        assert page.locator("#results").get_attribute("aria-busy") is None
        assert errors == []

    with browser_on(settings) as (page, errors):
        page.wait_for_selector("#collection option", state="attached")
        lists = ["{}", "null", "[null]", '{"collections": []}', '[{"name": 5}]']
        for body in lists:
            page.route("**/api/v1/collections", functools.partial(answer_with, body))
            page.reload()
            said_in_words(page, errors)
            assert page.locator("#collection option").count() == 0
            page.unroute("**/api/v1/collections")
        page.reload()
        expect(page.locator("#collection option")).to_have_count(1, timeout=TIMEOUT)

        hits = [
            "{}",
            "[]",
            '{"results": null}',
            '{"results": [null]}',
            '{"results": {}}',
            '{"results": [{"similarity_score": "high", "rank": 1, "image_path": "a"}]}',
            '{"results": [{"similarity_score": 0.5, "rank": 1, "image_path": {}}]}',
        ]
        for n, body in enumerate(hits):
            page.route("**/api/v1/search/image", functools.partial(answer_with, body))
            page.fill("#query", f"answer {n}")
            page.press("#query", "Enter")
            said_in_words(page, errors)
            with page.expect_response("**/api/v1/search/image"):  # the last words went
                page.set_input_files("#file", str(indexed / "chelsea.png"))
            said_in_words(page, errors)
            page.unroute("**/api/v1/search/image")
        for body in ("{}", '{"groups": null}', '{"groups": [null]}', '{"groups": [[null]]}'):
            page.route("**/duplicates", functools.partial(answer_with, body))
            page.click("#duplicates")
            said_in_words(page, errors)
            page.unroute("**/duplicates")
        page.fill("#query", "a cup of coffee")
        page.press("#query", "Enter")
        expect(page.locator("#results .card")).to_have_count(7, timeout=TIMEOUT)

        for body in ("{}", '{"stores": []}', "[null]", '[{"store_id": null}]'):
            page.route("**/api/v1/stores", functools.partial(answer_with, body))
            page.click("#view-products")
            said_in_words(page, errors)
            assert page.locator("#store option").count() == 0
            page.unroute("**/api/v1/stores")
            page.click("#view-images")
        page.click("#view-products")
        expect(page.locator("#store option")).to_have_count(1, timeout=TIMEOUT)
        products = [
            "{}",
            '{"results": null}',
            '{"results": [{}]}',
            '{"results": [{"product_id": "mug", "score": 0.5, "price": "cheap"}]}',
        ]
        for n, body in enumerate(products):
            page.route("**/api/v1/stores/demo/search", functools.partial(answer_with, body))
            page.fill("#product-query", f"answer {n}")
            page.press("#product-query", "Enter")
            said_in_words(page, errors)
            page.unroute("**/api/v1/stores/demo/search")
        page.fill("#product-query", "coffee")
        page.press("#product-query", "Enter")
        expect(page.locator("#results .product")).to_have_count(1, timeout=TIMEOUT)

        page.click("#view-images")
        for body in ("null", "[]", '"ready"', '{"model": {"state": "loading"}}'):
            page.route("**/ready", functools.partial(answer_with, body))
            page.reload()
            expect(page.locator("#collection option")).to_have_count(1, timeout=TIMEOUT)
            page.wait_for_load_state("networkidle")
            assert errors == []
            page.unroute("**/ready")
        page.fill("#query", "a cup of coffee")
        page.press("#query", "Enter")
        expect(page.locator("#results .card")).to_have_count(7, timeout=TIMEOUT)
        assert errors == []


DROP = """([zone, files]) => {
    const dropped = new DataTransfer();
    for (const [name, type, bytes] of files) {
        dropped.items.add(new File([new Uint8Array(bytes)], name, {type}));
    }
    document.querySelector(zone).dispatchEvent(
        new DragEvent('drop', {dataTransfer: dropped, bubbles: true, cancelable: true}));
}"""


def test_several_files_or_no_image_dropped_is_said(indexed):
    """Of several files dropped the first was searched with, and nothing said so; a text or
    a PDF dropped went to the server, which said '400: notes.txt: not a recognised image'.
    Now the first image is taken and that is said; a file that is no image is not sent."""
    from playwright.sync_api import expect

    store_a_mug(indexed, "demo")
    settings = load_settings(**TINY, allowed_roots=[indexed])
    chelsea = list((indexed / "chelsea.png").read_bytes())
    rocket = list((indexed / "rocket.jpg").read_bytes())
    text = list(b"a shopping list")
    with browser_on(settings) as (page, errors):
        page.wait_for_selector("#collection option", state="attached")
        sent: list[str] = []
        page.on("request", lambda r: sent.append(r.url) if "/search" in r.url else None)
        images = [("a.png", "image/png", chelsea), ("b.jpg", "image/jpeg", rocket)]
        page.evaluate(DROP, ["#drop", [*images, ("c.png", "image/png", chelsea)]])
        expect(page.locator("#status")).to_have_text(
            re.compile("^3 files dropped, a search takes one image: 7 results like \u2068a.png"),
            timeout=TIMEOUT,
        )
        first = page.locator("#results .card").first
        assert first.get_attribute("data-id") == str(indexed / "chelsea.png")

        page.evaluate(DROP, ["#drop", [("notes.txt", "text/plain", text)]])
        expect(page.locator("#status")).to_have_text(
            "\u2068notes.txt\u2069 is not an image (text/plain): choose an image file"
            " (JPEG, PNG, WebP…).",
            timeout=TIMEOUT,
        )
        assert "error" in page.locator("#status").get_attribute("class")
        pdf = ("report.pdf", "application/pdf", text)
        page.evaluate(DROP, ["#drop", [("notes.txt", "text/plain", text), pdf]])
        expect(page.locator("#status")).to_have_text(
            "None of the 2 files dropped is an image: choose an image file (JPEG, PNG, WebP…).",
            timeout=TIMEOUT,
        )
        assert len(sent) == 1  # neither went to the server

        page.evaluate(DROP, ["#drop", [("notes.txt", "text/plain", text), images[1]]])
        expect(page.locator("#status")).to_have_text(
            re.compile("^2 files dropped, a search takes one image: 7 results like \u2068b.jpg"),
            timeout=TIMEOUT,
        )
        assert first.get_attribute("data-id").startswith(str(indexed / "rocket"))  # or its copy

        page.click("#view-products")
        page.wait_for_selector("#store option", state="attached")
        page.evaluate(DROP, ["#product-drop", images])
        expect(page.locator("#status")).to_have_text(
            re.compile("^2 files dropped, a search takes one image: 1 product for \u2068a.png"),
            timeout=TIMEOUT,
        )
        page.evaluate(DROP, ["#product-drop", [pdf]])
        expect(page.locator("#status")).to_contain_text(
            "\u2068report.pdf\u2069 is not an image", timeout=TIMEOUT
        )
        assert errors == []


def test_a_right_to_left_override_cannot_turn_a_server_message_around(indexed, tmp_path):
    """The server's messages quote names as given: "400: evil\u202egnp.exe.png: not a
    recognised image (unknown format or corrupt)" read "...(tpurroc ro tamrof nwonknu)", as
    did one naming a collection "ph\u202eotos". A "\u2069" in a query closed the page's
    isolate around it early, and an override after it turned the rest of the line around."""
    from playwright.sync_api import expect

    with ImageEmbeddingService(**TINY) as service:
        coffee = str(indexed / "coffee.png")
        service.index([IndexItem(coffee, coffee, {})], "ph\u202eotos")
    bad = tmp_path / "evil\u202egnp.exe.png"
    bad.write_bytes(b"not an image at all")
    settings = load_settings(**TINY, allowed_roots=[indexed])

    def said_left_to_right(page: Any, text: str) -> None:
        expect(page.locator("#status")).to_contain_text(text, timeout=TIMEOUT)
        assert page.evaluate(LAST_IS_RIGHTMOST), page.locator("#status").inner_text()

    with browser_on(settings) as (page, errors):
        page.wait_for_selector("#collection option", state="attached")
        page.select_option("#collection", "photos")
        page.fill("#query", "a cat \u2069\u202eon a sofa")
        page.press("#query", "Enter")
        said_left_to_right(page, "7 results for")
        page.set_input_files("#file", str(bad))
        said_left_to_right(page, "400: \u2068evilgnp.exe.png: not a recognised image")

        page.select_option("#collection", "ph\u202eotos")
        gone = {"error": "no collection 'ph\u202eotos' (dropped by another client)",
                "error_type": "CollectionNotFoundError"}  # fmt: skip
        page.route("**/search/image", lambda route: route.fulfill(status=404, json=gone))
        page.fill("#query", "a cup of coffee")
        page.press("#query", "Enter")
        said_left_to_right(page, "404: \u2068no collection 'photos' (dropped by another client)")
        page.unroute("**/search/image")
        page.press("#query", "Enter")
        said_left_to_right(page, "1 result for")
        assert errors == []


def test_a_slow_list_is_waited_for_and_only_its_newest_answer_shown(indexed):
    """A server slow to list its collections left the page blank, and a search typed
    meanwhile said "Choose a collection first." with none to choose; a list asked for
    anew (a key given) was emptied by the earlier request's late 401, which then said
    "Cannot list collections: 401" under the list the key had opened."""
    from playwright.sync_api import expect

    store_a_mug(indexed, "demo")
    settings = load_settings(**TINY, allowed_roots=[indexed], api_keys="page-key")
    with browser_on(settings) as (page, errors):
        held: list[Any] = []

        def asked_for(path: str, request: Any) -> bool:
            return request.url.endswith(path)

        def hold_the_first(route: Any) -> None:
            if held:
                route.continue_()
            else:
                held.append(route)

        lists = [
            ("collections", None, "collection", "#query"),  # the view the page opens on
            ("stores", "#view-products", "store", "#product-query"),
        ]
        for path, view, what, query in lists:
            held.clear()
            page.route(f"**/api/v1/{path}", hold_the_first)
            page.reload()
            if view:
                page.click(view)
            expect(page.locator("#status")).to_have_text(
                f"Asking the server for its {what}s…", timeout=TIMEOUT
            )
            page.fill(query, "a cup of coffee")
            page.press(query, "Enter")
            expect(page.locator("#status")).to_have_text(
                f"The {what}s are not listed yet (no answer from the server so far):"
                " search once they are.",
                timeout=TIMEOUT,
            )
            page.evaluate("document.querySelector('#key-box').open = true")  # if no 401 has
            page.fill("#api-key", "page-key")  # asked for anew, with the key
            page.press("#api-key", "Enter")
            expect(page.locator(f"#{what} option")).to_have_count(1, timeout=TIMEOUT)
            expect(page.locator("#status")).to_have_text("", timeout=TIMEOUT)
            with page.expect_event("requestfinished", functools.partial(asked_for, path)):
                held[0].continue_()  # the first, without the key: a 401, late
            page.wait_for_timeout(500)  # time to read it
            expect(page.locator(f"#{what} option")).to_have_count(1)
            assert "401" not in page.locator("#status").inner_text()
            page.unroute(f"**/api/v1/{path}")
            page.fill("#api-key", "")
            page.press("#api-key", "Enter")
        assert errors == []


def test_a_list_the_server_never_gives_is_counted_and_given_up(indexed):
    """A server that never answered the list of collections (or of stores) left "Asking the
    server for its collections…" for ever: no seconds counted, no end, unlike a search. Now
    a list is waited for as a search is, given up after 120 s and asked for again later."""
    from playwright.sync_api import expect

    store_a_mug(indexed, "demo")
    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings) as (page, errors):
        page.clock.install()  # the page's seconds are the test's to move
        held: list[Any] = []

        def hold(route: Any) -> None:
            held.append(route)  # never answered

        lists = [("collections", None, "collection"), ("stores", "#view-products", "store")]
        for path, view, what in lists:
            page.route(f"**/api/v1/{path}", hold)
            if view:
                page.click(view)
            else:
                page.reload()
            asking = f"Asking the server for its {what}s…"
            expect(page.locator("#status")).to_have_text(asking, timeout=TIMEOUT)
            page.clock.run_for(5_000)
            expect(page.locator("#status")).to_have_text(
                f"{asking} (no answer yet after 5 s: still waiting for the server)", timeout=TIMEOUT
            )
            page.clock.run_for(115_000)
            expect(page.locator("#status")).to_have_text(
                f"Cannot list {what}s: no answer from the server in 120 s: it may be overloaded"
                " or stuck; asking again in 5 seconds",
                timeout=TIMEOUT,
            )
            assert "error" in page.locator("#status").get_attribute("class")
            page.unroute(f"**/api/v1/{path}")  # the server answers again
            page.clock.run_for(5_000)
            expect(page.locator(f"#{what} option")).to_have_count(1, timeout=TIMEOUT)
            expect(page.locator("#status")).to_have_text("", timeout=TIMEOUT)
        for route in held:
            with contextlib.suppress(Exception):  # the page gave up on it
                route.continue_()
        assert errors == []


# Where each of the status line's characters is drawn: [character, left, right].
DRAWN = """() => {
    const text = document.querySelector('#status').firstChild;
    const range = document.createRange();
    return [...text.data].map((char, n) => {
        range.setStart(text, n);
        range.setEnd(text, n + 1);
        const box = range.getBoundingClientRect();
        return [char, box.left, box.right];
    });
}"""


def assert_drawn_right_to_left(page) -> None:
    """The status line's Hebrew message, whose full stop ends it (drawn leftmost), sits
    whole between the status ("503: ") and the page's words after it ("(try again")."""
    drawn = page.evaluate(DRAWN)
    letters = [(left, right) for char, left, right in drawn if "\u05d0" <= char <= "\u05ea"]
    stop = next(left for char, left, _ in drawn if char == ".")
    bracket = next(left for char, left, _ in drawn if char == "(")
    prefix = max(right for char, _, right in drawn[:3])  # "503"
    assert stop < min(left for left, _ in letters), drawn  # the stop ends it, leftmost
    assert prefix <= stop and max(right for _, right in letters) <= bracket, drawn


def test_a_right_to_left_server_message_keeps_to_itself(indexed):
    """A server message in Hebrew or Arabic (no control characters in it) was not set apart
    from the page's words: its own full stop was drawn after it as English reads, to the
    right ("503: השרת עמוס. (try again ...)" read in Hebrew as a stop before the message).
    The message is now an isolate of its own, drawn as it reads, the page's words in place."""
    from playwright.sync_api import expect

    message = "השרת עמוס."  # "the server is overloaded."
    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings) as (page, errors):
        page.wait_for_selector("#collection option", state="attached")
        busy = {"status": 503, "headers": {"Retry-After": "30"}, "json": {"error": message}}
        page.route("**/api/v1/search/image", lambda route: route.fulfill(**busy))
        page.fill("#query", "a cup of coffee")
        page.press("#query", "Enter")
        expect(page.locator("#status")).to_contain_text("(try again in", timeout=TIMEOUT)
        assert_drawn_right_to_left(page)
        said = page.locator("#status").inner_text()
        assert said == f"503: \u2068{message}\u2069 (try again in 30 seconds)"
        assert errors == []


def test_a_very_long_list_of_results_keeps_the_page_responsive(indexed):
    """A server that sends 5000 results (an older one that ignores top_k, a proxy's cache):
    the page made all 5000 cards at once and froze for seconds (a task of 2.2-2.5 s here).
    Now a part is drawn, the rest as the end nears the screen or at a button that says how
    many are still to come; the status line says how many came."""
    from playwright.sync_api import expect

    def hit(n: int) -> dict[str, Any]:
        path = f"/x/{n}.png"
        return {"similarity_score": 1 - n / 10_000, "rank": n + 1, "image_path": path}

    hits = [hit(n) for n in range(5000)]
    body = json.dumps({"results": hits, "processing_time": 0.01})
    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings) as (page, errors):
        page.wait_for_selector("#collection option", state="attached")
        page.route("**/thumbnail?*", lambda route: route.fulfill(status=404, json={"error": "no"}))
        page.route(
            "**/api/v1/search/image",
            lambda route: route.fulfill(body=body, content_type="application/json"),
        )
        page.fill("#query", "a cup of coffee")
        page.press("#query", "Enter")
        expect(page.locator("#status")).to_have_text(
            "5000 results for “\u2068a cup of coffee\u2069” (0.01 s)", timeout=TIMEOUT
        )
        cards = page.locator("#results .card")
        assert cards.count() == 100  # not all at once
        more = page.locator("#results .more-results")
        expect(more).to_have_text("Show 100 more (4900 of 5000 not shown yet)")
        # from the keyboard (focused where it is, not scrolled to): the next part, the focus kept
        page.evaluate("document.querySelector('.more-results').focus({preventScroll: true})")
        page.keyboard.press("Enter")
        expect(cards).to_have_count(200, timeout=TIMEOUT)
        expect(more).to_have_text("Show 100 more (4800 of 5000 not shown yet)")
        assert page.evaluate("document.activeElement.classList.contains('more-results')")
        more.scroll_into_view_if_needed()  # the end in sight: more come by themselves
        page.wait_for_function("document.querySelectorAll('#results .card').length > 200")
        assert cards.first.get_attribute("data-id") == "/x/0.png"
        assert errors == []


# What has the keyboard's focus: its id (or class), and whether its ring is drawn clearly.
FOCUSED = """() => {
    const node = document.activeElement;
    const style = getComputedStyle(node);
    const ring = style.outlineStyle === 'solid' && parseFloat(style.outlineWidth) >= 2;
    return [node.id || node.className || node.tagName.toLowerCase(), ring];
}"""


def test_the_page_from_the_keyboard_alone(indexed):
    """Every control in order with Tab and a clear ring (the browser's was 1 px, dark on the
    blue buttons); Escape closes the key box (it stayed open) and gives the focus back to it;
    Enter searches; after "More like this" from the keyboard Tab goes on into the new
    results; the drop zone opens the file chooser."""
    from playwright.sync_api import expect

    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings) as (page, errors):
        page.wait_for_selector("#collection option", state="attached")
        order = []
        for _ in range(9):
            page.keyboard.press("Tab")
            order.append(page.evaluate(FOCUSED))
        controls = ["view-images", "view-products", "collection", "summary", "query", "top-k"]
        controls += ["search", "duplicates", "drop"]
        assert order == [[control, True] for control in controls], order

        page.focus("#key-box summary")
        page.keyboard.press("Enter")
        page.keyboard.press("Tab")
        assert page.evaluate(FOCUSED) == ["api-key", True]
        page.keyboard.press("Escape")
        expect(page.locator("#api-key")).to_be_hidden()
        assert page.evaluate(FOCUSED) == ["summary", True]

        page.focus("#query")
        page.keyboard.type("a cup of coffee")
        page.keyboard.press("Enter")  # searches
        expect(page.locator("#results .card")).to_have_count(7, timeout=TIMEOUT)
        for _ in range(4):  # top, search, near-duplicates, the drop zone, then the results
            page.keyboard.press("Tab")
        assert page.evaluate(FOCUSED) == ["drop", True]
        page.keyboard.press("Tab")
        assert page.evaluate(FOCUSED) == ["more", True]
        page.keyboard.press("Enter")  # more like this
        expect(page.locator("#status")).to_contain_text("results for this image", timeout=TIMEOUT)
        page.keyboard.press("Tab")
        assert page.evaluate(FOCUSED) == ["more", True], "the focus went back to the top"

        with page.expect_file_chooser() as chooser:  # the drop zone opens the file chooser
            page.focus("#drop")
            page.keyboard.press(" ")
        chooser.value.set_files(str(indexed / "chelsea.png"))
        expect(page.locator("#status")).to_contain_text("results like", timeout=TIMEOUT)
        assert errors == []


def test_escape_gives_up_a_search_or_a_list_the_page_waits_for(indexed):
    """A slow server: Escape did nothing, the search went on and its answer, when it came,
    replaced what the page showed. Now Escape aborts the search (by text, by image, of
    products) or the list the page waits for, says so, and the page goes on working."""
    from playwright.sync_api import expect

    store_a_mug(indexed, "demo")
    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings) as (page, errors):
        page.wait_for_selector("#collection option", state="attached")
        held: list[Any] = []  # requests the "server" does not answer until the test says

        def hold(route: Any) -> None:
            held.append(route)

        searches = re.compile(r"/api/v1/(search/image|stores/[^/]+/search)$")
        page.route(searches, hold)

        def escape_gives_up(field: str, said: str) -> None:
            """Escape in `field` while the page waits: the request aborted, `said` on the
            status line; the late answer, sent anyway, is not shown."""
            page.wait_for_function("document.querySelector('#results').ariaBusy === 'true'")
            with page.expect_event("requestfailed"):
                page.press(field, "Escape")
            expect(page.locator("#status")).to_have_text(said, timeout=TIMEOUT)
            assert page.locator("#results").get_attribute("aria-busy") is None
            with contextlib.suppress(Exception):  # the browser gave up on it: nothing to answer
                held.pop().continue_()
            page.wait_for_timeout(500)  # time to show it, were it still awaited
            expect(page.locator("#status")).to_have_text(said)
            assert page.locator("#results .card").count() == 0

        page.fill("#query", "a cup of coffee")
        page.press("#query", "Enter")
        escape_gives_up(
            "#query", "Searching \u2068photos\u2069 for “\u2068a cup of coffee\u2069”: cancelled."
        )
        assert page.input_value("#query") == "a cup of coffee"  # kept to try again

        page.unroute(searches)
        page.press("#query", "Enter")  # the page goes on: the same search, answered
        expect(page.locator("#results .card")).to_have_count(7, timeout=TIMEOUT)
        page.route(searches, hold)
        page.locator("#results .card .more").first.click()
        escape_gives_up("#query", "Searching \u2068photos\u2069 for this image: cancelled.")

        page.click("#view-products")
        page.wait_for_selector("#store option", state="attached")
        page.fill("#product-query", "coffee")
        page.press("#product-query", "Enter")
        escape_gives_up(
            "#product-query", "Searching \u2068demo\u2069 for “\u2068coffee\u2069”: cancelled."
        )
        page.unroute(searches)
        page.press("#product-query", "Enter")
        expect(page.locator("#results .product")).to_have_count(1, timeout=TIMEOUT)

        # a list: the page opens on a server that does not answer it
        page.route("**/api/v1/collections", hold)
        page.reload()
        asking = "Asking the server for its collections…"
        expect(page.locator("#status")).to_have_text(asking, timeout=TIMEOUT)
        with page.expect_event("requestfailed"):
            page.keyboard.press("Escape")
        said = "Asking the server for its collections: cancelled; reload the page to ask again."
        expect(page.locator("#status")).to_have_text(said, timeout=TIMEOUT)
        with contextlib.suppress(Exception):
            held.pop().continue_()
        page.wait_for_timeout(500)
        expect(page.locator("#status")).to_have_text(said)
        assert page.locator("#collection option").count() == 0
        page.unroute("**/api/v1/collections")
        page.reload()
        expect(page.locator("#collection option")).to_have_count(1, timeout=TIMEOUT)
        assert errors == []


def test_more_like_this_leaves_the_focus_on_the_new_results(indexed):
    """ "More like this" replaced its own card, and the keyboard's focus fell to the page's
    body: a screen reader or the next Tab started again from the top. Now the focus goes to
    the results (as the answer comes, or fails), and Tab goes on into them."""
    from playwright.sync_api import expect

    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings) as (page, errors):
        page.wait_for_selector("#collection option", state="attached")
        page.fill("#query", "a cup of coffee")
        page.press("#query", "Enter")
        expect(page.locator("#results .card")).to_have_count(7, timeout=TIMEOUT)
        focused = "document.activeElement.id || document.activeElement.className"
        page.locator("#results .card", has_text="coffee.png").locator(".more").click()
        expect(page.locator("#status")).to_contain_text("results for this image", timeout=TIMEOUT)
        assert page.evaluate(focused) == "results"
        page.keyboard.press("Tab")
        assert page.evaluate(focused) == "more"
        assert page.evaluate("document.activeElement.closest('.card').dataset.id") == str(
            indexed / "coffee.png"
        )  # the first of the new results

        page.click("#duplicates")  # a group's card, and a search that fails
        page.wait_for_selector("#results .group")
        busy = {"status": 503, "json": {"error": "server overloaded"}}
        page.route("**/api/v1/search/image", lambda route: route.fulfill(**busy))
        page.locator("#results .group .more").first.click()
        expect(page.locator("#status")).to_contain_text("503", timeout=TIMEOUT)
        assert page.evaluate(focused) == "results"
        assert errors == []


@contextlib.contextmanager
def answering_with(phrases: dict[str, tuple[int, str]]) -> Iterator[str]:
    """A stand-in for a proxy on loopback: a request for /<name> is answered with the status
    and reason phrase `phrases` give it (the phrase as UTF-8 bytes, as a proxy may send it;
    no HTTP server in Python sends other than Latin-1), a plain-text body and Retry-After."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, phrase = phrases[self.path.lstrip("/")]
            head = f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\nRetry-After: 30\r\n"
            self.wfile.write(f"{head}Content-Length: 2\r\nConnection: close\r\n\r\nno".encode())

        do_GET = do_POST = answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_a_right_to_left_reason_phrase_keeps_to_itself(indexed):
    """A failed answer without imgembed's JSON (a proxy's) is said by its reason phrase,
    which was neither set apart (an isolate, as the server's messages are) nor rid of its
    bidirectional controls; one in Hebrew, sent as UTF-8, read as its bytes ("×©×¨×ª")."""
    from playwright.sync_api import expect

    message = "השרת עמוס."  # "the server is overloaded."
    phrases = {"search": (503, message), "products": (502, "no \u202eupstream"),
               "thumbnail": (503, message)}  # fmt: skip
    store_a_mug(indexed, "demo")
    settings = load_settings(**TINY, allowed_roots=[indexed])
    with browser_on(settings) as (page, errors), answering_with(phrases) as proxy:
        page.wait_for_selector("#collection option", state="attached")
        page.route("**/thumbnail?*", lambda route: route.continue_(url=f"{proxy}/thumbnail"))
        page.fill("#query", "a cup of coffee")
        page.press("#query", "Enter")
        expect(page.locator("#results .card")).to_have_count(7, timeout=TIMEOUT)
        expect(page.locator("#results .card .no-image").first).to_have_text(
            f"no thumbnail: \u2068{message}\u2069", timeout=TIMEOUT
        )

        page.route("**/api/v1/search/image", lambda route: route.continue_(url=f"{proxy}/search"))
        page.press("#query", "Enter")
        expect(page.locator("#status")).to_contain_text("(try again in", timeout=TIMEOUT)
        said = page.locator("#status").inner_text()
        assert said == f"503: \u2068{message}\u2069 (try again in 30 seconds)"
        assert_drawn_right_to_left(page)

        page.click("#view-products")
        page.wait_for_selector("#store option", state="attached")
        page.route("**/stores/*/search", lambda route: route.continue_(url=f"{proxy}/products"))
        page.fill("#product-query", "coffee")
        page.press("#product-query", "Enter")
        expect(page.locator("#status")).to_have_text(
            "502: \u2068no upstream\u2069 (try again in 30 seconds)", timeout=TIMEOUT
        )
        assert errors == []
