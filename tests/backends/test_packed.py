"""The packed (padding-free) runner against the padded reference, on CPU in fp32.

The reference is the plain transformers forward (``TorchPaddedRunner``: right-padded batch,
attention mask, the model's own position ids). Everything the packed runner does besides the
CUDA kernels runs here: packing, per-sequence position ids, CLS gather, the CLS-only last
layer, the folded residual biases, order restore and the CUDA-graph input layout.
"""

from __future__ import annotations

import gc
import random
import threading

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)

from crossrank import Reranker
from crossrank.backends import torch_runner as choose_runner
from crossrank.backends.base import TorchPaddedRunner
from crossrank.backends.packed import (
    _GC_PAUSE,
    PackedOptions,
    PackedRunner,
    _Graph,
    pack,
    position_ids,
    unsupported_reason,
)
from crossrank.testing import kendall_tau
from crossrank.tokenization import EncodedPairs

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir)).eval()


@pytest.fixture(scope="module")
def reference(tiny_reranker) -> Reranker:
    return tiny_reranker


@pytest.fixture(scope="module")
def mixed(xquad, reference) -> EncodedPairs:
    """Shuffled multilingual pairs of very different lengths (empty document included)."""
    items = xquad["questions"][:24]
    docs = [it["context"] for it in items] + ["", "short", "火星"]
    queries = [it["question"] for it in items] + ["q", "a longer question here", "火星是什么"]
    order = list(range(len(docs)))
    random.Random(1).shuffle(order)
    return reference.encode([queries[i] for i in order], [docs[i] for i in order])


def test_roberta_position_ids_match_transformers() -> None:
    from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaEmbeddings

    pad = 1
    seqs = [[0, 5, 6, 2], [0, 7, pad, 8, 2], [0, 2]]  # a pad id inside the text counts as pad
    ids = np.concatenate([np.array(s) for s in seqs])
    cu = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    got = position_ids(ids, cu, pad)
    for s, start in zip(seqs, cu[:-1], strict=True):
        want = XLMRobertaEmbeddings.create_position_ids_from_input_ids(torch.tensor([s]), pad)
        assert got[start : start + len(s)].tolist() == want[0].tolist()
    assert got[:4].tolist() == [2, 3, 4, 5]  # starts at padding_idx + 1 in every sequence
    assert got[4:9].tolist() == [2, 3, 1, 4, 5]
    assert got[9:].tolist() == [2, 3]


def test_bert_position_ids_restart_at_zero() -> None:
    ids = np.arange(7)
    assert position_ids(ids, np.array([0, 3, 7]), None).tolist() == [0, 1, 2, 0, 1, 2, 3]


def test_pack_concatenates_in_order(mixed: EncodedPairs) -> None:
    batch = pack(mixed, 1)
    assert batch.tokens == mixed.total_tokens
    assert batch.pairs == len(mixed)
    assert batch.max_len == int(mixed.lengths.max())
    for i in range(len(mixed)):
        start, end = batch.cu_seqlens[i], batch.cu_seqlens[i + 1]
        row = mixed.ids[mixed.offsets[i] : mixed.offsets[i] + mixed.lengths[i]]
        assert batch.ids[start:end].tolist() == row.tolist()
        assert batch.ids[start] == 0  # every pair starts with its CLS token


@pytest.mark.parametrize("fuse_residual", [True, False])
def test_packed_matches_padded_reference(model, mixed, fuse_residual: bool) -> None:
    reference = TorchPaddedRunner(model, CPU, pad_id=1).run(mixed)
    packed = PackedRunner(model, CPU, PackedOptions(fuse_residual=fuse_residual)).run(mixed)
    assert packed.shape == reference.shape == (len(mixed), 1)
    np.testing.assert_allclose(packed, reference, atol=1e-4, rtol=0)


def test_engine_fast_path_restores_input_order(tiny_model_dir, reference, xquad) -> None:
    fast = Reranker(str(tiny_model_dir), device="cpu", fast_path=True)
    assert isinstance(fast.runner, PackedRunner)
    docs = [it["context"] for it in xquad["questions"][:40]]
    random.Random(2).shuffle(docs)
    docs += ["", "x"] * 80  # > 128 pairs: the chunked, tokenize-while-scoring path
    query = xquad["questions"][0]["question"]
    want = reference.score(query, docs, normalize=False)
    got = fast.score(query, docs, normalize=False)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    pairs = [(it["question"], it["context"]) for it in xquad["questions"][:30]]
    np.testing.assert_allclose(
        fast.score_pairs(pairs, normalize=False),
        reference.score_pairs(pairs, normalize=False),
        atol=1e-4,
        rtol=0,
    )
    fast.close()


