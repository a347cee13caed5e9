"""Shared fixtures: a tiny random reranker of the real bge-reranker-v2-m3 architecture.

The real XLM-R tokenizer comes from ``../shared`` (or ``$CROSSRANK_SHARED``). Without it the
suite still runs: a small unigram tokenizer is trained on the spot and tests that need the
real tokenizer or data skip, saying why.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from crossrank.testing import SKELETON, build_random_reranker, shared_dir

TINY = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    # a wide init spreads the random scores so that rankings are not all ties
    "initializer_range": 0.3,
}

FALLBACK_SENTENCES = [
    "Mars is known as the Red Planet because of iron oxide on its surface.",
    "Jupiter is the largest planet in the solar system.",
    "火星因表面的氧化铁而被称为红色星球。",
    "La tour Eiffel se trouve à Paris.",
    "Der Rhein fließt durch Deutschland und die Schweiz.",
    "東京は日本の首都です。",
    "서울은 대한민국의 수도입니다.",
    "pandas read_csv accepts skiprows to skip lines at the start of a file.",
]


def _train_fallback_skeleton(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import UnigramTrainer
    from transformers import XLMRobertaConfig, XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = UnigramTrainer(vocab_size=600, special_tokens=specials, unk_token="<unk>")
    tok.train_from_iterator(FALLBACK_SENTENCES * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    fast = XLMRobertaTokenizerFast(tokenizer_object=tok, model_max_length=8192)
    fast.save_pretrained(path)
    XLMRobertaConfig(
        vocab_size=len(fast), architectures=["XLMRobertaForSequenceClassification"], num_labels=1,
        max_position_embeddings=8194, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def shared() -> Path | None:
    return shared_dir()


@pytest.fixture(scope="session")
def real_tokenizer_dir(shared: Path | None) -> Path:
    """The real XLM-R tokenizer and bge-reranker-v2-m3 config; skips when ../shared is absent."""
    if shared is None:
        pytest.skip("../shared (or $CROSSRANK_SHARED) is absent: the real XLM-R tokenizer is unavailable")
    return shared / SKELETON


@pytest.fixture(scope="session")
def skeleton_dir(shared: Path | None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shared is not None:
        return shared / SKELETON
    return _train_fallback_skeleton(tmp_path_factory.mktemp("fallback-skeleton"))


@pytest.fixture(scope="session")
def tiny_model_dir(skeleton_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide random XLMRobertaForSequenceClassification with the real tokenizer."""
    return build_random_reranker(tmp_path_factory.mktemp("tiny-reranker"), skeleton_dir, **TINY)


@pytest.fixture(scope="session")
def tiny_reranker(tiny_model_dir: Path):
    from crossrank import Reranker

    return Reranker(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def xquad(shared: Path | None) -> dict[str, list[dict]]:
    """Questions and paragraphs of XQuAD-R (en, zh) from ../shared, or a small built-in set."""
    if shared is None or not (shared / "data/xquad-r/en.json").exists():
        return {"questions": [{"question": s, "context": s} for s in FALLBACK_SENTENCES]}
    items = []
    for lang in ("en", "zh"):
        data = json.loads((shared / f"data/xquad-r/{lang}.json").read_text(encoding="utf-8"))
        for article in data["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"][:1]:
                    items.append({"question": qa["question"], "context": paragraph["context"]})
    random.Random(0).shuffle(items)
    return {"questions": items}
