"""Index sources that cannot be used fail alone, named by their file line: rows without an
image, lines that are not JSON, list files that are not UTF-8, folders that cannot be listed.
Output paths are checked before any work."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from imgembed.errors import ConfigurationError
from imgembed.indexing import read_index_sources

PNG = [".png"]


def _errors(items) -> dict[str, tuple[str, str]]:
    return {i.source: (type(i.error).__name__, str(i.error)) for i in items if i.error}


def test_csv_rows_without_an_image_are_named_by_their_file_line(tmp_path):
    listing = tmp_path / "products.csv"
    listing.write_bytes(
        b"id,image,category,notes\r\n"  # 1: the header
        b"a,img/a.png,x,plain\r\n"  # 2
        b'b,img/b.png,y,"two\r\n'  # 3: a quoted field over two lines
        b'lines"\r\n'  # 4
        b"c,,z,no image\r\n"  # 5
        b"\r\n"  # 6: blank
        b'd,img/d.png,x,"multi\nline"\n'  # 7-8
        b",,x,neither id nor image\n"  # 9
        b"e,img/e.png\n"  # 10: short row
    )
    items = read_index_sources([str(listing)], PNG)
    ok = [i for i in items if i.error is None]
    assert [i.id for i in ok] == ["a", "b", "d", "e"]
    assert ok[1].metadata == {"category": "y", "notes": "two\r\nlines"}
    assert ok[0].source == str(tmp_path / "img" / "a.png")
    assert _errors(items) == {
        f"{listing}:5": ("SourceListError", f"{listing}:5: no image: none of image, image_url, "
                         "image_path, url, path, source, file has a value"),
        f"{listing}:9": ("SourceListError", f"{listing}:9: no image: none of image, image_url, "
                         "image_path, url, path, source, file has a value"),
    }  # fmt: skip
    assert {i.id for i in items if i.error} == {"c", f"{listing}:9"}  # the row's own id if any


def test_jsonl_lines_that_cannot_be_used_fail_alone(tmp_path):
    listing = tmp_path / "more.jsonl"
    listing.write_text(
        '{"image": "a.png", "id": "j1"}\n'
        "\n"
        "not json\n"
        "[1, 2]\n"
        '{"id": "j5", "title": "no image"}\n'
        '{"image_url": "https://shop.example/b.png", "title": "caf\u00e9"}\n'
        '{"image": "c.png", "id": {"sku": 1}}\n'
        '{"image": ["d.png"], "id": "j8"}\n'
        '{"image": "e.png", "id": true}\n'
        '{"image": "f.png", "id": 42}\n'
        '{"image": "g.png", "id": 0}\n'
    )
    items = read_index_sources([str(listing)], PNG)
    assert [(i.id, i.source) for i in items if not i.error] == [
        ("j1", str(tmp_path / "a.png")),
        ("https://shop.example/b.png", "https://shop.example/b.png"),
        ("42", str(tmp_path / "f.png")),
        ("0", str(tmp_path / "g.png")),  # 0 is an id (it fell back to the path)
    ]
    errors = _errors(items)
    assert errors[f"{listing}:3"][1].startswith(f"{listing}:3: not JSON: Expecting value")
    assert errors[f"{listing}:4"][1] == f"{listing}:4: expected a JSON object, not list"
    assert errors[f"{listing}:5"][0] == "SourceListError"
    # an object, array or true/false is no id or image name (it was str()-ed into one)
    assert errors[f"{listing}:7"][1] == f"{listing}:7: 'id' must be text or a number, not an object"
    assert errors[f"{listing}:8"][1].endswith("'image' must be text or a number, not an array")
    assert errors[f"{listing}:9"][1].endswith("'id' must be text or a number, not true/false")
    assert len(errors) == 6


def test_a_list_that_is_not_utf8_fails_naming_line_and_byte_and_the_rest_goes_on(tmp_path, photos):
    listing = tmp_path / "latin1.csv"
    listing.write_bytes("id,image,title\na,a.png,Café\n".encode() + b"b,b.png,Caf\xe9\n")
    (tmp_path / "pics").mkdir()
    shutil.copy(photos[0], tmp_path / "pics" / "p.png")
    items = read_index_sources([str(listing), str(tmp_path / "pics")], PNG)
    assert [i.id for i in items if not i.error] == [str(tmp_path / "pics" / "p.png")]
    ((item_source, (kind, message)),) = _errors(items).items()
    assert item_source == f"{listing}:3" and kind == "SourceListError"
    assert message.startswith(f"{listing}:3: not UTF-8: byte 0xe9 at column 12 cannot be decoded")
    assert "save it as UTF-8" in message


def test_a_utf8_bom_is_not_part_of_the_first_column(tmp_path):
    listing = tmp_path / "excel.csv"
    listing.write_bytes(b"\xef\xbb\xbfid,image\nsku-1,a.png\n")
    (item,) = read_index_sources([str(listing)], PNG)
    assert item.id == "sku-1" and item.error is None


def test_csv_lists_separated_by_semicolons_or_tabs(tmp_path):
    semi = tmp_path / "semi.csv"  # Excel in a German or Dutch locale
    semi.write_text("id;image;category\ns1;a.jpg;space, far\n")
    tabs = tmp_path / "tabs.csv"
    tabs.write_text("id\timage\ns2\tb.jpg\n")
    items = read_index_sources([str(semi), str(tabs)], [".jpg"])
    assert [(i.id, Path(i.source).name, i.metadata) for i in items] == [
        ("s1", "a.jpg", {"category": "space, far"}),
        ("s2", "b.jpg", {}),
    ]


def test_txt_lists_keep_blanks_a_name_on_disk_has(tmp_path):
    """Blanks around a line are dropped, unless a file is named with them."""
    (tmp_path / " lead.png").write_bytes(b"x")
    (tmp_path / "trail.png ").write_bytes(b"x")
    (tmp_path / "plain.png").write_bytes(b"x")
    listing = tmp_path / "files.txt"
    listing.write_text(" lead.png\ntrail.png \n  plain.png  \n")
    items = read_index_sources([str(listing)], PNG)
    assert [Path(i.source).name for i in items] == [" lead.png", "trail.png ", "plain.png"]
    assert all(Path(i.source).exists() for i in items)


def test_txt_lists_keep_names_that_are_not_utf8(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")
    listing = tmp_path / "files.txt"
    listing.write_bytes(b"caf\xe9.png\r\n\nplain.png\n")
    odd, plain = read_index_sources([str(listing)], PNG)
    assert odd.source == str(tmp_path / name)  # opens the file
    assert odd.id == f"{tmp_path}/caf\\xe9.png"  # what is stored and printed
    assert plain.id == plain.source == str(tmp_path / "plain.png")


def test_two_files_whose_names_print_alike_are_not_one_silently(tmp_path, photos):
    folder = tmp_path / "collide"
    folder.mkdir()
    (folder / "a_\\xff.png").write_bytes(photos[0].read_bytes())  # backslash, x, f, f
    (folder / os.fsdecode(b"a_\xff.png")).write_bytes(photos[1].read_bytes())  # byte 0xFF
    items = read_index_sources([str(folder)], [".png", ".jpg"])
    kept, clash = items
    assert kept.error is None and clash.error is not None
    assert kept.id == clash.id == f"{folder}/a_\\xff.png"
    assert "the same id as" in str(clash.error) and "rename one" in str(clash.error)


def test_a_list_row_whose_id_is_taken_fails_under_its_own_id_and_source(tmp_path, photos):
    listing = tmp_path / "h.csv"
    listing.write_text(f"id,image\na3,{photos[0]}\na3,{photos[1]}\n")
    kept, clash = read_index_sources([str(listing)], [".png", ".jpg"])
    assert (kept.id, kept.source, kept.error) == ("a3", str(photos[0]), None)
    assert (clash.id, clash.source) == ("a3", str(photos[1]))  # not another item's id
    assert str(clash.error) == (
        f"{photos[1]}: the same id ('a3') as {str(photos[0])!r}, which is kept; rename one"
    )


def test_a_row_that_fails_does_not_take_its_id_from_a_later_good_one(tmp_path, photos):
    """Before, the good row failed as 'the same id as h.csv:2, which is kept' and the id
    was kept by nothing."""
    listing = tmp_path / "h.csv"
    listing.write_text(f"id,image\na3,\na3,{photos[0]}\na3,{photos[1]}\n")
    kept, broken, clash = read_index_sources([str(listing)], [".png", ".jpg"])
    assert (kept.id, kept.source, kept.error) == ("a3", str(photos[0]), None)
    assert broken.source == f"{listing}:2" and "no image" in str(broken.error)
    assert f"as {str(photos[0])!r}, which is kept" in str(clash.error)


def _without_file_permissions_bypass(code: str) -> subprocess.CompletedProcess:
    """Runs Python as this user, but as root without the capabilities that ignore file
    permissions (so a chmod 000 folder is unreadable, as for any other user)."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a folder unreadable")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [*prefix, sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


@pytest.fixture
def locked_tree(tmp_path, photos):
    root = tmp_path / "tree"
    (root / "locked").mkdir(parents=True)
    (root / "open").mkdir()
    shutil.copy(photos[0], root / "a.png")
    shutil.copy(photos[1], root / "open" / "b.png")
    shutil.copy(photos[2], root / "locked" / "c.png")
    (root / "locked").chmod(0)
    yield root
    (root / "locked").chmod(0o755)


def test_a_folder_that_cannot_be_listed_is_a_failed_source(locked_tree):
    proc = _without_file_permissions_bypass(f"""
        import json
        from imgembed.indexing import read_index_sources
        from imgembed.intake.sources import expand_paths
        items = read_index_sources([{str(locked_tree)!r}], [".png"])
        print(json.dumps([[i.id, i.source, type(i.error).__name__, str(i.error)] for i in items]))
        print(json.dumps([str(p) for p in expand_paths([{str(locked_tree)!r}], [".png"])]))
    """)
    assert proc.returncode == 0, proc.stderr
    items, plain = (json.loads(line) for line in proc.stdout.splitlines())
    locked = str(locked_tree / "locked")
    assert items == [
        [str(locked_tree / "a.png"), str(locked_tree / "a.png"), "NoneType", "None"],
        [str(locked_tree / "open" / "b.png"), str(locked_tree / "open" / "b.png"), "NoneType",
         "None"],
        [locked, locked, "ImageNotFoundError", f"{locked}: cannot list folder: Permission denied"],
    ]  # fmt: skip
    # Without a failures list the folder stays an entry, so reading it fails as that entry.
    assert plain == [str(locked_tree / "a.png"), locked, str(locked_tree / "open" / "b.png")]


def test_output_paths_are_checked_before_any_work(tmp_path):
    from imgembed.cli.output import Writer, check_writable

    with pytest.raises(ConfigurationError, match=r"the folder .*missing does not exist"):
        Writer(tmp_path / "missing" / "out.npy")
    with pytest.raises(ConfigurationError, match="it is a folder"):
        check_writable(tmp_path)
    with pytest.raises(ConfigurationError, match=r"conftest\.py is a file, not a folder"):
        check_writable(Path(__file__).parent.parent / "conftest.py" / "v.npy")
    existing = tmp_path / "keep.jsonl"
    existing.write_text("old\n")
    check_writable(existing)
    assert existing.read_text() == "old\n"  # checked, not truncated
    check_writable(tmp_path / "new.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.jsonl"]  # no probe left behind


def test_a_read_only_folder_is_refused_before_any_work(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        proc = _without_file_permissions_bypass(f"""
            from imgembed.cli.output import Writer
            from imgembed.errors import ConfigurationError
            try:
                Writer(__import__("pathlib").Path({str(folder / "out.npy")!r}))
            except ConfigurationError as exc:
                print(exc)
        """)
    finally:
        folder.chmod(0o755)
    assert proc.stdout.strip() == f"cannot write the output {folder}/out.npy: Permission denied"
    assert list(Path(folder).iterdir()) == []


def test_a_write_that_fails_after_the_work_is_a_typed_error(tmp_path):
    import numpy as np

    from imgembed.cli.output import Writer
    from imgembed.errors import OutputError

    full = tmp_path / "full.jsonl"
    full.write_text("the last good output\n")
    # the file is written under a temporary name first: there, every write is ENOSPC
    (tmp_path / f".full.jsonl.{os.getpid()}.part").symlink_to("/dev/full")
    writer = Writer(full)
    with pytest.raises(OutputError, match=r"cannot write .*full\.jsonl: No space left on device"):
        for _ in range(2000):  # past the stream's buffer
            writer.write({"source": "a.png", "embedding": np.zeros(64, np.float32)})
        writer.close(64)
    assert full.read_text() == "the last good output\n"  # not replaced by half a file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.jsonl"]  # nothing left over
    npy = tmp_path / "v.npy"
    (tmp_path / f".v.npy.sources.txt.{os.getpid()}.part").symlink_to("/dev/full")
    writer = Writer(npy)
    writer.write({"source": "a.png", "embedding": np.zeros(4, np.float32)})
    with pytest.raises(OutputError, match=r"cannot write .*v\.npy\.sources\.txt: No space"):
        writer.close(4)
    assert not npy.exists()  # the matrix is not put in place without its names
    gone = tmp_path / "gone"
    gone.mkdir()
    writer = Writer(gone / "v.npy")
    writer.write({"source": "a.png", "embedding": np.zeros(4, np.float32)})
    gone.rmdir()  # the folder removed while the work ran
    with pytest.raises(OutputError, match="No such file or directory"):
        writer.close(4)


def test_a_data_uri_longer_than_pythons_default_csv_limit_is_an_item(tmp_path, photos):
    """An image given inline in a CSV list: its data: URI is a field over 128 KiB."""
    import base64

    photo = max(photos, key=lambda p: p.stat().st_size)
    assert photo.stat().st_size > 100_000
    uri = "data:image/png;base64," + base64.b64encode(photo.read_bytes()).decode()
    listing = tmp_path / "inline.csv"
    listing.write_text(f'id,image,colour\nbig,"{uri}",red\n')
    (item,) = read_index_sources([str(listing)], PNG)
    assert (item.error, item.id, item.source, item.metadata) == (
        None,
        "big",
        uri,
        {"colour": "red"},
    )


def test_urls_of_other_schemes_are_kept_as_written_and_refused_as_urls(tmp_path, tiny_service):
    """`ftp://host/a.jpg` in a list (or given directly) is not a file `ftp:/host/a.jpg` beside
    the list: intake refuses it as a URL it does not fetch."""
    listing = tmp_path / "list.txt"
    listing.write_text("ftp://example.com/a.png\ns3://bucket/b.png\nfile:///etc/c.png\n")
    items = read_index_sources([str(listing), "ftp://example.com/d.png"], PNG)
    written = ["ftp://example.com/a.png", "s3://bucket/b.png", "file:///etc/c.png",
               "ftp://example.com/d.png"]  # fmt: skip
    assert [(i.id, i.source, i.error) for i in items] == [(s, s, None) for s in written]
    results = tiny_service.embed_images([i.source for i in items])
    assert [type(r.error).__name__ for r in results] == ["SourceNotAllowedError"] * 4
    assert "ftp:// is not fetched: only http(s) URLs are" in str(results[0].error)
