"""Catalogue files into products: CSV, JSON lines, Shopify products.json; bad rows are
reported with their line in the file and never stop the rest."""

import contextlib
import json
from decimal import Decimal

import pytest
from hypothesis import given as holds_for
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from imgembed.catalog.importer import from_shopify, product, read_catalogue
from imgembed.catalog.products import (
    ProductRowError,
    from_mapping,
    parse_price,
    product_text,
    strip_html,
)
from imgembed.errors import ConfigurationError


def _lines(parsed):
    return {bad.line: bad.message for bad in parsed.bad_rows}


def _read_jsonl(tmp_path, rows):
    path = tmp_path / "products.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return read_catalogue(path)


def test_csv_with_aliases_html_prices_relative_images_and_bad_rows(tmp_path):
    (tmp_path / "img").mkdir()
    path = tmp_path / "products.csv"
    path.write_bytes(
        "\ufeffSKU,Name,Body (HTML),Type,Price,Currency,Image,Tags,Colour\n"  # BOM, Shopify-ish
        'A1,Rode jurk,"<p>Zomerse <b>jurk</b>&nbsp;van katoen</p><p>Maat M</p>",kleding,"29,99",'
        'eur,img/a1.jpg,"zomer, rood",rood\n'
        'A2,Lamp,Een lamp,interieur,"€ 1.299,00",EUR,https://shop.example/a2.jpg,,\n'
        "\n"  # blank lines are not rows
        ",No id,x,,1,,,,\n"
        "A4,,no title,,1,,,,\n"
        'A5,"Multi\nline title",x,,abc,,,,\n'  # a record over two lines: reported at its start
        "A6,Too many,x,,1,,,,,extra\n"
        "A7,Negative,x,,-3,,,,\n"
        "A8,Vaas,x,,1299.5,,ftp://shop.example/a8.jpg,,\n".encode()
    )
    parsed = read_catalogue(path)
    assert parsed.format == "csv" and parsed.rows == 8
    assert _lines(parsed) == {
        5: "no product id (a column product_id, id, sku, handle or artikelnummer)",
        7: "product A5: price 'abc' is not a number",
        9: "10 fields, but the header has 9",
        10: "product A7: price '-3' must be 0 or more",
    }
    (line, jurk), (_, lamp), (_, untitled), (_, vaas) = parsed.products
    assert line == 2
    # an empty title is no title: it updates a stored product, refused for a new one (Catalog)
    assert untitled.title == "" and "title" not in untitled.given and "price" in untitled.given
    assert jurk.product_id == "A1" and jurk.title == "Rode jurk"
    assert jurk.description == "Zomerse jurk van katoen\nMaat M"  # &nbsp; is a space
    assert jurk.category == "kleding" and jurk.price == Decimal("29.99") and jurk.currency == "EUR"
    assert jurk.image_url == str(tmp_path / "img" / "a1.jpg")  # relative to the file
    assert jurk.attributes == {"tags": ["zomer", "rood"], "colour": "rood"}
    assert lamp.price == Decimal("1299.00") and lamp.image_url == "https://shop.example/a2.jpg"
    assert vaas.image_url == "ftp://shop.example/a8.jpg"  # as written: intake refuses it
    assert vaas.price == Decimal("1299.5")


