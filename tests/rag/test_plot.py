"""``crossrank eval --plot`` and crossrank.rag.plot: a real image file, of the right kind, with
something drawn on it."""

from __future__ import annotations

import json
import struct
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _payload(random_weights: bool = False) -> dict[str, Any]:
    metrics = {
        "retrieval": {"nDCG@10": 0.41, "Recall@5": 0.38},
        "retrieval+rerank": {"nDCG@10": 0.72, "Recall@5": 0.69},
    }
    return {
        "dataset": "xquad-r",
        "top_k": 50,
        "random_weight_reranker": random_weights,
        "tasks": {task: {"metrics": metrics} for task in ("en-en", "zh-zh", "zh-en")},
        "timings": {
            "embed passages + build index": {"calls": 2, "total_s": 30.0},
            "retrieve": {"calls": 300, "total_s": 3.0},
            "rerank": {"calls": 300, "total_s": 45.0},
            "LLM": {"calls": 0, "total_s": 0.0},
        },
    }


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_png_and_svg(tmp_path: Path) -> None:
    from crossrank.rag.plot import save_eval_plot

    png = save_eval_plot(_payload(), tmp_path / "eval.png").read_bytes()
    width, height = _png_size(png)
    assert width > 800 and height > 300 and len(png) > 20_000
    svg = ET.parse(save_eval_plot(_payload(True), tmp_path / "eval.svg")).getroot()
    assert svg.tag.endswith("svg")
    text = (tmp_path / "eval.svg").read_text()
    assert len(text) > 20_000 and "RANDOM-WEIGHT" in text  # titles are kept as text in SVG


def test_eval_plot_option(minilm_path: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    from crossrank.cli import app

    plot, metrics = tmp_path / "eval.png", tmp_path / "eval.json"
    args = ["eval", "--embed-model", minilm_path, "--rerank-model", str(tiny_model_dir)]
    args += ["--device", "cpu", "--max-queries", "3", "--json", str(metrics), "--plot", str(plot)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {plot}" in result.stdout.replace("\n", "")
    assert _png_size(plot.read_bytes())[0] > 800 and plot.stat().st_size > 20_000
    assert json.loads(metrics.read_text())["tasks"]["demo"]["queries"] == 3
    assert "demo: retrieve + rerank: 3/3 queries (100%)" in result.stderr  # piped progress
