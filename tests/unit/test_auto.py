"""`auto` runtime and precision: chosen from the CPU's flags (faked here), only as measured."""

import pytest

from imgembed import ImageEmbeddingService
from imgembed.config import Settings
from imgembed.models import auto
from imgembed.models.registry import ModelRef
from tests.conftest import TINY

# Real flag sets, shortened: this project's AVX2 machine (AMD EPYC, Zen 3), a Zen 4 with
# AVX-512 VNNI, an Intel hybrid with AVX-VNNI, an old x86 without AVX2.
AVX2 = frozenset(
    [
        "fpu",
        "sse",
        "sse2",
        "ssse3",
        "fma",
        "sse4_1",
        "sse4_2",
        "avx",
        "f16c",
        "avx2",
        "bmi2",
        "sha_ni",
        "vaes",
    ]
)
ZEN4 = AVX2 | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}
ALDER_LAKE = AVX2 | {"avx_vnni"}
OLD = frozenset(["fpu", "sse", "sse2", "ssse3", "sse4_1", "sse4_2", "avx"])
CLIP = ModelRef("ViT-B-32", "openai")


def test_flags_are_read_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert auto.cpu_flags(x86) == {"fpu", "avx2", "fma"}
    assert auto.cpu_flags(arm) == {"fp", "asimd", "asimddp"}
    assert auto.cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(
    ("flags", "machine", "expected"),
    [
        (ZEN4, "x86_64", "avx512-vnni"),
        (ALDER_LAKE, "x86_64", "avx-vnni"),
        (AVX2, "x86_64", "avx2"),
        (AVX2 - {"fma"}, "x86_64", "other"),
        (OLD, "x86_64", "other"),
        (frozenset(), "x86_64", "other"),
        (frozenset({"fp", "asimd", "asimddp"}), "aarch64", "other"),
    ],
)
def test_cpu_class(flags, machine, expected):
    assert auto.cpu_class(flags, machine) == expected


@pytest.mark.parametrize(
    ("settings", "ref", "flags", "expected"),
    [
        ({"runtime": "auto", "precision": "auto"}, CLIP, AVX2, ("onnx", "int8")),
        ({"runtime": "auto", "precision": "auto"}, CLIP, ZEN4, ("onnx", "int8")),
        ({"runtime": "auto", "precision": "auto"}, CLIP, ALDER_LAKE, ("onnx", "int8")),
        ({"runtime": "auto", "precision": "auto"}, CLIP, OLD, ("onnx", "fp32")),
        ({"runtime": "auto", "precision": "auto"}, CLIP, frozenset(), ("onnx", "fp32")),
        # only open_clip models export to ONNX, and ONNX runs on the CPU only
        (
            {"runtime": "auto", "precision": "auto"},
            ModelRef("efficientnet-lite0", "imagenet"),
            AVX2,
            ("torch", "fp32"),
        ),
        ({"runtime": "auto", "precision": "auto", "device": "cuda"}, CLIP, AVX2, ("torch", "fp32")),
        # a fixed half is kept
        ({"runtime": "torch", "precision": "auto"}, CLIP, AVX2, ("torch", "fp32")),
        ({"runtime": "onnx", "precision": "auto"}, CLIP, AVX2, ("onnx", "int8")),
        ({"runtime": "auto", "precision": "fp32"}, CLIP, AVX2, ("onnx", "fp32")),
        ({"runtime": "torch", "precision": "bf16"}, CLIP, AVX2, ("torch", "bf16")),
    ],
)
def test_choice(settings, ref, flags, expected):
    assert auto.choose(Settings(**settings), ref, flags, "x86_64") == expected


def test_auto_on_arm_stays_fp32():
    settings = Settings(runtime="auto", precision="auto")
    assert auto.choose(settings, CLIP, frozenset({"asimd"}), "aarch64") == ("onnx", "fp32")


def test_fixed_settings_are_returned_as_they_are():
    settings = Settings(runtime="onnx", precision="fp32")
    assert auto.resolve(settings, CLIP) is settings


@pytest.mark.parametrize(("flags", "precision"), [(AVX2, "int8"), (OLD, "fp32")])
def test_service_runs_what_auto_chose(monkeypatch, tmp_path, photos, flags, precision):
    monkeypatch.setattr(auto, "cpu_flags", lambda: flags)
    monkeypatch.setattr(auto.platform, "machine", lambda: "x86_64")
    with ImageEmbeddingService(
        runtime="auto",
        precision="auto",
        model_cache_dir=tmp_path,
        cache_embeddings=False,
        **TINY,
    ) as service:
        assert service.encoder.fingerprint.startswith(f"onnx/{precision}/")
        assert service.embed_images(photos[:2])[0].ok
