"""Settings: built once (from the environment, keyword arguments or a seed-style dict) and
passed in. Environment variables use the prefix IMGEMBED_; the GenericRAG seed's
CLIP_MODEL_NAME and CLIP_DIMENSION are accepted as aliases."""

from __future__ import annotations

import difflib
import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import platformdirs
from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from imgembed.errors import ConfigurationError, DataDirError

DEFAULT_FORMATS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif",
    ".heic", ".heif", ".avif", ".mpo",
)  # fmt: skip


def _env(name: str, *aliases: str) -> AliasChoices:
    # A validation_alias replaces the env prefix, so the prefixed name is listed explicitly.
    return AliasChoices(name, f"IMGEMBED_{name.upper()}", *aliases)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="IMGEMBED_",
        populate_by_name=True,
        protected_namespaces=(),
        extra="forbid",
        frozen=True,  # built once and passed in; derive variants with model_copy(update=...)
    )

    model: str = Field("ViT-B-32", min_length=1, validation_alias=_env("model", "CLIP_MODEL_NAME"))
    pretrained: str = Field("openai", min_length=1, validation_alias=_env("pretrained"))
    dimension: int | None = Field(None, validation_alias=_env("dimension", "CLIP_DIMENSION"))
    device: str = Field("auto", validation_alias=_env("device"))
    # "auto": chosen per CPU class when the encoder is made (models/auto.py).
    runtime: Literal["torch", "onnx", "auto"] = Field("torch", validation_alias=_env("runtime"))
    precision: Literal["fp32", "fp16", "bf16", "int8", "auto"] = Field(
        "fp32", validation_alias=_env("precision")
    )
    batch_size: int = Field(32, gt=0, validation_alias=_env("batch_size"))
    max_workers: int | None = Field(None, gt=0, validation_alias=_env("max_workers"))
    normalize: bool = Field(True, validation_alias=_env("normalize"))
    exact: bool = Field(False, validation_alias=_env("exact"))
    cache_embeddings: bool = Field(
        True, validation_alias=_env("cache_embeddings", "IMGEMBED_CACHE")
    )
    data_dir: Path = Field(
        default_factory=lambda: platformdirs.user_data_path("imgembed"),
        validation_alias=_env("data_dir"),
    )
    cache_dir: Path | None = Field(None, validation_alias=_env("cache_dir"))
    model_cache_dir: Path | None = Field(None, validation_alias=_env("model_cache_dir"))
    max_file_size: int = Field(10 * 1024 * 1024, gt=0, validation_alias=_env("max_file_size"))
    max_image_pixels: int = Field(100_000_000, gt=0, validation_alias=_env("max_image_pixels"))
    max_image_size: int = Field(30_000, gt=0, validation_alias=_env("max_image_size"))
    min_image_size: int = Field(32, gt=0, validation_alias=_env("min_image_size"))
    supported_formats: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_FORMATS), validation_alias=_env("supported_formats")
    )
    allowed_roots: Annotated[list[Path] | None, NoDecode] = Field(
        None, validation_alias=_env("allowed_roots")
    )
    # Models a client may name for a new collection over HTTP besides the server's own (each
    # a download and the RAM of one more model); None: any known model.
    allowed_models: Annotated[list[str] | None, NoDecode] = Field(
        None, validation_alias=_env("allowed_models")
    )
    allow_private_urls: bool = Field(False, validation_alias=_env("allow_private_urls"))
    fetch_timeout: float = Field(30.0, gt=0, validation_alias=_env("fetch_timeout"))
    fetch_deadline: float | None = Field(None, gt=0, validation_alias=_env("fetch_deadline"))
    retry_attempts: int = Field(3, ge=1, validation_alias=_env("retry_attempts"))
    retry_delay: float = Field(1.0, ge=0, validation_alias=_env("retry_delay"))
    max_concurrent_fetches: int = Field(8, gt=0, validation_alias=_env("max_concurrent_fetches"))
    quality_threshold: float = Field(0.5, ge=0, le=1, validation_alias=_env("quality_threshold"))
    store: Literal["postgres", "qdrant"] = Field("postgres", validation_alias=_env("store"))
    database_url: str | None = Field(None, validation_alias=_env("database_url"))
    qdrant_url: str | None = Field(None, validation_alias=_env("qdrant_url"))
    qdrant_api_key: str | None = Field(None, validation_alias=_env("qdrant_api_key"))
    # How long each call to a Qdrant server waits for its whole answer (tried once more).
    qdrant_timeout: float = Field(30.0, gt=0, validation_alias=_env("qdrant_timeout"))
    collection: str = Field("images", min_length=1, validation_alias=_env("collection"))
    hnsw_ef_search: int = Field(100, ge=10, le=1000, validation_alias=_env("hnsw_ef_search"))
    # A run storing at least this many new items into a new collection, or one it grows by
    # half or more, builds the HNSW index after the load (Postgres; 0: never).
    defer_index_min: int = Field(5000, ge=0, validation_alias=_env("defer_index_min"))
    # How long a call waits for a PostgreSQL that went away (the embedded one started again)
    # before its StoreUnavailableError: long enough for a restart and its crash recovery.
    db_reconnect_timeout: float = Field(30.0, gt=0, validation_alias=_env("db_reconnect_timeout"))
    # The seed's `image_size`: the model's input size decides; a different value is refused.
    image_size: int | None = Field(None, gt=0, validation_alias=_env("image_size"))
    # The seed's `debug`: results carry metadata["debug_logs"] (timestamped steps).
    debug: bool = Field(False, validation_alias=_env("debug"))
    # The HTTP service (imgembed serve) and its dynamic batcher.
    batch_wait_ms: float = Field(5.0, ge=0, validation_alias=_env("batch_wait_ms"))
    queue_size: int = Field(1024, gt=0, validation_alias=_env("queue_size"))
    max_body_size: int = Field(25 * 1024 * 1024, gt=0, validation_alias=_env("max_body_size"))
    max_batch_inputs: int = Field(256, gt=0, validation_alias=_env("max_batch_inputs"))
    # On SIGTERM the server waits this long for requests in flight, then answers them 503.
    shutdown_timeout: float = Field(30.0, ge=0, validation_alias=_env("shutdown_timeout"))
    api_keys: Annotated[list[SecretStr] | None, NoDecode] = Field(
        None, validation_alias=_env("api_keys")
    )
    cors_origins: Annotated[list[str] | None, NoDecode] = Field(
        None, validation_alias=_env("cors_origins")
    )
    # The product catalogue (imgembed.catalog): its text embedder and category weights.
    text_model: str = Field("minilm", min_length=1, validation_alias=_env("text_model"))
    text_api_base: str | None = Field(
        None, validation_alias=_env("text_api_base", "OPENAI_BASE_URL")
    )
    openai_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("openai_api_key", "OPENAI_API_KEY")
    )
    ollama_url: str = Field(
        "http://localhost:11434", validation_alias=_env("ollama_url", "CLIP_OLLAMA_ENDPOINT")
    )
    text_timeout: float = Field(30.0, gt=0, validation_alias=_env("text_timeout"))
    text_retries: int = Field(3, ge=0, validation_alias=_env("text_retries"))
    text_batch_size: int = Field(128, gt=0, validation_alias=_env("text_batch_size"))
    category_weights: Path | None = Field(None, validation_alias=_env("category_weights"))
    # Ray (imgembed.distributed): encoder actors (default: half the cluster's CPUs, or one
    # per GPU) and the CPUs each one reserves (its torch/ONNX threads).
    ray_actors: int | None = Field(None, gt=0, validation_alias=_env("ray_actors"))
    ray_actor_cpus: float = Field(1.0, gt=0, validation_alias=_env("ray_actor_cpus"))

    @field_validator("supported_formats", "allowed_roots", "allowed_models", mode="before")
    @classmethod
    def _split_list(cls, value: Any, info: ValidationInfo) -> Any:
        """Lists from the environment: JSON, or separated by commas or the path separator
        (formats also by spaces, as the README's table shows them)."""
        if not isinstance(value, str):
            return value
        if value.strip().startswith("["):
            parts = json.loads(value)
        else:
            if info.field_name == "allowed_roots":  # model names may hold a colon (hf-hub:)
                value = value.replace(os.pathsep, ",")
            if info.field_name == "supported_formats":
                value = ",".join(value.split())
            parts = [part.strip() for part in value.split(",") if part.strip()]
        # A variable set but naming no folder is refused, not every path refused. A list
        # given as one ([]) means what it says, no local path: a server's own settings say
        # so, and settings derived from them are validated again (a store's models).
        if info.field_name == "allowed_roots" and parts == []:
            raise ValueError(
                "is set but names no folder: give at least one, or unset it to allow any path"
            )
        return parts

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.strip().startswith(("postgresql://", "postgres://")) and "=" not in value:
            raise ValueError(
                "names a PostgreSQL server: postgresql://user:password@host:5432/dbname (or "
                "libpq's host=... dbname=...)"
            )
        return value.strip()

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        """Keys and origins from the environment: separated by commas (origins hold colons)."""
        if not isinstance(value, str):
            return value
        return [part.strip() for part in value.split(",") if part.strip()]

    @field_validator("api_keys")
    @classmethod
    def _some_key(cls, value: list[SecretStr] | None) -> list[SecretStr] | None:
        """Blank keys dropped (one would let in "Authorization: Bearer " with no key); set
        but with no key left (" ", ","): refused, not a server open to all, unasked."""
        if value is None:
            return None
        keys = [SecretStr(k.get_secret_value().strip()) for k in value]
        keys = [k for k in keys if k.get_secret_value()]
        if not keys:
            raise ValueError(
                "is set but holds no key: give at least one, or unset it to serve without keys"
            )
        return keys

    @field_validator("qdrant_url")
    @classmethod
    def _server_not_folder(cls, value: str | None) -> str | None:
        """A path here was taken for a host name ("Name or service not known")."""
        if value is None or not value.strip():  # an empty variable: local files
            return None
        if value.strip().startswith(("/", ".", "~", "file:")):
            raise ValueError(
                "names a Qdrant server (http://host:6333), not a folder: Qdrant's local files "
                "live in the data directory (IMGEMBED_DATA_DIR/qdrant) when it is not set"
            )
        if not value.strip().startswith(("http://", "https://")):
            raise ValueError("names a Qdrant server: http://host:6333 or https://...")
        return value.strip()

    @field_validator("supported_formats")
    @classmethod
    def _dotted_lowercase(cls, value: list[str]) -> list[str]:
        return [f".{v.lower().lstrip('.')}" for v in value]

    @property
    def embedding_cache_dir(self) -> Path:
        return self.cache_dir or self.data_dir / "cache"

    @property
    def workers(self) -> int:
        return self.max_workers or cores()

    @property
    def encode_threads(self) -> int:
        return cores()

    @property
    def onnx_dir(self) -> Path:
        """Where ONNX exports live: next to the model weights if that is set."""
        return (self.model_cache_dir or self.data_dir) / "onnx"


