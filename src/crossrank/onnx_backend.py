"""ONNX Runtime backend for CPU: export the model once, optionally quantize it to int8, cache it.

On CPU, torch fp32 is the slow path; ONNX Runtime with dynamic int8 quantization runs the same
graph several times faster. The engine still owns tokenization, length sorting and batching;
this module only turns a checkpoint into a cached ``.onnx`` file and runs padded batches
through it (a :class:`crossrank.runners.Runner`).

The export uses the ``torch.export``-based exporter (``torch.onnx.export(dynamo=True)``): the
TorchScript exporter traces the attention-mask branch of recent transformers as a constant
and silently produces wrong scores for padded batches. ``optimum`` is not used: its exporter
pins ``transformers<4.58``.

Cache layout: ``<cache root>/<model slug>-<key>[-int8]/model.onnx`` (+ ``model.onnx.data``
holding the weights, so models over the 2 GB protobuf limit export too). The key hashes the
model identity (hub id + resolved commit, or local path + a fingerprint of its config and
weight files), the input names and the torch/transformers/onnxruntime versions, so a changed
model or toolchain gets a fresh export. Each entry is built in a private temporary directory
and published with one atomic ``rename``, so concurrent processes never see a half-written
file; a process that loses the race discards its copy and uses the winner's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import PreTrainedModel

from crossrank.loading import LoadedModel, load_weights
from crossrank.runners import Pending, Runner
from crossrank.tokenization import EncodedPairs, PairTokenizer

try:
    import onnx
    import onnxruntime as ort
    import onnxruntime.quantization
    from onnxruntime.quantization import QuantType, quantize_dynamic
except ImportError as err:  # pragma: no cover - exercised by simulating the absence
    raise ImportError(
        "backend='onnx' needs onnxruntime, onnx and onnxscript; install them with "
        "pip install 'crossrank[onnx]'"
    ) from err

logger = logging.getLogger(__name__)

CACHE_ENV = "CROSSRANK_ONNX_CACHE"
MODEL_FILE = "model.onnx"
INFO_FILE = "crossrank-onnx.json"
#: Bump when the export or quantization recipe changes, so old cache entries are not reused.
FORMAT_VERSION = 1
OUTPUT_NAME = "logits"


def default_cache_dir() -> Path:
    """``$CROSSRANK_ONNX_CACHE``, else ``$XDG_CACHE_HOME/crossrank/onnx`` (``~/.cache/...``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "crossrank" / "onnx"


def model_identity(
    source: str, *, revision: str | None, hub: dict[str, Any] | None = None
) -> dict[str, str]:
    """What the cache key must change with: a local model's content, or a hub commit.

    A local directory is identified by its absolute path, the bytes of its ``config.json`` and
    the name, size and modification time of its weight files (hashing gigabytes of weights on
    every start would cost as much as loading them). A hub model is identified by its id and
    the commit its cached ``config.json`` resolves to.
    """
    path = Path(source)
    if path.is_dir():
        digest = hashlib.sha256()
        config = path / "config.json"
        if config.is_file():
            digest.update(config.read_bytes())
        for weights in sorted(path.glob("*.safetensors*")):
            stat = weights.stat()
            digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        return {"path": str(path.resolve()), "fingerprint": digest.hexdigest()}
    from transformers.utils import cached_file
    from transformers.utils.hub import extract_commit_hash

    hub = dict(hub or {})
    hub.pop("trust_remote_code", None)
    hub.pop("revision", None)
    resolved = cached_file(source, "config.json", revision=revision, **hub)
    commit = extract_commit_hash(resolved, None)
    return {"hub_id": source, "revision": commit or revision or "main"}


def cache_entry(
    cache_root: Path, name: str, identity: dict[str, str], input_names: list[str], quantize: bool
) -> Path:
    """The directory that holds (or will hold) the export for this model and setting."""
    key_data = {
        "identity": identity,
        "inputs": input_names,
        "format": FORMAT_VERSION,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": ort.__version__ if quantize else None,
    }
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name.rstrip("/\\")).name or name)[-48:]
    return cache_root / f"{slug}-{key}{'-int8' if quantize else ''}"


@contextmanager
def _quiet_toolchain() -> Iterator[None]:
    """Silence the exporter's and quantizer's progress chatter for the duration of a build.

    The torch exporter warns about axis renaming, onnxscript/onnx_ir log every rewrite at INFO
    and the quantizer logs on the root logger; none of it is actionable for a crossrank user.
    """
    quantizer_dir = os.path.dirname(onnxruntime.quantization.__file__)

    def not_quantizer(record: logging.LogRecord) -> bool:
        return not record.pathname.startswith(quantizer_dir)

    noisy = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [log.level for log in noisy]
    root = logging.getLogger()
    root.addFilter(not_quantizer)
    for log in noisy:
        log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(not_quantizer)
        for log, level in zip(noisy, levels, strict=True):
            log.setLevel(level)