def test_jsonl_flat_and_shopify_objects(tmp_path):
    path = tmp_path / "products.jsonl"
    rows = [
        {
            "product_id": 1,
            "title": "Ring",
            "description": "Gold",
            "category": "sieraden",
            "price": 99,
            "image_url": "https://x/1.jpg",
            "attributes": {"material": "gold"},
        },
        "not json",
        [1, 2],
        {
            "id": 7,
            "title": "Shirt",
            "body_html": "<ul><li>Cotton</li><li>Blue</li></ul>",
            "product_type": "Fashion",
            "variants": [{"price": "19.95"}, {"price": "17.50"}],
            "images": [
                {"src": "https://x/b.jpg", "position": 2},
                {"src": "https://x/a.jpg", "position": 1},
            ],
        },
        {"title": "no id"},
    ]
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
    parsed = read_catalogue(path)
    assert _lines(parsed) == {
        2: "not valid JSON: Expecting value",
        4: "not a JSON object",
        6: "no product id (a column product_id, id, sku, handle or artikelnummer)",
    }
    (line_ring, ring), (line_shirt, shirt) = parsed.products
    assert (line_ring, line_shirt) == (1, 5)
    assert ring.product_id == "1" and ring.attributes == {"material": "gold"}
    assert ring.price == Decimal("99")
    assert shirt.description == "Cotton\nBlue" and shirt.category == "Fashion"
    assert shirt.price == Decimal("17.50")  # the lowest variant: Shopify's "from" price
    assert shirt.image_url == "https://x/a.jpg" and shirt.extra_image_urls == ("https://x/b.jpg",)


SHOPIFY = """{
  "products": [
    {
      "id": 632910392,
      "title": "IPod Nano - 8GB",
      "body_html": "<p>It's the <em>small</em> iPod with one very big idea: Video.</p>",
      "vendor": "Apple",
      "product_type": "Cult Products",
      "handle": "ipod-nano",
      "tags": "Emotive, Flash Memory, MP3, Music",
      "variants": [
        {"id": 808950810, "price": "199.00", "sku": "IPOD2008PINK",
         "presentment_prices": [{"price": {"amount": "199.00", "currency_code": "USD"}}]},
        {"id": 49148385, "price": "189.00", "sku": "IPOD2008RED"}
      ],
      "images": [{"id": 850703190, "position": 1, "src": "https://cdn.shopify.com/ipod-nano.png"},
                 {"id": 562641783, "position": 2, "src": "https://cdn.shopify.com/ipod-nano-2.png"}],
      "image": {"src": "https://cdn.shopify.com/ipod-nano.png"}
    },
    {
      "id": 921728736,
      "title": "",
      "body_html": "no title",
      "variants": []
    },
    {
      "id": 5,
      "title": "Broken price",
      "variants": [{"price": "gratis"}]
    },
    {
      "id": 6,
      "title": "Gift card",
      "body_html": "&lt;digital&gt; &amp; instant<script>track()</script>",
      "variants": [{"price": "25.00"}],
      "images": []
    }
  ]
}"""


def test_shopify_products_json_with_line_numbers(tmp_path):
    path = tmp_path / "products.json"
    path.write_text(SHOPIFY)
    parsed = read_catalogue(path)
    assert parsed.format == "shopify"
    assert _lines(parsed) == {
        # the line where the product's object starts
        26: "product 5: price 'gratis' is not a number",
    }
    (line, ipod), (untitled_line, untitled), (gift_line, gift) = parsed.products
    assert (line, untitled_line, gift_line) == (3, 20, 31)
    assert untitled.product_id == "921728736" and "title" not in untitled.given
    assert ipod.product_id == "632910392" and ipod.title == "IPod Nano - 8GB"
    assert ipod.description == "It's the small iPod with one very big idea: Video."
    assert ipod.category == "Cult Products" and ipod.price == Decimal("189.00")
    assert ipod.currency == "USD"
    assert ipod.image_url == "https://cdn.shopify.com/ipod-nano.png"
    assert ipod.extra_image_urls == ("https://cdn.shopify.com/ipod-nano-2.png",)
    assert ipod.attributes == {
        "vendor": "Apple",
        "handle": "ipod-nano",
        "tags": ["Emotive", "Flash Memory", "MP3", "Music"],
    }
    assert gift.description == "<digital> & instant" and gift.image_url is None


