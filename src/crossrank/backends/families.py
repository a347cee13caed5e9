"""What crossrank knows about each family of reranker models, declared in one place.

The engine needs a few facts per architecture: how many positions a pair may use (RoBERTa
counts positions from after its padding index, so two of ``max_position_embeddings`` are
never usable), whether the packed CUDA runner can run it, and where its classification head
lives. They used to be spread over the engine and the packed runner as ``model_type`` sets;
here each family is one small declarative record, so a new family (a decoder reranker, say)
is one more record rather than edits in several modules.

How a raw score comes from the logits depends on the head's width, not on the family: one
logit is the score itself; with two labels the score is ``logit[1] - logit[0]``, whose
sigmoid is the softmax probability of the positive label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from crossrank.errors import OptionError
from crossrank.options import EngineOptions


@dataclass(frozen=True)
class ModelFamily:
    """One family of sequence-classification rerankers.

    - ``model_types``: the ``config.model_type`` values that belong to it;
    - ``positions_from_padding``: position ids start after ``pad_token_id`` (RoBERTa rule:
      the k-th token gets ``pad_token_id + k``), so ``position_offset`` positions are unusable;
    - ``head``: where the classifier sits: ``"classifier"`` (``classifier.dense`` then
      ``classifier.out_proj`` on the first token) or ``"pooler"`` (BERT: ``pooler.dense`` then
      ``classifier``);
    - ``packed``: the padding-free CUDA runner (:mod:`crossrank.backends.packed`) supports it.
    """

    name: str
    model_types: frozenset[str]
    positions_from_padding: bool
    head: Literal["classifier", "pooler"]
    packed: bool = True

    @property
    def position_offset(self) -> int:
        """Positions of ``max_position_embeddings`` that no token can use."""
        return 2 if self.positions_from_padding else 0


ROBERTA = ModelFamily(
    "roberta",
    frozenset({"xlm-roberta", "roberta", "camembert"}),
    positions_from_padding=True,
    head="classifier",
)
BERT = ModelFamily("bert", frozenset({"bert"}), positions_from_padding=False, head="pooler")
FAMILIES: tuple[ModelFamily, ...] = (ROBERTA, BERT)


def family_of(config: Any) -> ModelFamily | None:
    """The family of a model ``config`` (``None`` for an architecture not described here,
    which the padded reference runner still scores)."""
    model_type = getattr(config, "model_type", "")
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def max_pair_tokens(config: Any) -> int | None:
    """The most tokens one pair may have in this model (``None`` when the config is silent)."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return None
    family = family_of(config)
    return int(positions) - (family.position_offset if family is not None else 0)


def pair_lengths(config: Any, options: EngineOptions) -> tuple[int, int]:
    """``(max_length, query_max_length)`` of ``options`` (the query's default: 3/4 of
    ``max_length``), ``max_length`` checked against the model's positions."""
    model_max = max_pair_tokens(config)
    if model_max is not None and options.max_length > model_max:
        raise OptionError(
            "max_length",
            f"max_length={options.max_length} exceeds the model's limit of {model_max}",
        )
    query_max = options.query_max_length
    return options.max_length, options.max_length * 3 // 4 if query_max is None else query_max


def raw_scores(logits: np.ndarray, num_labels: int) -> np.ndarray:
    """float32 raw scores from logits of shape ``(n, num_labels)`` (see the module docstring)."""
    raw = logits[:, 1] - logits[:, 0] if num_labels == 2 else logits[:, 0]
    return np.ascontiguousarray(raw, dtype=np.float32)
