"""Sources: base64 and data URIs, allowed roots (.. tricks, escaping symlinks, loops)."""

import base64
import os

import numpy as np
import pytest

from imgembed import (
    ImageEmbeddingService,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidImageError,
    SourceNotAllowedError,
)
from imgembed.intake.sources import expand_paths
from tests.conftest import TINY


def test_data_uri_and_base64_equal_the_file(tiny_service, photos):
    data = photos[0].read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    from_path = tiny_service.embed_image(photos[0])
    np.testing.assert_array_equal(tiny_service.embed_image(uri), from_path)
    (result,) = tiny_service.embed_images([uri])
    assert result.image_path.startswith("<data URI")


async def test_generate_embedding_from_base64(tiny_service, photos):
    data = photos[0].read_bytes()
    encoded = base64.b64encode(data).decode()
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))  # MIME style
    vector = await tiny_service.generate_embedding_from_base64(wrapped)
    np.testing.assert_allclose(vector, tiny_service.embed_image(data), atol=1e-7)


def test_bad_base64_is_a_typed_error(tiny_service):
    bad = tiny_service.embed_images(["data:image/png;base64,not*base64!", "data:text/plain,hi"])
    assert all(isinstance(r.error, InvalidImageError) for r in bad)


def test_oversize_base64_is_refused_before_decoding(photos):
    uri = "data:image/png;base64," + "A" * 4_000_000
    with ImageEmbeddingService(**TINY, max_file_size=1_000_000) as service:
        assert isinstance(service.embed_images([uri])[0].error, ImageTooLargeError)


@pytest.fixture
def tree(tmp_path, photos):
    """root/ (allowed) with a photo, a link escaping to outside/, and outside/ itself."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "ok.png").write_bytes(photos[0].read_bytes())
    (outside / "secret.png").write_bytes(photos[1].read_bytes())
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "inner.png").symlink_to(root / "ok.png")
    (root / "loop").symlink_to(root / "loop")
    return root, outside


def test_allowed_roots(tree):
    root, outside = tree
    with ImageEmbeddingService(**TINY, allowed_roots=[root]) as service:
        ok, inner, escape, dotdot, absolute, loop = service.embed_images(
            [root / "ok.png", root / "inner.png", root / "escape.png",
             f"{root}/../outside/secret.png", outside / "secret.png", root / "loop"]
        )  # fmt: skip
    assert ok.ok and inner.ok
    for refused in (escape, dotdot, absolute):
        assert isinstance(refused.error, SourceNotAllowedError), refused.image_path
        assert "allowed roots" in str(refused.error)
    assert isinstance(loop.error, ImageNotFoundError | SourceNotAllowedError)


def test_without_allowed_roots_everything_readable(tree):
    root, _ = tree
    with ImageEmbeddingService(**TINY) as service:
        assert service.embed_images([root / "escape.png"])[0].ok


def test_folder_walk_survives_symlink_loops(tree, tmp_path):
    root, _ = tree
    (root / "sub").mkdir()
    (root / "sub" / "back").symlink_to(root, target_is_directory=True)  # a directory loop
    (root / "notes.txt").write_text("not an image")
    found = expand_paths([root], [".png"])
    names = sorted(os.path.relpath(p, root) for p in found)
    assert names == ["escape.png", "inner.png", "ok.png"]


def test_a_dangling_link_says_where_it_points(tmp_path):
    link = tmp_path / "photo.jpg"
    link.symlink_to(tmp_path / "gone.jpg")
    with ImageEmbeddingService(**TINY) as service:
        (result,) = service.embed_images([link])
    assert isinstance(result.error, ImageNotFoundError)
    assert str(result.error) == f"{link}: a link to {tmp_path / 'gone.jpg'}, which does not exist"


def test_an_empty_path_is_not_the_current_folder():
    with ImageEmbeddingService(**TINY) as service:
        results = service.embed_images(["", " "])
    assert [type(r.error) for r in results] == [ImageNotFoundError, ImageNotFoundError]
    assert str(results[0].error) == "'': empty path: give a file, a URL or image data"


def test_a_name_as_printed_with_xnn_opens_the_file_again(tmp_path, photos):
    raw = tmp_path / os.fsdecode(b"caf\xe9 \xff.png")  # not UTF-8
    raw.write_bytes(photos[0].read_bytes())
    shown = str(tmp_path / "caf\\xe9 \\xff.png")  # what outputs and ids say
    with ImageEmbeddingService(**TINY) as service:
        by_text, by_name = service.embed_images([shown, raw])
    assert by_text.ok and by_text.image_id == by_name.image_id


def test_a_folder_without_images_is_a_failure_not_nothing(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("not an image")
    failures: list = []
    assert expand_paths([empty], [".png", ".jpg"], failures) == []
    (failure,) = failures
    assert isinstance(failure, ImageNotFoundError) and failure.source == str(empty)
    assert str(failure) == f"{empty}: folder holds no images (.jpg, .png)"
    # without a failures list the folder stays an entry, so reading it fails as that entry
    assert expand_paths([empty], [".png"]) == [empty]
