"""The catalogue's settings and public surface."""

import imgembed.catalog
from imgembed.config import load_settings


def test_catalogue_settings_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("IMGEMBED_TEXT_MODEL", "openai:text-embedding-3-small")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("CLIP_OLLAMA_ENDPOINT", "http://ollama:11434")
    monkeypatch.setenv("IMGEMBED_CATEGORY_WEIGHTS", str(tmp_path / "w.toml"))
    monkeypatch.setenv("IMGEMBED_TEXT_TIMEOUT", "5")
    settings = load_settings()
    assert settings.text_model == "openai:text-embedding-3-small"
    assert settings.openai_api_key.get_secret_value() == "sk-secret"
    assert "sk-secret" not in repr(settings)  # a secret, never printed
    assert settings.text_api_base == "http://127.0.0.1:9/v1"
    assert settings.ollama_url == "http://ollama:11434"
    assert settings.category_weights == tmp_path / "w.toml"
    assert settings.text_timeout == 5
    monkeypatch.setenv("IMGEMBED_OLLAMA_URL", "http://other:1")
    assert load_settings().ollama_url == "http://other:1"


def test_catalogue_defaults_and_the_seed_key():
    settings = load_settings({"ollama_endpoint": "http://localhost:11434", "model_name": "x"})
    assert settings.ollama_url == "http://localhost:11434"
    assert (settings.text_model, settings.text_retries, settings.text_batch_size) == (
        "minilm",
        3,
        128,
    )


def test_public_surface_is_explicit():
    assert set(imgembed.catalog.__all__) == {
        "BadRow", "Catalog", "EmbedEvents", "EmbedStats", "ImportReport", "ProductHit",
        "ProductInput", "StoreProvenance", "StoreStats", "TextEmbedder", "Weights",
        "WeightsTable", "combine_embeddings", "default_catalog", "findly_table",
        "generate_embedding", "generate_image_embedding", "generate_text_embedding", "load_weights",
        "product_text",
    }  # fmt: skip
    for name in imgembed.catalog.__all__:
        assert getattr(imgembed.catalog, name) is not None
