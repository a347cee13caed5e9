"""What a loaded model needs before it can score: the steps that depend on its family.

An encoder cross-encoder and a decoder (LLM) reranker differ in the dtype ``"auto"`` means on
CUDA (bf16 for decoders: fp16 overflows in some LLMs), in how many tokens one pass may hold
(sized from width x depth), in the pair tokenizer (plain pairs vs a prompt template) and in
what the score cache must fingerprint (a prompt's family and instruction), so the score
cache's key (:func:`score_fingerprint`, everything besides the pair that changes a raw score)
is built here too. The engine calls these once at load, so it never branches on a family
itself.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import torch

from crossrank.backends import compute_dtype
from crossrank.backends.decoder import FAMILIES, DecoderFamily, PromptTokenizer
from crossrank.cache import Cache, ScoreCache
from crossrank.errors import OptionError
from crossrank.fingerprint import model_identity
from crossrank.loading import LoadedModel, with_weights_on
from crossrank.longdoc import LongDocs
from crossrank.options import EngineOptions
from crossrank.tokenization import PairTokenizer
from crossrank.validation import check_instruction

#: ``config.architectures`` loaded as causal LMs (decoder rerankers read from answer logits).
DECODER_ARCHITECTURES = frozenset().union(*(f.architectures for f in FAMILIES.values()))

# Tokens per forward pass (padding included). CPU passes gain nothing from being large;
# on CUDA a larger pass keeps the GPU busy and stays far from memory limits for a
# 24-layer, 1024-wide model.
DEFAULT_BATCH_TOKENS = {"cpu": 8192, "mps": 16384, "cuda": 65536}


def with_weights(
    loaded: LoadedModel, family: DecoderFamily | None, opts: EngineOptions, device: torch.device
) -> tuple[LoadedModel, torch.dtype]:
    """``loaded`` with its weights (torch backend) in the compute dtype, and that dtype;
    ``num_labels`` is set from the family for a causal LM."""
    check_instruction(opts.instruction, decoder=family is not None)
    if family is not None and opts.backend != "torch":
        raise OptionError("backend", f"{family.name} rerankers run with backend='torch'")
    dtype = compute_dtype(opts, device, decoder=family is not None)
    if family is not None and loaded.causal:
        loaded = replace(loaded, num_labels=family.num_labels)
    if opts.backend != "torch":
        return loaded, dtype
    return with_weights_on(loaded, device, dtype), dtype


def default_batch_tokens(config: Any, family: DecoderFamily | None, device: torch.device) -> int:
    """Tokens per pass on ``device``; for a decoder scaled by its width x depth against the
    1024-wide, 24-layer encoder the defaults were sized for (a decoder token also costs a
    wider MLP: Qwen3-Reranker-0.6B 3072, 4B 9728)."""
    base = DEFAULT_BATCH_TOKENS.get(device.type, 8192)
    if family is None:
        return base
    size = int(config.hidden_size) * int(config.num_hidden_layers)
    return max(2048, min(base, base * 1024 * 24 // size))


def pair_tokenizer(
    loaded: LoadedModel,
    family: DecoderFamily | None,
    opts: EngineOptions,
    max_length: int,
    query_max_length: int,
) -> PairTokenizer:
    """The encoder's pair tokenizer, or a decoder family's prompt tokenizer (whose default
    query cap is 3/4 of the room the template leaves, not of ``max_length``)."""
    if family is None:
        return PairTokenizer(
            loaded.tokenizer, max_length=max_length, query_max_length=query_max_length
        )
    prompt = PromptTokenizer(
        loaded.tokenizer,
        family,
        max_length=max_length,
        query_max_length=opts.query_max_length or 1,
        instruction=opts.instruction,
    )
    if opts.query_max_length is None:
        room = max_length - prompt.special_tokens_in_pair
        prompt.query_max_length = max(1, room * 3 // 4)
    return prompt


def prompt_fingerprint(tokenizer: PairTokenizer) -> list[str]:
    """A decoder family's name and instruction (they change every prompt); none for pairs."""
    if not isinstance(tokenizer, PromptTokenizer):
        return []
    return [tokenizer.family.name, tokenizer.instruction]


def score_fingerprint(
    identity: dict[str, str], opts: EngineOptions, dtype: torch.dtype, tokenizer: PairTokenizer
) -> str:
    """Everything besides the pair that changes a raw score (``normalize`` does not);
    ``identity`` is the model's :func:`~crossrank.fingerprint.model_identity`."""
    return "|".join(
        [
            "crossrank-v3",
            json.dumps(identity, sort_keys=True),
            str(opts.revision),
            str(dtype),
            f"{opts.backend}{'-int8' if opts.quantize else ''}",
            str(tokenizer.max_length),
            str(tokenizer.query_max_length),
            LongDocs.from_options(opts).fingerprint(),
            *prompt_fingerprint(tokenizer),
        ]
    )


def score_cache(
    backend: Cache | None,
    loaded: LoadedModel,
    opts: EngineOptions,
    dtype: torch.dtype,
    tokenizer: PairTokenizer,
) -> ScoreCache | None:
    """The engine's score cache on ``backend`` (``None`` without one), its keys prefixed by
    :func:`score_fingerprint` of the loaded model's identity."""
    if backend is None:
        return None
    identity = model_identity(loaded.source, revision=opts.revision, hub=loaded.hub)
    fingerprint = score_fingerprint(identity, opts, dtype, tokenizer)
    return ScoreCache(backend, fingerprint, with_spans=LongDocs.from_options(opts).chunked)