def test_a_broken_json_document_keeps_what_came_before(tmp_path):
    path = tmp_path / "products.json"
    broken = SHOPIFY.replace('"id": 5,', '"id": 5 oops')
    path.write_text(broken)
    parsed = read_catalogue(path)
    assert [p.product_id for _, p in parsed.products] == ["632910392", "921728736"]
    assert parsed.bad_rows[-1].line == 27 and "rest is skipped" in parsed.bad_rows[-1].message
    plain = tmp_path / "list.json"
    plain.write_text('[{"id": "a", "title": "A"},\n {"id": "b", "title": "B"}]')
    assert [(n, p.product_id) for n, p in read_catalogue(plain).products] == [(1, "a"), (2, "b")]
    other = tmp_path / "other.json"
    other.write_text('{"items": []}')
    assert 'no "products" list' in read_catalogue(other).bad_rows[0].message


def test_json_nested_too_deeply_is_a_bad_row_not_a_crash(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    document = tmp_path / "products.json"
    document.write_text('[{"id": "a", "title": "A"},\n' + deep + "]")
    parsed = read_catalogue(document)
    assert [p.product_id for _, p in parsed.products] == ["a"]
    assert (parsed.bad_rows[0].line, parsed.bad_rows[0].message) == (
        2, "not valid JSON (nested too deeply to read); the rest is skipped")  # fmt: skip
    lines = tmp_path / "products.jsonl"
    lines.write_text('{"id": "a", "title": "A"}\n' + deep + '\n{"id": "b", "title": "B"}\n')
    parsed = read_catalogue(lines)
    assert [p.product_id for _, p in parsed.products] == ["a", "b"]
    assert [(r.line, r.message) for r in parsed.bad_rows] == [
        (2, "not valid JSON: nested too deeply to read")]  # fmt: skip


def test_rows_that_are_not_utf8_are_reported(tmp_path):
    """A UTF-8 file with a stray byte: that row is reported. A file with no UTF-8 at all is
    Excel's CSV in Windows-1252 (Dutch, German locales): read as that, every row whole."""
    path = tmp_path / "mixed.csv"
    path.write_bytes(b"id,title\n1,Caf\xe9 au lait\n2,Th" + "é\n".encode())  # one UTF-8 é
    parsed = read_catalogue(path)
    assert parsed.encoding == "utf-8"
    assert _lines(parsed) == {2: "product 1: text that is not valid UTF-8"}
    assert [p.title for _, p in parsed.products] == ["Thé"]
    excel = tmp_path / "de.csv"
    excel.write_bytes(
        "Artikelnummer;Titel;Preis;Währung\nd1;Größe 42 – Hemd;12,50;€\n".encode("cp1252")
    )
    parsed = read_catalogue(excel)
    assert parsed.encoding == "windows-1252" and parsed.bad_rows == []
    ((_, shirt),) = parsed.products
    assert (shirt.title, shirt.price, shirt.currency) == ("Größe 42 – Hemd", Decimal("12.50"), "€")


@pytest.mark.parametrize(
    ("given", "price"),
    [
        (29.99, "29.99"), (1e-06, "0.000001"), (1e20, "1E+20"), (7, "7"), ("29,99", "29.99"),
        ("€ 1.299,00", "1299.00"), ("1,299.00", "1299.00"), ("$1,299,000", "1299000"),
        ("1.299.000", "1299000"), ("CHF 1'299.50", "1299.50"), ("12 EUR", "12"),
        ("25,-", "25"), ("29.99 €", "29.99"), ("€\u00a01\u202f299,00", "1299.00"),
        ("1e308", "1E+308"), (".5", "0.5"),
    ],
)  # fmt: skip
def test_prices_are_read_exactly(given, price):
    assert parse_price(given, "p") == Decimal(price)


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ("3 for 2", "is not a number"), ("abc1", "is not a number"), ("1e", "is not a number"),
        ("nan", "is not a number"), (float("nan"), "is not a number"), ("-3", "must be 0 or"),
        (True, "is not a number"), ([1], "is not a number"), ("Infinity", "is not a number"),
    ],
)  # fmt: skip
def test_prices_that_are_not_one_number_are_refused(given, problem):
    # the old reader deleted every other character: "3 for 2" was 32, "1e20" was 120
    with pytest.raises(ProductRowError, match=f"product p: price .* {problem}"):
        parse_price(given, "p")


