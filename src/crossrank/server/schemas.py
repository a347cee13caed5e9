"""Request and response bodies of the HTTP API, as pydantic models.

Two wire formats are served so that existing clients work unchanged:

* the Cohere / Jina shape (``/v1/rerank``, ``/v2/rerank`` and ``/rerank``): ``documents``
  in, ``results: [{index, relevance_score, document?}]`` out;
* the Hugging Face TEI shape (``/rerank`` with ``texts``): a bare array
  ``[{index, score, text?}]`` out.

Unknown request fields are ignored (clients send provider-specific options such as Cohere's
``priority``); a missing or mistyped known field is a 422 naming it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator
from pydantic_core import PydanticCustomError

PositiveInt = Annotated[int, Field(strict=True, gt=0)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class DocumentText(BaseModel):
    """A document given as an object (Jina, Cohere v1); only ``text`` is read."""

    model_config = ConfigDict(extra="ignore")
    text: str


class RerankRequest(_Request):
    """Cohere / Jina rerank request."""

    model: str | None = Field(
        default=None, description="Accepted for compatibility; the served model answers."
    )
    query: str
    documents: list[str | DocumentText]
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

    @field_validator("documents", mode="before")
    @classmethod
    def _check_documents(cls, value: Any) -> Any:
        """Name the first bad document instead of pydantic's per-union-member error list."""
        if not isinstance(value, list):
            raise PydanticCustomError(
                "documents_type", "must be a list of strings or {'text': string} objects"
            )
        for i, item in enumerate(value):
            ok = isinstance(item, str) or (
                isinstance(item, dict) and isinstance(item.get("text"), str)
            )
            if not ok:
                raise PydanticCustomError(
                    "document_type",
                    "item {index} must be a string or an object with a string 'text' field",
                    {"index": i},
                )
        return value

    def texts(self) -> list[str]:
        """The documents as plain strings, in request order."""
        return [d if isinstance(d, str) else d.text for d in self.documents]


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
    truncation_direction: Literal["Right", "right"] = Field(
        default="Right", description="Only right truncation is supported."
    )


def _body_kind(value: Any) -> str:
    return "tei" if isinstance(value, dict) and "texts" in value else "cohere"


AnyRerankRequest = Annotated[
    Annotated[TEIRerankRequest, Tag("tei")] | Annotated[RerankRequest, Tag("cohere")],
    Discriminator(_body_kind),
]
"""The body of ``POST /rerank``: TEI when it has ``texts``, Cohere/Jina otherwise."""


class RerankResultItem(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(description="Probability of relevance, in [0, 1].")
    raw_score: float | None = Field(
        default=None, description="Raw logit; only when return_raw_scores is true."
    )
    document: DocumentText | None = Field(
        default=None, description="Only when return_documents is true."
    )


class Usage(BaseModel):
    total_tokens: int = Field(description="Tokens scored (pair tokens, special tokens included).")


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResultItem] = Field(description="Best first.")
    usage: Usage


class TEIRank(BaseModel):
    index: int
    score: float
    text: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "crossrank"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    """Every error: ``message`` (Cohere's key) and ``detail`` (FastAPI's and Jina's key)."""

    message: str
    detail: Any
