"""Request and response bodies (pydantic), with the GenericRAG seed's field names."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Scalar = str | int | float | bool
# A field that names one thing: "" is a malformed request (422), not a file or collection
# that cannot be found.
Named = Annotated[str, Field(min_length=1)]


def _exactly_one(model: BaseModel, fields: tuple[str, ...], what: str) -> None:
    given = [name for name in fields if getattr(model, name) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one {what} ({', '.join(fields)}); got {len(given)}")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageSource(_Body):
    """One image: exactly one of a path (inside the server's allowed roots), an http(s)
    URL, or base64 (plain or a data URI)."""

    path: str | None = None
    url: str | None = None
    base64: str | None = None

    @model_validator(mode="after")
    def _one(self) -> ImageSource:
        _exactly_one(self, ("path", "url", "base64"), "source")
        return self


class _ImageOptions(_Body):
    include_metadata: bool = False
    extended: bool = Field(False, description="With metadata: camera, exposure, dates, GPS.")
    normalize: bool | None = Field(None, description="L2-normalise; default: the setting.")


class ImageRequest(_ImageOptions):
    """JSON, or multipart/form-data with the image as `file` and these fields as form fields."""

    image_path: Named | None = None
    image_url: Named | None = None
    image_base64: Named | None = None


class BatchRequest(_ImageOptions):
    """JSON with `image_paths` and/or `images`, or multipart/form-data with several files."""

    image_paths: list[str] = Field(default_factory=list)
    images: list[ImageSource] = Field(default_factory=list)


class EmbeddingResult(BaseModel):
    """The seed's ImageEmbeddingResult, plus `cached` and `error_type`."""

    image_path: str
    image_id: str | None
    embedding: list[float] | None
    model_name: str
    dimension: int
    normalized: bool
    processing_time: float
    cached: bool
    confidence: float | None
    metadata: dict[str, Any] | None = None
    error: str | None
    error_type: str | None


class BatchResponse(BaseModel):
    results: list[EmbeddingResult]
    successful: int
    failed: int
    model_name: str
    processing_time: float


class TextRequest(_Body):
    texts: list[str] = Field(min_length=1)


class TextResponse(BaseModel):
    embeddings: list[list[float]]
    dimension: int
    model_name: str
    normalized: bool
    processing_time: float


class SearchRequest(_Body):
    """A query (an image by path/url/base64 or upload, a text, or an indexed item's id) and
    either candidate images or a collection (with metadata filters)."""

    query_image_path: Named | None = None
    query_image_url: Named | None = None
    query_image_base64: Named | None = None
    query_text: str | None = None
    query_id: Named | None = Field(None, description="An item of the collection: more like this.")
    candidate_image_paths: list[str] | None = None
    candidate_images: list[ImageSource] | None = None
    collection: Named | None = None
    top_k: int = Field(5, ge=1, le=1000)
    filters: dict[str, Scalar] | None = None
    include_embeddings: bool = False

    @field_validator("filters", mode="before")
    @classmethod
    def _json_filters(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:  # a multipart field
            return json.loads(value)
        except RecursionError:
            raise ValueError("invalid JSON: nested too deeply") from None

    @model_validator(mode="after")
    def _candidates_or_collection(self) -> SearchRequest:
        candidates = self.candidate_image_paths is not None or self.candidate_images is not None
        if candidates and self.collection is not None:
            raise ValueError("give candidate images or a collection, not both")
        if candidates and not (self.candidate_image_paths or self.candidate_images):
            raise ValueError("no candidate images: give at least one, or a collection")
        if self.query_id is not None and candidates:
            raise ValueError("query_id names an item of a collection")
        return self

    @property
    def searches_candidates(self) -> bool:
        return self.candidate_image_paths is not None or self.candidate_images is not None


class SimilarityOut(BaseModel):
    """The seed's SimilarityResult."""

    image_path: str | int
    similarity_score: float
    rank: int
    embedding: list[float] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class FailedInput(BaseModel):
    image_path: str
    error: str
    error_type: str


class SearchResponse(BaseModel):
    results: list[SimilarityOut]
    failed: list[FailedInput] = Field(default_factory=list, description="Unusable candidates.")
    collection: str | None
    model_name: str
    processing_time: float


# -- OpenAI-compatible -----------------------------------------------------------------------


class OpenAIEmbeddingRequest(BaseModel):
    input: str | list[str] | list[int] | list[list[int]]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    modality: Literal["text", "image"] | None = Field(
        None, description="Not OpenAI's: force every input to text or image (default: http(s) "
        "URLs and data:image URIs are images, the rest texts).",
    )  # fmt: skip


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    dimension: int
    pretrained: str


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


# -- collections -----------------------------------------------------------------------------


class CollectionOut(BaseModel):
    name: str
    backend: str
    model: str
    pretrained: str
    dimension: int
    count: int | None
    has_text_tower: bool


class CollectionCreate(_Body):
    name: str = Field(min_length=1, max_length=200)
    model: str | None = Field(None, max_length=300, description="Default: the server's model.")
    pretrained: str | None = Field(None, max_length=4096)  # a tag, or a path (PATH_MAX)


class IndexItemIn(_Body):
    source: str
    id: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class IndexRequest(_Body):
    """`sources`: folders, files, http(s) URLs or list files (.txt/.csv/.jsonl), as for
    `imgembed index`; `items`: explicit sources with ids and metadata."""

    sources: list[str] = Field(default_factory=list)
    items: list[IndexItemIn] = Field(default_factory=list)
    prune: bool = False


class DeleteItems(_Body):
    ids: list[str] = Field(min_length=1)


class ProductsRequest(_Body):
    products: list[Any] = Field(  # a bad item, an object or not, is that item's error
        min_length=1,
        description="Flat objects (id, title, description, category, price, currency, "
        "image_url, extra_image_urls, attributes; the import's column names) or Shopify "
        "product objects; a bad one is reported by its position and skipped.",
    )
    embed: bool = Field(True, description="Then embed those that changed (a background job).")


class StoreEmbedRequest(_Body):
    mode: Literal["changed", "missing", "force"] = "changed"
    batch_size: int = Field(50, ge=1, le=1000)
    product_ids: list[str] | None = Field(
        None, min_length=1, description="Only these; default: the store."
    )


class ProductSearchRequest(_Body):
    """A text, an image (path, URL, base64 or an uploaded `file`), or both."""

    query: str | None = Field(None, description="Text, e.g. 'rode jurk'.")
    image_path: str | None = None
    image_url: str | None = None
    image_base64: str | None = None
    category: str | None = Field(None, description="Only this category (or its aliases).")
    max_price: float | None = Field(None, ge=0)
    top_k: int = Field(10, ge=1, le=200)

    @property
    def image_given(self) -> bool:
        return any(v is not None for v in (self.image_path, self.image_url, self.image_base64))
