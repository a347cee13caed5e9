"""The process-wide engine registry: one loaded engine per configuration, shared by adapters."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
import torch

from crossrank import Reranker
from crossrank.registry import get_reranker


def loads(caplog: pytest.LogCaptureFixture) -> int:
    """Model loads seen in the log (crossrank.loading logs one line per load)."""
    return sum(r.name == "crossrank.loading" and r.msg.startswith("loaded") for r in caplog.records)


def test_one_configuration_is_one_engine(
    model_path: str,
    shared_engine: Reranker,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="crossrank")
    assert get_reranker(model_path, device="cpu") is shared_engine
    # defaults spelled out, a relative spelling of the path and the dtype it resolves to
    parent, name = os.path.split(model_path)
    monkeypatch.chdir(parent)
    same = get_reranker(
        os.path.join(".", name),
        device=torch.device("cpu"),
        dtype="float32",
        max_length=512,
        normalize=True,
        revision=None,
    )
    assert same is shared_engine
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert get_reranker(model_path) is shared_engine  # "auto" resolves to cpu here
    assert loads(caplog) == 0


def test_concurrent_first_requests_load_once(
    model_path: str, shared_engine: Reranker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crossrank")
    barrier = threading.Barrier(4)
    got: list[Reranker] = []

    def ask() -> None:
        barrier.wait()
        got.append(get_reranker(model_path, device="cpu", max_length=264))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(e is got[0] for e in got)
    assert got[0] is not shared_engine and got[0].max_length == 264
    assert loads(caplog) == 1


def test_unknown_option_is_refused(model_path: str) -> None:
    with pytest.raises(TypeError, match="max_len"):
        get_reranker(model_path, max_len=128)


def test_adapters_of_both_frameworks_share_one_engine(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from langchain_core.documents import Document
    from llama_index.core.schema import NodeWithScore, TextNode

    from crossrank.langchain import CrossRankCompressor, CrossRankCrossEncoder
    from crossrank.llama_index import CrossRankRerank

    caplog.set_level(logging.INFO, logger="crossrank")
    options = {"model": str(tiny_model_dir), "device": "cpu", "max_length": 272}
    compressor, encoder = CrossRankCompressor(**options), CrossRankCrossEncoder(**options)
    rerank, other_rerank = CrossRankRerank(**options), CrossRankRerank(**options, top_n=1)
    assert loads(caplog) == 0  # constructing adapters loads nothing
    compressor.compress_documents([Document(page_content="Mars")], "red planet")
    encoder.score([("red planet", "Mars")])
    rerank.postprocess_nodes([NodeWithScore(node=TextNode(text="Mars"))], query_str="red planet")
    other_rerank.postprocess_nodes([NodeWithScore(node=TextNode(text="Mars"))], query_str="q")
    assert loads(caplog) == 1
    shared = get_reranker(str(tiny_model_dir), device="cpu", max_length=272)
    assert compressor.engine is shared and encoder.engine is shared
    assert rerank.engine is shared and other_rerank.engine is shared
