"""Request bodies and image sources, under the server's security defaults:

- local paths are refused unless IMGEMBED_ALLOWED_ROOTS is set, and then only inside them
  (the service itself gets an empty root list, so nothing it is handed reads the disk);
- URLs must be http(s) and keep the intake's SSRF rules (no private addresses by default);
- base64 and uploads are held to the per-image size limit, bodies to IMGEMBED_MAX_BODY_SIZE,
  and the number of inputs per request to IMGEMBED_MAX_BATCH_INPUTS (413 beyond).

A route takes JSON, or multipart/form-data (uploads plus the same fields as form fields)."""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from imgembed.api.errors import is_json, not_json
from imgembed.api.schemas import ImageSource
from imgembed.config import Settings
from imgembed.engine.batcher import Batcher
from imgembed.errors import (
    ConfigurationError,
    ImageTooLargeError,
    ImgEmbedError,
    RequestTooLargeError,
    SourceNotAllowedError,
)
from imgembed.intake.image_input import Input
from imgembed.intake.sources import as_path, check_allowed, decode_base64, is_url
from imgembed.names import printable
from imgembed.results import ImageEmbeddingResult

M = TypeVar("M", bound=BaseModel)


def server_settings(settings: Settings) -> Settings:
    """The service's settings behind a server: no allowed roots means no local paths; ones
    that cannot work together are a ConfigurationError."""
    if settings.queue_size < settings.max_batch_inputs:
        raise ConfigurationError(
            f"IMGEMBED_QUEUE_SIZE={settings.queue_size} is under IMGEMBED_MAX_BATCH_INPUTS="
            f"{settings.max_batch_inputs}: a request of as many inputs as allowed would never "
            "be admitted"
        )
    if settings.allowed_roots is None:
        return settings.model_copy(update={"allowed_roots": []})
    return settings


def local_path(path: str, settings: Settings) -> Path:
    """A path inside the allowed roots (resolved), or SourceNotAllowedError. A path field
    is never fetched: an http(s) URL there is refused, naming the fields for URLs."""
    if is_url(path):
        raise SourceNotAllowedError(
            "a URL where a local path is asked for: send URLs as image_url or "
            'query_image_url, or as {"url": ...} in images or candidate_images',
            path[:200],
        )
    if not settings.allowed_roots:
        raise SourceNotAllowedError(
            "this server reads no local paths; its operator can allow folders with "
            "IMGEMBED_ALLOWED_ROOTS",
            path,
        )
    roots = [Path(root).resolve() for root in settings.allowed_roots]
    return check_allowed(as_path(path), roots)


def path_source(path: str, settings: Settings) -> Input:
    local_path(path, settings)
    return Path(path)  # never fetched as a URL; the intake checks the roots again on reading


def url_source(url: str) -> Input:
    if not is_url(url):
        raise SourceNotAllowedError("only http(s) URLs are fetched", url[:100])
    return url


def base64_source(text: str, settings: Settings) -> Input:
    return decode_base64(text, settings.max_file_size)


def image_source(
    settings: Settings, path: str | None, url: str | None, base64: str | None
) -> Input:
    """Exactly one of the three, as an input for the engine."""
    if path is not None:
        return path_source(path, settings)
    if url is not None:
        return url_source(url)
    assert base64 is not None
    return base64_source(base64, settings)


async def one_image(
    uploads: list[UploadFile], given: tuple[str | None, str | None, str | None], settings: Settings
) -> tuple[Input, str | None]:
    """The uploaded file, else the one of (path, url, base64) given, with its label."""
    if uploads:
        return await read_upload(uploads[0], settings)
    return await asyncio.to_thread(image_source, settings, *given), None


