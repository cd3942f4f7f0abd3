"""The seed's async methods: names, return shapes, and never blocking the event loop."""

import asyncio
import base64
import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgembed import (
    ConfigurationError,
    ImageEmbeddingService,
    ImageNotFoundError,
    InvalidImageError,
    InvalidSourceError,
    SourceNotAllowedError,
)
from tests.conftest import TINY


async def test_path_and_bytes_return_plain_lists(tiny_service, photos):
    from_path = await tiny_service.generate_embedding_from_image_path(str(photos[0]))
    from_bytes = await tiny_service.generate_embedding_from_image_bytes(photos[0].read_bytes())
    assert isinstance(from_path, list) and len(from_path) == 64
    assert all(isinstance(x, float) for x in from_path)
    assert np.linalg.norm(from_path) == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose(from_path, from_bytes, atol=1e-7)
    view = await tiny_service.generate_embedding_from_image_bytes(bytearray(photos[0].read_bytes()))
    np.testing.assert_allclose(view, from_bytes, atol=1e-7)
    # a str (a user's field passed on) is not read as a file: the library has no roots
    with pytest.raises(InvalidSourceError, match="bytes are needed here, not a str"):
        await tiny_service.generate_embedding_from_image_bytes(str(photos[0]))


async def test_base64_as_text_bytes_or_data_uri(tiny_service, photos):
    data = photos[0].read_bytes()
    expected = await tiny_service.generate_embedding_from_image_bytes(data)
    encoded = base64.b64encode(data)  # bytes, as b64encode returns: was a bare TypeError
    for given in (encoded, encoded.decode(), f"data:image/png;base64,{encoded.decode()}"):
        got = await tiny_service.generate_embedding_from_base64(given)
        np.testing.assert_allclose(got, expected, atol=1e-7)
    with pytest.raises(InvalidImageError, match="invalid base64"):
        await tiny_service.generate_embedding_from_base64(data)  # the image's own bytes
    with pytest.raises(InvalidSourceError, match="base64 text is needed here, not a NoneType"):
        await tiny_service.generate_embedding_from_base64(None)


async def test_the_seeds_text_service_example_ranks_images_by_a_text(tiny_service, photos):
    """The seed's example 5 (`text_service.generate_embedding(text_query)`, then
    `find_similar_images` over image embeddings) had no text method to call."""
    text_service = tiny_service
    text_embedding = await text_service.generate_embedding("a photo of a rocket")
    assert isinstance(text_embedding, list) and len(text_embedding) == 64
    np.testing.assert_allclose(text_embedding, tiny_service.embed_text("a photo of a rocket"))
    images = {p.name: await tiny_service.generate_embedding_from_image_path(p) for p in photos}
    hits = await tiny_service.find_similar_images(text_embedding, images, top_k=2)
    scores = {name: float(np.dot(text_embedding, vector)) for name, vector in images.items()}
    best = sorted(scores.items(), key=lambda kv: -kv[1])[:2]
    assert [name for name, _ in hits] == [name for name, _ in best]
    assert [score for _, score in hits] == pytest.approx([score for _, score in best], abs=1e-5)


async def test_one_text_methods_given_no_string_say_so(tiny_service):
    """They said "embed_texts takes a list of strings", also when given a list of strings."""
    for given, kind in ((["a red car", "a cat"], "list"), (None, "NoneType"), (b"x", "bytes")):
        with pytest.raises(
            ConfigurationError, match=f"generate_embedding takes one string, not a {kind}"
        ):
            await tiny_service.generate_embedding(given)
        with pytest.raises(ConfigurationError, match=f"embed_text takes one string, not a {kind}"):
            tiny_service.embed_text(given)
    with pytest.raises(ConfigurationError, match=r"not a list \(embed_texts takes a list\)"):
        tiny_service.embed_text(["a"])


async def test_include_metadata_returns_a_dict(tiny_service, photos):
    photo = next(p for p in photos if p.name == "rocket.jpg")
    result = await tiny_service.generate_embedding_from_image_path(
        str(photo), include_metadata=True
    )
    assert len(result["embedding"]) == 64
    assert result["metadata"]["width"] == 640 and result["metadata"]["height"] == 427
    assert result["metadata"]["format"] == "JPEG"
    assert result["metadata"]["size"] == photo.stat().st_size
    assert result["model_name"] == "imgembed-tiny (seed:0)" and result["dimension"] == 64
    assert result["normalized"] is True and result["processing_time"] > 0
    assert len(result["image_id"]) == 64 and result["error"] is None


