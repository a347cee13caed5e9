"""Build random-weight rerankers of a real architecture, for tests, benchmarks and offline demos.

No model weights can be downloaded in CI or on air-gapped machines, but the architecture
(``config.json``) and tokenizer of a real reranker are small. A random-weight model built from
them runs at exactly the real model's speed and exercises every code path; its scores are
meaningless, which is why everything built here is labelled as random.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

# The marker every model built here gets, and its test, live where the demo reads them.
from crossrank.rag.models import RANDOM_WEIGHTS_FILE, is_random_reranker

__all__ = [
    "RANDOM_WEIGHTS_FILE",
    "SHARED_ENV",
    "SKELETON",
    "TINY_CONFIG",
    "build_random_reranker",
    "is_random_reranker",
    "shared_dir",
]

SHARED_ENV = "CROSSRANK_SHARED"

#: Config overrides for a tiny (2-layer, 64-wide) test model of any BERT/XLM-R architecture.
#: The wide init spreads random scores so rankings are not all ties.
TINY_CONFIG: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "initializer_range": 0.3,
}
SKELETON = "models/bge-reranker-v2-m3-skeleton"


def shared_dir() -> Path | None:
    """The project's shared asset folder (``$CROSSRANK_SHARED``, else ``../shared``) if present."""
    candidates = [os.environ.get(SHARED_ENV)] if os.environ.get(SHARED_ENV) else []
    candidates.append(str(Path(__file__).resolve().parents[3] / "shared"))
    candidates.append(str(Path.cwd().parent / "shared"))
    for candidate in candidates:
        if candidate and (Path(candidate) / SKELETON).is_dir():
            return Path(candidate)
    return None


def build_random_reranker(
    out_dir: str | os.PathLike[str],
    skeleton_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Save a random-weight sequence-classification model and its tokenizer to ``out_dir``.

    ``skeleton_dir`` holds a ``config.json`` and tokenizer files (no weights). Keyword
    arguments override config fields, e.g. ``num_hidden_layers=2, hidden_size=64,
    num_attention_heads=4, intermediate_size=128`` for a tiny test model.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(skeleton_dir, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(skeleton_dir, use_fast=True).save_pretrained(out)
    (out / RANDOM_WEIGHTS_FILE).write_text(
        "This model has random weights built by crossrank.testing; its scores are meaningless.\n"
    )
    return out


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b between two score vectors (1.0 = same ranking); at most 2,000 items."""
    x = np.asarray(a, dtype=np.float64)[:2000]
    y = np.asarray(b, dtype=np.float64)[:2000]
    if x.shape != y.shape:
        raise ValueError(f"score vectors differ in shape: {x.shape} vs {y.shape}")
    i, j = np.triu_indices(x.shape[0], 1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    denominator = float(np.sqrt(np.count_nonzero(sx) * np.count_nonzero(sy)))
    return float((sx * sy).sum() / denominator) if denominator else 1.0
