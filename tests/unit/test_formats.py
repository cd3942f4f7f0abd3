"""Real-world formats: Pillow's own test images, HEIC/AVIF, 16-bit, orientation,
transparency, animation, EXIF in every container, limits, quality."""

import io
import json
import re
import time
from collections import Counter

import numpy as np
import pillow_heif
import pytest
from PIL import ExifTags, Image, ImageFilter
from PIL.TiffImagePlugin import IFDRational

from imgembed import (
    ConfigurationError,
    ImageEmbeddingService,
    ImageTooLargeError,
    ImageTooSmallError,
    ImgEmbedError,
    UnsupportedFormatError,
)
from imgembed.intake.decode import Limits, decode, image_metadata
from tests.conftest import TESTDATA, TINY

PILLOW = TESTDATA / "pillow"


@pytest.fixture(scope="module")
def service():
    with ImageEmbeddingService(**TINY, cache_embeddings=False) as s:
        yield s


@pytest.fixture(scope="module")
def rocket() -> Image.Image:
    return Image.open(TESTDATA / "photos" / "rocket.jpg").convert("RGB")


def _cos(a, b) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def _encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def test_every_pillow_test_image_embeds_or_fails_with_a_typed_error(service):
    files = sorted(p for p in PILLOW.rglob("*") if p.is_file())
    assert len(files) > 700, "run scripts/setup.sh to fetch Pillow's test images"
    started = time.perf_counter()
    results = service.embed_images(files)
    assert time.perf_counter() - started < 120
    for path, result in zip(files, results, strict=True):
        assert result.ok or isinstance(result.error, ImgEmbedError), path
        assert result.processing_time < 10, path
    embedded = Counter(r.metadata["format"] for r in results if r.ok)
    for fmt in ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF", "AVIF", "HEIF", "MPO"):
        assert embedded[fmt] > 0, fmt
    assert sum(embedded.values()) > 500
    kinds = Counter(type(r.error).__name__ for r in results if not r.ok)
    assert kinds["UnsupportedFormatError"] > 0  # PSD, DDS, TGA, ... refused by default
    assert kinds["InvalidImageError"] > 0  # the truncated and fuzzed files


def test_sixteen_bit_images_are_scaled_not_clipped():
    path = PILLOW / "16bit.cropped.tif"
    raw = np.asarray(Image.open(path), dtype=np.float64)
    assert raw.max() > 255  # really 16-bit data
    decoded = np.asarray(decode(path.read_bytes(), "x", Limits(min_side=1)).image)
    assert abs(decoded[..., 0].mean() - (raw / 65535 * 255).mean()) < 1
    assert (decoded < 255).mean() > 0.5  # Pillow's own convert("RGB") clips to white


def test_float_and_16_bit_png_images_are_scaled(tmp_path):
    ramp = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (64, 1))
    Image.fromarray(ramp, mode="F").save(tmp_path / "float.tif")
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "deep.png")
    for name in ("float.tif", "deep.png"):
        decoded = np.asarray(decode((tmp_path / name).read_bytes(), name, Limits()).image)
        np.testing.assert_allclose(decoded[0, :, 0], np.rint(ramp[0] * 255), atol=1, err_msg=name)


def test_cmyk_jpeg_converts_like_pillow():
    path = PILLOW / "pil_sample_cmyk.jpg"
    assert Image.open(path).mode == "CMYK"
    decoded = decode(path.read_bytes(), "x", Limits(min_side=1)).image
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(Image.open(path).convert("RGB")))
    assert np.asarray(decoded).std() > 10  # a real picture, not a flat colour


