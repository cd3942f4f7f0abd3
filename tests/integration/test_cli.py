"""The `imgembed` command: outputs, summaries, exit codes (in this process through Typer's
runner; in a real process where the process matters)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.cli import IMGEMBED, run, run_process
from tests.conftest import TESTDATA

TINY_ARGS = ["--model", "imgembed-tiny", "--pretrained", "seed:0"]


@pytest.fixture
def folder(photos, tmp_path):
    """A folder tree of real photos plus a non-image file that must be ignored."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i, photo in enumerate(photos):
        (root / ("sub" if i % 2 else ".") / photo.name).write_bytes(photo.read_bytes())
    (root / "notes.txt").write_text("not an image")
    return root


def test_embed_folder_to_stdout_with_a_failure(folder, photos):
    missing = folder / "missing.jpg"
    proc = run("embed", str(folder), str(missing), *TINY_ARGS)
    assert proc.returncode == 1, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == len(photos) + 1
    ok = [line for line in lines if line["error"] is None]
    assert len(ok) == len(photos) and all(len(line["embedding"]) == 64 for line in ok)
    assert lines[-1]["source"] == str(missing) and lines[-1]["error_type"] == "ImageNotFoundError"
    assert f"embedded: {len(photos)}  cached: 0  failed: 1" in proc.stderr
    assert "images/s:" in proc.stderr and "duration:" in proc.stderr
    assert f"failed: {missing}: no such file (ImageNotFoundError)" in proc.stderr


def test_outputs_npy_parquet_and_cache(folder, photos, tmp_path):
    npy = tmp_path / "out.npy"
    proc = run("embed", str(folder), "-o", str(npy), *TINY_ARGS)
    assert proc.returncode == 0, proc.stderr
    matrix = np.load(npy)
    sources = (tmp_path / "out.npy.sources.txt").read_text().splitlines()
    assert matrix.shape == (len(photos), 64) and matrix.dtype == np.float32
    assert len(sources) == len(photos) and all(Path(s).exists() for s in sources)
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1, atol=1e-5)

    parquet = tmp_path / "out.parquet"
    proc = run("embed", str(folder), "--output", str(parquet), *TINY_ARGS)
    assert proc.returncode == 0, proc.stderr
    assert f"embedded: 0  cached: {len(photos)}  failed: 0" in proc.stderr  # second run
    table = pq.read_table(parquet).to_pydict()
    assert table["source"] == sources
    np.testing.assert_allclose(np.array(table["embedding"]), matrix, atol=1e-6)

    odd = tmp_path / "odd"  # a line break in a name must not shift the rows after it
    odd.mkdir()
    shutil.copy(photos[0], odd / "a\nb.png")
    shutil.copy(photos[1], odd / "c.png")
    assert run("embed", str(odd), "-o", str(tmp_path / "odd.npy"), *TINY_ARGS).returncode == 0
    listed = (tmp_path / "odd.npy.sources.txt").read_text().splitlines()
    assert listed == [f"{odd}/a\\nb.png", f"{odd}/c.png"]


def test_nothing_to_embed_is_a_failure_not_an_empty_success(tmp_path, photos):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    proc = run("embed", str(empty), *TINY_ARGS)
    assert proc.returncode == 1, proc.stderr
    assert f"failed: {empty}: folder holds no images (.avif, .bmp," in proc.stderr
    # every input failed: the .npy still has the model's width, so it stacks with others
    npy = tmp_path / "none.npy"
    assert run("embed", str(tmp_path / "missing.jpg"), "-o", str(npy), *TINY_ARGS).returncode == 1
    assert np.load(npy).shape == (0, 64)
    # ... but one from before is kept: a run with nothing embedded does not wipe its vectors
    assert run("embed", str(photos[0]), "-o", str(npy), *TINY_ARGS).returncode == 0
    proc = run("embed", str(tmp_path / "missing.jpg"), "-o", str(npy), *TINY_ARGS)
    assert proc.returncode == 1 and "nothing embedded: " in proc.stderr
    assert "written to" not in proc.stderr and np.load(npy).shape == (1, 64)
    assert (tmp_path / "none.npy.sources.txt").read_text() == f"{photos[0]}\n"


