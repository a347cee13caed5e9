"""Fixtures of the backends tests (decoder rerankers: see llm_assets.py)."""

from .llm_assets import (  # noqa: F401  (fixtures)
    bos_tokenizer_dir,
    qwen_tokenizer_dir,
    tiny_gemma_dir,
    tiny_qwen3_dir,
    tiny_qwen3_seq_cls_dir,
)
