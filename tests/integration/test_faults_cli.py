"""The CLI under hostile inputs: file names that are not UTF-8 through every writer, `index`
and `search`; `-o` / `--failures` into a folder that is missing or read-only (refused before
any work); list rows without an image, a list that is not UTF-8 and a folder that cannot be
listed (each a failed source, the rest indexed, nothing pruned)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from imgembed.names import restore
from tests import cli
from tests.cli import IMGEMBED

TINY = ["--model", "imgembed-tiny", "--pretrained", "seed:0"]


def run(*args, env=None, prefix=()):
    """In this process, unless a `prefix` (e.g. dropping root's permission bypass) needs a
    process of its own."""
    env = {"COLUMNS": "1000", **(env or {})}
    if not prefix:
        return cli.run(*args, env=env)
    return subprocess.run(
        [*prefix, IMGEMBED, *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, **env},
    )  # fmt: skip


@pytest.fixture
def odd_folder(tmp_path, photos) -> Path:
    """b'caf\\xe9.png' (Latin-1, not UTF-8) next to plain.png."""
    folder = tmp_path / "pics"
    folder.mkdir()
    with open(os.fsencode(folder) + b"/caf\xe9.png", "wb") as handle:
        handle.write(photos[0].read_bytes())
    shutil.copy(photos[1], folder / "plain.png")
    return folder


def _escaped(folder: Path) -> str:
    return f"{folder}/caf\\xe9.png"  # the text we store, export and print


def test_undecodable_names_through_every_writer(odd_folder, tmp_path, photos):
    odd = _escaped(odd_folder)
    assert Path(restore(odd)).read_bytes() == photos[0].read_bytes()  # the text opens the file
    stdout = run("embed", str(odd_folder), *TINY)
    assert stdout.returncode == 0, stdout.stderr
    lines = [json.loads(line) for line in stdout.stdout.splitlines()]
    assert [line["source"] for line in lines] == [odd, str(odd_folder / "plain.png")]
    vectors = np.array([line["embedding"] for line in lines], dtype=np.float32)

    jsonl, npy, parquet = tmp_path / "v.jsonl", tmp_path / "v.npy", tmp_path / "v.parquet"
    for out in (jsonl, npy, parquet):
        proc = run("embed", str(odd_folder), "-o", str(out), *TINY)
        assert proc.returncode == 0, proc.stderr
    from_jsonl = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert [row["source"] for row in from_jsonl] == [odd, str(odd_folder / "plain.png")]
    sources = (tmp_path / "v.npy.sources.txt").read_text(encoding="utf-8").splitlines()
    assert sources == [odd, str(odd_folder / "plain.png")]
    np.testing.assert_allclose(np.load(npy), vectors, atol=1e-6)
    table = pq.read_table(parquet).to_pydict()
    assert table["source"] == sources and table["error"] == [None, None]
    np.testing.assert_allclose(np.array(table["embedding"]), vectors, atol=1e-6)


def test_undecodable_names_through_index_and_search(odd_folder, tmp_path, photos, data_dir):
    odd = _escaped(odd_folder)
    missing = os.fsdecode(os.fsencode(odd_folder) + b"/gon\xe9.png")
    failures = tmp_path / "failures.jsonl"
    proc = run("index", str(odd_folder), missing, "-c", "odd", "--failures", str(failures), *TINY)
    assert proc.returncode == 1, proc.stderr
    assert "Successful: 2" in proc.stderr and "Failed: 1" in proc.stderr
    assert f"failed: {odd_folder}/gon\\xe9.png: no such file" in proc.stderr
    (failure,) = [json.loads(line) for line in failures.read_text(encoding="utf-8").splitlines()]
    assert failure["source"] == failure["id"] == f"{odd_folder}/gon\\xe9.png"

    found = run("search", "--image", str(photos[0]), "-c", "odd", "--json")
    assert found.returncode == 0, found.stderr
    best = json.loads(found.stdout)[0]
    assert best["source"] == best["id"] == odd and best["score"] == pytest.approx(1, abs=1e-5)
    table = run("search", "--image", str(photos[0]), "-c", "odd", "-k", "1")
    assert table.returncode == 0 and odd in table.stdout

    again = run("index", str(odd_folder), "-c", "odd", *TINY)  # ids round-trip: all skipped
    assert again.returncode == 0 and "Skipped: 2 (unchanged)" in again.stderr


def _root_without_permission_bypass() -> list[str]:
    """A prefix that makes root obey file permissions (chmod 000 / 555 then apply)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a folder unreadable")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize("name", ["out.jsonl", "out.npy", "out.parquet"])
def test_output_into_a_missing_folder_fails_before_any_work(tmp_path, photos, name):
    target = tmp_path / "missing" / name
    proc = run("embed", str(photos[0].parent), "-o", str(target), *TINY)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip() == (
        f"error: cannot write the output {target}: the folder {target.parent} does not exist "
        "(create it first)"
    )
    assert not (Path(os.environ["IMGEMBED_DATA_DIR"]) / "cache").exists()  # nothing embedded


def test_output_into_a_read_only_folder_fails_before_any_work(tmp_path, photos):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        proc = run("embed", str(photos[0]), "-o", str(folder / "v.npy"), *TINY,
                   prefix=_root_without_permission_bypass())  # fmt: skip
    finally:
        folder.chmod(0o755)
    assert proc.returncode == 3, proc.stderr
    assert f"cannot write the output {folder}/v.npy: Permission denied" in proc.stderr
    assert list(folder.iterdir()) == []


def test_failures_file_into_a_missing_folder_fails_before_indexing(tmp_path, photos, data_dir):
    target = tmp_path / "missing" / "failures.jsonl"
    proc = run("index", str(photos[0].parent), "-c", "shop", "--failures", str(target), *TINY)
    assert proc.returncode == 3
    assert f"cannot write the failures file {target}" in proc.stderr
    assert "Indexing" not in proc.stderr
    assert not (data_dir / "postgres").exists()  # the store was never even started


def test_unusable_sources_fail_alone_and_nothing_is_pruned(tmp_path, photos):
    pics, locked = tmp_path / "pics", tmp_path / "locked"
    pics.mkdir()
    locked.mkdir()
    for n, photo in enumerate(photos):
        shutil.copy(photo, (pics if n < 4 else locked) / photo.name)
    catalogue = tmp_path / "products.csv"
    catalogue.write_text(
        "id,image,notes\n"  # 1
        f'sku-1,pics/{photos[0].name},"two\nlines"\n'  # 2-3
        "sku-2,,no image here\n"  # 4
        f"sku-3,pics/{photos[1].name},\n"  # 5
    )
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(b"id,image,title\nsku-9,pics/x.png,Caf\xe9\n")
    env = {"IMGEMBED_STORE": "qdrant"}  # root without permission bypass cannot use Postgres
    prefix = _root_without_permission_bypass()
    args = ["index", str(pics), str(locked), str(catalogue), str(latin1), "-c", "shop", *TINY]
    first = run("index", str(pics), str(locked), "-c", "shop", *TINY, env=env)
    assert first.returncode == 0 and "Successful: 6" in first.stderr  # all readable yet

    locked.chmod(0)
    try:
        failures = tmp_path / "failures.jsonl"
        proc = run(*args, "--prune", "--failures", str(failures), env=env, prefix=prefix)
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    assert "Failed: 3" in proc.stderr and "Skipped: 4 (unchanged)" in proc.stderr
    assert "Pruned: 0 (not pruned: some sources could not be read)" in proc.stderr
    rows = {f["source"]: f for f in map(json.loads, failures.read_text().splitlines())}
    assert rows[str(locked)]["error"] == f"{locked}: cannot list folder: Permission denied"
    assert rows[f"{catalogue}:4"]["error_type"] == "SourceListError"
    assert rows[f"{catalogue}:4"]["id"] == "sku-2"
    assert rows[f"{latin1}:2"]["error"].startswith(
        f"{latin1}:2: not UTF-8: byte 0xe9 at column {len(b'sku-9,pics/x.png,Caf') + 1} "
        "cannot be decoded"
    )
    listed = json.loads(run("collections", "--json", env=env).stdout)
    assert listed[0]["count"] == 8  # 6 photos + sku-1, sku-3 (same files, own ids)
    stored = run("search", "--image", str(photos[5]), "-c", "shop", "-k", "1", "--json", env=env)
    assert json.loads(stored.stdout)[0]["source"] == str(locked / photos[5].name)  # kept


def test_embed_and_metadata_report_a_folder_that_cannot_be_listed(tmp_path, photos):
    pics, locked = tmp_path / "pics", tmp_path / "pics" / "locked"
    locked.mkdir(parents=True)
    shutil.copy(photos[0], pics / photos[0].name)
    shutil.copy(photos[1], locked / photos[1].name)
    locked.chmod(0)
    try:
        prefix = _root_without_permission_bypass()
        embedded_run = run("embed", str(pics), *TINY, prefix=prefix)
        described = run("metadata", str(pics), "--json", prefix=prefix)
    finally:
        locked.chmod(0o755)
    assert embedded_run.returncode == 1, embedded_run.stderr
    rows = [json.loads(line) for line in embedded_run.stdout.splitlines()]
    assert [row["source"] for row in rows] == [str(pics / photos[0].name), str(locked)]
    assert rows[0]["error"] is None and len(rows[0]["embedding"]) == 64
    assert rows[1]["error"] == f"{locked}: cannot list folder: Permission denied"
    assert "embedded: 1  cached: 0  failed: 1" in embedded_run.stderr
    assert described.returncode == 1
    assert [json.loads(line)["path"] for line in described.stdout.splitlines()] == [
        str(pics / photos[0].name)
    ]
    assert f"failed: {locked}: cannot list folder: Permission denied" in described.stderr


def test_embed_text_output_into_a_missing_folder_fails_before_any_work(tmp_path):
    target = tmp_path / "missing" / "texts.npy"
    proc = run("embed-text", "a red bicycle", "-o", str(target), *TINY)
    assert proc.returncode == 3
    assert proc.stderr.strip().startswith(f"error: cannot write the output {target}")


def test_db_commands_report_an_unreachable_database_as_a_store_error():
    env = {"IMGEMBED_DATABASE_URL": "postgresql://imgembed@127.0.0.1:1/none?connect_timeout=2"}
    for command in (["db", "status"], ["db", "upgrade"]):
        proc = run(*command, env=env)
        assert proc.returncode == 6, (command, proc.stderr)
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("store", ["postgres", "qdrant"])
def test_a_data_dir_that_cannot_be_one_is_a_setting_to_fix(tmp_path, store):
    """Not "cannot start the embedded PostgreSQL ... (its log: <a file that cannot exist>)"."""
    in_the_way = tmp_path / "data"
    in_the_way.write_text("not a folder")
    for data_dir in (in_the_way, in_the_way / "sub"):
        proc = run("collections", env={"IMGEMBED_DATA_DIR": str(data_dir), "IMGEMBED_STORE": store})
        assert proc.returncode == 3, proc.stderr
        assert proc.stderr.strip() == (
            f"error: the data directory {data_dir} (IMGEMBED_DATA_DIR) cannot be made: "
            f"{in_the_way} is a file; set IMGEMBED_DATA_DIR to a folder"
        )
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        env = {"IMGEMBED_DATA_DIR": str(folder / "d"), "IMGEMBED_STORE": store}
        proc = run("collections", env=env, prefix=_root_without_permission_bypass())
    finally:
        folder.chmod(0o755)
    assert proc.returncode == 3, proc.stderr
    assert f"data directory {folder}/d (IMGEMBED_DATA_DIR) cannot be written" in proc.stderr
    assert list(folder.iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("args", [("models", "list"), ("models", "list", "--json"), ("--help",)])
def test_a_full_stdout_is_a_typed_output_error_not_a_traceback(args):
    with open("/dev/full", "w") as full:
        proc = subprocess.run([IMGEMBED, *args], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.strip() == "error: cannot write the output: No space left on device"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_stdout_under_embed_says_what_every_command_says(photos):
    with open("/dev/full", "w") as full:  # was "cannot write stdout: ..." from embed alone
        proc = subprocess.run([IMGEMBED, "embed", str(photos[0]), *TINY], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 5, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: cannot write the output: No space left on device", proc.stderr


def test_a_reader_that_stops_early_ends_the_command_quietly():
    proc = subprocess.Popen([IMGEMBED, "models", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    proc.stdout.close()  # as `| head` does, before the command writes
    assert proc.wait(timeout=300) == 1
    assert proc.stderr.read() == ""  # no traceback, no "Exception ignored"
