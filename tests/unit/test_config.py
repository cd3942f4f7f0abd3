"""Settings from the environment, keyword arguments and the seed's config names."""

import numpy as np
import open_clip
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
    # a seed key misspelt in a copied CLIP_CONFIG names the key meant, as the variables do
    with pytest.raises(ConfigurationError, match=r"'modle_name' \(did you mean model_name\?\)"):
        ImageEmbeddingService({"modle_name": "clip-vit-base-patch32"})
    with pytest.raises(ConfigurationError, match=r"\(did you mean normalize_embeddings"):
        ImageEmbeddingService({"normalise_embeddings": True})
    with pytest.raises(ConfigurationError, match=r"unknown setting 'zzz'$"):
        ImageEmbeddingService({"zzz": 1})
    with pytest.raises(ConfigurationError, match="batch_size"):
        ImageEmbeddingService(batch_size=0)
    with pytest.raises(ConfigurationError, match="runtime"):
        ImageEmbeddingService(runtime="tensorflow")


def test_an_explicit_checkpoint_wins_over_the_aliases_tag(monkeypatch, tmp_path):
    checkpoint = str(tmp_path / "ckpt.pt")
    service = ImageEmbeddingService(model="clip-vit-base-patch32", pretrained=checkpoint)
    assert service.model_ref == ModelRef("ViT-B-32", checkpoint)
    monkeypatch.setenv("CLIP_MODEL_NAME", "clip-vit-large-patch14")
    monkeypatch.setenv("IMGEMBED_PRETRAINED", "laion2b_s32b_b82k")
    assert ImageEmbeddingService().model_ref == ModelRef("ViT-L-14", "laion2b_s32b_b82k")
    monkeypatch.delenv("IMGEMBED_PRETRAINED")
    assert ImageEmbeddingService().model_ref == ModelRef("ViT-L-14", "openai")  # the alias's tag


@pytest.mark.slow
def test_an_alias_with_a_checkpoint_file_embeds_with_that_file(vitb32_checkpoint, photos):
    from tests.reference import reference_image_embeddings, rowwise_cosine

    service = ImageEmbeddingService(
        model="clip-vit-base-patch32", pretrained=str(vitb32_checkpoint), cache_embeddings=False
    )
    ours = np.stack([r.embedding for r in service.embed_images(photos[:3])])
    model, _, preprocess = open_clip.create_model_and_transforms(
        "ViT-B-32", pretrained=str(vitb32_checkpoint)
    )
    expected = reference_image_embeddings(model.eval(), preprocess, photos[:3])
    assert rowwise_cosine(ours, expected).min() >= 0.9999


def test_image_size_is_honoured_or_refused(photos):
    tiny = {"model": "imgembed-tiny", "pretrained": "seed:0", "cache_embeddings": False}
    same = ImageEmbeddingService({**tiny, "image_size": 224})
    assert same.embed_image(photos[0]).shape == (64,)
    # refused when the service is made (from the model's config, no weights loaded), not
    # on the first image an hour into a server's life
    with pytest.raises(ConfigurationError, match=r"image_size 256 cannot be honoured.*224x224"):
        ImageEmbeddingService({**tiny, "image_size": 256})
    with pytest.raises(ConfigurationError, match=r"ViT-B-32.*takes 224x224"):
        ImageEmbeddingService({"model_name": "clip-vit-base-patch32", "image_size": 336})
    with pytest.raises(ConfigurationError, match=r"efficientnet-lite0.*takes 224x224"):
        ImageEmbeddingService(model="efficientnet-lite0", image_size=300)


@pytest.mark.parametrize(
    ("key", "accepted", "refused", "reason"),
    [
        ("convert_to_rgb", True, False, "RGB"),
        ("apply_augmentation", False, True, "deterministic"),
        ("enable_metadata_extraction", True, False, "include_metadata"),
    ],
)
def test_seed_preprocessing_keys_are_honoured_or_refused(key, accepted, refused, reason):
    load_settings({key: accepted})
    with pytest.raises(ConfigurationError, match=rf"{key}={refused}.*{reason}"):
        load_settings({key: refused})


def test_seed_keys_without_effect_say_so():
    with pytest.warns(UserWarning, match="temp_directory has no effect"):
        load_settings({"temp_directory": "./data/temp"})


def test_a_misspelt_environment_variable_warns(monkeypatch):
    monkeypatch.setenv("IMGEMBED_BATCHSIZE", "3")
    monkeypatch.setenv("IMGEMBED_BATCH_SIZE", "4")
    with pytest.warns(UserWarning, match=r"IMGEMBED_BATCHSIZE .*did you mean IMGEMBED_BATCH_SIZE"):
        settings = load_settings()
    assert settings.batch_size == 4
    monkeypatch.delenv("IMGEMBED_BATCHSIZE")  # said above: not again into the run's warnings
    monkeypatch.setenv("IMGEMBED_EMBEDDING_CACHE_DIR", "/x")  # two names are close: both said
    with pytest.warns(UserWarning, match="IMGEMBED_MODEL_CACHE_DIR or IMGEMBED_CACHE_DIR"):
        load_settings()


