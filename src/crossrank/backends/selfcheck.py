"""The fast path checks itself on the loaded weights, and half-precision overflow is rescored.

Why: no trained weights reach our test machines, so the packed runner is tested against the
padded reference on random weights only. A model whose trained weights break an assumption of
the fast path (or a kernel that misbehaves on a new GPU) would silently serve wrong scores.

1. **Self-check at load.** Right after a fast runner is built, a fixed probe set (questions
   and passages in en, zh, ja, ar, ru and de, short pairs and pairs cut at ``max_length``) is
   scored by the fast runner (a one-pair pass, the short pairs, the long pairs) and by the
   padded reference runner built on the *same* model object (no second copy of the weights).
   If a score is non-finite or the largest difference of raw scores exceeds the dtype's
   tolerance, one warning names both numbers and the worker falls back to the reference.
   The result is :class:`SelfCheck` (``Reranker.self_check``, ``/ready``, ``/metrics``).
2. **Rescue at run time.** A pass of a float16/bfloat16 model whose logits are not all finite
   (activations overflowing the half range) is rescored by the padded reference in float32 on
   the same device, and counted (``Reranker.rescored_batches``).

Tolerances (max |fast - reference| of raw scores), from the measurements in
``docs/gpu-fast-path.md`` and ``crossrank.loading.resolve_dtype`` (bge-reranker-v2-m3
architecture, H200, 2,000 XQuAD-R pairs, each path against the fp32 reference):

- float32: ``1e-3``. The packed path equals the padded one within 1e-4 in fp32 (CPU tests,
  ``tests/backends/test_packed.py``); 10x room for pairs at ``max_length``.
- float16: ``2e-2``. Packed fp16 differs from fp32 by at most 1.9e-3, padded fp16 by 2.3e-3,
  so packed vs padded is at most 4.2e-3; about 5x room for long probes and trained weights,
  whose logits span a wider range than a random model's.
- bfloat16: ``1.5e-1``. Packed bf16 differs from fp32 by up to 1.4e-2 (bf16 keeps 8
  significant bits against fp16's 11), so packed vs padded is at most about 2.8e-2; the same
  5x room. A real fault (positions, attention across pairs, a wrong head) moves trained
  logits by whole units, far above these bounds.

The fp32 rescue casts the weights for that pass only (``torch.func.functional_call`` over
fp32 copies of the parameters and buffers, freed when the pass ends): nothing is kept between
rescues, at the price of a transient fp32 copy of the weights (2.3 GB for
bge-reranker-v2-m3, whose fp16 weights take 1.1 GB) and a cast of about 1 ms per rescued pass
on an H200. A permanent fp32 reference would hold that memory for a rare event; running the
half-precision model with only attention in fp32 would not fix overflow in the feed-forward
blocks. The rescue runs under the device worker's lock, since the parameters are swapped on
the shared model object for its duration.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from crossrank.backends.base import Pending, Runner, TorchPaddedRunner
from crossrank.backends.families import raw_scores
from crossrank.backends.packed import PackedRunner
from crossrank.backends.workers import DeviceWorker
from crossrank.tokenization import EncodedPairs, PairTokenizer

logger = logging.getLogger(__name__)

#: Max |fast - reference| raw-score difference accepted per compute dtype (module docstring).
TOLERANCES = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 1.5e-1}

# (query, relevant passage) per language; written for this probe, one topic so that the
# cross-lingual pairs below are meaningful too.
_PROBES = {
    "en": (
        "How far is the Moon from the Earth?",
        "The Moon orbits the Earth at an average distance of about 384,400 kilometres and "
        "takes roughly 27 days to complete one orbit.",
    ),
    "zh": (
        "月球离地球有多远？",
        "月球以平均约三十八万四千公里的距离绕地球运行，大约二十七天绕行一周。",
    ),
    "ja": (
        "月は地球からどれくらい離れていますか？",
        "月は平均して約38万4千キロメートルの距離で地球の周りを回り、一周するのに約27日かかります。",
    ),
    "ar": (
        "كم يبعد القمر عن الأرض؟",
        "يدور القمر حول الأرض على مسافة متوسطها نحو 384 ألف كيلومتر، ويستغرق نحو 27 يومًا "
        "لإكمال دورة واحدة.",
    ),
    "ru": (
        "Как далеко Луна от Земли?",
        "Луна обращается вокруг Земли на среднем расстоянии около 384 400 километров и "
        "совершает один оборот примерно за 27 дней.",
    ),
    "de": (
        "Wie weit ist der Mond von der Erde entfernt?",
        "Der Mond umkreist die Erde in einem mittleren Abstand von etwa 384.400 Kilometern und "
        "braucht für einen Umlauf rund 27 Tage.",
    ),
}
_OFF_TOPIC = "Der Rhein entspringt in den Schweizer Alpen und mündet bei Rotterdam in die Nordsee."
_LONG_REPEATS = 40  # every passage 40 times: far beyond 8,192 tokens, cut at max_length


def probe_pairs() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The probe set: (short pairs, long pairs). Short: each language's query with its
    passage, two cross-lingual pairs and an off-topic one; long: each query with a document
    of every passage repeated, which the tokenizer cuts at ``max_length``."""
    short = [(query, passage) for query, passage in _PROBES.values()]
    short += [
        (_PROBES["en"][0], _PROBES["zh"][1]),
        (_PROBES["ar"][0], _PROBES["ru"][1]),
        (_PROBES["ja"][0], _OFF_TOPIC),
    ]
    long_doc = " ".join(passage for _, passage in _PROBES.values()) + " "
    return short, [(query, long_doc * _LONG_REPEATS) for query, _ in _PROBES.values()]