def test_exif_orientation_is_applied(service, rocket):
    stored = rocket.rotate(90, expand=True)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # "rotate 90 clockwise to display"
    data = _encoded(stored, "PNG", exif=exif)
    decoded = decode(data, "x", Limits()).image
    assert decoded.size == rocket.size
    assert np.abs(np.asarray(decoded, np.int16) - np.asarray(rocket, np.int16)).mean() < 1
    upright = service.embed_image(_encoded(rocket, "PNG"))
    assert _cos(service.embed_image(data), upright) > 0.9999
    # the size said is the upright one, as shown and embedded
    assert rocket.width != rocket.height
    metadata = service.image_metadata(data, extended=True)
    assert (metadata["width"], metadata["height"], metadata["orientation"]) == (*rocket.size, 6)
    (result,) = service.embed_images([data])
    assert (result.metadata["width"], result.metadata["height"]) == rocket.size
    for path in (PILLOW / "hopper.png", TESTDATA / "photos" / "rocket.jpg"):
        opened = Image.open(path)
        image_metadata(opened, 1)
        assert opened._im is None, path  # still the header alone: no pixels decoded
    for fmt in ("JPEG", "TIFF", "WEBP"):  # Pillow turns a TIFF's size itself: not twice
        turned = _encoded(stored, fmt, exif=exif)
        said = service.image_metadata(turned)
        assert (said["width"], said["height"]) == rocket.size, fmt
        assert decode(turned, "x", Limits()).image.size == rocket.size, fmt


def test_transparency_is_composited_onto_white(service):
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red under fully transparent pixels
    rgba[16:48, 16:48] = (0, 0, 255, 255)  # an opaque blue square
    decoded = np.asarray(decode(_encoded(Image.fromarray(rgba), "PNG"), "x", Limits()).image)
    assert (decoded[0, 0] == (255, 255, 255)).all()
    assert (decoded[32, 32] == (0, 0, 255)).all()
    metadata = service.image_metadata(PILLOW / "1_trns.png")
    assert metadata["has_transparency"] is True


def test_animated_images_use_the_first_frame(service, rocket):
    coffee = Image.open(TESTDATA / "photos" / "coffee.png").convert("RGB").resize(rocket.size)
    data = _encoded(rocket, "GIF", save_all=True, append_images=[coffee])
    (result,) = service.embed_images([data])
    assert result.metadata["animated"] is True and result.metadata["frames"] == 2
    first = Image.open(io.BytesIO(data)).convert("RGB")
    np.testing.assert_allclose(result.embedding, service.embed_image(first), atol=1e-6)


def test_heic_embeds_like_the_photo(service, rocket):
    heif = pillow_heif.from_pillow(rocket)
    buffer = io.BytesIO()
    heif.save(buffer, quality=95)
    (result,) = service.embed_images([buffer.getvalue()])
    assert result.ok and result.metadata["format"] == "HEIF"
    assert _cos(result.embedding, service.embed_image(_encoded(rocket, "PNG"))) > 0.99


def _camera_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Fujifilm"
    exif[ExifTags.Base.Model] = "X-T30"
    exif[ExifTags.Base.DateTime] = "2024:05:02 10:00:00"
    detail = exif.get_ifd(ExifTags.IFD.Exif)
    detail[ExifTags.Base.DateTimeOriginal] = "2024:05:01 18:30:15"
    detail[ExifTags.Base.OffsetTimeOriginal] = "+02:00"
    detail[ExifTags.Base.ExposureTime] = 0.004
    detail[ExifTags.Base.FNumber] = 2.8
    detail[ExifTags.Base.ISOSpeedRatings] = 400
    detail[ExifTags.Base.LensModel] = "XF35mmF1.4 R"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 22.0, 12.0)
    gps[ExifTags.GPS.GPSLongitudeRef] = "W"
    gps[ExifTags.GPS.GPSLongitude] = (4.0, 53.0, 24.0)
    gps[ExifTags.GPS.GPSAltitudeRef] = b"\x00"
    gps[ExifTags.GPS.GPSAltitude] = 12.5
    return exif


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "AVIF", "HEIF"])
def test_extended_metadata_from_exif_in_every_container(service, rocket, fmt, tmp_path):
    path = tmp_path / f"photo.{fmt.lower()}"
    if fmt == "HEIF":
        heif = pillow_heif.from_pillow(rocket)
        heif.info["exif"] = _camera_exif().tobytes()
        heif.save(path)
    else:
        rocket.save(path, format=fmt, exif=_camera_exif())
    data = service.image_metadata(path, extended=True)
    assert data["camera_info"]["make"] == "Fujifilm" and data["camera_info"]["model"] == "X-T30"
    assert data["camera_info"]["lens"] == "XF35mmF1.4 R"
    assert data["exposure"] == {"exposure_time": 0.004, "f_number": 2.8, "iso": 400.0,
                                "focal_length": None}  # fmt: skip
    assert data["creation_date"] == "2024-05-01T18:30:15+02:00"
    assert data["modification_date"] == "2024-05-02T10:00:00"
    gps = data["gps_info"]
    assert gps["latitude"] == pytest.approx(52.37, abs=1e-6)
    assert gps["longitude"] == pytest.approx(-4.89, abs=1e-6)
    assert gps["altitude"] == pytest.approx(12.5)


