"""Response bodies built from scores: the Cohere/Jina, Infinity and TEI shapes.

Every text a response echoes is scrubbed of lone UTF-16 surrogates first (they become
U+FFFD, exactly what was scored): a surrogate can arrive in a JSON string (``"\\ud800"``) but
cannot be encoded as UTF-8, and echoing it made every route answer 500 (issue 13, fault 2).
:class:`SafeJSONResponse` applies the same rule to any other body (errors, and routes without
a response model) as a last resort; response models are serialized by pydantic-core, which
would refuse a surrogate, so every text they echo is scrubbed here.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse

from crossrank.result import sigmoid, to_results
from crossrank.server.schemas import (
    ApiVersion,
    BilledUnits,
    DocumentText,
    InfinityRankItem,
    InfinityRerankResponse,
    Meta,
    RerankRequest,
    RerankResponse,
    RerankResultItem,
    TEIPrediction,
    TEIRank,
    Usage,
)
from crossrank.validation import scrub_surrogates

#: Documents per Cohere search unit (Cohere bills one unit per query and 100 documents).
_DOCS_PER_SEARCH_UNIT = 100


class SafeJSONResponse(JSONResponse):
    """JSON that is always valid UTF-8: a lone surrogate anywhere in the body (a field name
    echoed by a validation error, say) becomes U+FFFD instead of failing the response."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(
            content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
        )
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return scrub_surrogates([text])[0].encode("utf-8")


def scrub_json(value: Any) -> Any:
    """``value`` (decoded JSON) with lone surrogates in every string replaced by U+FFFD."""
    if isinstance(value, str):
        return scrub_surrogates([value])[0]
    if isinstance(value, dict):
        return {scrub_json(k): scrub_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_json(v) for v in value]
    return value


def _ranked(
    texts: Sequence[str], raw: np.ndarray, *, raw_scores: bool, top_n: int | None = None
) -> tuple[list[tuple[int, float]], np.ndarray]:
    """``(index, score)`` best first (scores: logits or their sigmoid), and the sigmoid."""
    probs = sigmoid(raw)
    scores = raw if raw_scores else probs
    return [(r.index, r.score) for r in to_results(texts, scores, top_n=top_n)], probs


def cohere_response(
    body: RerankRequest, texts: list[str], raw: np.ndarray, tokens: int, model: str, version: str
) -> RerankResponse:
    """Cohere / Jina shape; ``version`` is the Cohere API version of the route ("1", "2")."""
    ranked, _ = _ranked(texts, raw, raw_scores=body.raw_scores, top_n=body.top_n)
    results = [
        RerankResultItem(
            index=i,
            relevance_score=score,
            raw_score=float(raw[i]) if body.return_raw_scores else None,
            document=_document(body.documents[i]) if body.return_documents else None,
        )
        for i, score in ranked
    ]
    units = max(1, math.ceil(len(texts) / _DOCS_PER_SEARCH_UNIT))
    return RerankResponse(
        id=str(uuid.uuid4()),
        model=model,
        results=results,
        usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        meta=Meta(
            api_version=ApiVersion(version=version), billed_units=BilledUnits(search_units=units)
        ),
    )


def _document(document: str | dict[str, Any]) -> DocumentText | dict[str, Any]:
    """A returned document: ``{"text": ...}`` for a string, the object sent for an object."""
    if isinstance(document, str):
        return DocumentText(text=scrub_json(document))
    return scrub_json(document)


def infinity_response(
    body: RerankRequest, texts: list[str], raw: np.ndarray, tokens: int, model: str
) -> InfinityRerankResponse:
    """Infinity shape: ``document`` is the scored text as a string."""
    ranked, _ = _ranked(texts, raw, raw_scores=body.raw_scores, top_n=body.top_n)
    echoed = scrub_surrogates(texts) if body.return_documents else None
    return InfinityRerankResponse(
        id=str(uuid.uuid4()),
        created=int(time.time()),
        model=model,
        results=[
            InfinityRankItem(index=i, relevance_score=score, document=echoed[i] if echoed else None)
            for i, score in ranked
        ],
        usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
    )


def tei_ranks(
    texts: list[str], raw: np.ndarray, *, raw_scores: bool, return_text: bool
) -> list[TEIRank]:
    """TEI's bare array of ranks, best first."""
    ranked, _ = _ranked(texts, raw, raw_scores=raw_scores)
    echoed = scrub_surrogates(texts) if return_text else None
    return [
        TEIRank(index=i, score=score, text=echoed[i] if echoed else None) for i, score in ranked
    ]


def tei_predictions(raw: np.ndarray, *, raw_scores: bool, label: str) -> list[list[TEIPrediction]]:
    """TEI's predictions, one list per pair (one score: the relevance of the pair)."""
    scores = raw if raw_scores else sigmoid(raw)
    return [[TEIPrediction(score=float(s), label=label)] for s in scores]