def test_nul_characters_lists_and_repeated_ids_are_bad_rows_not_lost_imports(tmp_path):
    path = tmp_path / "products.jsonl"
    rows = [
        {"id": "N1", "title": "good", "price": 1},
        {"id": "N2", "title": "bad \x00 nul", "price": 2},  # PostgreSQL text cannot hold it
        {"id": ["a"], "title": "list id"},
        {"id": "N4", "title": {"nl": "x"}},
        {"id": "N5", "title": "t", "image_url": 5},  # a number is a name like any other
        {"id": "N1", "title": "again"},
        {"id": "N7", "title": "t", "extra_image_urls": {"a": 1}},
        {"id": "N8\nx", "title": "a line break in its id"},  # no HTTP route could name it
    ]
    parsed = _read_jsonl(tmp_path, rows)
    assert _lines(parsed) == {
        2: "product N2: text with a NUL character",
        3: "product id must be text or a number, not a list",
        4: "product N4: title must be text or a number, not a dict",
        6: "product N1: the same id as line 1, which is kept",
        7: "product N7: extra_image_urls must be a list",
        8: "product 'N8\\nx': an id with a control character (a line break, a tab): HTTP "
        "routes cannot name it",
    }
    assert [(line, p.title) for line, p in parsed.products] == [(1, "good"), (5, "t")]
    assert parsed.products[1][1].image_url == str(tmp_path / "5")
    with pytest.raises(ConfigurationError, match="unknown catalogue format 'xml': use csv"):
        read_catalogue(path, "xml")


def test_semicolon_and_tab_separated_files_and_files_without_products(tmp_path):
    dutch = tmp_path / "excel.csv"  # Excel in a Dutch locale: ';' and decimal commas
    dutch.write_bytes(
        '\ufeffproduct_id;title;price\nA1;Stoel;1.299,00\nA2;Tafel;"12,50"\n'.encode()
    )
    parsed = read_catalogue(dutch)
    assert [(p.product_id, p.price) for _, p in parsed.products] == [
        ("A1", Decimal("1299.00")),
        ("A2", Decimal("12.50")),
    ]
    tabs = tmp_path / "export.csv"
    tabs.write_text("id\ttitle\nT1\tLamp, wit\n")
    assert read_catalogue(tabs).products[0][1].title == "Lamp, wit"
    header_only = tmp_path / "header.csv"
    header_only.write_text("id,title,price\n")
    assert _lines(read_catalogue(header_only)) == {
        1: "no products in this file (empty, or a header only)"
    }


@pytest.mark.parametrize(
    ("csv_text", "expected"),
    [
        ("ID;Titel;Omschrijving;Prijs;Categorie;Afbeelding;Kleur\n"
         "n1;Rode jurk;Zomerjurk;39,95;kleding;img/n1.jpg;rood\n",
         ("n1", "Rode jurk", "Zomerjurk", Decimal("39.95"), "kleding", "n1.jpg",
          {"kleur": "rood"})),
        ("Artikelnummer;Name;Beschreibung;Preis;Kategorie;Bild\n"
         "d1;Lampe;Eine Lampe;12,50;interieur;img/d1.jpg\n",
         ("d1", "Lampe", "Eine Lampe", Decimal("12.50"), "interieur", "d1.jpg", {})),
    ],
)  # fmt: skip
def test_dutch_and_german_column_names(tmp_path, csv_text, expected):
    """A Dutch export's ID;Titel;Prijs;Categorie;Afbeelding refused every row for "no title"
    and kept price, category and image as attributes."""
    path = tmp_path / "export.csv"
    path.write_text(csv_text)
    ((_, p),) = read_catalogue(path).products
    image = str(tmp_path / "img" / expected[5])
    assert (p.product_id, p.title, p.description, p.price, p.category, p.image_url,
            p.attributes) == (*expected[:5], image, expected[6])  # fmt: skip


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(ConfigurationError, match="unknown catalogue format"):
        read_catalogue(tmp_path / "products.xml")
    with pytest.raises(ConfigurationError, match="cannot read"):
        read_catalogue(tmp_path / "missing.csv")
    odd = tmp_path / "products.txt"
    odd.write_text('{"id": 1, "title": "x"}\n')
    assert read_catalogue(odd, "jsonl").products[0][1].title == "x"


