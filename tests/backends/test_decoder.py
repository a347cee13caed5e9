"""Decoder (LLM) rerankers: family detection, prompt ids and the padded reference runner,
against independent implementations of each model card's recipe (plain transformers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from crossrank.backends import decoder
from crossrank.backends.decoder import (
    BGE_GEMMA,
    QWEN3,
    DecoderPaddedRunner,
    PromptTokenizer,
    detect_family,
)
from crossrank.errors import ModelLoadError, OptionError

from .llm_assets import SAMPLE_DOCUMENTS, SAMPLE_QUERIES

# ---- independent references, written from the recipes (not from crossrank's code)
CARD_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
CARD_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
CARD_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def card_inputs(tokenizer, pairs, instruction, max_length):
    """Qwen3-Reranker model card: ``process_inputs`` (left padding)."""
    prefix = tokenizer.encode(CARD_PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(CARD_SUFFIX, add_special_tokens=False)
    texts = [f"<Instruct>: {instruction}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
    enc = tokenizer(
        texts,
        padding=False,
        truncation="longest_first",
        return_attention_mask=False,
        max_length=max_length - len(prefix) - len(suffix),
    )
    enc["input_ids"] = [prefix + ids + suffix for ids in enc["input_ids"]]
    tokenizer.padding_side = "left"
    return enc["input_ids"], tokenizer.pad(enc, padding=True, return_tensors="pt")


def card_scores(model_dir, pairs, instruction=CARD_INSTRUCTION, max_length=8192):
    """Qwen3-Reranker model card: ``compute_logits`` -> (probability of yes, yes - no)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    yes = tokenizer.convert_tokens_to_ids("yes")
    no = tokenizer.convert_tokens_to_ids("no")
    _, inputs = card_inputs(tokenizer, pairs, instruction, max_length)
    with torch.no_grad():
        last = model(**inputs).logits[:, -1, :]
    both = torch.stack([last[:, no], last[:, yes]], dim=1)
    prob = torch.nn.functional.log_softmax(both, dim=1)[:, 1].exp()
    return prob.numpy(), (last[:, yes] - last[:, no]).numpy()


