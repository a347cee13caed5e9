"""The fast path's self-check at load and the float32 rescue of non-finite passes, on CPU.

Faults are injected into the real packed runner (its ``submit`` perturbs or NaNs the logits);
the expected scores come from plain transformers forwards of the same weights, written here.
"""

from __future__ import annotations

import logging

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from crossrank import Reranker
from crossrank.backends.base import TorchPaddedRunner
from crossrank.backends.packed import PackedRunner
from crossrank.backends.selfcheck import TOLERANCES, probe_pairs
from crossrank.server import create_app
from crossrank.server.runner import BackgroundServer
from tests.conftest import DOCS, QUERY
from tests.server.helpers import metric

_real_submit = PackedRunner.submit


def _faulty(change):
    """A PackedRunner.submit whose logits are changed by ``change``."""

    def submit(self, encoded):
        pending = _real_submit(self, encoded)
        return lambda: change(pending().copy())

    return submit


def _transformers_scores(model_dir, dtype=torch.float32, docs=DOCS) -> np.ndarray:
    """Raw scores by the plain transformers recipe (tokenizer pair call, model forward)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, torch_dtype=dtype)
    model = model.float().eval()  # dtype, then fp32: the half weights upcast exactly
    batch = tokenizer(
        [QUERY] * len(docs),
        docs,
        padding=True,
        truncation=True,
        max_length=512,
        return_tensors="pt",
    )
    with torch.no_grad():
        return model(**batch).logits[:, 0].numpy()


def test_probe_set_is_multilingual_short_and_long(tiny_reranker) -> None:
    short, long = probe_pairs()
    text = " ".join(q + d for q, d in short)
    for sample in ("Moon", "月球", "地球", "القمر", "Луна", "Mond"):
        assert sample in text
    encoded = tiny_reranker.tokenizer.encode(*map(list, zip(*long, strict=True)))
    assert (encoded.lengths == tiny_reranker.max_length).all()  # cut at max_length
    assert len(long) == 6 and len(short) >= 6


@pytest.fixture(scope="module")
def fast(tiny_model_dir):
    """The packed runner forced on CPU (its self-check passes)."""
    reranker = Reranker(str(tiny_model_dir), device="cpu", fast_path=True)
    yield reranker
    reranker.close()


@pytest.fixture(scope="module")
def fell_back(tiny_model_dir):
    """The packed runner with every logit shifted by 0.05 (over fp32's 1e-3), and the warnings
    its load logged."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("crossrank").addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(PackedRunner, "submit", _faulty(lambda logits: logits + 0.05))
            reranker = Reranker(str(tiny_model_dir), device="cpu", fast_path=True)
    finally:
        logging.getLogger("crossrank").removeHandler(handler)
    yield reranker, [r.getMessage() for r in records if "self-check" in r.getMessage()]
    reranker.close()


def test_correct_fast_runner_passes(fast) -> None:
    check = fast.self_check
    assert check is not None and check.passed and not check.fell_back
    assert isinstance(fast.runner, PackedRunner)
    assert (check.runner, check.reference) == ("PackedRunner", "TorchPaddedRunner")
    assert 0 <= check.max_abs_diff <= check.tolerance == TOLERANCES[torch.float32]
    assert check.pairs == sum(map(len, probe_pairs()))


def test_reference_runner_and_option_off_run_no_check(tiny_model_dir, tiny_reranker) -> None:
    assert tiny_reranker.self_check is None  # CPU auto: the reference runner was chosen
    off = Reranker(str(tiny_model_dir), device="cpu", fast_path=True, self_check=False)
    assert off.self_check is None and isinstance(off.runner, PackedRunner)
    off.close()


def _assert_fell_back(reranker, warnings, shown, model_dir) -> None:
    check = reranker.self_check
    assert check is not None and not check.passed and check.fell_back
    assert check.max_abs_diff > check.tolerance
    assert len(warnings) == 1
    assert shown in warnings[0] and "0.001" in warnings[0] and "TorchPaddedRunner" in warnings[0]
    assert type(reranker.runner) is TorchPaddedRunner and not reranker.runner.packed
    np.testing.assert_allclose(
        reranker.score(QUERY, DOCS, normalize=False),
        _transformers_scores(model_dir),
        atol=1e-5,
        rtol=0,
    )


def test_perturbed_fast_runner_is_caught_and_replaced(fell_back, tiny_model_dir) -> None:
    reranker, warnings = fell_back
    assert reranker.self_check.max_abs_diff == pytest.approx(0.05, abs=1e-3)
    _assert_fell_back(reranker, warnings, "0.05", tiny_model_dir)


def test_nan_fast_runner_is_caught_and_replaced(tiny_model_dir, monkeypatch, caplog) -> None:
    monkeypatch.setattr(PackedRunner, "submit", _faulty(lambda x: np.full_like(x, np.nan)))
    with caplog.at_level(logging.WARNING, logger="crossrank"):
        reranker = Reranker(str(tiny_model_dir), device="cpu", fast_path=True)
    warnings = [r.getMessage() for r in caplog.records if "self-check" in r.getMessage()]
    monkeypatch.undo()
    _assert_fell_back(reranker, warnings, "inf", tiny_model_dir)
    reranker.close()


def test_non_finite_half_precision_pass_is_rescored_in_fp32(tiny_model_dir, monkeypatch) -> None:
    reranker = Reranker(str(tiny_model_dir), device="cpu", dtype="bfloat16", fast_path=False)
    worker = reranker._devices.workers[0]
    real = worker.runner.submit
    calls = []

    def overflowing(encoded):
        pending = real(encoded)
        calls.append(len(encoded))
        return lambda: np.where(np.arange(len(encoded))[:, None] == 0, np.inf, pending())

    monkeypatch.setattr(worker.runner, "submit", overflowing)
    got = reranker.score(QUERY, DOCS, normalize=False)
    assert calls and reranker.rescored_batches == len(calls)  # every pass had an inf row
    # fp32 of the bf16 weights, by plain transformers: not the bf16 result
    want = _transformers_scores(tiny_model_dir, torch.bfloat16)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.isfinite(got).all()
    monkeypatch.setattr(worker.runner, "submit", real)
    before = reranker.rescored_batches
    fine = reranker.score(QUERY, DOCS, normalize=False)
    assert reranker.rescored_batches == before  # finite passes are never rescored
    assert np.abs(fine - want).max() > 1e-5  # bf16 itself differs: the rescue really was fp32
    reranker.close()


def test_fp32_model_is_never_rescored(tiny_reranker, monkeypatch) -> None:
    worker = tiny_reranker._devices.workers[0]
    assert worker.rescue is None
    real = worker.runner.submit
    monkeypatch.setattr(
        worker.runner, "submit", lambda e: (lambda p: lambda: np.full_like(p(), np.nan))(real(e))
    )
    assert np.isnan(tiny_reranker.score(QUERY, ["a"])).all()
    assert tiny_reranker.rescored_batches == 0


def test_ready_and_metrics_show_the_self_check(fell_back, fast, tiny_reranker) -> None:
    for reranker, passed in ((fell_back[0], False), (fast, True), (tiny_reranker, None)):
        with BackgroundServer(create_app(reranker)) as srv:
            srv.wait_ready()
            ready = httpx.get(srv.url + "/ready").json()
            text = httpx.get(srv.url + "/metrics").text
        assert ready["status"] == "ready"
        assert "crossrank_rescored_batches_total 0.0" in text
        if passed is None:
            assert "self_check" not in ready  # the reference runner: nothing was checked
            assert "crossrank_fast_path_self_check_passed" not in text
            continue
        detail = ready["self_check"]
        assert detail["passed"] is passed and detail["fell_back"] is not passed
        assert detail["runner"] == "PackedRunner" and detail["tolerance"] == 1e-3
        assert metric(text, "crossrank_fast_path_self_check_passed") == int(passed)
        diff = metric(text, "crossrank_fast_path_max_abs_diff")
        assert diff == pytest.approx(detail["max_abs_diff"])
        assert (diff > 0.01) is not passed