def test_flat_rows_with_shopify_column_names_keep_their_own_columns(tmp_path):
    table = tmp_path / "export.csv"
    table.write_text(
        "id,title,body_html,category,price,image_url\n"
        "h1,Rode jurk,<p>Mooie jurk</p>,kleding,49.95,https://x/h1.jpg\n"
    )
    (row,) = [p for _, p in read_catalogue(table).products]
    assert (row.description, row.category, row.price, row.image_url) == (
        "Mooie jurk", "kleding", Decimal("49.95"), "https://x/h1.jpg")  # fmt: skip
    lines = tmp_path / "images.jsonl"  # no main image named: the first of the others is it
    lines.write_text('{"id": "g1", "title": "t", "images": ["https://x/1.jpg", "https://x/2.jpg"]}')
    (gallery,) = [p for _, p in read_catalogue(lines).products]
    assert (gallery.image_url, gallery.extra_image_urls) == (
        "https://x/1.jpg",
        ("https://x/2.jpg",),
    )


def test_one_shopify_product_joined_jsonl_files_and_an_empty_file(tmp_path):
    single = tmp_path / "product.json"  # Shopify's GET /products/{id}.json
    single.write_text('{\n  "product": {"id": 7, "title": "Lamp", "variants": [{"price": "9"}]}\n}')
    ((line, lamp),) = read_catalogue(single).products
    assert (line, lamp.product_id, lamp.price) == (2, "7", Decimal("9"))
    joined = tmp_path / "joined.jsonl"  # two exports joined with `cat`, each with a BOM
    joined.write_bytes(
        '\ufeff{"id": "a", "title": "A"}\n\ufeff{"id": "b", "title": "B"}\n'.encode()
    )
    parsed = read_catalogue(joined)
    assert [p.product_id for _, p in parsed.products] == ["a", "b"] and not parsed.bad_rows
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    parsed = read_catalogue(empty)
    assert parsed.rows == 0 and len(parsed.bad_rows) == 1  # not "1 row read, 1 bad"


def test_a_file_in_another_format_than_named_is_refused_whole(tmp_path):
    table = tmp_path / "products.csv"
    table.write_text("id,title\nA1,Stoel\nA2,Tafel\n")
    with pytest.raises(ConfigurationError, match="not JSON lines; use --format csv"):
        read_catalogue(table, "jsonl")
    with pytest.raises(ConfigurationError, match=r"not a JSON document .*'id,title"):
        read_catalogue(table, "shopify")
    lines = tmp_path / "products.jsonl"
    lines.write_text('{"id": "A1", "title": "Stoel"}\n')
    with pytest.raises(ConfigurationError, match="holds JSON, not CSV: use --format jsonl"):
        read_catalogue(lines, "csv")
    # one broken line among JSON lines is that line's error, not the file's
    lines.write_text('"id": "A0"\n{"id": "A1", "title": "Stoel"}\n')
    parsed = read_catalogue(lines)
    assert [p.product_id for _, p in parsed.products] == ["A1"]
    assert "not valid JSON" in _lines(parsed)[1]


def test_product_text_template_and_html():
    assert product_text("Rode jurk", "Katoen", "kleding", Decimal("29.9"), "EUR") == (
        "Rode jurk\nKatoen\nCategory: kleding\nPrice: 29.90 EUR"
    )
    assert product_text("Lamp", "", None, None, None) == "Lamp"
    assert strip_html("<div>a<br>b</div><style>p{}</style>  c &gt; d") == "a\nb\nc > d"


