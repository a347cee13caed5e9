"""The LLM step: a prompt citing the reranked passages by id, sent to any OpenAI-compatible
``/chat/completions`` endpoint (vLLM, Ollama, llama.cpp server, a hosted API).

The request goes through the ``openai`` SDK with ``base_url`` (what users of those servers
already have): it brings retries with backoff on connection errors, 408/409/429 and 5xx, and
timeouts, which a hand-written client lacked.

Configured by environment variables; with none set, callers run a *dry run*: they show the
exact prompt and no answer, so nothing made up is ever presented as an LLM's reply. The API
key is sent only in the ``Authorization`` header and never logged, printed or put in errors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from crossrank.errors import LLMError, require_extra

logger = logging.getLogger(__name__)

BASE_URL_ENV = "CROSSRANK_LLM_BASE_URL"
MODEL_ENV = "CROSSRANK_LLM_MODEL"
API_KEY_ENV = "CROSSRANK_LLM_API_KEY"

DRY_RUN_NOTICE = (
    f"DRY RUN: no LLM endpoint configured, nothing was sent and there is no answer. Set "
    f"{BASE_URL_ENV} (e.g. http://localhost:11434/v1 for Ollama), {MODEL_ENV} and, if the "
    f"endpoint needs one, {API_KEY_ENV}. This is the exact prompt the LLM would receive:"
)

INSTRUCTIONS = (
    "Answer the question using only the passages below. Cite every passage you use by its id "
    "in square brackets, e.g. [p012]. If the passages do not contain the answer, say so. "
    "Answer in the language of the question."
)


@dataclass(frozen=True)
class LLMConfig:
    """An OpenAI-compatible endpoint: ``base_url`` is the part before ``/chat/completions``."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 120.0
    max_retries: int = 2

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LLMConfig | None:
        """The endpoint named by ``CROSSRANK_LLM_*``; ``None`` (dry run) when no base URL is set."""
        env = os.environ if environ is None else environ
        base_url = env.get(BASE_URL_ENV, "").strip()
        if not base_url:
            return None
        model = env.get(MODEL_ENV, "").strip()
        if not model:
            raise ValueError(f"{BASE_URL_ENV} is set but {MODEL_ENV} is not: name the model to use")
        return cls(base_url.rstrip("/"), model, env.get(API_KEY_ENV) or None)


def build_prompt(question: str, passages: Sequence[tuple[str, str]]) -> str:
    """The user message for the LLM: instructions, then each ``(id, text)`` passage as
    ``[id] text`` on its own line in the given (reranked) order, then the question."""
    if not question.strip():
        raise ValueError("question must not be empty")
    lines = []
    for i, (passage_id, text) in enumerate(passages):
        if not passage_id or any(c in passage_id for c in "[]\n"):
            raise ValueError(f"passages[{i}] has an id that cannot be cited: {passage_id!r}")
        lines.append(f"[{passage_id}] {' '.join(text.split())}")
    return (
        f"{INSTRUCTIONS}\n\nPassages:\n" + "\n".join(lines) + f"\n\nQuestion: {question}\nAnswer:"
    )


def client(config: LLMConfig, http_client: Any = None) -> Any:
    """An ``openai.OpenAI`` client for ``config`` (``http_client``: the SDK's HTTP client).
    ``OPENAI_API_KEY`` is never read: only ``CROSSRANK_LLM_API_KEY`` counts."""
    openai = require_extra("openai", "rag", feature="the RAG demo's LLM step")
    return openai.OpenAI(
        base_url=config.base_url,
        api_key=config.api_key or "unused",  # the SDK needs one; its header is omitted
        timeout=config.timeout,
        max_retries=config.max_retries,
        http_client=http_client,
    )


def chat(
    messages: Sequence[Mapping[str, str]],
    config: LLMConfig,
    *,
    http_client: Any = None,
    **params: Any,
) -> str:
    """Send ``messages`` to ``{base_url}/chat/completions`` and return the reply text.

    ``params`` go into the request body (default ``temperature=0``).
    """
    import openai

    url = f"{config.base_url}/chat/completions"
    logger.info("LLM request to %s (model %s)", url, config.model)
    body = {"temperature": 0, **params}
    if not config.api_key:  # no key: no Authorization header at all
        body["extra_headers"] = {"Authorization": openai.Omit()}
    try:
        reply = client(config, http_client).chat.completions.create(
            model=config.model, messages=list(messages), **body
        )
    except openai.APIStatusError as err:
        raise LLMError(
            f"LLM endpoint {url} answered HTTP {err.status_code}: {err.response.text[:300]}"
        ) from None
    except openai.APIConnectionError as err:
        raise LLMError(f"could not reach the LLM endpoint {url}: {err}") from None
    try:
        return str(reply.choices[0].message.content)
    except (AttributeError, IndexError, TypeError):
        raise LLMError(f"LLM endpoint {url} did not return a chat completion") from None


def complete(prompt: str, config: LLMConfig) -> str:
    """:func:`chat` with ``prompt`` as the single user message."""
    return chat([{"role": "user", "content": prompt}], config)