def test_known_environment_variables_do_not_warn(monkeypatch, recwarn):
    values = {"IMGEMBED_MODEL": "ViT-B-32", "IMGEMBED_CACHE": "1", "IMGEMBED_DEBUG": "1",
              "IMGEMBED_HNSW_EF_SEARCH": "40"}  # fmt: skip
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    load_settings()
    assert not [w for w in recwarn if "IMGEMBED_" in str(w.message)]


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


def test_a_bad_setting_is_named_by_its_variable(monkeypatch):
    """Not pydantic's own layout (with a link to a web page): the variable, why, the value."""
    monkeypatch.setenv("IMGEMBED_BATCH_SIZE", "-3")
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert str(caught.value) == (
        "invalid settings: IMGEMBED_BATCH_SIZE (batch_size): Input should be greater than 0 "
        "(given '-3')"
    )
    monkeypatch.delenv("IMGEMBED_BATCH_SIZE")
    # an empty variable (docker-compose's ${MODEL} unset) was a model named '' (exit 4)
    monkeypatch.setenv("IMGEMBED_MODEL", "")
    with pytest.raises(ConfigurationError, match=r"IMGEMBED_MODEL \(model\): .* \(given ''\)"):
        load_settings()
    monkeypatch.delenv("IMGEMBED_MODEL")
    with pytest.raises(ConfigurationError, match=r"IMGEMBED_PRETRAINED \(pretrained\)"):
        load_settings(pretrained="")
    # a folder given as the Qdrant server was looked up as a host name
    with pytest.raises(ConfigurationError, match=r"IMGEMBED_QDRANT_URL .* not a folder"):
        load_settings(store="qdrant", qdrant_url="/srv/qdrant")
    assert load_settings(qdrant_url="http://qdrant:6333").qdrant_url == "http://qdrant:6333"
    with pytest.raises(ConfigurationError, match=r"IMGEMBED_QDRANT_URL .* http://host:6333"):
        load_settings(qdrant_url="qdrant")
    assert load_settings(qdrant_url=" ").qdrant_url is None  # an empty variable: local files
    # a database URL that is none is a setting to fix (exit 3), not a store error; its value
    # (a password in it) is not repeated
    for url in ("notaurl", "mysql://user:secret@db/x"):
        with pytest.raises(ConfigurationError, match="IMGEMBED_DATABASE_URL") as caught:
            load_settings(database_url=url)
        assert "secret" not in str(caught.value) and "postgresql://user:password@" in str(
            caught.value
        )
    for url in ("postgresql://u@db/x", "postgres://db/x", "host=/run/pg dbname=x"):
        assert load_settings(database_url=url).database_url == url
    assert load_settings(database_url=" ").database_url is None
    # an empty root list refused every path; formats as the README's table shows them
    with pytest.raises(ConfigurationError, match=r"IMGEMBED_ALLOWED_ROOTS .* names no folder"):
        load_settings(allowed_roots="")
    assert load_settings(supported_formats="jpg png").supported_formats == [".jpg", ".png"]
    # model names keep their colon (a path list splits on it); empty: only the server's model
    models = load_settings(allowed_models="ViT-B-32, hf-hub:org/repo").allowed_models
    assert models == ["ViT-B-32", "hf-hub:org/repo"]
    assert load_settings(allowed_models="").allowed_models == []


@pytest.mark.parametrize("keys", [",", " ", ""])
def test_api_keys_set_to_no_key_are_refused_not_an_open_server(monkeypatch, keys):
    """IMGEMBED_API_KEYS="," became an empty list, which meant: no key needed."""
    from tests.cli import run

    monkeypatch.setenv("IMGEMBED_API_KEYS", keys)
    with pytest.raises(ConfigurationError, match=r"IMGEMBED_API_KEYS .* holds no key"):
        load_settings()
    served = run("serve", "--port", "0")
    assert served.returncode == 3 and "holds no key" in served.stderr
    monkeypatch.setenv("IMGEMBED_API_KEYS", "k1,,k2 ")
    assert [k.get_secret_value() for k in load_settings().api_keys] == ["k1", "k2"]
    # a blank key beside a real one matched "Authorization: Bearer " with no key at all
    given = load_settings(api_keys=["secret", "", " k3 "]).api_keys
    assert [k.get_secret_value() for k in given] == ["secret", "k3"]
    monkeypatch.delenv("IMGEMBED_API_KEYS")
    for port in ("99999", "-1"):  # was OverflowError's traceback from bind()
        refused = run("serve", "--port", port)
        assert refused.returncode == 2 and "--port" in refused.stderr
