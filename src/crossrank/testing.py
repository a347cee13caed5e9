"""Build random-weight rerankers of a real architecture, for tests, benchmarks and offline demos.

No model weights can be downloaded in CI or on air-gapped machines, but the architecture
(``config.json``) and tokenizer of a real reranker are small. A random-weight model built from
them runs at exactly the real model's speed and exercises every code path; its scores are
meaningless, which is why everything built here is labelled as random.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

# The marker every model built here gets, and its test, live where the demo reads them.
from crossrank.rag.models import RANDOM_WEIGHTS_FILE, is_random_reranker

__all__ = [
    "RANDOM_WEIGHTS_FILE",
    "SHARED_ENV",
    "SKELETON",
    "TINY_CONFIG",
    "build_random_reranker",
    "is_random_reranker",
    "shared_dir",
]

SHARED_ENV = "CROSSRANK_SHARED"

#: Config overrides for a tiny (2-layer, 64-wide) test model of any BERT/XLM-R architecture.
#: The wide init spreads random scores so rankings are not all ties.
TINY_CONFIG: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "initializer_range": 0.3,
}
SKELETON = "models/bge-reranker-v2-m3-skeleton"


def shared_dir() -> Path | None:
    """The project's shared asset folder (``$CROSSRANK_SHARED``, else ``../shared``) if present."""
    candidates = [os.environ.get(SHARED_ENV)] if os.environ.get(SHARED_ENV) else []
    candidates.append(str(Path(__file__).resolve().parents[3] / "shared"))
    candidates.append(str(Path.cwd().parent / "shared"))
    for candidate in candidates:
        if candidate and (Path(candidate) / SKELETON).is_dir():
            return Path(candidate)
    return None


