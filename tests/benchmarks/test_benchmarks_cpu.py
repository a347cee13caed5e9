"""Smoke test of benchmarks/cpu_peers.py: it runs and reports every system (never timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("sentence_transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_peers.py"


def test_quick_run_reports_all_systems(skeleton_dir: Path, tmp_path: Path) -> None:
    out, doc = tmp_path / "result.json", tmp_path / "cpu.md"
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src")}
    env.pop("CROSSRANK_ST_ONNX_PYTHON", None)  # no side venv: the ST onnx row must say why
    args = ["--quick", "--skeleton", str(skeleton_dir), "--work-dir", str(tmp_path / "work")]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--json", str(out), "--write", str(doc)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["system"]: row for row in json.loads(out.read_text())["rows"]}
    assert len(rows) == 5
    for name in ("crossrank torch fp32", "crossrank onnx fp32", "crossrank onnx int8"):
        assert rows[name]["available"] and rows[name]["pairs_per_s"] > 0
    # the ONNX fp32 path agrees with torch on the same pairs
    assert rows["crossrank onnx fp32"]["max_abs_diff"] < 1e-4
    unavailable = [r for r in rows.values() if not r["available"]]
    assert all(r["reason"] for r in unavailable)  # a peer that cannot run says why
    st_onnx = rows["sentence-transformers CrossEncoder onnx, batch 32"]
    assert st_onnx["available"] or "--st-onnx-python" in st_onnx["reason"]
    text = doc.read_text()
    assert "| system | pairs/s |" in text and "crossrank onnx int8" in text
    assert "python benchmarks/cpu_peers.py --quick" in text
