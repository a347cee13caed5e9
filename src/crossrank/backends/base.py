"""Runners turn a batch of encoded pairs into logits on one backend.

The engine owns tokenization, batching, order and normalization; a runner owns only the
forward pass, so backends (plain padded torch, packed CUDA, ONNX Runtime) are swappable and
the padded torch runner stays the reference every other runner is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from crossrank.tokenization import EncodedPairs

#: A submitted forward pass: call it to wait for its float32 logits.
Pending = Callable[[], np.ndarray]


class Runner:
    """A forward pass over encoded pairs.

    ``submit`` starts a pass and returns without waiting where the device allows it (CUDA
    kernels are queued), so the caller can tokenize or queue the next pass while the device
    works; ``run`` is submit-and-wait.
    """

    #: True when the cost of a batch is its real token count (no padding computed).
    packed: bool = False

    def submit(self, encoded: EncodedPairs) -> Pending:
        """Start the pass; the returned callable gives float32 logits of shape
        ``(len(encoded), num_labels)`` in ``encoded`` order."""
        raise NotImplementedError

    def run(self, encoded: EncodedPairs) -> np.ndarray:
        """float32 logits of shape ``(len(encoded), num_labels)``, in ``encoded`` order."""
        return self.submit(encoded)()


def on_device(device: torch.device) -> AbstractContextManager[Any]:
    """Make ``device`` the current CUDA device (a no-op elsewhere).

    Streams, events and graph captures belong to the current device, not to the device of
    the tensors involved: a thread driving ``cuda:1`` must say so, or its events and graphs
    land on ``cuda:0``.
    """
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def device_result(logits: torch.Tensor) -> Pending:
    """Copy ``logits`` to the host without blocking; the pending result waits for the copy.

    On CUDA the copy lands in pinned memory once the queued kernels are done; elsewhere it is
    already complete.
    """
    host = logits.float().to("cpu", non_blocking=True)
    if not logits.is_cuda:
        return host.numpy
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(logits.device))

    def result() -> np.ndarray:
        done.synchronize()
        return host.numpy()

    return result


class TorchPaddedRunner(Runner):
    """The reference runner: right-padded batch through the Hugging Face model."""

    def __init__(self, model: PreTrainedModel, device: torch.device, pad_id: int) -> None:
        self.model = model
        self.device = device
        self.pad_id = pad_id

    def inputs(self, encoded: EncodedPairs) -> dict[str, Any]:
        """The right-padded model inputs of ``encoded`` on this runner's device."""
        tensors = encoded.padded(np.arange(len(encoded)), self.pad_id)
        return {k: torch.from_numpy(v).to(self.device) for k, v in tensors.items()}

    def submit(self, encoded: EncodedPairs) -> Pending:
        inputs = self.inputs(encoded)
        with torch.inference_mode():
            return device_result(self.model(**inputs).logits)