def flag_llm_scores(model_dir, pairs, max_length=512, prompt=None):
    """FlagEmbedding ``FlagLLMReranker.compute_score`` (bge-reranker-v2-gemma), unnormalized;
    ``prompt`` as its ``prompt=`` (``None``: its default)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if prompt is None:
        prompt = (
            "Given a query A and a passage B, determine whether the passage contains an answer "
            "to the query by providing a prediction of either 'Yes' or 'No'."
        )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sep = tokenizer("\n", add_special_tokens=False)["input_ids"]
    yes = tokenizer("Yes", add_special_tokens=False)["input_ids"][0]
    scores = []
    for q, d in pairs:
        q_ids = tokenizer("A: " + q, add_special_tokens=False)["input_ids"][: max_length * 3 // 4]
        d_ids = tokenizer("B: " + d, add_special_tokens=False)["input_ids"][:max_length]
        ids = [tokenizer.bos_token_id, *q_ids, *sep, *d_ids, *sep, *prompt_ids]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        scores.append(float(logits[yes]))
    return np.array(scores)


# ---- helpers
def all_pairs():
    return [(q, d) for q in SAMPLE_QUERIES for d in SAMPLE_DOCUMENTS]


def crossrank_logits(model_dir, family, pairs, **tokenizer_options):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    options = {"max_length": family.default_max_length, "query_max_length": 256}
    options.update(tokenizer_options)
    prompt = PromptTokenizer(tokenizer, family, **options)
    config = AutoConfig.from_pretrained(model_dir)
    seq_cls = "ForSequenceClassification" in config.architectures[0]
    auto = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, dtype=torch.float32).eval()
    runner = DecoderPaddedRunner(
        model, torch.device("cpu"), prompt.pad_id, family, prompt.answer_ids
    )
    encoded = prompt.encode([q for q, _ in pairs], [d for _, d in pairs])
    return encoded, runner.run(encoded)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


# ---- family detection
def test_detects_family_from_config_and_tokenizer(tiny_qwen3_dir: Path, tiny_gemma_dir: Path):
    for model_dir, family in ((tiny_qwen3_dir, QWEN3), (tiny_gemma_dir, BGE_GEMMA)):
        config = AutoConfig.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        assert detect_family(config, tokenizer) is family
    config = AutoConfig.from_pretrained(tiny_qwen3_dir)
    assert detect_family(config, None, name="bge-reranker-gemma") is BGE_GEMMA


def test_encoders_are_not_decoder_families(tiny_model_dir: Path):
    assert detect_family(AutoConfig.from_pretrained(tiny_model_dir)) is None


def test_unknown_family_name_is_an_option_error(tiny_qwen3_dir: Path):
    with pytest.raises(OptionError, match="qwen3-reranker") as err:
        detect_family(AutoConfig.from_pretrained(tiny_qwen3_dir), name="no-such-family")
    assert err.value.param == "family"


def test_tokenizer_without_template_tokens_is_refused(tiny_qwen3_dir: Path, tiny_model_dir: Path):
    config = AutoConfig.from_pretrained(tiny_qwen3_dir)
    xlmr = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(ModelLoadError, match="qwen3-reranker"):
        detect_family(config, xlmr)


# ---- prompt ids
def test_qwen3_prompt_ids_are_the_model_cards(tiny_qwen3_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    pairs = all_pairs()
    expected, _ = card_inputs(tokenizer, pairs, CARD_INSTRUCTION, 8192)
    prompt = PromptTokenizer(tokenizer, QWEN3, max_length=8192, query_max_length=256)
    encoded = prompt.encode([q for q, _ in pairs], [d for _, d in pairs])
    got = [
        encoded.ids[o : o + n].tolist()
        for o, n in zip(encoded.offsets, encoded.lengths, strict=True)
    ]
    assert got == expected
    assert prompt.answer_ids == [tokenizer.convert_tokens_to_ids(t) for t in ("no", "yes")]


def test_templates_kept_across_calls_give_the_model_cards_ids(tiny_qwen3_dir: Path, monkeypatch):
    """The template around each (instruction, query) is kept for later calls (at most
    ``_MAX_FRAMES``, then started over): calls that reuse it, calls with another
    instruction, and calls after it was started over give the recipe's ids."""
    monkeypatch.setattr(decoder, "_MAX_FRAMES", 2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    prompt = PromptTokenizer(tokenizer, QWEN3, max_length=8192, query_max_length=256)
    pairs = all_pairs()
    for instruction in (CARD_INSTRUCTION, "Find the answer", CARD_INSTRUCTION):
        expected, _ = card_inputs(tokenizer, pairs, instruction, 8192)
        for part in (pairs[:3], pairs, pairs[::-1]):
            encoded = prompt.encode(
                [q for q, _ in part], [d for _, d in part], instruction=instruction
            )
            got = [
                encoded.ids[o : o + n].tolist()
                for o, n in zip(encoded.offsets, encoded.lengths, strict=True)
            ]
            assert got == [expected[pairs.index(pair)] for pair in part]
        assert len(prompt._frames_made) <= max(2, len(SAMPLE_QUERIES))  # bounded


def test_truncation_cuts_only_the_document(tiny_qwen3_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    query, long_doc = "Where is the Eiffel tower?", "Paris is the capital of France. " * 200
    prompt = PromptTokenizer(tokenizer, QWEN3, max_length=160, query_max_length=32)
    encoded = prompt.encode([query, query], [long_doc, "short"])
    ids = encoded.ids[: encoded.lengths[0]].tolist()
    assert encoded.lengths[0] == 160
    text = tokenizer.decode(ids)
    head = f"{CARD_PREFIX}<Instruct>: {CARD_INSTRUCTION}\n<Query>: {query}\n<Document>: Paris"
    assert text.startswith(head)
    assert text.endswith(CARD_SUFFIX)
    assert text.count("Paris") < 200
    # exactly the model card's truncation at the same max_length
    expected, _ = card_inputs(tokenizer, [(query, long_doc)], CARD_INSTRUCTION, 160)
    assert ids == expected[0]


def test_query_is_capped_not_the_template(tiny_qwen3_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    prompt = PromptTokenizer(tokenizer, QWEN3, max_length=200, query_max_length=8)
    encoded = prompt.encode(["alpha beta gamma delta " * 20], ["the document"])
    text = tokenizer.decode(encoded.ids.tolist())
    assert text.endswith("<Document>: the document" + CARD_SUFFIX)
    assert text.count("alpha") == 2  # eight query tokens kept


def test_room_for_the_template_is_checked(tiny_qwen3_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    prompt = PromptTokenizer(tokenizer, QWEN3, max_length=8192, query_max_length=256)
    assert 50 < prompt.special_tokens_in_pair < 100
    with pytest.raises(ValueError, match="template"):
        PromptTokenizer(tokenizer, QWEN3, max_length=100, query_max_length=40)


# ---- scores: padded reference runner vs the recipes
def test_qwen3_scores_match_the_model_card(tiny_qwen3_dir: Path):
    pairs = all_pairs()
    _, logits = crossrank_logits(tiny_qwen3_dir, QWEN3, pairs)
    prob, raw = card_scores(tiny_qwen3_dir, pairs)
    assert logits.shape == (len(pairs), 2) and logits.dtype == np.float32
    engine_raw = logits[:, 1] - logits[:, 0]  # the engine's two-label rule
    np.testing.assert_allclose(engine_raw, raw, atol=1e-4)
    np.testing.assert_allclose(sigmoid(engine_raw), prob, atol=1e-4)
    assert np.ptp(prob) > 1e-3  # random weights still spread the scores


def test_qwen3_truncated_scores_match_the_model_card(tiny_qwen3_dir: Path):
    pairs = [("Where is the Eiffel tower?", "Paris is the capital of France. " * 100)]
    pairs.append(("Explain gravity", SAMPLE_DOCUMENTS[1] * 5))
    _, logits = crossrank_logits(tiny_qwen3_dir, QWEN3, pairs, max_length=150, query_max_length=32)
    _, raw = card_scores(tiny_qwen3_dir, pairs, max_length=150)
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], raw, atol=1e-4)


def test_custom_instruction(tiny_qwen3_dir: Path):
    pairs = all_pairs()[:5]
    instruction = "Given a question, retrieve passages written in Chinese"
    _, logits = crossrank_logits(tiny_qwen3_dir, QWEN3, pairs, instruction=instruction)
    _, raw = card_scores(tiny_qwen3_dir, pairs, instruction=instruction)
    _, default_raw = card_scores(tiny_qwen3_dir, pairs)
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], raw, atol=1e-4)
    assert not np.allclose(raw, default_raw, atol=1e-4)


