"""A per-call ``instruction=`` on decoder (LLM) rerankers: every engine method and data path
(sync and async, pairs, rerank, the overlapped packed path, ``max_doc_tokens``, chunk mode)
scores as an engine built with that instruction, and as the model card's recipe with it; the
score cache keeps instructions apart; an encoder model, a bad type and an instruction that
leaves no room are refused naming ``instruction``. The peers' ``prompt=`` is that instruction:
against sentence-transformers' ``CrossEncoder`` (Qwen3 seq-cls conversion, its chat template)
and FlagEmbedding's ``FlagLLMReranker`` recipe (bge-reranker-v2-gemma). Tiny random models,
fp32 CPU."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from crossrank import Reranker
from crossrank.backends.decoder import QWEN3
from crossrank.errors import OptionError, OptionTypeError

from .llm_assets import OTHER_INSTRUCTION as OTHER
from .llm_assets import SAMPLE_DOCUMENTS, SAMPLE_QUERIES
from .test_decoder import card_scores, flag_llm_scores

QUERY = SAMPLE_QUERIES[0]
PAIRS = [(q, d) for q in SAMPLE_QUERIES[:2] for d in SAMPLE_DOCUMENTS]
LONG_DOC = "Beijing is the capital of China and has a long history. " * 60
ENGINE = {"device": "cpu", "max_length": 256}
#: the packed runner's CPU code path (shared prefix across a pass), with calls of more than
#: one pair tokenized in overlapped chunks of 1, then 4 pairs
PACKED = {**ENGINE, "fast_path": True, "overlap_min_pairs": 1, "overlap_first_chunk": 1}


@pytest.fixture(scope="module")
def default(tiny_qwen3_dir: Path) -> Reranker:
    return Reranker(str(tiny_qwen3_dir), **ENGINE)


@pytest.fixture(scope="module")
def built(tiny_qwen3_dir: Path, default: Reranker) -> Reranker:
    """An engine built with ``OTHER`` (and the default engine's query cap)."""
    return Reranker(
        str(tiny_qwen3_dir),
        **ENGINE,
        instruction=OTHER,
        query_max_length=default.query_max_length,
    )


def raw_of(engine: Reranker, **kwargs) -> np.ndarray:
    return engine.score(QUERY, SAMPLE_DOCUMENTS, normalize=False, **kwargs)


def test_per_call_instruction_scores_as_an_engine_built_with_it(
    default: Reranker, built: Reranker, tiny_qwen3_dir: Path
):
    got = raw_of(default, instruction=OTHER)
    np.testing.assert_allclose(got, raw_of(built), atol=1e-6)
    _, card = card_scores(tiny_qwen3_dir, [(QUERY, d) for d in SAMPLE_DOCUMENTS], OTHER)
    np.testing.assert_allclose(got, card, atol=1e-4)
    assert np.abs(got - raw_of(default)).max() > 1e-3  # the instruction reaches the model


def test_none_or_the_engine_instruction_is_the_default(default: Reranker):
    expected = raw_of(default)
    np.testing.assert_array_equal(raw_of(default, instruction=None), expected)
    np.testing.assert_array_equal(raw_of(default, instruction=QWEN3.default_instruction), expected)


def test_pairs_rerank_and_max_doc_tokens(default: Reranker, built: Reranker):
    np.testing.assert_allclose(
        default.score_pairs(PAIRS, instruction=OTHER), built.score_pairs(PAIRS), atol=1e-6
    )
    got = default.rerank(QUERY, SAMPLE_DOCUMENTS, top_n=3, instruction=OTHER)
    expected = built.rerank(QUERY, SAMPLE_DOCUMENTS, top_n=3)
    assert [r.index for r in got] == [r.index for r in expected]
    np.testing.assert_allclose([r.score for r in got], [r.score for r in expected], atol=1e-6)
    np.testing.assert_allclose(
        raw_of(default, max_doc_tokens=4, instruction=OTHER),
        raw_of(built, max_doc_tokens=4),
        atol=1e-6,
    )


def test_async_methods(default: Reranker, built: Reranker):
    async def calls(engine: Reranker, **kwargs):
        return (
            await engine.ascore(QUERY, SAMPLE_DOCUMENTS, normalize=False, **kwargs),
            await engine.ascore_raw(QUERY, SAMPLE_DOCUMENTS, **kwargs),
            await engine.ascore_pairs(PAIRS, **kwargs),
            [(r.index, r.score) for r in await engine.arerank(QUERY, SAMPLE_DOCUMENTS, **kwargs)],
        )

    score, (raw, tokens), pairs, ranked = asyncio.run(calls(default, instruction=OTHER))
    e_score, (e_raw, e_tokens), e_pairs, e_ranked = asyncio.run(calls(built))
    np.testing.assert_allclose(score, e_score, atol=1e-6)
    np.testing.assert_allclose(raw, e_raw, atol=1e-6)
    assert tokens == e_tokens  # usage counts the call's own prompts
    np.testing.assert_allclose(pairs, e_pairs, atol=1e-6)
    assert [i for i, _ in ranked] == [i for i, _ in e_ranked]
    np.testing.assert_allclose([s for _, s in ranked], [s for _, s in e_ranked], atol=1e-6)


def test_overlapped_packed_path_mixes_instructions_in_one_pass(
    tiny_qwen3_dir: Path, built: Reranker
):
    packed = Reranker(str(tiny_qwen3_dir), **PACKED)
    assert packed.runner.packed
    expected = raw_of(built)
    np.testing.assert_allclose(raw_of(packed, instruction=OTHER), expected, atol=1e-4)
    default_raw = raw_of(packed)

    async def both():  # concurrent calls share the micro-batcher's passes
        return await asyncio.gather(
            packed.ascore(QUERY, SAMPLE_DOCUMENTS, normalize=False),
            packed.ascore(QUERY, SAMPLE_DOCUMENTS, normalize=False, instruction=OTHER),
        )

    plain, other = asyncio.run(both())
    np.testing.assert_allclose(plain, default_raw, atol=1e-5)
    np.testing.assert_allclose(other, expected, atol=1e-4)


def test_chunk_mode_and_the_cache_keep_instructions_apart(tiny_qwen3_dir: Path):
    """Same pairs, two instructions, one cached engine: two sets of scores (and spans), each
    the uncached value of an engine built with its instruction, each hit on its own."""
    chunk = {**ENGINE, "long_docs": "chunk"}
    cached = Reranker(str(tiny_qwen3_dir), **chunk, cache="memory")
    built = Reranker(
        str(tiny_qwen3_dir), **chunk, instruction=OTHER, query_max_length=cached.query_max_length
    )
    docs = [SAMPLE_DOCUMENTS[0], LONG_DOC]

    def ranked(engine: Reranker, **kwargs):
        return [(r.index, r.score, r.best_span) for r in engine.rerank(QUERY, docs, **kwargs)]

    first = ranked(cached)
    other = ranked(cached, instruction=OTHER)
    assert cached.cache_stats is not None
    assert (cached.cache_stats.hits, cached.cache_stats.misses) == (0, 4)
    expected = ranked(built)
    assert [(i, span) for i, _, span in other] == [(i, span) for i, _, span in expected]
    np.testing.assert_allclose([s for _, s, _ in other], [s for _, s, _ in expected], atol=1e-6)
    assert ranked(cached) == first and ranked(cached, instruction=OTHER) == other
    assert (cached.cache_stats.hits, cached.cache_stats.misses) == (4, 4)
    # the engine's own instruction, given per call, has the engine's keys
    assert ranked(cached, instruction=QWEN3.default_instruction) == first
    assert (cached.cache_stats.hits, cached.cache_stats.misses) == (6, 4)
    assert {s for _, s, _ in first}.isdisjoint(s for _, s, _ in other)


def test_first_overlong_counts_the_call_instruction(default: Reranker):
    tok = default.tokenizer
    longer = QWEN3.default_instruction + ", in the legal domain, citing the statute and the court"
    room = tok.max_length - tok.template_tokens() - int(tok.token_counts([QUERY])[0])
    doc = " ".join(["word"] * (room - 2))
    assert tok.token_counts([doc])[0] <= room  # fits with the engine's instruction
    assert default.first_overlong(QUERY, [doc]) is None
    assert tok.template_tokens(longer) > tok.template_tokens() + 2
    assert default.first_overlong(QUERY, [doc], instruction=longer) == 0


def test_encoder_models_refuse_an_instruction(tiny_reranker: Reranker):
    tiny_reranker.score(QUERY, ["x"], instruction=None)  # None is everyone's default
    calls = [
        lambda: tiny_reranker.score(QUERY, ["x"], instruction="task"),
        lambda: tiny_reranker.score_pairs([(QUERY, "x")], instruction="task"),
        lambda: tiny_reranker.rerank(QUERY, ["x"], instruction="task"),
        lambda: asyncio.run(tiny_reranker.ascore(QUERY, ["x"], instruction="task")),
        lambda: tiny_reranker.first_overlong(QUERY, ["x"], instruction="task"),
    ]
    for call in calls:
        with pytest.raises(OptionError, match="decoder") as err:
            call()
        assert err.value.param == "instruction"


def test_bad_or_too_long_instructions_are_named(default: Reranker):
    with pytest.raises(OptionTypeError, match="instruction must be a str") as err:
        default.score(QUERY, SAMPLE_DOCUMENTS, instruction=5)  # type: ignore[arg-type]
    assert err.value.param == "instruction"

    def arerank(query: str, docs: list[str], instruction: str) -> object:
        return asyncio.run(default.arerank(query, docs, instruction=instruction))

    for too_long in ("word " * 300, "word " * (256 - default.query_max_length)):
        for call in (default.score, arerank):
            with pytest.raises(OptionError, match="max_length=256; shorten the instruction") as e:
                call(QUERY, ["x"], instruction=too_long)
            assert e.value.param == "instruction"


# The Qwen3-Reranker chat template sentence-transformers (>= 5.4) renders pairs with: the
# system message (a predict/rank ``prompt``) is the <Instruct> line. Copied from
# sentence-transformers' tests/cross_encoder/test_model.py (test_qwen3_reranker_with_chat_template).
ST_QWEN3_TEMPLATE = """\
<|im_start|>system
Judge whether the Document meets the requirements based on the Query and the Instruct provided. \
Note that the answer can only be "yes" or "no".<|im_end|>
<|im_start|>user
<Instruct>: {{ messages | selectattr("role", "eq", "system") | map(attribute="content") | first \
| default("Given a web search query, retrieve relevant passages that answer the query") }}
<Query>: {{ messages | selectattr("role", "eq", "query") | map(attribute="content") | first }}
<Document>: {{ messages | selectattr("role", "eq", "document") | map(attribute="content") \
| first }}<|im_end|>
<|im_start|>assistant
<think>\n\n</think>\n\n\n"""


def test_sentence_transformers_prompt_is_the_instruction(tiny_qwen3_seq_cls_dir: Path):
    st = pytest.importorskip("sentence_transformers")
    identity = torch.nn.Identity()
    peer = st.CrossEncoder(
        str(tiny_qwen3_seq_cls_dir),
        activation_fn=identity,
        processor_kwargs={"chat_template": ST_QWEN3_TEMPLATE},
        model_kwargs={"torch_dtype": torch.float32},
    )
    engine = Reranker(str(tiny_qwen3_seq_cls_dir), **ENGINE)
    got = engine.predict(PAIRS, activation_fn=identity, prompt=OTHER)
    np.testing.assert_allclose(got, peer.predict(PAIRS, prompt=OTHER), atol=1e-4)
    np.testing.assert_allclose(
        engine.predict(PAIRS, activation_fn=identity), peer.predict(PAIRS), atol=1e-4
    )
    assert np.abs(got - peer.predict(PAIRS)).max() > 1e-3
    ranked = engine.rank(QUERY, SAMPLE_DOCUMENTS, activation_fn=identity, prompt=OTHER)
    peer_ranked = peer.rank(QUERY, SAMPLE_DOCUMENTS, prompt=OTHER)
    assert [r["corpus_id"] for r in ranked] == [r["corpus_id"] for r in peer_ranked]


def test_flag_llm_reranker_prompt_is_the_instruction(tiny_gemma_dir: Path):
    prompt = "Given a query A and a passage B, say whether B is written in the language of A."
    engine = Reranker(str(tiny_gemma_dir), device="cpu", max_length=512)
    pairs = [(QUERY, d) for d in SAMPLE_DOCUMENTS]
    got = engine.compute_score(pairs, prompt=prompt)
    np.testing.assert_allclose(
        got, flag_llm_scores(tiny_gemma_dir, pairs, prompt=prompt), atol=1e-4
    )
    assert np.abs(np.array(got) - engine.compute_score(pairs)).max() > 1e-3