class _LogitsOnly(torch.nn.Module):
    """Maps positional graph inputs to model keywords and returns only the logits tensor."""

    def __init__(self, model: PreTrainedModel, input_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(**dict(zip(self.input_names, inputs, strict=True))).logits
        return logits


def export_onnx(model: PreTrainedModel, directory: Path, input_names: list[str]) -> Path:
    """Export ``model`` to ``directory/model.onnx`` with dynamic batch and sequence axes."""
    wrapper = _LogitsOnly(model, input_names).eval()
    # Batch 2 and length 16: sizes 0 and 1 would be specialised as constants by torch.export.
    example = tuple(torch.ones(2, 16, dtype=torch.long) for _ in input_names)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    path = directory / MODEL_FILE
    with _quiet_toolchain():
        torch.onnx.export(
            wrapper,
            example,
            str(path),
            dynamo=True,
            verbose=False,
            input_names=input_names,
            output_names=[OUTPUT_NAME],
            dynamic_shapes=(tuple({0: batch, 1: seq} for _ in input_names),),
            external_data=True,
        )
    return path


def quantize_onnx(source: Path, directory: Path) -> Path:
    """Dynamic int8 quantization of every weight MatMul (and the embedding gathers).

    Weights get one scale per output channel: on trained encoders (whose weight rows differ
    widely in range) this kept clearly more of the fp32 ranking than one scale per tensor, at
    the same speed. Activations are quantized per tensor at run time by ONNX Runtime, so an
    int8 score depends slightly on which other pairs share its batch. The exporter records intermediate shapes (``value_info``) that ONNX Runtime's own shape
    inference disagrees with, so they are dropped before quantizing; they are recomputed.
    """
    model = onnx.load(str(source))
    del model.graph.value_info[:]
    path = directory / MODEL_FILE
    with _quiet_toolchain():
        quantize_dynamic(
            model,
            str(path),
            weight_type=QuantType.QInt8,
            per_channel=True,
            use_external_data_format=True,
        )
    return path


def _publish(entry: Path, build: Callable[[Path], Path], info: dict[str, Any]) -> Path:
    """Build a cache entry in a private directory and rename it into place atomically."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        build(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the published entry is a normal dir
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        try:
            os.rename(staging, entry)
        except OSError:
            if not (entry / MODEL_FILE).is_file():
                raise
            logger.info("another process published %s first; using its copy", entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry / MODEL_FILE


def ensure_exported(
    *,
    name: str,
    identity: dict[str, str],
    input_names: list[str],
    quantize: bool,
    cache_dir: str | os.PathLike[str] | None,
    load_model: Callable[[], PreTrainedModel],
) -> Path:
    """Path of the cached ONNX file for this model; exports (and quantizes) it on a miss.

    ``load_model`` is called only when the fp32 export is missing, so a warm cache never loads
    the torch weights.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    fp32 = cache_entry(root, name, identity, input_names, quantize=False)
    target = cache_entry(root, name, identity, input_names, quantize=quantize)
    if (target / MODEL_FILE).is_file():
        logger.info("using cached ONNX model %s", target / MODEL_FILE)
        return target / MODEL_FILE
    info = {"model": name, "identity": identity, "inputs": input_names, "quantized": False}
    if not (fp32 / MODEL_FILE).is_file():
        start = time.perf_counter()
        model = load_model()
        _publish(fp32, lambda d: export_onnx(model, d, input_names), info)
        del model
        logger.info("exported %s to ONNX in %.1fs: %s", name, time.perf_counter() - start, fp32)
    if quantize:
        start = time.perf_counter()
        info["quantized"] = "dynamic int8, per-channel weights"
        _publish(target, lambda d: quantize_onnx(fp32 / MODEL_FILE, d), info)
        logger.info("quantized %s to int8 in %.1fs: %s", name, time.perf_counter() - start, target)
    return target / MODEL_FILE


class OnnxRunner(Runner):
    """Runs right-padded batches through an ONNX Runtime CPU session.

    Intra-op threads follow ``torch.get_num_threads()`` (all physical cores unless
    ``OMP_NUM_THREADS``/``torch.set_num_threads`` say otherwise), so one setting governs both
    backends; a single forward pass runs at a time, so inter-op parallelism is off.
    """

    def __init__(
        self, path: str | os.PathLike[str], pad_id: int, threads: int | None = None
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: its warnings are about unused initializers
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = Path(path)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.pad_id = pad_id

    def submit(self, encoded: EncodedPairs) -> Pending:
        """Runs the pass at once (ONNX Runtime's CPU session call blocks)."""
        tensors = encoded.padded(np.arange(len(encoded)), self.pad_id)
        (logits,) = self.session.run([OUTPUT_NAME], {k: tensors[k] for k in self.input_names})
        result = np.asarray(logits, dtype=np.float32)
        return lambda: result


def build_runner(
    loaded: LoadedModel,
    tokenizer: PairTokenizer,
    *,
    quantize: bool,
    cache_dir: str | os.PathLike[str] | None,
) -> OnnxRunner:
    """The ONNX runner for a checkpoint loaded without weights (exported on first use)."""
    input_names = ["input_ids", "attention_mask"]
    if tokenizer.returns_type_ids:
        input_names.append("token_type_ids")
    path = ensure_exported(
        name=loaded.source,
        identity=model_identity(loaded.source, revision=loaded.hub["revision"], hub=loaded.hub),
        input_names=input_names,
        quantize=quantize,
        cache_dir=cache_dir,
        load_model=lambda: load_weights(
            loaded.source,
            loaded.config,
            device=torch.device("cpu"),
            dtype=torch.float32,
            hub=loaded.hub,
        ),
    )
    return OnnxRunner(path, tokenizer.pad_id)
