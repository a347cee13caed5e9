"""The packed decoder runner (CPU code path) against the padded reference runner, with and
without the shared-prefix computation; on a CUDA device, its CUDA-graph replays against its
eager passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from crossrank.backends.decoder import BGE_GEMMA, QWEN3, DecoderPaddedRunner, PromptTokenizer
from crossrank.backends.decoder_packed import (
    DecoderPackedRunner,
    _graph_key,
    choose_decoder_runner,
    common_prefix,
    pack_with_prefix,
    unsupported_reason,
)
from crossrank.tokenization import EncodedPairs

from .llm_assets import SAMPLE_DOCUMENTS, SAMPLE_QUERIES


def runners(model_dir: Path, family, seq_cls: bool = False, max_length: int = 512):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = PromptTokenizer(tokenizer, family, max_length=max_length, query_max_length=64)
    auto = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, dtype=torch.float32).eval()
    cpu = torch.device("cpu")
    padded = DecoderPaddedRunner(model, cpu, prompt.pad_id, family, prompt.answer_ids)
    packed = DecoderPackedRunner(model, cpu, family, prompt.answer_ids)
    unshared = DecoderPackedRunner(model, cpu, family, prompt.answer_ids, share_prefix=False)
    return prompt, padded, packed, unshared


def one_query(n: int = 5):
    return [SAMPLE_QUERIES[0]] * n, SAMPLE_DOCUMENTS[:n]


def many_queries():
    pairs = [(q, d) for q in SAMPLE_QUERIES for d in SAMPLE_DOCUMENTS]
    return [q for q, _ in pairs], [d for _, d in pairs]


@pytest.mark.parametrize("make_pairs", [one_query, many_queries], ids=["1xN", "NxM"])
def test_packed_equals_padded_qwen3(tiny_qwen3_dir: Path, make_pairs):
    prompt, padded, packed, unshared = runners(tiny_qwen3_dir, QWEN3)
    encoded = prompt.encode(*make_pairs())
    expected = padded.run(encoded)
    np.testing.assert_allclose(packed.run(encoded), expected, atol=1e-4)
    np.testing.assert_allclose(unshared.run(encoded), expected, atol=1e-4)
    assert packed.stats.prefix_tokens_saved > 0
    assert unshared.stats.prefix_tokens_saved == 0


def test_one_query_shares_template_and_query(tiny_qwen3_dir: Path):
    prompt, *_ = runners(tiny_qwen3_dir, QWEN3)
    query = SAMPLE_QUERIES[0]
    same = prompt.encode(*one_query())
    mixed = prompt.encode(*many_queries())
    tokenizer = prompt.tokenizer
    shared = tokenizer.decode(same.ids[: common_prefix(same)].tolist())
    assert shared.endswith(f"<Query>: {query}\n<Document>:")
    assert tokenizer.decode(mixed.ids[: common_prefix(mixed)].tolist()).endswith("<Query>:")


def test_single_pair_and_short_pairs(tiny_qwen3_dir: Path):
    prompt, padded, packed, _ = runners(tiny_qwen3_dir, QWEN3)
    encoded = prompt.encode([SAMPLE_QUERIES[1]], [SAMPLE_DOCUMENTS[1]])
    np.testing.assert_allclose(packed.run(encoded), padded.run(encoded), atol=1e-4)
    # identical pairs: the prefix stops one token short so each pair keeps its last token
    twins = prompt.encode([SAMPLE_QUERIES[0]] * 3, [SAMPLE_DOCUMENTS[0]] * 3)
    assert common_prefix(twins) == int(twins.lengths[0]) - 1
    np.testing.assert_allclose(packed.run(twins), padded.run(twins), atol=1e-4)


def test_packed_equals_padded_gemma(tiny_gemma_dir: Path):
    prompt, padded, packed, _ = runners(tiny_gemma_dir, BGE_GEMMA)
    encoded = prompt.encode(*many_queries())
    np.testing.assert_allclose(packed.run(encoded), padded.run(encoded), atol=1e-4)


def test_packed_equals_padded_seq_cls(tiny_qwen3_seq_cls_dir: Path):
    prompt, padded, packed, _ = runners(tiny_qwen3_seq_cls_dir, QWEN3, seq_cls=True)
    encoded = prompt.encode(*one_query())
    out = packed.run(encoded)
    assert out.shape == (5, 1)
    np.testing.assert_allclose(out, padded.run(encoded), atol=1e-4)


def test_pack_with_prefix_layout():
    ids = np.array([7, 8, 9, 1, 7, 8, 9, 2, 3], dtype=np.int64)
    encoded = EncodedPairs(ids, np.array([0, 4]), np.array([4, 5]))
    assert common_prefix(encoded) == 3
    batch = pack_with_prefix(encoded, 3)
    assert batch.ids.tolist() == [7, 8, 9, 1, 2, 3]
    assert batch.positions.tolist() == [0, 1, 2, 3, 3, 4]
    assert batch.cu_q.tolist() == [0, 3, 4, 6]
    assert batch.cu_k.tolist() == [0, 3, 7, 12]
    assert batch.key_index.tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 4, 5]
    assert batch.last.tolist() == [3, 5]


def test_encoders_are_refused(tiny_model_dir: Path):
    from transformers import AutoModelForSequenceClassification as Auto

    assert "not one of" in (unsupported_reason(Auto.from_pretrained(tiny_model_dir)) or "")


@pytest.mark.parametrize(
    ("make_pairs", "kernel"),
    [(one_query, False), (many_queries, False), (one_query, True)],  # interpreted: slow
    ids=["1xN", "NxM", "1xN-prefix-kernel"],
)
def test_graph_layout_gives_the_same_logits(
    tiny_qwen3_dir: Path, make_pairs, kernel: bool, request: pytest.FixtureRequest
):
    """A pass laid out in a CUDA graph's padded shape (filler and empty sequences) gives the
    real pairs' logits unchanged; checked through the CPU attention path, and through the
    shared-prefix kernel (Triton's interpreter)."""
    if kernel:
        request.getfixturevalue("interpret_on_cpu")
    prompt, _, packed, _ = runners(tiny_qwen3_dir, QWEN3)
    assert packed.prefix_kernel == kernel
    encoded = prompt.encode(*make_pairs())
    batch = pack_with_prefix(encoded, common_prefix(encoded), gather_keys=not kernel)
    key = _graph_key(batch, gathered=not kernel)
    assert key[0] % 256 == 0 and key[0] > batch.ids.shape[0] - 256
    with torch.inference_mode():
        graphed = packed._forward(packed._upload(batch, key))[: len(encoded)]
        eager = packed._forward(packed._upload(batch))
    np.testing.assert_allclose(graphed.numpy(), eager.numpy(), atol=1e-5)


def test_runner_choice_on_cpu(tiny_qwen3_dir: Path):
    prompt, *_ = runners(tiny_qwen3_dir, QWEN3)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=torch.float32)
    cpu = torch.device("cpu")
    args = (model, cpu, prompt.pad_id, QWEN3, prompt.answer_ids)
    assert isinstance(choose_decoder_runner(*args, None), DecoderPaddedRunner)
    assert isinstance(choose_decoder_runner(*args, False), DecoderPaddedRunner)
    assert isinstance(choose_decoder_runner(*args, True), DecoderPackedRunner)
    assert "bfloat16" in (unsupported_reason(model, torch.device("cuda")) or "")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replays_give_the_eager_logits(tiny_qwen3_dir: Path):
    """Passes through captured graphs, one bucket replayed with other pairs than it was
    captured with, give the eager passes' logits: the graph's inputs are refilled each time."""
    prompt, *_ = runners(tiny_qwen3_dir, QWEN3)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=torch.bfloat16).cuda()
    cuda = torch.device("cuda")
    graphed = DecoderPackedRunner(model.eval(), cuda, QWEN3, prompt.answer_ids)
    eager = DecoderPackedRunner(model, cuda, QWEN3, prompt.answer_ids, cuda_graphs=False)
    outputs = []
    for docs in (SAMPLE_DOCUMENTS[:3], SAMPLE_DOCUMENTS[1:4], SAMPLE_DOCUMENTS[:3][::-1]):
        encoded = prompt.encode([SAMPLE_QUERIES[1]] * 3, docs)
        outputs.append(graphed.run(encoded))
        np.testing.assert_allclose(outputs[-1], eager.run(encoded), atol=2e-2)
    assert graphed.stats.graph_passes == 3 and graphed.stats.graphs_captured < 3
    assert eager.stats.graph_passes == 0
    # the passes differ by more than the tolerance: stale inputs would have been caught
    assert (
        np.abs(outputs[0] - outputs[2][::-1]).max() < 2e-2 < np.abs(outputs[0] - outputs[1]).max()
    )
