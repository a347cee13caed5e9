"""The LLM reranker benchmark's CPU smoke run (``--quick``) runs and writes its table (no
timing asserts)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_llm_quick(shared: Path | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if shared is None or not (shared / "data/xquad-r/en.json").exists():
        pytest.skip("../shared (or $CROSSRANK_SHARED) is absent: no XQuAD-R workload")
    from crossrank.testing import qwen_vocab_file

    if qwen_vocab_file() is None:
        pytest.skip("dashscope is not installed: the Qwen BPE vocabulary is unavailable")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_llm", ROOT / "benchmarks/gpu_llm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_llm", module)
    spec.loader.exec_module(module)
    out, data = tmp_path / "llm.md", tmp_path / "llm.json"
    argv = ["--quick", "--shared", str(shared), "--out", str(out), "--json", str(data)]
    assert module.main(argv) == 0
    rows = {r["system"]: r for r in json.loads(data.read_text())["rows"]}
    ours = rows["crossrank 0.6b (tiny) (DecoderPaddedRunner)"]
    assert ours["pairs_per_s"] > 0 and ours["p99_50"] >= ours["p50_50"] > 0
    assert any(name.startswith("transformers 0.6b (tiny): model card") for name in rows)
    assert "| crossrank gemma (tiny) (DecoderPaddedRunner) |" in out.read_text()
