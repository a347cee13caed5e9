"""Model and tokenizer loading with clear errors and safe defaults.

Safe defaults: safetensors only, ``trust_remote_code=False`` unless the caller opts in,
weights materialised directly in the target dtype.

Fast, clear failures: on a machine without network the Hub client retries each file (a
newcomer saw 28 s of ten repeated retry messages for one model), so before loading a Hub id
we try one TCP connection to the Hub, bounded by :data:`HUB_PROBE_TIMEOUT` seconds; when it
fails (or ``HF_HUB_OFFLINE=1``) the model loads from the local Hugging Face cache or the load
fails at once. Every "cannot get this model" case has one message, built here, whose remedy
names the way the calling front door takes a local model (``--model PATH`` on the command
line, ``Reranker("/path/to/model")`` in Python): see :func:`set_local_model_hint`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from crossrank.errors import ModelLoadError

logger = logging.getLogger(__name__)

#: Seconds to wait for a TCP connection to the Hub before treating it as unreachable.
HUB_PROBE_TIMEOUT = 3.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
#: How Python callers pass a local model directory; a command replaces it with its own flag.
PYTHON_HINT = 'Reranker("/path/to/model")'
_local_model_hint = PYTHON_HINT

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class LoadedModel:
    #: ``None`` when loaded with ``weights=False`` (a backend that does not need them).
    model: PreTrainedModel | None
    tokenizer: PreTrainedTokenizerBase
    num_labels: int
    config: PretrainedConfig
    #: The resolved local directory, or the hub id.
    source: str
    #: Hub options (revision, cache_dir, ...) to load the weights later with ``load_weights``.
    hub: dict[str, Any]
    #: A causal LM (a decoder reranker scored from answer-token logits), loaded with
    #: ``AutoModelForCausalLM``; ``num_labels`` is then the engine's to set from the family.
    causal: bool = False


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then CPU."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"``: fp16 on CUDA and MPS, fp32 on CPU.

    fp16 rather than bf16 on CUDA: its three extra mantissa bits keep rankings much closer to
    fp32 (bge-reranker-v2-m3 architecture on an H200: max logit difference 1.9e-3 vs 1.4e-2,
    minimum per-query Kendall tau 0.978 vs 0.877) for about 3% less throughput, and the BGE
    rerankers are run in fp16 by their authors' own FlagReranker.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"dtype must be 'auto', one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}"
        ) from None


def looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
        or os.path.splitdrive(name)[0] != ""
    )


def set_local_model_hint(hint: str) -> None:
    """How the running front door takes a local model directory (``"--model PATH"``), named in
    the remedy of every loading error. Commands call it once at start."""
    global _local_model_hint
    _local_model_hint = hint


def _is_hub_id(name: str) -> bool:
    return not (looks_like_path(name) or os.path.exists(os.path.expanduser(name)))


@functools.cache
def hub_reachable() -> bool:
    """Whether one TCP connection to the Hub endpoint opens within :data:`HUB_PROBE_TIMEOUT`
    seconds, name resolution included (behind a proxy we cannot tell: assume yes)."""
    if any(os.environ.get(var) for var in _PROXY_VARS):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    opened: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=HUB_PROBE_TIMEOUT).close()
            opened.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=connect, name="crossrank-hub-probe", daemon=True)
    probe.start()
    probe.join(HUB_PROBE_TIMEOUT)  # getaddrinfo ignores the socket timeout
    return bool(opened)


def unavailable_message(
    name: str,
    *,
    offline_switch: str | None = None,
    error: Exception | None = None,
    hint: str | None = None,
) -> str:
    """The one message for "this Hub model cannot be had", ending with the remedy for the
    front door (``hint``, default: the one set by :func:`set_local_model_hint`).

    ``offline_switch`` names what turned downloads off (``"HF_HUB_OFFLINE=1"``); ``error`` is
    the Hub's own error; with neither, the Hub cannot be reached.
    """
    local = f"pass a local directory instead: {hint or _local_model_hint}"
    if offline_switch:
        return (
            f"could not load {name!r}: {offline_switch} turns downloads off and it is not in the "
            f"local Hugging Face cache. Drop {offline_switch} to download it, or {local}."
        )
    if error is not None:
        return (
            f"could not load {name!r} from the Hugging Face Hub "
            f"({error.__class__.__name__}: {error}). Check the id, or {local}."
        )
    return (
        f"could not load {name!r}: it is not a local directory, not in the local Hugging Face "
        "cache, and the Hugging Face Hub cannot be reached from this machine. Download it where "
        f"there is network (hf download {name}) and {local}."
    )


def hub_access(
    name: str,
    *,
    local_files_only: bool = False,
    hint: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> bool:
    """Whether ``name`` must load from the local Hugging Face cache only.

    Raises :class:`ModelLoadError` at once when ``name`` is a Hub id that can be neither
    downloaded (offline, or the Hub unreachable) nor found in the cache.
    """
    if not _is_hub_id(name):
        return local_files_only  # a local directory (a missing one is reported by path)
    from huggingface_hub import constants, try_to_load_from_cache

    offline = local_files_only or constants.HF_HUB_OFFLINE
    if not offline and hub_reachable():
        return False
    try:
        found = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir, revision=revision)
    except ValueError:  # not a valid Hub id; the loader explains
        return offline
    if isinstance(found, str):
        if not offline:
            logger.info("Hugging Face Hub unreachable; loading %s from the local cache", name)
        return True
    switch = None
    if offline:
        switch = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1"
    raise ModelLoadError(unavailable_message(name, offline_switch=switch, hint=hint))


def _explain(name: str, err: Exception) -> str:
    if not _is_hub_id(name):
        return f"could not load a model from the local path {name!r}: {err}"
    return unavailable_message(name, error=err)


def load(
    name_or_path: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    revision: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    trust_remote_code: bool = False,
    weights: bool = True,
    causal_architectures: frozenset[str] = frozenset(),
) -> LoadedModel:
    """Load a sequence-classification checkpoint's config, fast tokenizer and (unless
    ``weights=False``) its weights onto ``device``. A checkpoint whose
    ``config.architectures`` lists one of ``causal_architectures`` (the decoder reranker
    families the caller knows) is loaded as a causal LM instead."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError("model must be a non-empty hub id or local directory path")
    expanded = os.path.expanduser(name_or_path)
    if looks_like_path(name_or_path) and not os.path.exists(expanded):
        raise ModelLoadError(f"model path {name_or_path!r} does not exist")
    if os.path.exists(expanded):
        name_or_path = expanded
    local_files_only = hub_access(
        name_or_path, local_files_only=local_files_only, revision=revision, cache_dir=cache_dir
    )
    hub: dict[str, Any] = {
        "revision": revision,
        "cache_dir": cache_dir,
        "local_files_only": local_files_only,
        "trust_remote_code": trust_remote_code,
    }
    try:
        config = AutoConfig.from_pretrained(name_or_path, **hub)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, use_fast=True, **hub)
    except (OSError, ValueError) as err:
        raise ModelLoadError(_explain(name_or_path, err)) from err
    architectures = list(getattr(config, "architectures", None) or [])
    causal = bool(set(architectures) & causal_architectures)
    if (
        architectures
        and not causal
        and not any(a.endswith("ForSequenceClassification") for a in architectures)
    ):
        raise ModelLoadError(
            f"{name_or_path!r} is a {', '.join(architectures)} checkpoint, not a "
            "sequence-classification model (cross-encoder); crossrank needs a reranker such as "
            "BAAI/bge-reranker-v2-m3"
        )
    num_labels = int(config.num_labels)
    if num_labels not in (1, 2) and not causal:
        raise ModelLoadError(
            f"{name_or_path!r} has {num_labels} labels; a reranker has one relevance logit "
            "(or two labels: not relevant / relevant)"
        )
    model = None
    if weights:
        model = load_weights(
            name_or_path, config, device=device, dtype=dtype, hub=hub, causal=causal
        )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        num_labels=num_labels,
        config=config,
        source=name_or_path,
        hub=hub,
        causal=causal,
    )


