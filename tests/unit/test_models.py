"""Model loading: clear errors when weights can't be had, one shared instance per process."""

import threading
import time

import numpy as np
import open_clip
import pytest
import torch

from imgembed import ConfigurationError, ImageEmbeddingService, ModelUnavailableError
from imgembed.models import loader, registry
from tests.conftest import TINY


def test_offline_default_model_fails_fast_and_says_what_to_do():
    service = ImageEmbeddingService()  # ViT-B-32 + openai; the hub is off in tests
    started = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as caught:
        service.embed_text("x")
    assert time.perf_counter() - started < 20
    message = str(caught.value)
    for needle in (
        "ViT-B-32 (openai)",
        "timm/vit_base_patch32_clip_224.openai",
        "HF_HUB_OFFLINE",
        "IMGEMBED_PRETRAINED=/path/to/file",
        "IMGEMBED_MODEL_CACHE_DIR",
    ):
        assert needle in message


def test_missing_checkpoint_file(tmp_path):
    from imgembed.errors import UnknownModelError

    missing = tmp_path / "nope.safetensors"
    service = ImageEmbeddingService(model="ViT-B-32", pretrained=str(missing))
    # no weights of that name, as an unknown tag: over HTTP a 422, not a 503 to retry
    with pytest.raises(UnknownModelError, match="does not exist"):
        service.encoder  # noqa: B018
    folder = ImageEmbeddingService(model=f"local-dir:{tmp_path / 'no-folder'}")
    with pytest.raises(UnknownModelError, match="does not exist"):
        folder.encoder  # noqa: B018
    # a name too long for a file name is not there either (pathlib's is_file raises)
    too_long = ImageEmbeddingService(model="ViT-B-32", pretrained=str(tmp_path / f"{'x' * 300}.pt"))
    with pytest.raises(UnknownModelError, match="does not exist"):
        too_long.encoder  # noqa: B018


def test_missing_checkpoint_file_on_onnx_is_said_before_any_export(tmp_path, caplog):
    from imgembed.errors import UnknownModelError

    missing = tmp_path / "nope.pt"
    service = ImageEmbeddingService(model="imgembed-tiny", pretrained=str(missing),
                                    runtime="onnx", data_dir=tmp_path / "d")  # fmt: skip
    with pytest.raises(UnknownModelError, match=r"nope\.pt does not exist"):
        service.embed_text("x")
    # it warned "not exported yet; exporting to ONNX ..." first (without torch: "exporting
    # needs torch, run imgembed models export ...", for weights that are not there)
    assert not [r for r in caplog.records if "exporting" in r.getMessage()]


def test_a_checkpoint_of_another_architecture_says_so_not_where_to_download(tmp_path):
    registry.open_clip()
    path = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model("imgembed-tiny").state_dict(), path)
    service = ImageEmbeddingService(model="ViT-B-32", pretrained=str(path))
    with pytest.raises(ModelUnavailableError) as caught:
        service.encoder  # noqa: B018
    message = str(caught.value)
    assert f"{path} is there but does not load as ViT-B-32" in message
    assert "models list" in message and "Hugging Face" not in message


def test_a_malformed_seed_or_a_checkpoint_named_as_the_model_is_a_clear_error():
    from imgembed.errors import UnknownModelError

    for tag in ("seed:abc", "seed:", "seed:-1"):
        with pytest.raises(ConfigurationError, match="seed:N takes a whole number"):
            ImageEmbeddingService(model="imgembed-tiny", pretrained=tag)
    with pytest.raises(UnknownModelError, match="give it as --pretrained"):
        ImageEmbeddingService(model="/models/vit-b-32.pt")


def test_unknown_tag_lists_the_known_ones():
    from imgembed.errors import UnknownModelError

    service = ImageEmbeddingService(model="ViT-B-32", pretrained="no-such-tag")
    # a wrong name, as an unknown architecture (over HTTP a 422, not a 503 to retry)
    with pytest.raises(UnknownModelError, match=r"known: .*openai.*laion2b_s34b_b79k"):
        service.encoder  # noqa: B018
    # the test model has no tag: the default 'openai' names the way to its random weights
    with pytest.raises(
        UnknownModelError, match=r"known: none\) .*: seed:N, e\.g\. --pretrained seed:0$"
    ):
        ImageEmbeddingService(model="imgembed-tiny").encoder  # noqa: B018


