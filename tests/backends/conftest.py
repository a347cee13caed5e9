"""Fixtures of the backend tests: a tiny random BERT config (the BERT family, with token type
ids, next to the XLM-R tiny model of tests/conftest.py).

The decoder (LLM) reranker assets of llm_assets.py are registered in tests/conftest.py."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import BertConfig

from crossrank.backends import fused

#: A 2-layer, 32-wide BERT: small enough to build in milliseconds on CPU.
TINY_BERT: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "type_vocab_size": 2,
}

#: the Triton kernels run on the GPU when there is one, else through Triton's interpreter on
#: CPU tensors (tests/conftest.py sets TRITON_INTERPRET before Triton is imported)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the Triton kernels run (on CPU tensors through the interpreter)."""
    if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton was imported before TRITON_INTERPRET was set (see tests/conftest.py)")
    monkeypatch.setattr(fused, "INTERPRET_ON_CPU", True)


@pytest.fixture
def interpret_on_cpu(interpret: None) -> None:
    """For a runner on CPU through the kernels: only where Triton interprets them (on a CUDA
    host they run on the GPU, and a CPU runner takes its plain PyTorch path instead)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a CPU runner takes the kernels only through Triton's interpreter")


@pytest.fixture(scope="session")
def tiny_bert_config() -> Callable[..., BertConfig]:
    """Build the tiny BERT config; keyword arguments override or add config fields."""

    def build(**overrides: Any) -> BertConfig:
        return BertConfig(**{**TINY_BERT, **overrides})

    return build
