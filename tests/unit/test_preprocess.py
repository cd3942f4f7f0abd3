"""Our torch-free transform reproduces open_clip's inference transform on real photos."""

import numpy as np
import open_clip
import pytest
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from imgembed.intake.decode import Limits, decode
from imgembed.models.preprocess import Preprocessor


@pytest.mark.parametrize(
    "cfg",
    [
        {},  # the default: OpenAI mean/std, bicubic, shortest side, 224
        {"resize_mode": "squash"},
        {"resize_mode": "longest", "fill_color": 0},
        {"interpolation": "bilinear"},
        {"size": (224, 256), "resize_mode": "shortest"},
        {"size": 256, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
        {"size": 64, "resize_mode": "longest"},
    ],
)
def test_arrays_equal_open_clip_transform(cfg, photos):
    full = PreprocessCfg(**cfg)
    reference = image_transform_v2(full, is_train=False)
    ours = Preprocessor.from_config(open_clip.transform.merge_preprocess_dict(full, {}))
    for path in photos:
        image = Image.open(path).convert("RGB")
        expected = reference(image).numpy()
        actual = ours(image)
        assert actual.shape == expected.shape
        assert actual.dtype == np.float32
        assert np.abs(actual - expected).max() < 1e-5, path.name


def test_small_image_is_upscaled_and_padded_like_open_clip():
    image = Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3))
    for mode in ("shortest", "longest", "squash"):
        cfg = PreprocessCfg(resize_mode=mode)
        expected = image_transform_v2(cfg, is_train=False)(image).numpy()
        actual = Preprocessor.from_config(open_clip.transform.merge_preprocess_dict(cfg, {}))(image)
        assert np.abs(actual - expected).max() < 1e-5, mode


def test_draft_decoding_keeps_short_side_above_the_floor(large_jpegs):
    data = large_jpegs[0].read_bytes()
    full = decode(data, "x", Limits())
    drafted = decode(data, "x", Limits(), draft_min_side=448)
    assert min(drafted.image.size) >= 448
    assert drafted.image.size[0] < full.image.size[0] / 2  # really decoded smaller
    assert drafted.metadata["width"] == full.metadata["width"]  # metadata is of the file


def test_to_array_gives_the_formula_s_float32_numbers_for_every_level():
    """The table lookup equals (x / 255 - mean) / std in float32, bit for bit."""
    ours = Preprocessor.from_config(
        {"size": 16, "mean": [0.48, 0.45, 0.4], "std": [0.27, 0.26, 0.28]}
    )
    levels = np.arange(256, dtype=np.uint8)
    pixels = np.stack([levels, levels[::-1], np.roll(levels, 7)], axis=-1).reshape(16, 16, 3)
    expected = np.asarray(pixels, dtype=np.float32) / np.float32(255)
    expected -= np.asarray(ours.mean, dtype=np.float32)
    expected /= np.asarray(ours.std, dtype=np.float32)
    actual = ours.to_array(Image.fromarray(pixels))
    assert actual.dtype == np.float32 and actual.flags.c_contiguous
    np.testing.assert_array_equal(actual, expected.transpose(2, 0, 1))