def test_unknown_architecture():
    from imgembed.errors import UnknownModelError

    with pytest.raises(ModelUnavailableError, match="unknown model architecture 'ViT-Q-99'"):
        ImageEmbeddingService(model="ViT-Q-99").encoder  # noqa: B018
    # names a client may send: too long for a file name (was an OSError); with a colon
    # but neither open_clip schema hf-hub: nor local-dir: (was weights to load, then a 503)
    for name in ("x" * 1000, "a:b", "data:image/png;base64,AAAA", "imgembed-tiny:seed:1"):
        with pytest.raises(UnknownModelError, match="unknown model architecture"):
            ImageEmbeddingService(model=name)
    assert registry.ModelRef("hf-hub:org/repo", "").carries_config
    assert registry.ModelRef("local-dir:models/tiny", "").carries_config


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="IMGEMBED_DEVICE=cpu"):
        ImageEmbeddingService(**TINY, device="cuda").encoder  # noqa: B018
    # the seed's GPU example names its own keys, not our variable: the way out in them
    seed = {"use_gpu": True, "gpu_device": "cuda:0", "model_name": "imgembed-tiny"}
    with pytest.raises(ConfigurationError, match="leave out gpu_device: use_gpu alone"):
        ImageEmbeddingService(seed, pretrained="seed:0").encoder  # noqa: B018


def test_auto_device_on_this_machine():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert loader.resolve_device("auto").type == expected


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"precision": "int8"}, "not available on the torch runtime"),
        ({"precision": "fp16", "device": "cpu"}, "fp16 needs a CUDA device"),
        ({"runtime": "onnx", "precision": "bf16"}, "not available on the ONNX runtime"),
        ({"runtime": "onnx", "device": "cuda"}, "runs on the CPU"),
        ({"device": "tpu"}, "unsupported device|invalid device"),
    ],
)
def test_unusable_runtime_settings(settings, match):
    with pytest.raises(ConfigurationError, match=match):
        ImageEmbeddingService(**{**TINY, **settings}).encoder  # noqa: B018


def test_bf16_on_cpu_works_and_stays_close(photos):
    with ImageEmbeddingService(**TINY, cache_embeddings=False) as fp32:
        reference = fp32.embed_image(photos[0])
    with ImageEmbeddingService(**TINY, precision="bf16", cache_embeddings=False) as bf16:
        vector = bf16.embed_image(photos[0])
    assert vector.dtype.name == "float32"
    assert float(reference @ vector) > 0.99


