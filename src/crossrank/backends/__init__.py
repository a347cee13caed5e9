"""Which runner scores a model on a device: the one place that chooses a backend.

Three runners share the :class:`~crossrank.backends.base.Runner` contract: the padded torch
reference (every device, every architecture), the packed padding-free CUDA runner
(:mod:`~crossrank.backends.packed`, for the families that support it, measured 1.4-3x faster
on an H200: ``docs/gpu-fast-path.md``) and ONNX Runtime on CPU (:mod:`~crossrank.backends.onnx`,
fp32 or int8). :func:`build_runner` picks one from the engine options, so the engine itself
never branches on a backend.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from crossrank.backends.base import Pending, Runner, TorchPaddedRunner
from crossrank.backends.decoder import PromptTokenizer
from crossrank.backends.decoder_packed import choose_decoder_runner
from crossrank.backends.packed import PackedOptions, PackedRunner, unsupported_reason
from crossrank.backends.selfcheck import SelfCheck, checked_worker
from crossrank.backends.workers import DeviceWorker
from crossrank.errors import OptionError
from crossrank.loading import LoadedModel, resolve_device, resolve_dtype, with_weights_on
from crossrank.options import EngineOptions
from crossrank.tokenization import PairTokenizer

__all__ = [
    "Pending",
    "Runner",
    "SelfCheck",
    "build_runner",
    "build_workers",
    "compute_dtype",
    "resolve_devices",
    "torch_runner",
]

logger = logging.getLogger(__name__)


def build_runner(
    loaded: LoadedModel, device: torch.device, tokenizer: PairTokenizer, options: EngineOptions
) -> Runner:
    """The runner for ``loaded`` on ``device``: ONNX Runtime with ``backend="onnx"`` (the
    model exported, and cached, on first use), else :func:`torch_runner` per ``fast_path``."""
    if options.backend == "onnx":
        # onnxruntime is the optional extra crossrank[onnx]: importing the module raises a
        # MissingExtraError naming it when it is absent.
        from crossrank.backends import onnx

        return onnx.build_runner(
            loaded, tokenizer, quantize=options.quantize, cache_dir=options.onnx_cache_dir
        )
    if loaded.model is None:
        raise ValueError("the torch backend needs the model's weights (loaded with weights=True)")
    if isinstance(tokenizer, PromptTokenizer):  # a decoder (LLM) reranker
        fast_path = None if options.fast_path is None else options.fast_path is not False
        return choose_decoder_runner(
            loaded.model,
            device,
            tokenizer.pad_id,
            tokenizer.family,
            tokenizer.answer_ids,
            fast_path,
        )
    return torch_runner(loaded.model, device, tokenizer.pad_id, options.fast_path)


def torch_runner(
    model: PreTrainedModel,
    device: torch.device,
    pad_id: int,
    fast_path: bool | PackedOptions | None,
) -> Runner:
    """The torch runner for ``model`` on ``device``.

    ``None`` (auto): the packed runner on CUDA in fp16/bf16 for supported architectures, the
    padded reference runner otherwise. ``False``: always the padded runner. ``True`` or
    :class:`PackedOptions`: the packed runner, or a ``ValueError`` saying why it cannot run.
    """
    if fast_path is False:
        return TorchPaddedRunner(model, device, pad_id)
    reason = unsupported_reason(model)
    dtype = next(model.parameters()).dtype
    if reason is None and device.type == "cuda" and dtype not in (torch.float16, torch.bfloat16):
        reason = f"flash attention needs float16 or bfloat16 weights, not {dtype}"
    if fast_path is None:
        if device.type != "cuda" or reason is not None:
            if device.type == "cuda":
                logger.info("packed fast path off: %s", reason)
            return TorchPaddedRunner(model, device, pad_id)
        return PackedRunner(model, device)
    if reason is not None:
        raise ValueError(f"fast_path was requested but cannot be used: {reason}")
    return PackedRunner(model, device, fast_path if isinstance(fast_path, PackedOptions) else None)


def resolve_devices(options: EngineOptions) -> list[torch.device]:
    """The requested devices, resolved (``"auto"`` is the CPU for the ONNX backend)."""
    device = options.device
    requested = list(device) if isinstance(device, (list, tuple)) else [device]
    if options.backend == "onnx":
        requested = ["cpu" if d == "auto" else d for d in requested]
    try:
        return [resolve_device(d) for d in requested]
    except ValueError as err:
        raise OptionError("device", str(err)) from None


def compute_dtype(
    options: EngineOptions, device: torch.device, decoder: bool = False
) -> torch.dtype:
    """The compute dtype on ``device``; the ONNX backend runs on the CPU in float32 only.

    ``decoder``: for a decoder (LLM) reranker ``"auto"`` is bfloat16 on CUDA, not float16:
    LLM activations grow to magnitudes past fp16's 65504 in some layers (large residual
    outliers), which turn into inf/NaN scores, while bf16 has fp32's range; the Qwen3 and
    gemma checkpoints are published in bf16."""
    if options.backend != "onnx":
        if decoder and options.dtype == "auto" and device.type == "cuda":
            return torch.bfloat16
        return resolve_dtype(options.dtype, device)
    dtype = resolve_dtype("float32" if options.dtype == "auto" else options.dtype, device)
    if device.type != "cpu" or dtype != torch.float32:
        raise OptionError(
            "device" if device.type != "cpu" else "dtype",
            "backend='onnx' runs on device='cpu' in float32 (quantize=True for int8), got "
            f"device={str(device)!r}, dtype={dtype}",
        )
    return dtype


def build_workers(
    loaded: LoadedModel,
    devices: Sequence[torch.device],
    tokenizer: PairTokenizer,
    options: EngineOptions,
) -> list[DeviceWorker]:
    """One :class:`DeviceWorker` per device. The first runs ``loaded`` (already on
    ``devices[0]``); each other device gets its own copy of the weights, while the config and
    the tokenizer stay shared. A fast runner is checked against the reference on the loaded
    weights first (``self_check``, :mod:`crossrank.backends.selfcheck`)."""
    workers = []
    for k, device in enumerate(devices):
        here = loaded
        if k and loaded.model is not None:
            dtype = compute_dtype(options, device, decoder=isinstance(tokenizer, PromptTokenizer))
            here = with_weights_on(loaded, device, dtype)
        runner = build_runner(here, device, tokenizer, options)
        workers.append(
            checked_worker(
                runner,
                here.model,
                device,
                tokenizer,
                loaded.num_labels,
                self_check=options.self_check,
            )
        )
    return workers