def test_tiff_exif(service, rocket, tmp_path):
    """Pillow's TIFF writer drops the Exif and GPS sub-IFDs (checked: tags 34665/34853 are
    absent from the file), so only the base IFD can be written here; it is read back."""
    path = tmp_path / "photo.tif"
    rocket.save(path, exif=_camera_exif())
    data = service.image_metadata(path, extended=True)
    assert data["camera_info"]["make"] == "Fujifilm" and data["camera_info"]["model"] == "X-T30"
    assert data["modification_date"] == "2024-05-02T10:00:00"


def test_a_tiff_codec_libtiff_lacks_is_unsupported_naming_it(service):
    path = PILLOW / "hopper_webp.tif"
    try:
        Image.open(path).load()
        pytest.skip("this Pillow's libtiff reads WebP-compressed TIFFs")
    except OSError:
        pass
    (result,) = service.embed_images([path])
    assert isinstance(result.error, UnsupportedFormatError)
    assert "TIFF's 'webp' compression" in str(result.error)


def test_real_camera_exif(service):
    data = service.image_metadata(PILLOW / "flower.jpg", extended=True)
    assert data["camera_info"]["make"] == "Canon"
    assert data["camera_info"]["model"] == "Canon PowerShot S40"
    assert data["exposure"]["exposure_time"] == pytest.approx(1 / 500)
    assert data["exposure"]["f_number"] == pytest.approx(4.9)
    assert data["creation_date"] == "2003-12-14T12:01:44"
    assert data["gps_info"] is None


@pytest.mark.parametrize(
    "name",
    ["exif_gps.jpg", "exif_gps_typeerror.jpg", "exif_typeerror.jpg", "broken_exif_dpi.jpg",
     "exif-dpi-zerodivision.jpg", "empty_gps_ifd.jpg", "exif-ifd-offset.jpg", "hopper.jpg"],
)  # fmt: skip
def test_malformed_or_missing_exif_gives_nulls(service, name):
    data = service.image_metadata(PILLOW / name, extended=True)
    for key in ("camera_info", "exposure", "creation_date", "gps_info", "orientation"):
        assert key in data
    if name == "exif_gps.jpg":  # its GPS values are garbage (e.g. the date 1999:99:99)
        assert data["gps_info"] is None


