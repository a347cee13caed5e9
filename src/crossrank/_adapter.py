"""What the LangChain and LlamaIndex adapters share: engine options, lazy engine, ranking.

The adapters only translate framework types; every score, sort, threshold and top-n cut is
the engine's (:meth:`crossrank.Reranker.rerank` / :meth:`~crossrank.Reranker.arerank`).
Their engine fields are generated from :func:`crossrank.options.option_fields` and checked
by building an :class:`~crossrank.options.EngineOptions`, so an option is declared once.
The peers' parameter names that mean the same thing (``model_name``, ``use_fp16``,
``model_kwargs``, ``score_threshold``, ...) are translated here, once for every adapter.
``instruction`` (decoder rerankers) is the one option an adapter passes per call instead
(:data:`PER_CALL`): adapters with different instructions share one loaded engine.
Needs pydantic, which both frameworks bring; the core package does not import this module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    create_model,
    field_serializer,
    field_validator,
    model_validator,
)

from crossrank.engine import DEFAULT_MODEL, Reranker
from crossrank.options import ALIASES, EngineOptions, option_fields
from crossrank.registry import get_reranker
from crossrank.result import RerankResult
from crossrank.validation import check_query, check_threshold, check_top_n

#: Metadata key of a result's best-matching character span ``[start, end]`` (set when the
#: engine scored a long document by windows).
SPAN_KEY = "relevance_span"
#: Metadata key of the retriever's score, kept by LlamaIndex ``keep_retrieval_score``.
RETRIEVAL_SCORE_KEY = "retrieval_score"

#: sentence-transformers ``CrossEncoder(...)`` keyword arguments (LangChain
#: ``HuggingFaceCrossEncoder(model_kwargs=...)``, LlamaIndex ``cross_encoder_kwargs``) that
#: mean the same as an engine option.
CROSS_ENCODER_KWARGS = {
    "device": "device",
    "max_length": "max_length",
    "trust_remote_code": "trust_remote_code",
    "revision": "revision",
    "local_files_only": "local_files_only",
    "cache_folder": "cache_dir",
}

T = TypeVar("T")


def check_items(items: Any, kind: type[T], name: str) -> list[T]:
    """``items`` as a list of ``kind``; a ``TypeError`` names the first item that is not."""
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"{name} must be a list of {kind.__name__}, got {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, kind):
            raise TypeError(f"{name}[{i}] must be a {kind.__name__}, got {type(item).__name__}")
    return list(items)


def _move(data: dict[str, Any], old: str, new: str, value: Any) -> None:
    """Put ``value`` under ``new`` (given as ``old``); both given is an error."""
    if data.get(new) is not None:
        raise ValueError(f"{old} and {new} name the same setting: pass only {new}")
    data[new] = value


def _cross_encoder_kwargs(data: dict[str, Any], name: str, kwargs: Any) -> None:
    """Translate a sentence-transformers ``CrossEncoder`` kwargs dict into engine options."""
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"{name} must be a dict, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if key not in CROSS_ENCODER_KWARGS:
            raise ValueError(
                f"{name}[{key!r}] has no crossrank equivalent; accepted keys are "
                f"{sorted(CROSS_ENCODER_KWARGS)}, and every engine option (dtype, batch_tokens, "
                "normalize, ...) can be passed directly as a field"
            )
        _move(data, f"{name}[{key!r}]", CROSS_ENCODER_KWARGS[key], value)


def translate_peer_names(data: Any) -> Any:
    """The peers' spellings of our fields, turned into ours (see the module docstring)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for old, new in (*ALIASES.items(), ("model_name", "model"), ("score_threshold", "threshold")):
        if old in data:
            _move(data, old, new, data.pop(old))
    if "use_fp16" in data:
        use_fp16 = data.pop("use_fp16")
        if not isinstance(use_fp16, bool):
            raise TypeError(f"use_fp16 must be a bool, got {type(use_fp16).__name__}")
        _move(data, "use_fp16", "dtype", "float16" if use_fp16 else "float32")
    for name in ("model_kwargs", "cross_encoder_kwargs"):
        if name in data:
            _cross_encoder_kwargs(data, name, data.pop(name) or {})
    return data


