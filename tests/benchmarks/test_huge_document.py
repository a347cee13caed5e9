"""Smoke test of benchmarks/huge_document.py on a small document: it runs and prints its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "huge_document.py"


def test_small_document_run_prints_the_table(skeleton_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    args = ["--server-src", str(ROOT / "src"), "--label", "smoke", "--doc-mb", "0.2"]
    args += ["--scenarios", "truncate", "--skeleton", str(skeleton_dir), "--json", str(out)]
    args += ["--small-delay", "0.1", "--settle", "0.1"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| code | scenario | RSS before MiB | peak RSS MiB |" in proc.stdout
    assert "| smoke | truncate |" in proc.stdout
    (outcome,) = json.loads(out.read_text())
    assert outcome["big_status"] == "200"
    assert [status for status, _ in outcome["during"] + outcome["after"]] == ["200"] * 6
    assert outcome["peak_mib"] >= outcome["baseline_mib"] > 0
