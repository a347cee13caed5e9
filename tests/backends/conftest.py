"""Fixtures of the backend tests: a tiny random BERT config (the BERT family, with token type
ids, next to the XLM-R tiny model of tests/conftest.py).

The decoder (LLM) reranker assets of llm_assets.py are registered in tests/conftest.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from transformers import BertConfig

#: A 2-layer, 32-wide BERT: small enough to build in milliseconds on CPU.
TINY_BERT: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "type_vocab_size": 2,
}


@pytest.fixture(scope="session")
def tiny_bert_config() -> Callable[..., BertConfig]:
    """Build the tiny BERT config; keyword arguments override or add config fields."""

    def build(**overrides: Any) -> BertConfig:
        return BertConfig(**{**TINY_BERT, **overrides})

    return build
