"""Quiet third-party output that says nothing to a crossrank user (called by the commands).

Why: every ``crossrank`` run printed transformers' ``Loading weights`` and ``Writing model
shards`` bars and, in the server log of the ONNX backend, four ``torchvision is not
installed`` lines from torch's ONNX exporter (crossrank exports a text model: torchvision's
operators are irrelevant). A newcomer reads them as problems. What is silenced is exactly
those: progress bars of transformers and huggingface_hub (crossrank reports its own progress,
:mod:`crossrank.progress`) and that one exporter message. Warnings and errors of every
library still show.
"""

from __future__ import annotations

import logging
import os

#: The logger of torch's ONNX exporter that reports skipped torchvision operators.
_ONNX_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"


def _not_about_torchvision(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("torchvision is not installed")


def quiet_third_party() -> None:
    """Turn off transformers' and huggingface_hub's progress bars and the exporter's
    torchvision notices, for this process. Idempotent."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when the hub is imported
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()
    exporter = logging.getLogger(_ONNX_REGISTRATION_LOGGER)
    if _not_about_torchvision not in exporter.filters:
        exporter.addFilter(_not_about_torchvision)
