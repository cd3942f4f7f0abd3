"""Settings from the environment, keyword arguments and the seed's config names."""

import pytest

from imgembed import ConfigurationError, ImageEmbeddingService, Settings
from imgembed.config import load_settings
from imgembed.models.registry import ModelRef


def test_environment_variables(monkeypatch, tmp_path):
    values = {
        "IMGEMBED_MODEL": "ViT-B-16",
        "IMGEMBED_PRETRAINED": "laion2b_s34b_b88k",
        "IMGEMBED_DEVICE": "cpu",
        "IMGEMBED_RUNTIME": "torch",
        "IMGEMBED_PRECISION": "bf16",
        "IMGEMBED_BATCH_SIZE": "7",
        "IMGEMBED_DATA_DIR": str(tmp_path / "d"),
        "IMGEMBED_CACHE_DIR": str(tmp_path / "c"),
        "IMGEMBED_STORE": "qdrant",
        "IMGEMBED_COLLECTION": "products",
        "IMGEMBED_HNSW_EF_SEARCH": "64",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert (settings.model, settings.pretrained, settings.device) == (
        "ViT-B-16",
        "laion2b_s34b_b88k",
        "cpu",
    )
    assert (settings.runtime, settings.precision, settings.batch_size) == ("torch", "bf16", 7)
    assert settings.data_dir == tmp_path / "d"
    assert settings.embedding_cache_dir == tmp_path / "c"
    assert (settings.store, settings.collection, settings.hnsw_ef_search) == (
        "qdrant",
        "products",
        64,
    )


def test_defaults(tmp_path):
    settings = Settings()
    assert (settings.model, settings.pretrained, settings.batch_size) == ("ViT-B-32", "openai", 32)
    assert settings.normalize and settings.cache_embeddings and not settings.exact
    assert settings.embedding_cache_dir == settings.data_dir / "cache"


def test_keyword_arguments_beat_the_environment(monkeypatch):
    monkeypatch.setenv("IMGEMBED_BATCH_SIZE", "7")
    assert load_settings(batch_size=3).batch_size == 3
    assert load_settings().batch_size == 7


def test_seed_environment_names(monkeypatch):
    monkeypatch.setenv("CLIP_MODEL_NAME", "clip-vit-large-patch14")
    monkeypatch.setenv("CLIP_DIMENSION", "768")
    service = ImageEmbeddingService()  # no weights are loaded until first use
    assert service.model_ref == ModelRef("ViT-L-14", "openai")
    assert service.dimension == 768


def test_dimension_that_does_not_match_the_model(monkeypatch):
    monkeypatch.setenv("CLIP_DIMENSION", "768")
    with pytest.raises(ConfigurationError, match=r"768.*ViT-B-32.*512"):
        ImageEmbeddingService()


def test_seed_config_dict():
    config = {
        "model_name": "clip-vit-base-patch32",
        "dimension": 512,
        "ollama_endpoint": "http://localhost:11434",
        "image_size": 224,
        "batch_size": 16,
        "normalize_embeddings": True,
        "use_gpu": False,
        "cache_embeddings": False,
        "cache_directory": "./data/embeddings",
        "max_workers": 4,
        "parallel_processing": True,
        "supported_formats": [".jpg", ".png"],
        "max_file_size": 10485760,
    }
    service = ImageEmbeddingService(config)
    s = service.settings
    assert service.model_ref == ModelRef("ViT-B-32", "openai")
    assert (s.batch_size, s.device, s.cache_embeddings, s.max_workers) == (16, "cpu", False, 4)
    assert str(s.cache_dir) == "data/embeddings"


def test_seed_gpu_device_and_parallel_processing():
    assert load_settings({"use_gpu": True, "gpu_device": "cuda:1"}).device == "cuda:1"
    assert load_settings({"use_gpu": True}).device == "auto"
    assert load_settings({"parallel_processing": False}).workers == 1


def test_seed_keyword_style(tmp_path):
    service = ImageEmbeddingService(cache_embeddings=True, debug=True, cache_directory=tmp_path)
    assert service.settings.cache_dir == tmp_path


def test_unknown_and_invalid_settings_are_clear_errors():
    with pytest.raises(ConfigurationError, match="unknown setting 'modle'"):
        ImageEmbeddingService(modle="ViT-B-32")
    with pytest.raises(ConfigurationError, match="batch_size"):
        ImageEmbeddingService(batch_size=0)
    with pytest.raises(ConfigurationError, match="runtime"):
        ImageEmbeddingService(runtime="tensorflow")


def test_settings_are_immutable_and_copied_with_changes():
    from pydantic import ValidationError

    settings = load_settings(batch_size=4)
    with pytest.raises(ValidationError, match="frozen"):
        settings.batch_size = 8
    changed = settings.model_copy(update={"batch_size": 8})
    assert (settings.batch_size, changed.batch_size) == (4, 8)


def test_service_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("IMGEMBED_API_KEYS", "k1, k2")
    monkeypatch.setenv("IMGEMBED_CORS_ORIGINS", "http://localhost:3000,https://a.example")
    monkeypatch.setenv("IMGEMBED_MAX_BODY_SIZE", "1000")
    settings = Settings()
    assert [key.get_secret_value() for key in settings.api_keys] == ["k1", "k2"]
    assert "k1" not in repr(settings)  # keys never end up in logs
    assert settings.cors_origins == ["http://localhost:3000", "https://a.example"]
    assert settings.max_body_size == 1000 and settings.max_batch_inputs == 256
    assert (settings.batch_wait_ms, settings.queue_size) == (5.0, 1024)
    assert Settings().model_copy().api_keys == settings.api_keys