def sources_or_errors(
    settings: Settings, paths: list[str], images: list[ImageSource]
) -> tuple[list[Input | ImgEmbedError], list[str]]:
    """Each listed input as an engine input, or the error that refuses it (that input only),
    with labels for the results. Blocking (paths are resolved): call it in a thread."""
    sources: list[Input | ImgEmbedError] = []
    for path, url, data in [(p, None, None) for p in paths] + [
        (i.path, i.url, i.base64) for i in images
    ]:
        try:
            sources.append(image_source(settings, path, url, data))
        except ImgEmbedError as exc:
            sources.append(exc)
    numbered = enumerate(images, len(paths))
    labels = [*paths, *(i.path or i.url or f"<input {n}>" for n, i in numbered)]
    # labels name the inputs in the results: as valid UTF-8 ("\\ud800" sent as JSON is a
    # lone surrogate, which the response could not hold)
    return sources, [printable(label) for label in labels]


async def embed_inputs(
    batcher: Batcher,
    sources: list[Input | ImgEmbedError],
    labels: list[str],
    *,
    extended: bool = False,
    normalize: bool | None = None,
) -> list[ImageEmbeddingResult]:
    """Results in input order; inputs refused before embedding keep their error."""
    todo = [n for n, source in enumerate(sources) if not isinstance(source, ImgEmbedError)]
    embedded = await batcher.embed_images(
        [sources[n] for n in todo],  # type: ignore[misc]
        labels=[labels[n] for n in todo],
        extended=extended,
        normalize=normalize,
    )
    results = [
        batcher.failed_result(labels[n], source) if isinstance(source, ImgEmbedError) else None
        for n, source in enumerate(sources)
    ]
    for n, result in zip(todo, embedded, strict=True):
        results[n] = result
    return results  # type: ignore[return-value]


def invalid_body(message: str) -> RequestValidationError:
    """Fields that are each valid but do not fit together: a ValidationError (422) like
    pydantic's own refusals; ConfigurationError is kept for models and settings."""
    return RequestValidationError([{"loc": ("body",), "msg": message, "type": "value_error"}])


def check_count(count: int, settings: Settings) -> None:
    if count > settings.max_batch_inputs:
        raise RequestTooLargeError(
            f"{count} inputs in one request; at most {settings.max_batch_inputs} "
            "(IMGEMBED_MAX_BATCH_INPUTS)"
        )


async def read_upload(upload: UploadFile, settings: Settings) -> tuple[bytes, str]:
    """An uploaded file's bytes (within the per-image limit) and its name."""
    name = upload.filename or "upload"
    data = await upload.read(settings.max_file_size + 1)
    if len(data) > settings.max_file_size:
        raise ImageTooLargeError(
            f"over the limit of {settings.max_file_size:,} bytes (max_file_size)", name
        )
    return data, name


async def parse_body(
    request: Request, model: type[M], settings: Settings, uploads_as: str
) -> tuple[M, list[UploadFile]]:
    """The body as `model`, from JSON or from multipart form fields, plus the files uploaded
    as the form field `uploads_as` (a file under another name is refused, as an unknown
    field is). Large JSON bodies (base64 images) are parsed in a thread, off the event loop."""
    uploads: list[UploadFile] = []
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await _form(request, settings)
        fields: dict[str, list[str]] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile) and key != uploads_as:
                raise RequestValidationError([{
                    "loc": ("body", key), "type": "extra_forbidden",
                    "msg": f"a file under an unknown name: upload it as {uploads_as!r}",
                }])  # fmt: skip
            if isinstance(value, UploadFile):
                uploads.append(value)
            else:
                fields.setdefault(key, []).append(value)
        return _validate(model, _form_data(model, fields)), uploads
    if not is_json(request):
        raise not_json(request, multipart=True)
    raw = await request.body()
    if len(raw) > LARGE_BODY:
        return await asyncio.to_thread(_parse_json, model, raw), uploads
    return _parse_json(model, raw), uploads


LARGE_BODY = 256 * 1024
MAX_FORM_FIELDS = 1000  # Starlette's default: form fields other than files


class _WholeForm(MultiPartParser):
    """Starlette's streaming form parser, which also tells whether the form reached its
    closing boundary: python-multipart ends a body cut short without a word, and the part it
    was in (a file half sent) is dropped, so the form would seem to hold no file."""

    ended = False

    def on_end(self) -> None:
        self.ended = True


