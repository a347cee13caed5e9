"""Runner selection (build_runner), the model-family facts, and the per-device workers."""

from __future__ import annotations

import sys
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from transformers import BertConfig, XLMRobertaConfig

import crossrank.backends
from crossrank.backends import build_runner, build_workers
from crossrank.backends.base import TorchPaddedRunner
from crossrank.backends.families import BERT, ROBERTA, family_of, max_pair_tokens, raw_scores
from crossrank.backends.packed import PackedOptions, PackedRunner
from crossrank.backends.workers import DevicePool, DeviceWorker
from crossrank.loading import load
from crossrank.options import EngineOptions
from crossrank.tokenization import PairTokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(str(tiny_model_dir), device=CPU, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(loaded):
    return PairTokenizer(loaded.tokenizer, max_length=128, query_max_length=64)


def test_torch_runner_follows_fast_path(loaded, tokenizer) -> None:
    def runner(**options):
        return build_runner(loaded, CPU, tokenizer, EngineOptions(**options))

    assert type(runner()) is TorchPaddedRunner  # auto: the packed runner is for CUDA only
    assert type(runner(fast_path=False)) is TorchPaddedRunner
    assert type(runner(fast_path=True)) is PackedRunner
    forced = runner(fast_path=PackedOptions(cuda_graphs=False))
    assert type(forced) is PackedRunner and not forced.options.cuda_graphs  # type: ignore[attr-defined]
    assert runner().pad_id == tokenizer.pad_id  # type: ignore[attr-defined]


def test_onnx_backend_goes_to_the_onnx_module(loaded, tokenizer, monkeypatch) -> None:
    calls: list[dict] = []
    fake = types.ModuleType("crossrank.backends.onnx")

    def fake_build(got_loaded, got_tokenizer, *, quantize, cache_dir):
        calls.append(
            {
                "loaded": got_loaded,
                "tokenizer": got_tokenizer,
                "quantize": quantize,
                "cache_dir": cache_dir,
            }
        )
        return "onnx runner"

    fake.build_runner = fake_build  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "crossrank.backends.onnx", fake)
    monkeypatch.setattr(crossrank.backends, "onnx", fake, raising=False)
    options = EngineOptions(backend="onnx", quantize=True, onnx_cache_dir="/tmp/x")
    assert build_runner(loaded, CPU, tokenizer, options) == "onnx runner"
    assert calls == [
        {"loaded": loaded, "tokenizer": tokenizer, "quantize": True, "cache_dir": "/tmp/x"}
    ]


def test_torch_backend_needs_weights(loaded, tokenizer) -> None:
    from dataclasses import replace

    with pytest.raises(ValueError, match="weights"):
        build_runner(replace(loaded, model=None), CPU, tokenizer, EngineOptions())


def test_build_workers_loads_one_copy_per_extra_device(loaded, tokenizer) -> None:
    workers = build_workers(loaded, [CPU, CPU], tokenizer, EngineOptions())
    assert [w.device for w in workers] == [CPU, CPU]
    assert workers[0].runner.model is loaded.model  # type: ignore[attr-defined]
    assert workers[1].runner.model is not loaded.model  # type: ignore[attr-defined]


def test_families() -> None:
    roberta = XLMRobertaConfig(max_position_embeddings=514)
    bert = BertConfig(max_position_embeddings=512)
    assert family_of(roberta) is ROBERTA and family_of(bert) is BERT
    # RoBERTa positions start after the padding index: 2 of 514 are unusable
    assert max_pair_tokens(roberta) == 512 and max_pair_tokens(bert) == 512
    assert family_of(types.SimpleNamespace(model_type="llama")) is None
    assert max_pair_tokens(types.SimpleNamespace(model_type="llama")) is None
    logits = np.array([[1.0, 3.0], [2.0, -1.0]], dtype=np.float32)
    np.testing.assert_array_equal(raw_scores(logits, 2), [2.0, -3.0])  # positive minus negative
    np.testing.assert_array_equal(raw_scores(logits[:, :1], 1), [1.0, 2.0])


class _FlakyRunner:
    """Logits = pair lengths; a pass of more than ``limit`` pairs runs out of memory."""

    packed = False

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: list[int] = []

    def submit(self, encoded):
        self.seen.append(len(encoded))
        if len(encoded) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        logits = encoded.lengths.astype(np.float32)[:, None]
        return lambda: logits


def test_device_worker_splits_a_pass_that_runs_out_of_memory(tiny_reranker) -> None:
    docs = [f"document number {i} " * (1 + i % 7) for i in range(16)]
    encoded = tiny_reranker.encode(["query"] * len(docs), docs)
    runner = _FlakyRunner(limit=4)
    worker = DeviceWorker(runner, CPU, num_labels=1)  # type: ignore[arg-type]
    np.testing.assert_array_equal(worker.submit(encoded)(), encoded.lengths.astype(np.float32))
    assert runner.seen == [16, 8, 4, 4, 8, 4, 4]  # only failing passes are split
    single = DeviceWorker(_FlakyRunner(limit=0), CPU, num_labels=1)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="single pair"):
        single.submit(encoded.take(np.array([0])))


def test_device_pool_spreads_large_calls_only(tiny_reranker) -> None:
    docs = [f"document {i} " * (i + 1) for i in range(12)]
    encoded = tiny_reranker.encode(["q"] * len(docs), docs)
    runners = [_FlakyRunner(limit=100), _FlakyRunner(limit=100)]
    workers = [DeviceWorker(r, CPU, num_labels=1) for r in runners]  # type: ignore[arg-type]
    with ThreadPoolExecutor(3) as pool:
        devices = DevicePool(workers, split_tokens=encoded.total_tokens, executor=pool)
        want = encoded.lengths.astype(np.float32)
        np.testing.assert_array_equal(devices.submit(encoded, batch_tokens=64)(), want)
        assert all(r.seen for r in runners)  # both devices scored part of the call
        for r in runners:
            r.seen.clear()
        small = encoded.take(np.arange(3))
        np.testing.assert_array_equal(devices.submit(small, batch_tokens=64)(), want[:3])
        assert runners[0].seen and not runners[1].seen
