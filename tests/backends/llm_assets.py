"""Fixtures for the decoder (LLM) reranker tests: the real Qwen3 tokenizer, built at test time
from the ``qwen.tiktoken`` vocabulary that Alibaba's Apache-2.0 ``dashscope`` package ships,
and tiny random-weight models of the real Qwen3-Reranker-0.6B and bge-reranker-v2-gemma
configs. Without ``dashscope`` the tests that need them skip, saying why.

The gemma-shaped model is tested on the same Qwen vocabulary with a ``<bos>`` token added
(Gemma's own SentencePiece vocabulary has no permissively licensed PyPI source here); the
family's prompt needs only BOS and a single-token "Yes".
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from crossrank import Reranker
from crossrank.testing import (
    BGE_RERANKER_GEMMA_CONFIG,
    QWEN3_RERANKER_0_6B_CONFIG,
    TINY_DECODER_CONFIG,
    build_qwen_tokenizer,
    build_random_decoder_reranker,
    qwen_vocab_file,
)

SAMPLE_QUERIES = [
    "What is the capital of China?",
    "Explain gravity",
    "火星为什么是红色的？",
]
#: A task instruction other than Qwen3-Reranker's default (the per-call instruction tests).
OTHER_INSTRUCTION = "Given a question, retrieve passages written in Chinese"

SAMPLE_DOCUMENTS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other. It gives weight to "
    "physical objects and is responsible for the movement of planets around the sun.",
    "火星表面的氧化铁使它呈现红色。",
    "  Leading spaces, trailing newline?\n",
    "",
]


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if qwen_vocab_file() is None:
        pytest.skip("dashscope is not installed: the Qwen BPE vocabulary is unavailable")
    return build_qwen_tokenizer(tmp_path_factory.mktemp("qwen-tokenizer"))


@pytest.fixture(scope="session")
def bos_tokenizer_dir(qwen_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Qwen tokenizer plus a ``<bos>`` special token used as BOS."""
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    tokenizer.add_special_tokens({"bos_token": "<bos>"})
    out = tmp_path_factory.mktemp("bos-tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_qwen3_dir(qwen_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_decoder_reranker(
        tmp_path_factory.mktemp("tiny-qwen3"),
        qwen_tokenizer_dir,
        QWEN3_RERANKER_0_6B_CONFIG,
        **TINY_DECODER_CONFIG,
    )


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3_dir: Path) -> Reranker:
    """The tiny Qwen3 reranker's engine on CPU (``max_length=256``), one per test module."""
    return Reranker(str(tiny_qwen3_dir), device="cpu", max_length=256)


@pytest.fixture(scope="session")
def tiny_qwen3_seq_cls_dir(
    qwen_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return build_random_decoder_reranker(
        tmp_path_factory.mktemp("tiny-qwen3-seq-cls"),
        qwen_tokenizer_dir,
        QWEN3_RERANKER_0_6B_CONFIG,
        seq_cls=True,
        **TINY_DECODER_CONFIG,
    )


@pytest.fixture(scope="session")
def tiny_gemma_dir(bos_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_decoder_reranker(
        tmp_path_factory.mktemp("tiny-gemma"),
        bos_tokenizer_dir,
        BGE_RERANKER_GEMMA_CONFIG,
        **{**TINY_DECODER_CONFIG, "num_key_value_heads": 1},
    )