def cores() -> int:
    """CPUs this process may use (a container's or taskset's limit, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# The GenericRAG seed's CLIP_CONFIG keys. Mapped ones become settings; the others describe
# what imgembed always does, so their value is checked rather than silently ignored.
_SEED_KEYS = {
    "model_name": "model",
    "dimension": "dimension",
    "batch_size": "batch_size",
    "normalize_embeddings": "normalize",
    "normalize": "normalize",
    "cache_embeddings": "cache_embeddings",
    "cache_directory": "cache_dir",
    "max_workers": "max_workers",
    "max_file_size": "max_file_size",
    "max_image_size": "max_image_size",
    "min_image_size": "min_image_size",
    "supported_formats": "supported_formats",
    "quality_threshold": "quality_threshold",
    "timeout": "fetch_timeout",
    "retry_attempts": "retry_attempts",
    "retry_delay": "retry_delay",
    "image_size": "image_size",
    "debug": "debug",
    "ollama_endpoint": "ollama_url",
}
# Keys whose only possible value is what imgembed does anyway: that value is accepted, any
# other is refused with the reason.
_SEED_FIXED = {
    "convert_to_rgb": (True, "every image is converted to RGB: the model takes RGB input"),
    "apply_augmentation": (False, "embeddings must be deterministic, so nothing is augmented"),
    "enable_metadata_extraction": (
        True,
        "metadata is read from the image header at no cost; results show it with "
        "include_metadata=True",
    ),
}
_SEED_KEYS_WITHOUT_EFFECT = {
    "temp_directory": "imgembed keeps downloads and decoded images in memory",
}


def translate_seed_config(config: dict[str, Any]) -> dict[str, Any]:
    """Turn a seed-style config dict (or our own field names) into Settings keyword arguments."""
    out: dict[str, Any] = {}
    use_gpu = config.get("use_gpu")
    gpu_device = config.get("gpu_device")
    for key, value in config.items():
        if key in ("use_gpu", "gpu_device"):
            continue
        if key in _SEED_FIXED:
            expected, reason = _SEED_FIXED[key]
            if bool(value) != expected:
                raise ConfigurationError(f"{key}={value!r} cannot be honoured: {reason}")
            continue
        if key in _SEED_KEYS_WITHOUT_EFFECT:
            warnings.warn(
                f"{key} has no effect: {_SEED_KEYS_WITHOUT_EFFECT[key]}", UserWarning, stacklevel=3
            )
            continue
        if key == "parallel_processing":
            if not value:
                out["max_workers"] = 1
            continue
        if key in _SEED_KEYS:
            out[_SEED_KEYS[key]] = value
        elif key in Settings.model_fields:
            out[key] = value
        else:
            raise ConfigurationError(f"unknown setting {key!r}{_closest_key(key)}")
    if use_gpu is False:
        out["device"] = "cpu"
    elif gpu_device:
        out["device"] = gpu_device
    return out


def _closest_key(key: str) -> str:
    """' (did you mean ...?)' for a misspelt seed key or setting name, else ''."""
    known = [*_SEED_KEYS, *_SEED_FIXED, *_SEED_KEYS_WITHOUT_EFFECT, *Settings.model_fields]
    known += ["use_gpu", "gpu_device", "parallel_processing"]
    close = difflib.get_close_matches(str(key), known, n=2)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


# Read by `imgembed serve` (uvicorn's own options) and by the embedded PostgreSQL
# (store/embedded.py), not settings of the library.
_SERVER_ENVIRONMENT = {
    "IMGEMBED_HOST",
    "IMGEMBED_PORT",
    "IMGEMBED_WORKERS",
    "IMGEMBED_PGDATA_TEMPLATE",
}


def _known_environment_names() -> set[str]:
    names = set(_SERVER_ENVIRONMENT)
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(
                a for a in alias.choices if isinstance(a, str) and a.startswith("IMGEMBED_")
            )
    return names


def warn_unknown_environment(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Warn about IMGEMBED_* variables that are no setting (a typo would otherwise be
    ignored silently); returns them."""
    known = _known_environment_names()
    unknown = sorted(k for k in environ if k.startswith("IMGEMBED_") and k not in known)
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        warnings.warn(
            f"{name} is not an imgembed setting{hint}; it is ignored", UserWarning, stacklevel=2
        )
    return unknown