def test_bert_family_with_token_types(tiny_bert_config) -> None:
    config = tiny_bert_config(
        vocab_size=120, max_position_embeddings=64, num_labels=2, initializer_range=0.3
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 30, size=9)
    ids = rng.integers(5, 120, size=int(lengths.sum()))
    types = np.concatenate([(np.arange(n) >= n // 2).astype(np.int64) for n in lengths])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    encoded = EncodedPairs(ids, offsets, lengths, types)
    reference = TorchPaddedRunner(model, CPU, pad_id=0).run(encoded)
    packed = PackedRunner(model, CPU).run(encoded)
    assert packed.shape == (9, 2)
    np.testing.assert_allclose(packed, reference, atol=1e-4, rtol=0)


def _graph_logits(runner: PackedRunner, encoded: EncodedPairs) -> np.ndarray:
    """Logits from the bucketed buffer a captured CUDA graph reads (filler sequences, empty
    slots), computed by the graph's own forward run eagerly on CPU over the same views."""
    batch = pack(encoded, runner.padding_idx)
    bucket, slots, length = runner._graph_key(batch.tokens, batch.pairs, batch.max_len)
    inputs = torch.full((runner._graph_size(bucket, slots),), -7, dtype=torch.int32)
    runner._fill(_Graph(None, inputs, inputs, bucket, slots), batch)  # type: ignore[arg-type]
    assert (inputs != -7).all(), "every input position is written"
    views = runner._graph_views(inputs, bucket, slots, length)
    cu = views.cu_seqlens.tolist()
    assert cu == sorted(cu) and cu[-1] == bucket and max(np.diff(cu)) <= length
    views.cu_host = cu
    with torch.inference_mode():
        logits = runner._forward(views)
    assert logits.shape[0] == slots >= batch.pairs
    return logits[: batch.pairs].numpy()


@pytest.mark.parametrize("pairs", [1, 5, 27])
def test_cuda_graph_input_layout(model, mixed, pairs: int) -> None:
    part = mixed.take(np.arange(pairs))
    reference = TorchPaddedRunner(model, CPU, pad_id=1).run(part)
    got = _graph_logits(PackedRunner(model, CPU), part)
    np.testing.assert_allclose(got, reference, atol=1e-4, rtol=0)


def test_cuda_graph_layout_when_tokens_fill_the_bucket(model) -> None:
    lengths = np.array([300, 400, 324])  # 1024 tokens: no filler sequence at all
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    ids = np.random.default_rng(3).integers(5, 1000, size=int(lengths.sum()))
    ids[offsets] = 0
    encoded = EncodedPairs(ids, offsets, lengths)
    reference = TorchPaddedRunner(model, CPU, pad_id=1).run(encoded)
    got = _graph_logits(PackedRunner(model, CPU), encoded)
    np.testing.assert_allclose(got, reference, atol=1e-4, rtol=0)


def test_choose_runner(model) -> None:
    assert isinstance(choose_runner(model, CPU, 1, None), TorchPaddedRunner)  # auto on CPU
    assert isinstance(choose_runner(model, CPU, 1, False), TorchPaddedRunner)
    assert isinstance(choose_runner(model, CPU, 1, True), PackedRunner)
    assert isinstance(choose_runner(model, CPU, 1, PackedOptions(cuda_graphs=False)), PackedRunner)


def test_unsupported_models_are_named() -> None:
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_act="relu",
    )
    model = BertForSequenceClassification(config).eval()
    assert "hidden_act='relu'" in (unsupported_reason(model) or "")
    assert isinstance(choose_runner(model, CPU, 0, None), TorchPaddedRunner)
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        choose_runner(model, CPU, 0, True)
    with pytest.raises(ValueError, match="cannot run this model"):
        PackedRunner(model, CPU)


def test_kendall_tau() -> None:
    from scipy.stats import kendalltau

    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    b = a + rng.normal(scale=0.3, size=50)
    assert kendall_tau(a, a) == 1.0
    assert kendall_tau(a, -a) == -1.0
    assert kendall_tau(a, b) == pytest.approx(kendalltau(a, b)[0])
    ties = np.array([1.0, 1.0, 2.0, 3.0])
    assert kendall_tau(ties, np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
        kendalltau(ties, [1.0, 2.0, 3.0, 4.0])[0]
    )
    with pytest.raises(ValueError, match="differ in shape"):
        kendall_tau(a, a[:3])


def test_gc_pause_holds_collection_off_until_the_last_capture_ends() -> None:
    """Graph captures pause the garbage collector (a collection there would run CUDA
    deleters) instead of collecting first; overlapping captures on two threads keep it off
    until both end, and a collector the user had turned off stays off."""
    assert gc.isenabled()
    first_in, second_done, release = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def second() -> None:
        first_in.wait()
        with _GC_PAUSE:
            seen.append(gc.isenabled())
        second_done.set()
        release.wait()

    thread = threading.Thread(target=second)
    thread.start()
    with _GC_PAUSE:
        first_in.set()
        second_done.wait()
        seen.append(gc.isenabled())  # the other capture ended: still paused for this one
    release.set()
    thread.join()
    assert seen == [False, False]
    assert gc.isenabled()
    gc.disable()
    try:
        with _GC_PAUSE:
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
