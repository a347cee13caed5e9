"""Request and response bodies of the HTTP API, as pydantic models.

Three wire formats are served so that existing clients work unchanged:

* the Cohere / Jina shape (``/v1/rerank``, ``/v2/rerank``): ``documents`` in,
  ``results: [{index, relevance_score, document?}]``, ``usage`` and Cohere's ``meta`` out;
* the Infinity shape (``/rerank`` with ``documents``): the same request, ``document`` a
  string, ``usage`` with ``prompt_tokens`` (Infinity's ``ReRankResult``);
* the Hugging Face TEI shape (``/rerank`` with ``texts``, ``/predict``, ``/info``): a bare
  array ``[{index, score, text?}]`` out, errors as ``{"error", "error_type"}``.

Unknown request fields are ignored (clients send provider-specific options such as Cohere's
``priority``); a missing or mistyped known field is a 422 naming it. Every request may carry
``instruction``, a crossrank extension for decoder (LLM) rerankers (:class:`_Request`). Shapes follow the
providers' published schemas: Cohere's rerank reference, Infinity's ``infinity_client``
models, TEI's ``docs/openapi.json``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)
from pydantic_core import PydanticCustomError

PositiveInt = Annotated[int, Field(strict=True, gt=0)]
#: Document field values that ``rank_fields`` can rank over (serialised with ``str``).
_FIELD_VALUE = (str, int, float)


#: Longest ``instruction`` a request may carry, in characters: an instruction is a sentence
#: or two (Qwen3-Reranker's default has 75 characters); the served model's ``max_length``
#: bounds it in tokens too.
MAX_INSTRUCTION_CHARS = 4096


class _Request(BaseModel):
    """What every request body shares: unknown fields ignored, and the prompt instruction of
    a decoder (LLM) reranker."""

    model_config = ConfigDict(extra="ignore")

    instruction: str | None = Field(
        default=None,
        max_length=MAX_INSTRUCTION_CHARS,
        description="crossrank extension, decoder (LLM) rerankers only: the task instruction "
        "of this request's prompts (Qwen3-Reranker's '<Instruct>' line, "
        "bge-reranker-v2-gemma's prompt) instead of the served model's; at most "
        f"{MAX_INSTRUCTION_CHARS} characters. With an encoder cross-encoder, or when it leaves "
        "no room for the document within the model's max_length, the request is a 422.",
    )


class RerankRequest(_Request):
    """Cohere / Jina / Infinity rerank request."""

    model: str | None = Field(
        default=None, description="Accepted for compatibility; the served model answers."
    )
    query: str
    documents: list[str | dict[str, Any]] = Field(
        description="Strings, or objects: their 'text' is ranked, or with rank_fields the "
        "listed fields."
    )
    rank_fields: list[str] | None = Field(
        default=None,
        description="Cohere v1: rank object documents over these fields, in this order (one "
        "'field: value' line each, the YAML form Cohere recommends for structured data).",
    )
    top_n: PositiveInt | None = Field(
        default=None, description="Return only the best top_n results (all by default)."
    )
    return_documents: bool = Field(
        default=False, description="Include each document's text in its result."
    )
    max_tokens_per_doc: PositiveInt | None = Field(
        default=None, description="Cut each document to this many tokens before scoring."
    )
    return_raw_scores: bool = Field(
        default=False,
        description="crossrank extension: also return each result's raw logit as raw_score.",
    )
    raw_scores: bool = Field(
        default=False,
        description="Infinity: relevance_score is the raw logit instead of its sigmoid.",
    )

    @model_validator(mode="before")
    @classmethod
    def _check_documents(cls, value: Any) -> Any:
        """Name the first bad document instead of pydantic's per-union-member error list."""
        if not isinstance(value, dict) or "documents" not in value:
            return value  # pydantic reports the missing field or the wrong body type
        documents, fields = value["documents"], value.get("rank_fields")
        if not isinstance(documents, list):
            raise PydanticCustomError(
                "documents_type", "documents: must be a list of strings or objects"
            )
        if not (isinstance(fields, list) and fields and all(isinstance(f, str) for f in fields)):
            fields = None  # pydantic reports a malformed rank_fields
        for i, item in enumerate(documents):
            _check_document(i, item, fields)
        return value

    def texts(self) -> list[str]:
        """The text scored for each document, in request order."""
        return [_document_text(d, self.rank_fields) for d in self.documents]


def _check_document(index: int, item: Any, fields: list[str] | None) -> None:
    if isinstance(item, str):
        return
    if not isinstance(item, dict):
        raise PydanticCustomError(
            "document_type",
            "documents: item {index} must be a string or an object",
            {"index": index},
        )
    if fields is None:
        if not isinstance(item.get("text"), str):
            raise PydanticCustomError(
                "document_type",
                "documents: item {index} must be a string or an object with a string 'text' "
                "field (or send rank_fields naming the fields to rank over)",
                {"index": index},
            )
        return
    present = [f for f in fields if f in item]
    bad = [f for f in present if isinstance(item[f], bool) or not isinstance(item[f], _FIELD_VALUE)]
    if not present or bad:
        raise PydanticCustomError(
            "document_fields",
            "documents: item {index} must have at least one of rank_fields {fields}, each a "
            "string or a number",
            {"index": index, "fields": fields},
        )


def _document_text(document: str | dict[str, Any], fields: list[str] | None) -> str:
    """A document's scored text: a string as is; an object's ``text``; with ``rank_fields``,
    one listed field's value, or one ``field: value`` line per listed field present (the
    YAML form Cohere's rerank guide recommends for semi-structured documents)."""
    if isinstance(document, str):
        return document
    if fields is None:
        return str(document["text"])
    present = [f for f in fields if f in document]
    if len(present) == 1:
        return str(document[present[0]])
    return "\n".join(f"{f}: {document[f]}" for f in present)


