"""What the LangChain and LlamaIndex adapters share: engine options, lazy engine, ranking.

The adapters only translate framework types; every score, sort, threshold and top-n cut is
the engine's (:meth:`crossrank.Reranker.rerank` / :meth:`~crossrank.Reranker.arerank`).
Needs pydantic, which both frameworks bring; the core package does not import this module.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_serializer,
    field_validator,
    model_validator,
)

from crossrank.engine import DEFAULT_MODEL, Reranker
from crossrank.registry import get_reranker
from crossrank.result import RerankResult
from crossrank.validation import check_query, check_top_n

#: Metadata key of a result's best-matching character span ``[start, end]`` (set when the
#: engine scored a long document by windows).
SPAN_KEY = "relevance_span"

_ENGINE_OPTIONS = ("revision", "device", "dtype", "max_length", "batch_tokens")

T = TypeVar("T")


def check_items(items: Any, kind: type[T], name: str) -> list[T]:
    """``items`` as a list of ``kind``; a ``TypeError`` names the first item that is not."""
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"{name} must be a list of {kind.__name__}, got {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, kind):
            raise TypeError(f"{name}[{i}] must be a {kind.__name__}, got {type(item).__name__}")
    return list(items)


class _EngineHandle:
    """Holds the loaded engine. Pickles and deep-copies as an empty handle, so a serialized
    adapter never carries model weights and resolves its engine again on first use."""

    __slots__ = ("engine",)

    def __init__(self) -> None:
        self.engine: Reranker | None = None

    def __reduce__(self) -> tuple[type[_EngineHandle], tuple[()]]:
        return (_EngineHandle, ())


class EngineConfig(BaseModel):
    """A model name plus engine options, resolved lazily through the shared registry."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model: str | Reranker = Field(
        default=DEFAULT_MODEL,
        description="Hugging Face id or local path of a reranker, or a loaded crossrank.Reranker.",
    )
    revision: str | None = Field(default=None, description="Model revision (branch, tag, sha).")
    device: str | None = Field(default=None, description="'auto', 'cpu', 'cuda', 'cuda:1', 'mps'.")
    dtype: str | None = Field(default=None, description="'auto', 'float32', 'float16', 'bfloat16'.")
    max_length: int | None = Field(default=None, description="Max tokens per (query, document).")
    batch_tokens: int | None = Field(default=None, description="Token budget per forward pass.")

    _handle: _EngineHandle = PrivateAttr(default_factory=_EngineHandle)

    @model_validator(mode="after")
    def _options_need_a_name(self) -> EngineConfig:
        if isinstance(self.model, Reranker) and self.engine_options():
            raise ValueError(
                f"engine options {sorted(self.engine_options())} apply only when model is a "
                "name or path; a Reranker instance already carries its own"
            )
        return self

    @field_serializer("model")
    def _serialize_model(self, model: str | Reranker) -> str:
        if isinstance(model, Reranker):
            raise TypeError(
                f"{type(self).__name__} built around a Reranker instance cannot be serialized; "
                "build it from a model name and options (the engine is shared anyway)"
            )
        return model

    def __getstate__(self) -> dict[Any, Any]:
        self._serialize_model(self.model)  # the same clear error as to_dict/model_dump
        state: dict[Any, Any] = super().__getstate__()
        return state

    def engine_options(self) -> dict[str, Any]:
        """The engine options that were set (the rest keep the engine's defaults)."""
        return {k: getattr(self, k) for k in _ENGINE_OPTIONS if getattr(self, k) is not None}

    @property
    def model_name(self) -> str:
        """The model's name or path, known without loading it."""
        return self.model.model_name if isinstance(self.model, Reranker) else self.model

    @property
    def engine(self) -> Reranker:
        """The engine, loaded (or taken from the shared registry) on first use."""
        engine = self._handle.engine
        if engine is None:
            if isinstance(self.model, Reranker):
                engine = self.model
            else:
                engine = get_reranker(self.model, **self.engine_options())
            self._handle.engine = engine
        return engine

    async def aengine(self) -> Reranker:
        """:attr:`engine`, loading it (the first time) off the event loop."""
        engine = self._handle.engine
        if engine is None:
            engine = await asyncio.to_thread(lambda: self.engine)
        return engine


class RankingConfig(EngineConfig):
    """Engine options plus the cut applied to each ranking."""

    top_n: int | None = Field(default=5, description="Results to keep; None keeps all.")
    score_threshold: float | None = Field(
        default=None,
        description=(
            "Keep results scoring >= this; None keeps all. Scores are probabilities in [0, 1] "
            "unless a Reranker built with normalize=False is passed as model."
        ),
    )

    @field_validator("top_n", mode="before")
    @classmethod
    def _check_top_n(cls, value: Any) -> int | None:
        return check_top_n(value)

    def rank(self, query: str, texts: list[str]) -> list[RerankResult]:
        """Rank ``texts`` for ``query``, best first; ``[]`` for no texts without loading."""
        if not texts:
            check_query(query)
            return []
        return self.engine.rerank(query, texts, top_n=self.top_n, threshold=self.score_threshold)

    async def arank(self, query: str, texts: list[str]) -> list[RerankResult]:
        """Async :meth:`rank` through the engine's micro-batching queue."""
        if not texts:
            check_query(query)
            return []
        engine = await self.aengine()
        return await engine.arerank(query, texts, top_n=self.top_n, threshold=self.score_threshold)


def span_metadata(result: RerankResult) -> dict[str, list[int]]:
    """``{"relevance_span": [start, end]}`` when the engine reported one, else ``{}``."""
    if result.best_span is None:
        return {}
    return {SPAN_KEY: list(result.best_span)}
