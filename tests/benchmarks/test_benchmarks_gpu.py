"""The GPU peer benchmark's CPU smoke variant runs and writes its rows (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_peers_cpu_smoke(
    shared: Path | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shared is None or not (shared / "data/xquad-r/en.json").exists():
        pytest.skip("../shared (or $CROSSRANK_SHARED) is absent: no XQuAD-R workload")
    spec = importlib.util.spec_from_file_location("gpu_peers", ROOT / "benchmarks/gpu_peers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_peers", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    out, data = tmp_path / "bench.md", tmp_path / "bench.json"
    argv = ["--cpu-smoke", "--shared", str(shared), "--out", str(out), "--json", str(data)]
    assert module.main(argv) == 0

    results = json.loads(data.read_text())
    rows = {r["system"]: r for r in results["rows"] + results["ablation"]}
    fast = rows["crossrank (float32, fast path)"]
    padded = rows["crossrank (float32, padded, fast_path=False)"]
    for row in (fast, padded, rows["crossrank packed runner only (pre-tokenized)"]):
        assert row["pairs_per_s"] > 0
        assert row["max_diff"] < 1e-4  # fp32 on CPU: the same scores as the reference
        assert row["min_tau"] == pytest.approx(1.0)
    assert fast["p99_50"] >= fast["p50_50"] > 0
    assert results["facts"]["pairs"] == 8  # 1 en + 1 zh question x 4 paragraphs
    text = out.read_text()
    assert "| crossrank (float32, fast path) |" in text
    assert "python benchmarks/gpu_peers.py --cpu-smoke" in text


def test_gpu_multi_cpu_smoke(shared: Path | None, tmp_path: Path) -> None:
    """Two CPU "devices": the split call runs on both replicas and matches one device."""
    if shared is None or not (shared / "data/xquad-r/en.json").exists():
        pytest.skip("../shared (or $CROSSRANK_SHARED) is absent: no XQuAD-R workload")
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_multi

    out, data = tmp_path / "multi.md", tmp_path / "multi.json"
    argv = ["--cpu-smoke", "--shared", str(shared), "--out", str(out), "--json", str(data)]
    assert gpu_multi.main(argv) == 0
    result = json.loads(data.read_text())
    assert [c["pairs"] for c in result["calls"]] == [8, 16]
    for call in result["calls"]:
        assert call["all_gpus_pairs_per_s"] > 0 and call["one_gpu_pairs_per_s"] > 0
        assert call["max_abs_diff"] < 1e-4  # fp32 on CPU: splitting changes no score
        assert call["min_tau"] == pytest.approx(1.0)
    assert "| 16 |" in out.read_text()