async def test_the_seeds_data_structures_are_importable_and_describe_the_results(
    tiny_service, photos
):
    """The seed's ImageEmbeddingResult, ImageMetadata and SimilarityResult: ImageMetadata
    was not there to import; it names every key the metadata methods return."""
    import dataclasses
    import typing

    from imgembed import ImageEmbeddingResult, ImageMetadata, SimilarityResult

    seed_result = {"embedding", "image_path", "image_id", "metadata", "processing_time"}
    seed_result |= {"model_name", "dimension", "normalized", "confidence", "error"}
    assert seed_result <= {f.name for f in dataclasses.fields(ImageEmbeddingResult)}
    seed_similarity = {"image_path", "similarity_score", "rank", "embedding", "metadata"}
    assert seed_similarity == {f.name for f in dataclasses.fields(SimilarityResult)}
    keys = set(typing.get_type_hints(ImageMetadata))
    seed_metadata = {"width", "height", "format", "mode", "size", "dpi", "creation_date"}
    seed_metadata |= {"modification_date", "camera_info", "gps_info"}
    assert seed_metadata <= keys
    basic = await tiny_service.extract_image_metadata(str(photos[0]))
    extended = await tiny_service.extract_extended_metadata(str(photos[0]))
    assert set(basic) <= set(extended) == keys
    assert ImageMetadata(width=1, height=2) == {"width": 1, "height": 2}  # a plain dict


async def test_single_bad_path_raises_typed_error(tiny_service):
    with pytest.raises(ImageNotFoundError):
        await tiny_service.generate_embedding_from_image_path("/no/such/image.jpg")


async def test_batch_keeps_order_and_marks_failures(tiny_service, photos):
    paths = [str(photos[0]), "/no/such.jpg", str(photos[1])]
    plain = await tiny_service.batch_generate_embeddings(paths)
    assert [isinstance(x, list) for x in plain] == [True, False, True] and plain[1] is None
    detailed = await tiny_service.batch_generate_embeddings(paths, include_metadata=True)
    assert detailed[1]["error_type"] == "ImageNotFoundError" and detailed[1]["embedding"] is None
    np.testing.assert_allclose(detailed[2]["embedding"], plain[2], atol=1e-7)


async def test_the_seeds_example_2_reads_processing_time_of_a_plain_embedding(tiny_service, photos):
    """The seed's example 2 prints `len(embedding)` and `embeddings[i]['processing_time']`
    of the same plain result: the second was a TypeError (list indices must be integers)."""
    image_paths = [str(p) for p in photos[:3]]
    embeddings = await tiny_service.batch_generate_embeddings(image_paths)
    for i, (path, embedding) in enumerate(zip(image_paths, embeddings, strict=True)):
        assert len(embedding) == 64 and isinstance(embedding, list)
        assert f"{embeddings[i]['processing_time']:.2f}s".endswith("s")
        assert embeddings[i]["processing_time"] >= 0
        assert embedding["image_path"] == path and embedding["dimension"] == 64
        assert embedding[:2] == list(embedding)[:2] and embedding[-1] == list(embedding)[-1]
    single = await tiny_service.generate_embedding_from_image_path(image_paths[0])
    assert single["image_id"] == embeddings[0]["image_id"]
    assert json.loads(json.dumps(single)) == pytest.approx(list(single))  # still a JSON list
    assert pickle.loads(pickle.dumps(single)) == single
    np.testing.assert_array_equal(np.asarray(single), np.asarray(list(single)))
    with pytest.raises(KeyError, match="processing_time"):  # a misspelt field names them
        single["processing_tme"]