#: Engine options an adapter passes with each call rather than to the shared engine.
PER_CALL = ("instruction",)
_ENGINE_OPTIONS = [f for f in option_fields(flags_only=False) if f.name not in PER_CALL]

#: One optional field per engine option (``None``: the engine's default), generated from
#: the single declaration in :mod:`crossrank.options`; secrets stay out of ``repr``.
EngineOptionFields: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "EngineOptionFields",
    __config__=ConfigDict(arbitrary_types_allowed=True),
    **{
        f.name: (Any, Field(default=None, description=f.help, repr=not f.secret))
        for f in _ENGINE_OPTIONS
    },
)
_OPTION_NAMES = tuple(f.name for f in _ENGINE_OPTIONS)


class _EngineHandle:
    """Holds the loaded engine. Pickles and deep-copies as an empty handle, so a serialized
    adapter never carries model weights and resolves its engine again on first use."""

    __slots__ = ("engine",)

    def __init__(self) -> None:
        self.engine: Reranker | None = None

    def __reduce__(self) -> tuple[type[_EngineHandle], tuple[()]]:
        return (_EngineHandle, ())


class EngineConfig(EngineOptionFields):  # type: ignore[misc,valid-type]
    """A model name plus engine options, resolved lazily through the shared registry.

    Every :class:`~crossrank.options.EngineOptions` option is a field (``None`` keeps the
    engine's default); the peers' names ``model_name``, ``use_fp16`` (``True``: float16,
    ``False``: float32), ``model_kwargs``/``cross_encoder_kwargs`` (their device,
    max_length, trust_remote_code, revision, local_files_only, cache_folder) and
    ``max_batch_tokens`` are accepted at construction.
    """

    model_config: ClassVar[ConfigDict] = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model: str | Reranker = Field(
        default=DEFAULT_MODEL,
        description="Hugging Face id or local path of a reranker, or a loaded crossrank.Reranker.",
    )
    instruction: str | None = Field(
        default=None,
        description="Decoder (LLM) rerankers: the task instruction of each call's prompt "
        "(None: the engine's); an encoder cross-encoder refuses one when it scores.",
    )

    _handle: _EngineHandle = PrivateAttr(default_factory=_EngineHandle)

    @model_validator(mode="before")
    @classmethod
    def _peer_names(cls, data: Any) -> Any:
        return translate_peer_names(data)

    @model_validator(mode="after")
    def _check_options(self) -> EngineConfig:
        given = sorted(self.model_fields_set & set(_OPTION_NAMES))
        if isinstance(self.model, Reranker) and given:
            raise ValueError(
                f"engine options {given} apply only when model is a "
                "name or path; a Reranker instance already carries its own"
            )
        EngineOptions.build(**self.engine_options())  # an OptionError names the field
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
        return {k: getattr(self, k) for k in _OPTION_NAMES if getattr(self, k) is not None}

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
    threshold: float | None = Field(
        default=None,
        description=(
            "Keep results scoring >= this (also accepted as score_threshold); None keeps all. "
            "Scores are probabilities in [0, 1] unless normalize=False."
        ),
    )

    @field_validator("top_n", mode="before")
    @classmethod
    def _check_top_n(cls, value: Any) -> int | None:
        return check_top_n(value)

    @field_validator("threshold", mode="before")
    @classmethod
    def _check_threshold(cls, value: Any) -> float | None:
        return check_threshold(value)

    def rank(self, query: str, texts: list[str]) -> list[RerankResult]:
        """Rank ``texts`` for ``query``, best first; ``[]`` for no texts without loading."""
        if not texts:
            check_query(query)
            return []
        return self.engine.rerank(
            query, texts, top_n=self.top_n, threshold=self.threshold, instruction=self.instruction
        )

    async def arank(self, query: str, texts: list[str]) -> list[RerankResult]:
        """Async :meth:`rank` through the engine's micro-batching queue."""
        if not texts:
            check_query(query)
            return []
        engine = await self.aengine()
        return await engine.arerank(
            query, texts, top_n=self.top_n, threshold=self.threshold, instruction=self.instruction
        )


def span_metadata(result: RerankResult) -> dict[str, list[int]]:
    """``{"relevance_span": [start, end]}`` when the engine reported one, else ``{}``."""
    if result.best_span is None:
        return {}
    return {SPAN_KEY: list(result.best_span)}