class TEIRerankRequest(_Request):
    """Hugging Face text-embeddings-inference rerank request."""

    query: str
    texts: list[str]
    raw_scores: bool = Field(default=False, description="Return raw logits, not probabilities.")
    return_text: bool = Field(default=False, description="Include each text in its result.")
    truncate: bool | None = Field(
        default=None,
        description="crossrank truncates by default; false refuses (413) any pair longer than "
        "the model's max_length instead.",
    )
    truncation_direction: Literal["Right", "right", "Left", "left"] = Field(
        default="Right",
        description="Which end of a too long text is cut: Right keeps its start, Left its end.",
    )


class TEIPredictRequest(_Request):
    """Hugging Face TEI predict request: one (query, text) pair or a batch of pairs.

    crossrank scores pairs; TEI's single-text inputs are refused with a 422 naming them.
    """

    inputs: list[str] | list[list[str]] | str = Field(
        description="A pair [query, text], or a batch [[query, text], ...]."
    )
    raw_scores: bool = Field(default=False, description="Return raw logits, not probabilities.")
    truncate: bool | None = Field(default=None, description="crossrank always truncates.")
    truncation_direction: Literal["Right", "right", "Left", "left"] = Field(
        default="Right", description="Accepted; pairs are cut on the right."
    )

    def pairs(self) -> tuple[list[tuple[str, str]], bool]:
        """The pairs, and whether the input was a batch (answered as a list of lists)."""
        inputs = self.inputs
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], str)):
            return [_pair(inputs, "inputs")], False
        return [_pair(item, f"inputs[{i}]") for i, item in enumerate(inputs)], True


class PredictInputError(ValueError):
    """A /predict input that is not a (query, text) pair; the message names it."""


def _pair(item: Any, where: str) -> tuple[str, str]:
    if isinstance(item, list) and len(item) == 2 and all(isinstance(t, str) for t in item):
        return item[0], item[1]
    raise PredictInputError(
        f"{where} must be a [query, text] pair: crossrank scores pairs with a cross-encoder, "
        "single texts cannot be classified"
    )


def _body_kind(value: Any) -> str:
    return "tei" if isinstance(value, dict) and "texts" in value else "cohere"


AnyRerankRequest = Annotated[
    Annotated[TEIRerankRequest, Tag("tei")] | Annotated[RerankRequest, Tag("cohere")],
    Discriminator(_body_kind),
]
"""The body of ``POST /rerank``: TEI when it has ``texts``, Cohere/Jina otherwise."""


class DocumentText(BaseModel):
    """A returned document (Cohere, Jina): its text."""

    text: str


class RerankResultItem(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(
        description="Probability of relevance, in [0, 1] (the raw logit with raw_scores)."
    )
    raw_score: float | None = Field(
        default=None, description="Raw logit; only when return_raw_scores is true."
    )
    document: DocumentText | dict[str, Any] | None = Field(
        default=None,
        description="Only when return_documents is true: {'text': ...}, or the object sent.",
    )


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens the model computed (Infinity's key).")
    total_tokens: int = Field(
        description="Tokens the model computed (special tokens included; cache hits cost none)."
    )


class ApiVersion(BaseModel):
    version: str
    is_experimental: bool = False


class BilledUnits(BaseModel):
    search_units: int = Field(description="Cohere's unit: one query over up to 100 documents.")


class Meta(BaseModel):
    """Cohere's response ``meta``."""

    api_version: ApiVersion
    billed_units: BilledUnits


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResultItem] = Field(description="Best first.")
    usage: Usage
    meta: Meta


class InfinityRankItem(BaseModel):
    index: int
    relevance_score: float = Field(description="Sigmoid of the logit (the logit with raw_scores).")
    document: str | None = Field(default=None, description="Only when return_documents is true.")


class InfinityRerankResponse(BaseModel):
    """Infinity's ``ReRankResult`` (``/rerank`` with ``documents``)."""

    object: Literal["rerank"] = "rerank"
    id: str
    created: int
    model: str
    results: list[InfinityRankItem] = Field(description="Best first.")
    usage: Usage


class TEIRank(BaseModel):
    index: int
    score: float
    text: str | None = None


class TEIPrediction(BaseModel):
    score: float
    label: str


class TEIClassifier(BaseModel):
    id2label: dict[str, str]
    label2id: dict[str, int]


class TEIModelType(BaseModel):
    reranker: TEIClassifier


class TEIInfo(BaseModel):
    """TEI's ``GET /info``: what the served model is and the server's limits."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_type: TEIModelType
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_client_batch_size: int
    auto_truncate: bool = True
    tokenization_workers: int
    version: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "crossrank"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class InfinityModelCard(BaseModel):
    """Infinity's ``ModelInfo`` (its ``owned_by`` is an enum, so it is left out)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    backend: str = "crossrank"
    capabilities: list[str] = ["rerank"]
    stats: dict[str, Any] = {}


class InfinityModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[InfinityModelCard]


class ErrorBody(BaseModel):
    """Every error off the TEI routes: ``message`` (Cohere's key) and ``detail`` (FastAPI's
    and Jina's key)."""

    message: str
    detail: Any


class TEIErrorBody(BaseModel):
    """An error on a TEI route: TEI's ``error`` and ``error_type`` (lower case, as TEI sends
    them), plus ``message`` and ``detail`` as on every other route."""

    error: str
    error_type: Literal["validation", "tokenizer", "backend", "overloaded", "unhealthy"]
    message: str
    detail: Any