async def _form(request: Request, settings: Settings) -> FormData:
    limit = settings.max_batch_inputs
    try:  # one file more than allowed, so that the route names the count it refuses
        async with aclosing(request.stream()) as stream:
            parser = _WholeForm(
                request.headers, stream, max_files=limit + 1, max_fields=MAX_FORM_FIELDS
            )
            form = await parser.parse()
    except MultiPartException as exc:  # Starlette's words for a form over its limits
        detail = exc.message
        if detail.startswith("Too many files"):
            raise RequestTooLargeError(
                f"more than {limit + 1:,} files in one request, over the limit of {limit:,} "
                "inputs (IMGEMBED_MAX_BATCH_INPUTS)"
            ) from None
        if detail.startswith("Too many fields"):
            raise RequestTooLargeError(
                f"more than {MAX_FORM_FIELDS:,} form fields in one request"
            ) from None
        raise RequestValidationError(  # a malformed form: no boundary, a part without a name
            [{"loc": ("body",), "msg": f"invalid form: {detail}", "type": "form_invalid"}]
        ) from None
    if not parser.ended:
        await form.close()
        boundary = parse_options_header(request.headers["content-type"])[1].get(b"boundary", b"")
        closing = f"--{boundary.decode('latin-1')}--"
        raise RequestValidationError([{
            "loc": ("body",), "type": "form_incomplete",
            "msg": f"invalid form: it ended before its closing boundary ({closing}): the "
            "body was cut short, so its last part (a file?) is incomplete; send it whole",
        }])  # fmt: skip
    return form


def _form_data(model: type[BaseModel], fields: dict[str, list[str]]) -> dict[str, Any]:
    """Form fields as the model's values: a list field takes the field repeated or one JSON
    array (items that are objects as JSON), a dict field a JSON object, any other the last
    value given."""
    data: dict[str, Any] = {}
    for key, values in fields.items():
        info = model.model_fields.get(key)
        shape = _shape(info.annotation) if info else None
        if shape is list:
            whole = _json(values[0], "[") if len(values) == 1 else None
            data[key] = whole if isinstance(whole, list) else [_json(v, "{") for v in values]
        elif shape is dict:
            parsed = _json(values[-1], "{")
            if not isinstance(parsed, dict):
                raise RequestValidationError([{
                    "loc": ("body", key), "type": "dict_type",
                    "msg": 'a JSON object in a form field, e.g. {"category": "fashion"}',
                }])  # fmt: skip
            data[key] = parsed
        else:
            data[key] = values[-1]
    return data


def _shape(annotation: Any) -> type | None:
    """list or dict if the annotation is one (or one of a union's members)."""
    for candidate in (annotation, *get_args(annotation)):
        origin = get_origin(candidate) or candidate
        if origin in (list, dict):
            return origin
    return None


def _json(text: str, opener: str) -> Any:
    """`text` parsed when it is JSON that starts with `opener`, otherwise itself."""
    if not text.lstrip().startswith(opener):
        return text
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested too deeply: left as text
        return text


def _parse_json(model: type[M], raw: bytes) -> M:
    try:
        data = json.loads(raw) if raw else {}
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        reason = exc if isinstance(exc, ValueError) else "nested too deeply"
        raise RequestValidationError(
            [{"loc": ("body",), "msg": f"invalid JSON: {reason}", "type": "json_invalid"}]
        ) from None
    return _validate(model, data)


def _validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors) from exc


def body_spec(model: type[BaseModel], uploads: str) -> dict[str, Any]:
    """OpenAPI for a body given as JSON or as multipart with file uploads."""
    schema = _inline(model.model_json_schema())
    form = {
        "type": "object",
        "properties": {
            **schema.get("properties", {}),
            uploads: {"type": "array", "items": {"type": "string", "format": "binary"}},
        },
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema},
                "multipart/form-data": {"schema": form},
            },
        }
    }


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """Replace local `$defs` references by the definitions (the models are not recursive)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)