def load_weights(
    source: str,
    config: PretrainedConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    hub: dict[str, Any],
    causal: bool = False,
) -> PreTrainedModel:
    """Load the safetensors weights of a checkpoint whose config is already loaded
    (``causal``: as ``AutoModelForCausalLM``, a decoder reranker's LM head included)."""
    auto: Any = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    try:
        model, info = auto.from_pretrained(
            source,
            config=config,
            dtype=dtype,
            use_safetensors=True,
            output_loading_info=True,
            **hub,
        )
    except (OSError, ValueError) as err:
        if "safetensors" in str(err).lower() or "model.safetensors" in str(err):
            raise ModelLoadError(
                f"{source!r} has no safetensors weights; crossrank loads safetensors only "
                "(pickled .bin weights can run code). Convert the checkpoint with "
                "model.save_pretrained(path, safe_serialization=True)."
            ) from err
        raise ModelLoadError(_explain(source, err)) from err
    except SafetensorError as err:  # a truncated or damaged file: name it
        raise ModelLoadError(_damaged_weights(source, err)) from err
    missing = [k for k in info.get("missing_keys", []) if k]
    if missing:
        raise ModelLoadError(
            f"{source!r} is not a {'causal LM' if causal else 'sequence-classification'} "
            f"checkpoint: its weights lack "
            f"{', '.join(sorted(missing)[:4])}{' ...' if len(missing) > 4 else ''}"
        )
    model.to(device)
    model.eval()
    logger.info("loaded %s on %s as %s", source, device, dtype)
    return model


def _damaged_weights(source: str, err: Exception) -> str:
    """The message for weights that safetensors cannot read, naming the damaged file (the
    first of a local directory's ``*.safetensors`` files that does not open)."""
    damaged = source
    if os.path.isdir(source):
        for path in sorted(Path(source).glob("*.safetensors")):
            try:
                with safe_open(path, framework="pt"):
                    pass
            except SafetensorError:
                damaged = str(path)
                break
    return (
        f"the weights file {damaged!r} is damaged or truncated ({err}); copy or download it again"
    )


def with_weights_on(loaded: LoadedModel, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """``loaded`` (config and tokenizer) with its weights loaded on ``device`` in ``dtype``:
    the same model again for another device, or the weights of a ``weights=False`` load."""
    model = load_weights(
        loaded.source,
        loaded.config,
        device=device,
        dtype=dtype,
        hub=loaded.hub,
        causal=loaded.causal,
    )
    return dataclasses.replace(loaded, model=model)
