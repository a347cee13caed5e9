"""Runners turn a batch of encoded pairs into logits on one backend.

The engine owns tokenization, batching, order and normalization; a runner owns only the
forward pass, so backends (plain padded torch, packed CUDA, ONNX Runtime) are swappable and
the padded torch runner stays the reference every other runner is tested against.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from transformers import PreTrainedModel

from crossrank.tokenization import EncodedPairs


class Runner(Protocol):
    """A forward pass over encoded pairs."""

    #: True when the cost of a batch is its real token count (no padding computed).
    packed: bool

    def run(self, encoded: EncodedPairs) -> np.ndarray:
        """float32 logits of shape ``(len(encoded), num_labels)``, in ``encoded`` order."""
        ...


class TorchPaddedRunner:
    """The reference runner: right-padded batch through the Hugging Face model."""

    packed = False

    def __init__(self, model: PreTrainedModel, device: torch.device, pad_id: int) -> None:
        self.model = model
        self.device = device
        self.pad_id = pad_id

    def run(self, encoded: EncodedPairs) -> np.ndarray:
        tensors = encoded.padded(np.arange(len(encoded)), self.pad_id)
        inputs: dict[str, Any] = {
            k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in tensors.items()
        }
        with torch.inference_mode():
            logits = self.model(**inputs).logits.float()
        return logits.cpu().numpy()
