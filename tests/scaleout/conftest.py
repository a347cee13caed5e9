"""Fixtures of the scale-out tests: the tiny random decoder (LLM) reranker of
tests/backends/llm_assets.py (the encoder fixtures are in tests/conftest.py)."""

from tests.backends.llm_assets import (  # noqa: F401 (fixtures)
    qwen3,
    qwen_tokenizer_dir,
    tiny_qwen3_dir,
)