def load_settings(config: Settings | dict[str, Any] | None = None, **overrides: Any) -> Settings:
    """Settings from a Settings object, a seed-style dict and/or keyword overrides; fields not
    given come from the environment."""
    if isinstance(config, Settings):
        if not overrides:
            return config
        base = config.model_dump(exclude_unset=True)
    else:
        base = translate_seed_config(config or {})
    base.update(translate_seed_config(overrides))
    warn_unknown_environment()
    try:
        return Settings(**base)
    except ValidationError as exc:
        raise ConfigurationError(f"invalid settings: {_problems(exc)}") from exc


_SECRET = {"database_url", "qdrant_api_key", "api_keys", "openai_api_key"}


def _problems(exc: ValidationError) -> str:
    """Each bad setting by its variable's name, with pydantic's reason and the value given
    (not pydantic's own layout, with its link to a web page)."""
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]  # field validators only: never empty
        reason = error["msg"].removeprefix("Value error, ")
        name = ".".join(loc)
        given = "" if loc[0] in _SECRET else f" (given {error['input']!r})"  # passwords
        problems.append(f"IMGEMBED_{loc[0].upper()} ({name}): {reason}{given}")
    return "; ".join(problems)


def make_data_dir(folder: Path) -> Path:
    """Create the data directory. A file in the way or a folder this user cannot write is
    a setting to fix, said as such (it read as a database that failed to start)."""
    folder = Path(folder).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        check_data_dir(folder)
        raise _file_in_the_way(folder, folder) from exc
    except PermissionError as exc:
        raise DataDirError(_unwritable(folder, exc.filename)) from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataDirError(_unwritable(folder, folder))
    return folder