async def test_an_upright_image_does_not_say_to_turn_it_again(service, rocket):
    """preprocess_image of a rotated JPEG kept the file's EXIF (Orientation 6): embedded
    again, or shown by a viewer, it was turned a second time."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    data = _encoded(rocket.rotate(90, expand=True), "JPEG", exif=exif, quality=95)
    shown = await service.preprocess_image(data)
    assert ExifTags.Base.Orientation not in shown.getexif()
    assert _cos(service.embed_image(shown), service.embed_image(data)) > 0.9999
    assert decode(data, "x", Limits()).image.getexif().get(ExifTags.Base.Orientation) is None


def test_exif_numbers_that_are_not_finite_are_null(service, rocket, tmp_path):
    """A 0/0 GPS rational reads as NaN and a DOUBLE tag can hold infinity: they came back as
    a NaN latitude and an infinite exposure, which no JSON can hold."""
    exif = Image.Exif()
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (IFDRational(52, 1), IFDRational(22, 1), IFDRational(0, 0))
    gps[ExifTags.GPS.GPSLongitudeRef] = "W"
    gps[ExifTags.GPS.GPSLongitude] = (4.0, 53.0, 24.0)
    detail = exif.get_ifd(ExifTags.IFD.Exif)
    detail[ExifTags.Base.ExposureTime] = float("inf")
    detail[ExifTags.Base.FNumber] = 2.8
    path = tmp_path / "gps.jpg"
    rocket.save(path, exif=exif)
    data = service.image_metadata(path, extended=True)
    json.dumps(data, allow_nan=False)
    assert data["gps_info"]["latitude"] is None
    assert data["gps_info"]["longitude"] == pytest.approx(-4.89, abs=1e-6)
    assert data["exposure"] == {"exposure_time": None, "f_number": 2.8, "iso": None,
                                "focal_length": None}  # fmt: skip


def test_minimum_size(rocket):
    small = _encoded(rocket.resize((40, 20)), "PNG")
    with ImageEmbeddingService(**TINY) as service:
        (result,) = service.embed_images([small])
        assert isinstance(result.error, ImageTooSmallError) and "min_image_size" in str(
            result.error
        )
    with ImageEmbeddingService(**TINY, min_image_size=16) as service:
        assert service.embed_images([small])[0].ok


def test_supported_formats_are_configurable():
    psd = PILLOW / "hopper.psd"
    with ImageEmbeddingService(**TINY) as service:
        error = service.embed_images([psd])[0].error
        assert isinstance(error, UnsupportedFormatError) and "PSD" in str(error)
    with ImageEmbeddingService(**TINY, supported_formats=[".psd"]) as service:
        assert service.embed_images([psd])[0].ok
        jpeg = service.embed_images([TESTDATA / "photos" / "rocket.jpg"])[0]
        assert isinstance(jpeg.error, UnsupportedFormatError)
    # a typo or an empty list refused every image later, "(supported_formats: )"
    for formats, said in (([".jpg", ".pgn"], ".pgn is no image format"), ([], "no format")):
        with pytest.raises(ConfigurationError, match="IMGEMBED_SUPPORTED_FORMATS") as caught:
            ImageEmbeddingService(**TINY, supported_formats=formats)
        assert said in str(caught.value)


def test_quality_signal(rocket):
    blurred = _encoded(rocket.filter(ImageFilter.GaussianBlur(8)), "PNG")
    uniform = _encoded(Image.new("RGB", (400, 300), (120, 120, 120)), "PNG")
    with ImageEmbeddingService(**TINY) as service:
        sharp, soft, flat = service.embed_images([_encoded(rocket, "PNG"), blurred, uniform])
        assert sharp.confidence == 1.0 and not sharp.metadata["quality"]["low_quality"]
        assert soft.confidence < 0.5 and soft.metadata["quality"]["low_quality"]
        assert flat.confidence == 0.0 and flat.ok  # flagged, still embedded
        again = service.embed_images([blurred])[0]
        assert again.cached and again.confidence == soft.confidence
    with ImageEmbeddingService(**TINY, quality_threshold=0.01) as service:
        assert not service.embed_images([blurred])[0].metadata["quality"]["low_quality"]


def test_a_side_over_max_image_size_is_refused_by_name_not_scaled():
    """The seed's `max_image_size: 1333` copied as is: a limit (no vector changes by a
    resize the model would not make), and the error says which key to change."""
    data = _encoded(Image.new("RGB", (1400, 300)), "PNG")
    with pytest.raises(ImageTooLargeError, match=r"1400x300 .*over 1333 \(max_image_size"):
        decode(data, "x", Limits(max_side=1333))
    assert decode(data, "x", Limits()).image.size == (1400, 300)


@pytest.mark.parametrize("name", ["decompression_bomb.gif", "decompression_bomb.ico"])
def test_a_decompression_bomb_is_refused_in_our_words(name):
    """Pillow refuses these in Image.open already ("could be decompression bomb DOS attack"):
    the error says what the header claims and that nothing was decoded."""
    from imgembed.errors import ImageTooLargeError

    with pytest.raises(ImageTooLargeError) as caught:
        decode((PILLOW / name).read_bytes(), name, Limits())
    message = str(caught.value)
    assert re.search(r"[\d,]{13} pixels in its header", message), message
    assert "refused before decoding" in message and "DOS" not in message