def test_an_empty_name_is_a_failed_input_not_the_current_folder(folder, monkeypatch):
    monkeypatch.chdir(folder)  # Path("") is ".": the folder's photos would be embedded
    proc = run("embed", "", " ", *TINY_ARGS)
    assert proc.returncode == 1, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["source"] for line in lines] == ["", " "]
    assert {line["error_type"] for line in lines} == {"ImageNotFoundError"}
    assert "embedded: 0  cached: 0  failed: 2" in proc.stderr
    assert "empty path: give a file, a URL or image data" in proc.stderr
    assert run("metadata", "", "--json").stdout == ""


def test_names_too_long_for_the_file_system_are_errors_not_tracebacks(photos, tmp_path):
    long = tmp_path / ("a" * 300)  # over NAME_MAX (255): stat() fails with ENAMETOOLONG
    proc = run("embed", str(photos[0]), f"{long}.jpg", str(long / "b.jpg"), *TINY_ARGS)
    assert proc.returncode == 1, proc.stderr
    assert "embedded: 1  cached: 0  failed: 2" in proc.stderr
    assert proc.stderr.count("cannot read: File name too long (ImageNotFoundError)") == 2
    assert run("metadata", f"{long}.png").returncode == 1
    output = run("embed", str(photos[0]), "-o", f"{long}.npy", *TINY_ARGS)
    assert output.returncode == 3 and ".npy: File name too long" in output.stderr
    checkpoint = run("embed", str(photos[0]), "--model", "imgembed-tiny", "--pretrained",
                     f"{long}.pt")  # fmt: skip
    assert checkpoint.returncode == 4 and ".pt does not exist" in checkpoint.stderr


def test_serve_refuses_an_empty_address_that_would_listen_everywhere():
    proc = subprocess.run(  # `--host "$HOST"` with HOST unset: it served on 0.0.0.0 and [::]
        [IMGEMBED, "serve", "--host", "", "--port", "0", *TINY_ARGS],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "cannot be empty" in proc.stderr, proc.stderr


def test_embed_text(tmp_path):
    proc = run("embed-text", "a red bicycle", "a cat", *TINY_ARGS)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["source"] for line in lines] == ["a red bicycle", "a cat"]
    assert all(len(line["embedding"]) == 64 for line in lines)
    out = tmp_path / "texts.npy"
    proc = run("embed-text", "-", "-o", str(out), *TINY_ARGS, stdin="one\ntwo\n\nthree\n")
    assert proc.returncode == 0, proc.stderr
    assert np.load(out).shape == (3, 64)
    assert f"written to {out}" in proc.stderr  # as embed says it
    # a file saved on Windows: its \r is no part of the text (nor of the source written); a
    # real process (Typer's runner reads its input with universal newlines)
    crlf = run_process("embed-text", "-", *TINY_ARGS, stdin="a red bicycle\r\na cat\r\n")
    assert [json.loads(line)["source"] for line in crlf.stdout.splitlines()] == [
        "a red bicycle",
        "a cat",
    ]


def test_models_list():
    proc = run("models", "list", "--json")
    rows = {(r["model"], r["pretrained"]): r for r in json.loads(proc.stdout)}
    assert rows[("ViT-B-32", "openai")]["dimension"] == 512
    assert "clip-vit-large-patch14" in rows[("ViT-L-14", "openai")]["aliases"]
    assert rows[("imgembed-tiny", "seed:0")]["note"].startswith("TEST ONLY")
    everything = json.loads(run("models", "list", "--all", "--json").stdout)
    assert len(everything) > 100
    assert run("models", "list").returncode == 0