def test_a_quote_never_closed_is_a_bad_row_and_the_rows_after_it_are_read(tmp_path):
    """A stray quote would make the rest of the file one field of its row, silently. (Where a
    later quote pairs with it, CSV itself cannot tell: the rows between become that text.)"""
    path = tmp_path / "quote.csv"
    path.write_text('id,title,price\nq1,"One\nover two lines",1\nq2,"Two unterminated,2\n'
                    'q3,Three,3\nq4,Four,4\n')  # fmt: skip
    parsed = read_catalogue(path)
    assert [(n, p.product_id) for n, p in parsed.products] == [(2, "q1"), (5, "q3"), (6, "q4")]
    assert parsed.products[0][1].title == "One\nover two lines"  # a quote that closes
    assert [(r.line, r.message) for r in parsed.bad_rows] == [
        (4, "a quote opened in this row is never closed")]  # fmt: skip
    assert parsed.rows == 4


def test_a_header_that_names_a_column_twice_is_refused(tmp_path):
    path = tmp_path / "twice.csv"
    path.write_text("id,title,Title,price\np1,One,Other,1\n")
    parsed = read_catalogue(path)
    assert parsed.products == []
    assert [(r.line, r.message) for r in parsed.bad_rows] == [
        (1, "the header names title more than once; rename or remove one")]  # fmt: skip


def test_fields_longer_than_pythons_default_csv_limit_are_read(tmp_path):
    """Python's csv refuses fields over 128 KiB; a long description is a product."""
    long = "lang " * 60_000  # 300 KB
    path = tmp_path / "long.csv"
    path.write_text(f'id,title,description,price\np1,One,"{long}",1\np2,Two,short,2\n')
    parsed = read_catalogue(path)
    assert parsed.bad_rows == []
    assert [p.product_id for _, p in parsed.products] == ["p1", "p2"]
    assert parsed.products[0][1].description == long.strip()


def test_utf16_with_its_bom_as_excel_saves_unicode_text(tmp_path):
    """Excel's "Unicode text": UTF-16 with a BOM, tab-separated (it gave 6 rows, all bad)."""
    path = tmp_path / "excel.csv"
    path.write_bytes("id\ttitle\tprice\r\n1\tRode jurk\t49,95\r\n2\tMok\t12\r\n".encode("utf-16"))
    parsed = read_catalogue(path)
    assert (parsed.rows, parsed.bad_rows) == (2, [])
    assert [(p.product_id, p.title, p.price) for _, p in parsed.products] == [
        ("1", "Rode jurk", Decimal("49.95")),
        ("2", "Mok", Decimal("12")),
    ]


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_without_a_bom_is_read_and_a_binary_file_refused(tmp_path, encoding):
    """Both were read as Windows-1252, every row then "no product id"."""
    path = tmp_path / "no-bom.csv"
    path.write_bytes("id,title\r\n1,Rode jurk\r\n2,Mok\r\n".encode(encoding))
    parsed = read_catalogue(path)
    assert (parsed.encoding, parsed.rows, parsed.bad_rows) == (encoding, 2, [])
    assert [p.title for _, p in parsed.products] == ["Rode jurk", "Mok"]
    binary = tmp_path / "photo.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigurationError, match="not a text file"):
        read_catalogue(binary)