def build_random_reranker(
    out_dir: str | os.PathLike[str],
    skeleton_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Save a random-weight sequence-classification model and its tokenizer to ``out_dir``.

    ``skeleton_dir`` holds a ``config.json`` and tokenizer files (no weights). Keyword
    arguments override config fields, e.g. ``num_hidden_layers=2, hidden_size=64,
    num_attention_heads=4, intermediate_size=128`` for a tiny test model.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(skeleton_dir, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(skeleton_dir, use_fast=True).save_pretrained(out)
    (out / RANDOM_WEIGHTS_FILE).write_text(
        "This model has random weights built by crossrank.testing; its scores are meaningless.\n"
    )
    return out


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b between two score vectors (1.0 = same ranking); at most 2,000 items."""
    x = np.asarray(a, dtype=np.float64)[:2000]
    y = np.asarray(b, dtype=np.float64)[:2000]
    if x.shape != y.shape:
        raise ValueError(f"score vectors differ in shape: {x.shape} vs {y.shape}")
    i, j = np.triu_indices(x.shape[0], 1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    denominator = float(np.sqrt(np.count_nonzero(sx) * np.count_nonzero(sy)))
    return float((sx * sy).sum() / denominator) if denominator else 1.0


# ------------------------------------------------------------------ decoder (LLM) rerankers
#: ``config.json`` of Qwen/Qwen3-Reranker-0.6B (Qwen3-0.6B-Base shape: 28 layers, hidden 1024,
#: 16 query / 8 key-value heads of 128, QK-norm, tied embeddings; the reranker's vocabulary
#: holds the 151,669 tokens of its tokenizer).
QWEN3_RERANKER_0_6B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "vocab_size": 151669,
}
#: ``config.json`` shape of BAAI/bge-reranker-v2-gemma (google/gemma-2b: 18 layers, hidden
#: 2048, 8 query heads and one key-value head of 256, GeGLU 16384, tied embeddings).
BGE_RERANKER_GEMMA_CONFIG: dict[str, Any] = {
    "architectures": ["GemmaForCausalLM"],
    "model_type": "gemma",
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_size": 2048,
    "intermediate_size": 16384,
    "max_position_embeddings": 8192,
    "num_attention_heads": 8,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "vocab_size": 256000,
}
#: Overrides for a tiny (2-layer, 64-wide, grouped-query) test model of either decoder shape.
TINY_DECODER_CONFIG: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "initializer_range": 0.2,
}
#: The regular-token vocabulary of Qwen's byte-level BPE (151,643 tokens, ``qwen.tiktoken``)
#: ships inside Alibaba's Apache-2.0 ``dashscope`` SDK (``dashscope/resources/``); Qwen2 and
#: Qwen3 use the same 151,643 tokens and split pattern, plus the added tokens below.
QWEN_VOCAB_PACKAGE = ("dashscope", "resources/qwen.tiktoken")
#: Qwen3's pre-tokenizer split pattern (its ``tokenizer.json``; single digits).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Qwen3's added tokens from id 151643 on, in id order, with their ``special`` flag.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    *(
        (t, True)
        for t in (
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|object_ref_start|>",
            "<|object_ref_end|>",
            "<|box_start|>",
            "<|box_end|>",
            "<|quad_start|>",
            "<|quad_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
        )
    ),
    *(
        (t, False)
        for t in (
            "<tool_call>",
            "</tool_call>",
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
            "<tool_response>",
            "</tool_response>",
            "<think>",
            "</think>",
        )
    ),
)


def qwen_vocab_file() -> Path | None:
    """``qwen.tiktoken`` from the installed ``dashscope`` package (not imported), if present."""
    import importlib.util

    package, relative = QWEN_VOCAB_PACKAGE
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / relative
        if path.is_file():
            return path
    return None


def build_qwen_tokenizer(out_dir: str | os.PathLike[str]) -> Path:
    """Save the Qwen3 tokenizer (``tokenizer.json`` + config) built from ``qwen.tiktoken``.

    The vocabulary and merges come from transformers' tiktoken converter; normalizer (NFC),
    split pattern, byte-level steps and added tokens (ids 151643-151668) are Qwen3's.
    Raises ``FileNotFoundError`` when ``dashscope`` is absent.
    """
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = qwen_vocab_file()
    if vocab is None:
        raise FileNotFoundError("qwen.tiktoken not found: pip install dashscope")
    backend = TikTokenConverter(str(vocab), pattern=QWEN_SPLIT_PATTERN).converted()
    backend.model.ignore_merges = False  # as Qwen3's tokenizer.json
    backend.normalizer = normalizers.NFC()
    for content, special in QWEN3_ADDED_TOKENS:
        token = AddedToken(content, normalized=False, special=special)
        (backend.add_special_tokens if special else backend.add_tokens)([token])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        model_max_length=131072,
    )
    out = Path(out_dir)
    fast.save_pretrained(out)
    return out


def build_random_decoder_reranker(
    out_dir: str | os.PathLike[str],
    tokenizer_dir: str | os.PathLike[str],
    config: dict[str, Any],
    *,
    seq_cls: bool = False,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Save a random-weight decoder reranker of ``config`` (e.g.
    :data:`QWEN3_RERANKER_0_6B_CONFIG`, overridden by ``config_overrides`` such as
    :data:`TINY_DECODER_CONFIG`) with the tokenizer in ``tokenizer_dir``.

    The vocabulary is sized to the tokenizer; ``seq_cls=True`` saves the one-logit
    ``...ForSequenceClassification`` conversion (last-token pooling) instead of the causal LM.
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    fields = {**config, **config_overrides, "vocab_size": len(tokenizer)}
    fields["pad_token_id"] = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        fields["bos_token_id"] = tokenizer.bos_token_id
    model_type = fields.pop("model_type")
    architecture = fields.pop("architectures")[0]
    if seq_cls:
        architecture = architecture.replace("ForCausalLM", "ForSequenceClassification")
        fields["num_labels"] = 1
    model_config = AutoConfig.for_model(model_type, architectures=[architecture], **fields)
    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    model = auto.from_config(model_config)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / RANDOM_WEIGHTS_FILE).write_text(
        "This model has random weights built by crossrank.testing; its scores are meaningless.\n"
    )
    return out