@dataclass(frozen=True)
class SelfCheck:
    """The fast runner scored against the reference on the probe set, at load.

    ``max_abs_diff`` is the largest |fast - reference| of raw scores (``inf`` when a score
    was not finite); ``fell_back`` is true when the worker serves the reference instead.
    """

    passed: bool
    max_abs_diff: float
    tolerance: float
    runner: str
    reference: str
    fell_back: bool
    pairs: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe fields (a non-finite difference becomes ``None``)."""
        fields = asdict(self)
        fields["max_abs_diff"] = self.max_abs_diff if np.isfinite(self.max_abs_diff) else None
        return fields


def reference_for(
    runner: Runner, model: PreTrainedModel | None, device: torch.device, pad_id: int
) -> Runner | None:
    """The padded reference on the same weights for a fast ``runner``; ``None`` when
    ``runner`` is itself the reference or has no torch weights (ONNX)."""
    if model is not None and isinstance(runner, PackedRunner):
        return TorchPaddedRunner(model, device, pad_id)
    return None


def verify(
    fast: Runner, reference: Runner, tokenizer: PairTokenizer, dtype: torch.dtype, num_labels: int
) -> SelfCheck:
    """Score the probe set with both runners and compare (see the module docstring)."""
    short, long = probe_pairs()
    encoded = tokenizer.encode(*map(list, zip(*(short + long), strict=True)))
    rows = np.arange(len(encoded))
    passes = [rows[:1], rows[: len(short)], rows[len(short) :]]
    fast_scores = np.empty(len(encoded), dtype=np.float32)
    for part in passes:
        fast_scores[part] = raw_scores(fast.run(encoded.take(part)), num_labels)
    want = raw_scores(reference.run(encoded), num_labels)
    finite = bool(np.isfinite(fast_scores).all() and np.isfinite(want).all())
    diff = float(np.abs(fast_scores - want).max()) if finite else float("inf")
    tolerance = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    return SelfCheck(
        passed=diff <= tolerance,
        max_abs_diff=diff,
        tolerance=tolerance,
        runner=type(fast).__name__,
        reference=type(reference).__name__,
        fell_back=diff > tolerance,
        pairs=len(encoded),
    )


class Fp32Rescue(TorchPaddedRunner):
    """The padded reference run in float32 on the model's device: the weights are cast for
    each pass and freed after it (see the module docstring for the trade-off)."""

    def submit(self, encoded: EncodedPairs) -> Pending:
        inputs = self.inputs(encoded)
        named = [*self.model.named_parameters(), *self.model.named_buffers()]
        with torch.inference_mode():
            state = {k: v.float() if v.is_floating_point() else v for k, v in named}
            logits = torch.func.functional_call(self.model, state, (), inputs).logits
            host = logits.float().cpu().numpy()
        return lambda: host


def checked_worker(
    runner: Runner,
    model: PreTrainedModel | None,
    device: torch.device,
    tokenizer: PairTokenizer,
    num_labels: int,
    *,
    self_check: bool,
) -> DeviceWorker:
    """The device worker for ``runner``: self-checked against the reference on the same
    weights when ``runner`` is a fast one (falling back to the reference if it fails), and
    with the fp32 rescue when the weights are float16/bfloat16."""
    check = None
    reference = reference_for(runner, model, device, tokenizer.pad_id) if self_check else None
    dtype = next(model.parameters()).dtype if model is not None else torch.float32
    if reference is not None:
        check = verify(runner, reference, tokenizer, dtype, num_labels)
        if check.fell_back:
            logger.warning(
                "fast path self-check failed on %s: max |%s - %s| = %.3g exceeds the %s "
                "tolerance %.3g; serving with %s",
                device,
                check.runner,
                check.reference,
                check.max_abs_diff,
                str(dtype).removeprefix("torch."),
                check.tolerance,
                check.reference,
            )
            runner = reference
    rescue = None
    if model is not None and dtype in (torch.float16, torch.bfloat16):
        rescue = Fp32Rescue(model, device, tokenizer.pad_id)
    return DeviceWorker(runner, device, num_labels, rescue=rescue, self_check=check)