def test_loose_values_in_product_objects_are_that_products_error(tmp_path):
    """Each of these broke the import with a TypeError or ValueError (a 500 over HTTP)."""
    rows = [
        {"id": "A", "title": "nested attributes as text", "attributes": "color=red"},
        {"id": "B", "title": "t", "images": 5},
        {"id": "C", "title": "t", "variants": 1, "images": [{"src": "a.jpg"}]},
        {"id": "D", "title": "t", "tags": 7, "variants": []},
        {"id": {"x": 1}, "title": "t", "variants": [{"price": "1"}]},
        {"id": "F", "title": "t", "variants": [{"presentment_prices": 3}], "image": {"src": "f"}},
        {
            "id": "G",
            "title": "positions of any type",
            "images": [{"src": "2.jpg", "position": "2"}, {"src": "1.jpg", "position": 1}],
        },
    ]
    parsed = _read_jsonl(tmp_path, rows)
    assert _lines(parsed) == {
        1: 'product A: attributes must be an object, as {"color": "red"}',
        2: "product B: extra_image_urls must be a list",
        3: "product C: variants must be a list, not 1",
        4: "product D: tags must be a list, not 7",
        5: "product id must be text or a number, not a dict",
    }
    assert [p.product_id for _, p in parsed.products] == ["F", "G"]
    assert parsed.products[1][1].image_url == str(tmp_path / "2.jpg")  # "2" counts as 0
    with pytest.raises(ProductRowError, match=r"^not a product object but \[1, 2\]$"):
        product([1, 2])
    # in a CSV, an attributes column holds its object as JSON text
    csv_path = tmp_path / "products.csv"
    csv_path.write_text('id,title,attributes\nJ,t,"{""color"": ""red""}"\nK,t,color=red\nL,t,\n')
    parsed = read_catalogue(csv_path)
    assert _lines(parsed) == {3: 'product K: attributes must be an object, as {"color": "red"}'}
    assert [p.attributes for _, p in parsed.products] == [{"color": "red"}, {}]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
_KEYS = st.sampled_from(
    ["id", "title", "price", "images", "image", "variants", "tags", "attributes",
     "extra_image_urls", "image_url", "handle", "body_html", "presentment_prices", "src"]
)  # fmt: skip


@hypothesis_settings(max_examples=300, deadline=None)
@holds_for(st.dictionaries(_KEYS, _JSON, max_size=8))
def test_any_json_object_is_a_product_or_a_product_row_error(row):
    """Both readers themselves, not only the catch-all around them: a bad value is named."""
    for read in (from_mapping, from_shopify):
        with contextlib.suppress(ProductRowError):
            read(row)


def test_a_nul_byte_in_one_row_of_a_utf8_csv_is_that_rows_error(tmp_path):
    """Not the whole file refused as "not a text file": a bad row never stops the rest."""
    path = tmp_path / "products.csv"
    path.write_bytes(b"id,title\n1,Rode jurk\n2,Mok\x00 groot\n3,Tas\n")
    parsed = read_catalogue(path)
    assert (parsed.encoding, parsed.rows) == ("utf-8", 3)
    assert _lines(parsed) == {3: "product 2: text with a NUL character"}
    assert [p.product_id for _, p in parsed.products] == ["1", "3"]


def test_bad_rows_are_reported_in_the_order_of_their_lines(tmp_path):
    """A repeated id is found after the file is read: its line was listed after the later
    lines' errors."""
    rows = [
        {"id": "A", "title": "first"},
        {"id": "B", "title": "second"},
        {"id": "A", "title": "again"},
        {"title": "no id"},
        {"id": "B", "title": "again"},
    ]
    parsed = _read_jsonl(tmp_path, rows)
    assert [row.line for row in parsed.bad_rows] == [3, 4, 5]
    assert [(line, p.product_id) for line, p in parsed.products] == [(1, "A"), (2, "B")]
    assert parsed.rows == 5


def test_a_json_file_is_never_read_as_windows_1252(tmp_path):
    """JSON is UTF-8: a byte that is not (Windows-1252's é) is its row's error, as in a UTF-8
    CSV; only a CSV without one UTF-8 sequence is taken for Excel's Windows-1252."""
    raw = b'{"id": "1", "title": "Caf\xe9"}\n{"id": "2", "title": "Tea"}\n'
    for name in ("products.jsonl", "products.json"):
        path = tmp_path / name
        path.write_bytes(raw if name.endswith("l") else b"[" + raw.replace(b"}\n{", b"},{") + b"]")
        parsed = read_catalogue(path)
        assert parsed.encoding == "utf-8"
        assert _lines(parsed) == {1: "product 1: text that is not valid UTF-8"}
        assert [p.title for _, p in parsed.products] == ["Tea"]


