"""crossrank.quiet silences third-party progress bars and the exporter's torchvision notice,
and nothing else."""

from __future__ import annotations

import logging

import pytest

from crossrank.quiet import quiet_third_party


def test_quiet_third_party_keeps_real_warnings(caplog: pytest.LogCaptureFixture) -> None:
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

    quiet_third_party()
    quiet_third_party()  # idempotent
    assert are_progress_bars_disabled()
    assert not transformers_logging.is_progress_bar_enabled()
    exporter = logging.getLogger("torch.onnx._internal.exporter._registration")
    with caplog.at_level(logging.WARNING, logger=exporter.name):
        exporter.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
        exporter.warning("a real problem with %s", "aten::foo")
    assert [r.getMessage() for r in caplog.records] == ["a real problem with aten::foo"]
    assert len(exporter.filters) == 1