def test_gemma_scores_match_flag_llm_reranker(tiny_gemma_dir: Path):
    pairs = all_pairs()
    encoded, logits = crossrank_logits(tiny_gemma_dir, BGE_GEMMA, pairs)
    assert logits.shape == (len(pairs), 1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma_dir)
    assert encoded.ids[0] == tokenizer.bos_token_id
    np.testing.assert_allclose(logits[:, 0], flag_llm_scores(tiny_gemma_dir, pairs), atol=1e-4)


def test_seq_cls_conversion_matches_transformers(tiny_qwen3_seq_cls_dir: Path):
    pairs = all_pairs()
    encoded, logits = crossrank_logits(tiny_qwen3_seq_cls_dir, QWEN3, pairs)
    assert logits.shape == (len(pairs), 1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_qwen3_seq_cls_dir).eval()
    expected = []
    for o, n in zip(encoded.offsets, encoded.lengths, strict=True):
        with torch.no_grad():
            expected.append(
                float(model(input_ids=torch.from_numpy(encoded.ids[o : o + n])[None]).logits[0, 0])
            )
    np.testing.assert_allclose(logits[:, 0], expected, atol=1e-4)


def test_windows_cover_a_long_document(tiny_qwen3_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    prompt = PromptTokenizer(tokenizer, QWEN3, max_length=8192, query_max_length=64)
    long_doc = " ".join(f"sentence {i} about the history of Paris." for i in range(60))
    queries, docs = ["Where is Paris?", "Explain gravity"], [long_doc, SAMPLE_DOCUMENTS[1]]
    windows = prompt.encode_windows(queries, docs, window_tokens=100, overlap=10)
    assert windows.pair_index is not None and windows.spans is not None
    first = windows.pair_index == 0
    assert first.sum() > 3 and windows.pair_index[~first].tolist() == [1]
    starts, ends = windows.spans[first, 0], windows.spans[first, 1]
    assert starts[0] == 0 and ends[-1] == len(long_doc)
    assert (starts[1:] < ends[:-1]).all()  # consecutive windows overlap
    for row in np.flatnonzero(first):
        text = tokenizer.decode(
            windows.ids[windows.offsets[row] : windows.offsets[row] + windows.lengths[row]].tolist()
        )
        start, end = windows.spans[row]
        assert text.endswith(f"<Document>: {long_doc[start:end]}{CARD_SUFFIX}")
        assert "<Query>: Where is Paris?\n" in text
    # a document that fits is the row encode() gives
    whole = prompt.encode(queries[1:], docs[1:])
    last = int(np.flatnonzero(~first)[0])
    row = windows.ids[windows.offsets[last] : windows.offsets[last] + windows.lengths[last]]
    assert row.tolist() == whole.ids.tolist()