def test_utf16_without_a_bom_of_a_greek_shop_is_read(tmp_path):
    """Text that is more than half ASCII (ids, prices, links) is UTF-16 when half of its
    bytes are 0, though a third of it is Greek."""
    text = "id,title,price\r\n1,Φόρεμα μακρύ,49.95\r\n2,Κούπα,12\r\n"
    path = tmp_path / "greek.csv"
    path.write_bytes(text.encode("utf-16-le"))
    parsed = read_catalogue(path)
    assert (parsed.encoding, parsed.bad_rows) == ("utf-16-le", [])
    assert [(p.title, p.price) for _, p in parsed.products] == [
        ("Φόρεμα μακρύ", Decimal("49.95")),
        ("Κούπα", Decimal("12")),
    ]


def test_a_shopify_product_with_one_image_object_status_and_presentment_currencies(tmp_path):
    """Shopify's `image` object alone (no `images` list) is its photo; the first presentment
    currency is the shop's own; the status is kept with vendor and handle."""
    item = {
        "id": 9,
        "title": "Mug",
        "status": "draft",
        "image": {"src": "https://x/mug.jpg"},
        "variants": [
            {"price": "12.00", "presentment_prices": [
                {"price": {"amount": "12.00", "currency_code": "EUR"}},
                {"price": {"amount": "13.10", "currency_code": "USD"}}]},
            {"price": "10.00", "presentment_prices": [
                {"price": {"amount": "8.60", "currency_code": "GBP"}}]},
        ],
    }  # fmt: skip
    mug = _read_jsonl(tmp_path, [item]).products[0][1]
    assert mug.image_url == "https://x/mug.jpg" and mug.extra_image_urls == ()
    assert (mug.price, mug.currency) == (Decimal("10.00"), "EUR")
    assert mug.attributes == {"status": "draft"}
    no_variants = product({"id": 10, "title": "Print", "image": {"src": "https://x/p.jpg"}})
    assert no_variants.image_url == "https://x/p.jpg"


def test_csv_header_names_are_read_without_the_blanks_around_them(tmp_path):
    path = tmp_path / "spaced.csv"
    path.write_text("id , title , price\nM1,Mok,12\n")
    parsed = read_catalogue(path)
    assert parsed.bad_rows == []
    assert [(p.product_id, p.title, p.price) for _, p in parsed.products] == [
        ("M1", "Mok", Decimal("12"))
    ]
    twice = tmp_path / "twice.csv"  # one value would silently win over the other
    twice.write_text("id,title, Title \nM1,Mok,Beker\n")
    parsed = read_catalogue(twice)
    assert (parsed.products, _lines(parsed)) == (
        [], {1: "the header names title more than once; rename or remove one"})  # fmt: skip


def test_a_json_list_missing_a_comma_ends_there_and_ndjson_is_json_lines(tmp_path):
    document = tmp_path / "products.json"
    document.write_text('[{"id": "a", "title": "A"},\n {"id": "b", "title": "B"}\n {"id": "c"}]')
    parsed = read_catalogue(document)
    assert [p.product_id for _, p in parsed.products] == ["a", "b"]
    assert _lines(parsed) == {
        3: "not valid JSON (expected ',' or ']' after a product); the rest is skipped"
    }
    lines = tmp_path / "export.NDJSON"
    lines.write_text('{"id": "n1", "title": "One"}\n{"id": "n2", "title": "Two"}\n')
    parsed = read_catalogue(lines)
    assert parsed.format == "jsonl"
    assert [p.product_id for _, p in parsed.products] == ["n1", "n2"]