async def test_a_failed_image_among_named_candidates_is_named(tiny_service, photos):
    """A dict built from batch_generate_embeddings holds None for an image that failed: the
    error said "candidate 1 is None", a row number the dict does not have."""
    paths = [str(photos[0]), "missing.jpg"]
    embeddings = await tiny_service.batch_generate_embeddings(paths)
    image_embeddings = dict(zip(paths, embeddings, strict=True))
    with pytest.raises(ConfigurationError, match=r"the embedding of 'missing\.jpg' is None"):
        await tiny_service.find_similar_images(embeddings[0], image_embeddings, top_k=2)


async def test_result_dicts_among_candidates_are_named_not_counted(photos):
    """In debug mode (or with include_metadata) a batch's items are result dicts: fed in as
    candidates, the error was "numbers of one length (lengths given: [12, 64])", the 12 being
    the dict's keys; now it says which item is a failed image's result or a dict to unwrap."""
    service = ImageEmbeddingService(TINY, debug=True)
    paths = [str(photos[0]), "missing.jpg"]
    embeddings = await service.batch_generate_embeddings(paths)
    query = embeddings[0]
    named = dict(zip(paths, embeddings, strict=True))
    failed = r"the embedding of 'missing\.jpg' is a failed image's result \(missing\.jpg: no such"
    with pytest.raises(ConfigurationError, match=failed):
        await service.find_similar_images(query, named)
    with pytest.raises(ConfigurationError, match=r"candidate 1 is a failed image's result"):
        await service.calculate_similarities(query, embeddings)
    detailed = await service.batch_generate_embeddings(paths[:1], include_metadata=True)
    with pytest.raises(ConfigurationError, match=r"candidate 0 is a result dict.*'embedding'"):
        await service.calculate_similarities(query, detailed)


async def test_one_image_where_a_list_is_needed_and_urls_that_are_not_http(tiny_service):
    # a string is iterable: it used to be embedded character by character (26 Nones)
    with pytest.raises(ConfigurationError, match="a list of images is needed, not one str"):
        await tiny_service.batch_generate_embeddings("image1.jpg")
    with pytest.raises(ConfigurationError, match="a list of images is needed"):
        await tiny_service.batch_preprocess_images("image1.jpg")
    for nothing in (None, 3):  # were a bare TypeError: not iterable
        with pytest.raises(ConfigurationError, match="a list of images is needed, not"):
            await tiny_service.batch_generate_embeddings(nothing)
        with pytest.raises(ConfigurationError, match="a list of images is needed, not"):
            await tiny_service.batch_preprocess_images(nothing)
    with pytest.raises(SourceNotAllowedError, match=r"ftp://x/y\.jpg: only http"):
        await tiny_service.generate_embedding_from_url("ftp://x/y.jpg")
    with pytest.raises(SourceNotAllowedError):  # a path is not a URL
        await tiny_service.generate_embedding_from_url("/etc/hostname")


async def test_similarity_methods(tiny_service, photos):
    embeddings = await tiny_service.batch_generate_embeddings([str(p) for p in photos])
    query = embeddings[2]
    scores = await tiny_service.calculate_similarities(query, embeddings)
    assert scores == pytest.approx((np.array(embeddings) @ np.array(query)).tolist(), abs=1e-5)
    assert await tiny_service.calculate_cosine_similarity(query, query) == pytest.approx(
        1, abs=1e-6
    )
    mapping = {p.name: e for p, e in zip(photos, embeddings, strict=True)}
    hits = await tiny_service.find_similar_images(query, mapping, top_k=2)
    assert len(hits) == 2 and hits[0] == (photos[2].name, pytest.approx(1, abs=1e-5))
    assert hits[0][1] >= hits[1][1]
    by_row = await tiny_service.find_similar_images(query, np.array(embeddings), top_k=np.int64(1))
    assert by_row[0][0] == 2
    for nothing in (0, -1, 2.5, True):  # an empty answer would read as "no match"
        with pytest.raises(ConfigurationError, match="top_k must be a whole number"):
            await tiny_service.find_similar_images(query, mapping, top_k=nothing)
        with pytest.raises(ConfigurationError, match="top_k must be a whole number"):
            tiny_service.search_vector(query, "any", top_k=nothing)