def test_models_export_then_verify_on_own_images(photos, tmp_path):
    proc = run("models", "export", "imgembed-tiny", "--pretrained", "seed:0", "--precision", "int8")
    assert proc.returncode == 0, proc.stderr
    folder = Path(proc.stdout.strip())
    assert {"visual.onnx", "text.onnx", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert "visual.onnx" in proc.stderr and "sha256" in proc.stderr
    again = run(
        "models", "export", "imgembed-tiny", "--pretrained", "seed:0", "--precision", "int8"
    )
    assert again.stdout == proc.stdout and f"up to date: {folder}" in again.stderr

    images = tmp_path / "mine"
    images.mkdir()
    for photo in photos:
        (images / photo.name).write_bytes(photo.read_bytes())
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    args = ["models", "verify", "imgembed-tiny", "--pretrained", "seed:0", "--images", str(images)]
    fp32 = run(*args, "--precision", "fp32", "--json")
    assert fp32.returncode == 0, fp32.stderr
    report = json.loads(fp32.stdout)
    assert report["images"] == len(photos) and len(report["failed"]) == 1
    assert report["image_cosine_min"] >= 0.99999 and report["text_cosine_min"] >= 0.99999
    assert report["speed_ratio"] > 0 and report["reference_images_per_second"] > 0
    int8 = run(*args, "--json")  # int8 is the default to verify
    report = json.loads(int8.stdout)
    assert report["precision"] == "int8" and 0.98 < report["image_cosine_min"] < 0.99999
    strict = run(*args, "--min-cosine", "0.99999")
    assert strict.returncode == 1 and "is below 0.99999" in strict.stderr
    assert run(*args, "--min-cosine", "2").returncode == 2  # no cosine is above 1: a typo
    assert "image cosine min / mean" in strict.stdout


def test_embed_on_the_onnx_runtime_matches_torch(photos):
    onnx = run("embed", *map(str, photos), "--runtime", "onnx", "--no-cache", *TINY_ARGS)
    torch = run("embed", *map(str, photos), "--no-cache", *TINY_ARGS)
    assert onnx.returncode == 0 and torch.returncode == 0, onnx.stderr + torch.stderr
    a = np.array([json.loads(line)["embedding"] for line in onnx.stdout.splitlines()])
    b = np.array([json.loads(line)["embedding"] for line in torch.stdout.splitlines()])
    assert np.sum(a * b, axis=1).min() >= 0.99999
    bad = run("embed", str(photos[0]), "--runtime", "onnx", "--precision", "bf16", *TINY_ARGS)
    assert bad.returncode == 3 and "not available on the ONNX runtime" in bad.stderr


def test_exit_codes_for_unavailable_model_and_bad_config(photos):
    proc = run("embed", str(photos[0]))  # default ViT-B-32 openai, offline
    assert proc.returncode == 4
    assert "IMGEMBED_PRETRAINED=/path/to/file" in proc.stderr
    proc = run("embed", str(photos[0]), "-o", "x.csv", *TINY_ARGS)
    assert proc.returncode == 3 and "unknown output format" in proc.stderr
    assert run("embed").returncode == 2  # usage
    # option values that cannot be are usage errors (2), named, not a settings dump (3)
    for option, value in [("--batch-size", "0"), ("--runtime", "banana"), ("--precision", "x")]:
        wrong = run("embed", str(photos[0]), option, value, *TINY_ARGS)
        assert wrong.returncode == 2 and "Invalid value for" in wrong.stderr, (option, wrong)
    unnamed = run("index", str(photos[0]), "-c", "", *TINY_ARGS)  # not the default collection
    assert unnamed.returncode == 2 and "cannot be empty" in unnamed.stderr
    nothing = run("embed-text", "-", *TINY_ARGS, stdin="\n  \n")
    assert nothing.returncode == 1 and "no text to embed" in nothing.stderr
    ftp = run("embed", "ftp://example.org/a.jpg", *TINY_ARGS)  # was read as the path ftp:/...
    assert ftp.returncode == 1 and "ftp://example.org/a.jpg: ftp:// is not fetched" in ftp.stderr


def test_verify_says_why_no_image_could_be_read(tmp_path):
    broken = Path(__file__).resolve().parents[2] / ".testdata" / "pillow" / "broken.png"
    proc = run("models", "verify", "imgembed-tiny", "--pretrained", "seed:0", "--images", broken)
    assert proc.returncode == 3  # the argument is at fault: configuration, not "other"
    assert f"no image could be read to verify with: {broken}: not a recognised" in proc.stderr
    proc = run("models", "verify", "imgembed-tiny", "--pretrained", "seed:0", "--images", tmp_path)
    assert proc.returncode == 3 and "folder holds no images" in proc.stderr  # "not a file"


def test_the_librarys_warnings_are_plain_warning_lines(tmp_path, monkeypatch):
    """Not "WARNING:imgembed.engine.cache:..." from the root handler open_clip sets up."""
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("IMGEMBED_CACHE_DIR", str(tmp_path / "afile" / "cache"))
    photo = Path(__file__).resolve().parents[2] / ".testdata" / "photos" / "coffee.png"
    proc = run_process("embed", str(photo), *TINY_ARGS)
    assert proc.returncode == 0, proc.stderr
    assert "warning: embedding cache" in proc.stderr and "WARNING:" not in proc.stderr


def test_a_misspelt_variable_is_one_warning_line(monkeypatch):
    monkeypatch.setenv("IMGEMBED_BATCHSIZE", "3")
    proc = run_process("embed-text", "a cat", *TINY_ARGS)  # warnings print only in a process
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith(
        "warning: IMGEMBED_BATCHSIZE is not an imgembed setting (did you mean"
    )
    assert "UserWarning" not in proc.stderr and "warnings.warn" not in proc.stderr


def test_metadata_command(tmp_path):
    pillow = Path(__file__).resolve().parents[2] / ".testdata" / "pillow"
    proc = run(
        "metadata", str(pillow / "flower.jpg"), str(pillow / "broken.png"), "--extended", "--json"
    )
    assert proc.returncode == 1
    (line,) = [json.loads(text) for text in proc.stdout.splitlines()]
    assert line["camera_info"]["model"] == "Canon PowerShot S40"
    assert line["creation_date"] == "2003-12-14T12:01:44"
    assert line["quality"]["confidence"] > 0.5
    assert "broken.png" in proc.stderr and "InvalidImageError" in proc.stderr
    table = run("metadata", str(pillow / "flower.jpg"))
    assert table.returncode == 0 and "480x360" in table.stdout
    assert "camera" not in table.stdout  # no empty EXIF columns that read as "none there"
    extended = run("metadata", str(pillow / "flower.jpg"), "--extended")
    assert "camera" in extended.stdout and "Canon" in extended.stdout
    odd = tmp_path / os.fsdecode(b"caf\xe9.jpg")  # a name that is not UTF-8
    shutil.copy(pillow / "flower.jpg", odd)
    named = run_process("metadata", str(odd), "--json")  # a real process: real stdout bytes
    assert named.returncode == 0 and json.loads(named.stdout)["path"].endswith("caf\\xe9.jpg")


def test_pillows_log_lines_stay_out_of_the_output():
    """A TIFF Pillow logs about (on the root handler open_clip's logging sets up) fails with
    its typed error in the summary, and no 'ERROR:PIL...' line in between."""
    tiff = TESTDATA / "pillow" / "oom-225817ca0f8c663be7ab4b9e717b02c661e66834.tif"
    proc = run_process("embed", str(tiff), *TINY_ARGS)
    assert proc.returncode == 1 and f"failed: {tiff}" in proc.stderr
    assert "PIL" not in proc.stderr and "samples per pixel" not in proc.stderr


def test_a_reader_that_stops_early_ends_the_command_quietly_with_1():
    """`imgembed embed-text - | head -c 100`: the output is larger than the pipe holds, the
    reader goes away; as documented, exit 1 and no error (it was exit 5, 'Broken pipe')."""
    texts = "".join(f"a photo of {n} apples\n" for n in range(3000))  # ~2 MB of JSON lines
    process = subprocess.Popen(
        [IMGEMBED, "embed-text", "-", *TINY_ARGS], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    process.stdin.write(texts)
    process.stdin.close()
    assert process.stdout.read(100).startswith("{")
    process.stdout.close()
    assert process.wait(timeout=300) == 1
    assert "error" not in process.stderr.read()


def test_embed_url_from_the_command_line(photos, monkeypatch):
    from tests.integration.test_fetch import ImageServer

    server = ImageServer(next(p for p in photos if p.suffix == ".jpg").read_bytes())
    try:
        url = server.url("/photo.jpg")
        refused = run("embed", url, *TINY_ARGS)
        assert refused.returncode == 1 and "SourceNotAllowedError" in refused.stderr
        monkeypatch.setenv("IMGEMBED_ALLOW_PRIVATE_URLS", "true")
        proc = run("embed", url, *TINY_ARGS)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["source"] == url
    finally:
        server.close()


def test_messages_are_printed_as_they_are_not_as_emoji_codes(tmp_path):
    # a file, a collection or a model name such as `openai:m` ("openai:m: cannot reach ...")
    # holds what rich would turn into an emoji (:x: ❌, :m: Ⓜ)
    missing = tmp_path / ":x:" / ":m:.jpg"
    proc = run("embed", str(missing), *TINY_ARGS)
    assert proc.returncode == 1
    assert f"failed: {missing}: no such file (ImageNotFoundError)" in proc.stderr
    assert "❌" not in proc.stderr and "Ⓜ" not in proc.stderr


def test_names_with_brackets_are_printed_as_they_are_not_as_markup(tmp_path, photos, monkeypatch):
    """rich read "[/b]" in a message as a closing tag (a MarkupError traceback), dropped a
    "[x]" as a style and made ":smile:" an emoji, in messages and in tables alike."""
    broken = run("db", "start", "--for", "[/b]")
    assert broken.returncode == 2 and "--for '[/b]': give a duration" in broken.stderr
    shutil.copy(photos[0], tmp_path / "[x] :smile:.png")
    monkeypatch.chdir(tmp_path)  # a short path: a long one is folded over lines in the table
    table = run("metadata", "[x] :smile:.png")
    assert table.returncode == 0 and "[x] :smile:.png" in table.stdout, table.stdout


# `python -m imgembed` was "No module named imgembed.__main__"; `python -m imgembed.cli.app`
# (the module [project.scripts] names) did nothing at all and exited 0
@pytest.mark.parametrize("module", ["imgembed", "imgembed.cli.app"])
def test_python_dash_m_imgembed_runs_the_command(tmp_path, photos, module):
    shutil.copy(photos[0], tmp_path / photos[0].name)
    ran = subprocess.run(
        [sys.executable, "-m", module, "metadata", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout.splitlines()[0])["path"].endswith(photos[0].name)
    missing = subprocess.run(
        [sys.executable, "-m", module, "metadata", str(tmp_path / "nope.jpg")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 1 and "Traceback" not in missing.stderr, missing.stderr


@pytest.mark.parametrize("command", [("index",), ("catalog", "embed")])
def test_the_ray_options_help_names_the_extra_to_install(command):
    # Rich's markup read "imgembed[ray]" as a tag and printed "Needs imgembed."
    out = run(*command, "--help", env={"COLUMNS": "400"}).stdout
    assert "Needs imgembed[ray]." in out