def check_data_dir(folder: Path) -> None:
    """A DataDirError if a file stands where the data directory or a folder above it
    belongs (creates nothing: for commands that only look)."""
    folder = Path(folder).expanduser().resolve()  # (resolved: no links left in the path)
    files = (p for p in (folder, *folder.parents) if p.exists() and not p.is_dir())
    in_the_way = next(files, None)
    if in_the_way is not None:
        raise _file_in_the_way(folder, in_the_way)


def _file_in_the_way(folder: Path, in_the_way: Path) -> DataDirError:
    return DataDirError(
        f"the data directory {folder} (IMGEMBED_DATA_DIR) cannot be made: {in_the_way} is "
        "a file; set IMGEMBED_DATA_DIR to a folder"
    )


def _unwritable(folder: Path, where: Any) -> str:
    return (
        f"the data directory {folder} (IMGEMBED_DATA_DIR) cannot be written by this user "
        f"(permission denied at {where}); set IMGEMBED_DATA_DIR to a folder you can write"
    )


_RAY_ADDRESS = re.compile(r"^(ray://)?[\w.\-\[\]:]+:\d+$")


def check_ray_address(address: str | None) -> str:
    """ "local", "auto" or a cluster address; anything else is a ConfigurationError. Here,
    not beside Ray: the command line checks `--ray` while it reads its arguments (Ray not
    imported), before a path taken for the address leaves the sources missing."""
    if address is None or address == "local":
        return "local"
    if address == "auto" or _RAY_ADDRESS.match(address):
        return address
    raise ConfigurationError(
        f"--ray takes local, auto or a cluster address (host:port, ray://host:10001), not "
        f"{address!r}; with no address, put --ray after the sources or write --ray=local"
    )