async def test_find_similar_images_takes_a_generator_of_candidates(tiny_service):
    rows = [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    hits = await tiny_service.find_similar_images([1, 0, 0], (r for r in rows), top_k=1)
    assert hits == [(1, 1.0)]  # was a bare TypeError: a generator has no len()
    with pytest.raises(ConfigurationError, match="a list or matrix of embeddings, not NoneType"):
        await tiny_service.find_similar_images([1, 0, 0], None)


def test_similar_images_returns_ranked_results(tiny_service):
    vectors = {"a": [1, 0, 0], "b": [0.9, 0.1, 0], "c": [0, 1, 0], "d": [-1, 0, 0]}
    hits = tiny_service.similar_images([1, 0, 0], vectors, top_k=3)
    assert [(h.image_path, h.rank) for h in hits] == [("a", 1), ("b", 2), ("c", 3)]
    assert hits[0].similarity_score == pytest.approx(1.0)
    assert hits[1].similarity_score == pytest.approx(0.9 / np.hypot(0.9, 0.1))
    assert hits[1].embedding == pytest.approx([0.9, 0.1, 0])
    by_row = tiny_service.similar_images([0, 1, 0], np.array(list(vectors.values())), top_k=1)
    assert by_row[0].image_path == 2 and by_row[0].rank == 1


async def test_preprocess_image(tiny_service, photos):
    image = await tiny_service.preprocess_image(str(photos[0]))
    assert isinstance(image, Image.Image) and image.size == (224, 224) and image.mode == "RGB"
    images = await tiny_service.batch_preprocess_images([str(photos[0]), "/missing.png"])
    assert images[0].size == (224, 224) and images[1] is None


async def test_extract_image_metadata(tiny_service, photos):
    metadata = await tiny_service.extract_image_metadata(str(photos[0]))
    assert metadata["width"] > 0 and metadata["format"] in ("PNG", "JPEG")
    # the seed's Tuple[int, int]: a PNG's 11,811 pixels per metre are 300 dpi, not 299.999
    astronaut = next(p for p in photos if p.name == "astronaut.png")
    assert (await tiny_service.extract_image_metadata(astronaut))["dpi"] == [300, 300]


async def test_async_methods_do_not_block_the_event_loop(all_photos, monkeypatch):
    """Each encode waits until the event loop has ticked a few more times: if the embedding
    ran on the loop, no tick could happen and the wait would run out. No timing ratios."""
    service = ImageEmbeddingService(**TINY, cache_embeddings=False, exact=True)
    encoder = service.encoder  # load first: we watch embedding, not loading
    ticks = 0
    real = encoder.encode_images
    loop_ticked = []

    def encode(batch):
        start, deadline = ticks, time.monotonic() + 60
        while ticks < start + 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        loop_ticked.append(ticks >= start + 5)
        return real(batch)

    monkeypatch.setattr(encoder, "encode_images", encode)
    done = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    results = await service.batch_generate_embeddings([str(p) for p in all_photos * 2])
    done.set()
    await task
    assert len(results) == 2 * len(all_photos)
    assert loop_ticked and all(loop_ticked)


def test_clear_cache_without_prior_use(photos):
    service = ImageEmbeddingService(**TINY)
    service.embed_images(photos[:2])
    fresh = ImageEmbeddingService(**TINY)
    assert fresh.clear_cache() == 2


def test_seed_config_dict_and_texts(tmp_path):
    service = ImageEmbeddingService(
        {"model_name": "imgembed-tiny", "use_gpu": False, "batch_size": 2}, pretrained="seed:0"
    )
    vectors = service.embed_texts(["a", "b", "c", "d", "e"])
    assert vectors.shape == (5, 64)
    np.testing.assert_allclose(vectors[0], service.embed_text("a"), atol=1e-6)


async def test_debug_mode_returns_timestamped_steps(photos, tmp_path):
    """The seed's `debug=True`: the result carries metadata["debug_logs"], each entry a
    timestamp and a message, for a fresh embedding, a cached one and a failure."""
    from datetime import datetime

    service = ImageEmbeddingService({**TINY, "debug": True, "cache_directory": tmp_path / "c"})
    fresh = await service.generate_embedding_from_image_path(str(photos[0]))
    messages = [entry["message"] for entry in fresh["metadata"]["debug_logs"]]
    assert messages[0].startswith(f"read {photos[0]}") and "sha256" in messages[0]
    assert messages[1] == "cache miss"
    assert any(m.startswith("decoded ") for m in messages)
    assert any(m.startswith("preprocessed to 224x224") for m in messages)
    assert any(m.startswith("encoded by ") and "batch of 1" in m for m in messages)
    assert messages[-1].startswith("done in ")
    stamps = [datetime.fromisoformat(e["timestamp"]) for e in fresh["metadata"]["debug_logs"]]
    assert stamps == sorted(stamps) and stamps[0].tzinfo is not None
    # still the seed's plain list (its example 1 prints len(embedding)), fields by name
    assert isinstance(fresh, list) and len(fresh) == 64 and fresh["embedding"] == fresh
    with_metadata = await service.generate_embedding_from_image_path(str(photos[0]), True)
    assert isinstance(with_metadata, dict) and with_metadata["metadata"]["debug_logs"]

    cached = await service.generate_embedding_from_image_path(str(photos[0]))
    assert "cache hit: the stored embedding is used" in [
        e["message"] for e in cached["metadata"]["debug_logs"]
    ]
    broken, good = await service.batch_generate_embeddings([b"not an image", photos[0]])
    assert isinstance(broken, dict) and broken["error_type"] == "InvalidImageError"
    assert isinstance(good, list) and len(good) == 64 and good["metadata"]["debug_logs"]
    assert broken["metadata"]["debug_logs"][-2]["message"].startswith("failed: InvalidImageError")


async def test_without_debug_there_are_no_logs(photos):
    service = ImageEmbeddingService(TINY)
    result = await service.generate_embedding_from_image_path(str(photos[0]), True)
    assert "debug_logs" not in result["metadata"]
    assert isinstance(await service.generate_embedding_from_image_path(str(photos[0])), list)


def test_one_text_where_a_list_is_needed_is_refused(tiny_service):
    # a string is iterable: embed_texts("a red bicycle") gave 13 vectors, one per letter
    with pytest.raises(ConfigurationError, match="embed_texts takes a list of strings, not one"):
        tiny_service.embed_texts("a red bicycle")
    with pytest.raises(ConfigurationError, match="count_tokens takes a list of strings, not one"):
        tiny_service.count_tokens("a cat")
    assert tiny_service.embed_texts(("a red bicycle",)).shape == (1, 64)
    assert tiny_service.count_tokens(["a cat"]) == [4]


def test_a_model_file_inside_an_allowed_root_given_as_a_link_or_relative_is_allowed(
    tiny_service, tmp_path, monkeypatch
):
    """with_model's roots are resolved as the intake's are: a root that is a symlink (or
    relative to the working folder) refused every checkpoint inside it, 'outside the allowed
    roots (models)', while images in that folder were read."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "tiny.pt").write_bytes(b"")  # not loaded: the check comes first
    (tmp_path / "models").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    named = str(tmp_path / "models" / "tiny.pt")
    for root in (tmp_path / "models", Path("models")):
        sibling = tiny_service.with_model("imgembed-tiny", named, [root])
        assert sibling.model_ref.pretrained == named
    (tmp_path / "elsewhere.pt").write_bytes(b"")
    with pytest.raises(SourceNotAllowedError, match="outside the allowed roots"):
        tiny_service.with_model("imgembed-tiny", str(tmp_path / "elsewhere.pt"), [Path("models")])


def test_an_offered_model_may_be_named_by_the_alias_it_is_offered_as(tiny_service):
    """IMGEMBED_ALLOWED_MODELS=clip-vit-base-patch32 (the seeds' name): a client naming it so
    was refused, 'this server offers only imgembed-tiny, clip-vit-base-patch32', as the name
    was compared after it was read as ViT-B-32 while the offered one was not."""
    for offered in ("clip-vit-base-patch32", "openai/clip-vit-base-patch32", "ViT-B/32"):
        for named in (offered, "ViT-B-32"):
            sibling = tiny_service.with_model(named, None, None, [offered])  # not loaded yet
            assert sibling.model_ref.name == "ViT-B-32", (offered, named)
    with pytest.raises(SourceNotAllowedError, match="offers only imgembed-tiny, ViT-B/32"):
        tiny_service.with_model("ViT-B-16", None, None, ["ViT-B/32"])