def test_one_model_instance_per_process(monkeypatch):
    calls = []
    real_load = loader._load
    monkeypatch.setattr(loader, "_load", lambda *a: calls.append(a) or real_load(*a))
    settings = {"model": "imgembed-tiny", "pretrained": "seed:77"}
    services = [ImageEmbeddingService(**settings) for _ in range(6)]
    models = []
    threads = [
        threading.Thread(target=lambda s=s: models.append(s.encoder._loaded.model))
        for s in services
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert all(m is models[0] for m in models)


def test_quick_gelu_follows_the_pretrained_tag(monkeypatch):
    seen = {}

    def fake_create_model(name, pretrained=None, **kwargs):
        seen[pretrained] = kwargs["force_quick_gelu"]
        raise RuntimeError("stop before downloading")

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    for tag in ("openai", "laion2b_s34b_b79k"):
        with pytest.raises(ModelUnavailableError):
            ref = registry.ModelRef("ViT-B-32", tag)
            loader._load(ref, torch.device("cpu"), "fp32", None, registry.weights_id(ref))
    assert seen == {"openai": True, "laion2b_s34b_b79k": False}


def test_catalogue_dimensions_match_open_clip_configs():
    """registry reads the config files itself (no open_clip import): same answer."""
    import open_clip

    for entry in registry.CATALOGUE:
        facts = registry.facts(entry.ref.name)
        assert facts.dimension == entry.dimension, entry.ref
        if facts.family == "open_clip":
            assert registry.model_config(entry.ref.name) == open_clip.get_model_config(
                entry.ref.name
            )


def test_seed_aliases_resolve():
    alias = registry.resolve("clip-vit-base-patch32", "x", explicit=False)
    assert alias == registry.ModelRef("ViT-B-32", "openai")  # the alias's own tag by default
    assert registry.resolve("clip-vit-base-patch32", "x") == registry.ModelRef("ViT-B-32", "x")
    assert registry.resolve("openai/clip-vit-large-patch14", "x").name == "ViT-L-14"
    assert registry.resolve("ViT-B/32", "openai") == registry.ModelRef("ViT-B-32", "openai")
    assert registry.resolve("hf-hub:org/repo", "") == registry.ModelRef("hf-hub:org/repo", "")


def test_seeded_models_are_deterministic_and_distinct():
    a = ImageEmbeddingService(**TINY).embed_text("same text")
    b = ImageEmbeddingService(model="imgembed-tiny", pretrained="seed:1").embed_text("same text")
    assert float(a @ ImageEmbeddingService(**TINY).embed_text("same text")) == pytest.approx(1)
    assert float(a @ b) < 0.99


def test_unreachable_hub_fails_fast_without_retries(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1")  # nothing listens on :443
    started = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match=r"https://127\.0\.0\.1 is not reachable"):
        ImageEmbeddingService(model="ViT-B-16", pretrained="openai").encoder  # noqa: B018
    assert time.perf_counter() - started < 10
    assert constants.HF_HUB_OFFLINE is False  # restored after the load


@pytest.fixture
def unshared_models():
    """Models loaded in the test leave the process-wide cache afterwards: a later test in this
    process expects the default ViT-B-32 (openai) weights to be unavailable offline."""
    before = dict(loader._LOADED)
    yield
    loader._LOADED.clear()
    loader._LOADED.update(before)


@pytest.mark.slow
@pytest.mark.usefixtures("unshared_models")
def test_weights_in_the_hugging_face_cache_load_offline(vitb32_checkpoint, tmp_path, photos):
    """What a first download leaves behind is used without the network, with the tag's
    QuickGELU, exactly as open_clip computes it from the same file."""
    from safetensors.torch import save_file

    from tests.reference import reference_image_embeddings, rowwise_cosine

    revision = "0" * 40
    repo = tmp_path / "hub" / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    weights = torch.load(vitb32_checkpoint, weights_only=True)
    save_file(weights, repo / "snapshots" / revision / "open_clip_model.safetensors")

    service = ImageEmbeddingService(model="clip-vit-base-patch32", model_cache_dir=tmp_path / "hub")
    ours = np.stack([r.embedding for r in service.embed_images(photos)])
    model, _, preprocess = open_clip.create_model_and_transforms(
        "ViT-B-32", pretrained=str(vitb32_checkpoint), force_quick_gelu=True
    )
    expected = reference_image_embeddings(model.eval(), preprocess, photos)
    assert rowwise_cosine(ours, expected).min() >= 0.9999


def test_local_dir_model_and_its_dimension_check(tmp_path, photos):
    """open_clip's local-dir schema (config + weights in a folder) loads without the hub;
    its dimension is only known once loaded, and is checked then."""
    import json

    from safetensors.torch import save_file

    tiny = ImageEmbeddingService(**TINY, cache_embeddings=False)
    folder = tmp_path / "tiny-local"
    folder.mkdir()
    config = json.loads((registry.CONFIG_DIR / "imgembed-tiny.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    state = {k: v.contiguous() for k, v in tiny.encoder._loaded.model.state_dict().items()}
    save_file(state, folder / "open_clip_model.safetensors")

    local = ImageEmbeddingService(model=f"local-dir:{folder}", cache_embeddings=False)
    np.testing.assert_allclose(local.embed_image(photos[0]), tiny.embed_image(photos[0]), atol=1e-6)
    assert local.dimension == 64
    wrong = ImageEmbeddingService(model=f"local-dir:{folder}", dimension=512)
    with pytest.raises(ConfigurationError, match="configured dimension 512"):
        wrong.embed_text("x")


def test_a_checkpoint_replaced_on_disk_loads_anew(tmp_path, photos):
    """A long-running process must not keep serving the old weights of a replaced file."""
    registry.open_clip()
    path = tmp_path / "tiny.pt"

    def save_and_embed(seed: int) -> np.ndarray:
        torch.manual_seed(seed)
        torch.save(open_clip.create_model("imgembed-tiny").state_dict(), path)
        settings = {"model": "imgembed-tiny", "pretrained": str(path), "cache_embeddings": False}
        with ImageEmbeddingService(**settings) as service:
            return service.embed_image(photos[0])

    first, second = save_and_embed(1), save_and_embed(2)
    assert float(first @ second) < 0.99
    np.testing.assert_allclose(save_and_embed(1), first, atol=1e-6)


def test_model_facts_are_data():
    clip = registry.facts("ViT-B-32")
    assert (clip.family, clip.dimension, clip.has_text_tower) == ("open_clip", 512, True)
    assert clip.duplicate_threshold == registry.CLIP_DUPLICATE_THRESHOLD
    effnet = registry.facts("efficientnet-lite0")
    assert (effnet.family, effnet.dimension, effnet.has_text_tower) == ("efficientnet", 1280, False)
    assert effnet.duplicate_threshold == 0.6
    assert registry.facts("hf-hub:org/repo").dimension is None  # known once loaded
    with pytest.raises(ModelUnavailableError, match="models list --all"):
        registry.facts("no-such-architecture")
