"""ONNX Runtime backend for CPU: export the model once, optionally quantize it to int8, cache it.

On CPU, torch fp32 is the slow path; ONNX Runtime with dynamic int8 quantization runs the same
graph several times faster. The engine still owns tokenization, length sorting and batching;
this module only turns a checkpoint into a cached ``.onnx`` file and runs padded batches
through it (a :class:`crossrank.backends.base.Runner`).

The export uses the ``torch.export``-based exporter (``torch.onnx.export(dynamo=True)``): the
TorchScript exporter traces the attention-mask branch of recent transformers as a constant
and silently produces wrong scores for padded batches. ``optimum`` is not used: its exporter
pins ``transformers<4.58``.

Cache layout: ``<cache root>/<model slug>-<key>[-int8]/model.onnx`` (+ ``model.onnx.data``
holding the weights, so models over the 2 GB protobuf limit export too). The key hashes the
model identity (:func:`crossrank.fingerprint.model_identity`, the rule the score cache uses
too: hub id + resolved commit, or local path + a fingerprint of its files), the input names and the torch/transformers/onnxruntime versions, so a changed
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
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import PreTrainedModel

from crossrank.backends.base import Pending, Runner
from crossrank.errors import MissingExtraError
from crossrank.fingerprint import model_identity
from crossrank.loading import LoadedModel, load_weights
from crossrank.progress import working
from crossrank.tokenization import EncodedPairs, PairTokenizer

try:
    import onnx
    import onnxruntime as ort
    import onnxruntime.quantization
    from onnxruntime.quantization import QuantType, quantize_dynamic
except ImportError as err:  # pragma: no cover - exercised by simulating the absence
    raise MissingExtraError(
        "backend='onnx' needs onnxruntime, onnx and onnxscript; install them with "
        "pip install 'crossrank[onnx]'"
    ) from err

logger = logging.getLogger(__name__)

CACHE_ENV = "CROSSRANK_ONNX_CACHE"
MODEL_FILE = "model.onnx"
INFO_FILE = "crossrank-onnx.json"
#: Bump when the export or quantization recipe changes, so old cache entries are not reused.
FORMAT_VERSION = 2
OUTPUT_NAME = "logits"


def default_cache_dir() -> Path:
    """``$CROSSRANK_ONNX_CACHE``, else ``$XDG_CACHE_HOME/crossrank/onnx`` (``~/.cache/...``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "crossrank" / "onnx"


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
    """Export ``model`` to ``directory/model.onnx`` with dynamic batch and sequence axes.

    Attention is exported from the eager implementation: the SDPA one decomposes into a
    masked softmax with ``IsNaN``/``Where`` passes over every [batch, heads, tokens, tokens]
    score tensor, which took about a fifth of the int8 run time of a base-size model.
    """
    model.set_attn_implementation("eager")
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
    """Dynamic int8 quantization of the encoder's weight MatMuls, first-token rows kept in fp32.

    Recipe (chosen by measuring per-query Kendall tau against fp32, see tests/backends/test_onnx.py):

    - Weights get one int8 scale per output channel; activations are quantized per tensor at
      run time by ONNX Runtime (``DynamicQuantizeMatMul``), so an int8 score depends slightly
      on which other pairs share its batch.
    - The classification head reads only the first token, so its MatMuls and Gemms (2-D
      inputs) stay fp32: they cost nothing next to the encoder.
    - In the quantized encoder MatMuls on the residual path (attention output, FFN in and
      out) the first-token row of each sequence (``<s>``/``[CLS]``, the row the head turns
      into the score) is recomputed in fp32 from the dequantized int8 weights and written over
      the int8 result. Measured on a random 4-layer XLM-R and on all-MiniLM-L6-v2 with a
      random head, most of the int8 ranking error was the rounding of that one row's
      activations, which reaches the score directly, while other tokens reach it only through
      attention averages. q/k/v (three MatMuls sharing one input) are left alone: their first
      row only enters attention scores, and protecting them too changed tau by < 0.01.
      Per-query tau against fp32 on 8 x 24 XQuAD-R pairs: small random model 0.937 -> 0.980
      (min 0.877 -> 0.964); MiniLM + random head 0.851 -> 0.917. On a base-size model the
      extra rows cost about a sixth of the int8 run time (mostly the ``ScatterND`` copy and
      dequantizing the weights per call), which the eager-attention export more than repays.
    - Not done: per-row activation scales for all tokens. Simulated on MiniLM they lift tau
      to ~0.97 (outlier channels widen a per-tensor scale), but ONNX Runtime's integer MatMuls
      take a single activation zero point, so it needs extra elementwise passes per MatMul.

    The exporter records intermediate shapes (``value_info``) that ONNX Runtime's own shape
    inference disagrees with, so they are dropped before quantizing (their ranks are read
    first, to tell the head's 2-D MatMuls from the encoder's 3-D ones).
    """
    model = onnx.load(str(source))
    ranks = {
        info.name: len(info.type.tensor_type.shape.dim)
        for info in [*model.graph.value_info, *model.graph.input]
        if info.type.tensor_type.HasField("shape")
    }
    weights = {init.name for init in model.graph.initializer}
    # Encoder MatMuls act on [batch, tokens, features] (the head's 2-D MatMuls or Gemms are
    # left out); the embedding tables are stored as int8 too.
    chosen = [
        node.name
        for node in model.graph.node
        if (node.op_type == "MatMul" and ranks.get(node.input[0]) == 3 and node.input[1] in weights)
        or (node.op_type == "Gather" and node.input[0] in weights)
    ]
    del model.graph.value_info[:]
    staging = directory / "quantized"
    staging.mkdir()
    with _quiet_toolchain():
        quantize_dynamic(
            model,
            str(staging / MODEL_FILE),
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_quantize=chosen,
            use_external_data_format=True,
        )
    quantized = onnx.load(str(staging / MODEL_FILE))
    protected = _first_token_rows_in_fp32(quantized.graph)
    logger.debug("first-token rows kept in fp32 in %d int8 MatMuls", protected)
    path = directory / MODEL_FILE
    onnx.save(quantized, str(path), save_as_external_data=True, location=f"{MODEL_FILE}.data")
    shutil.rmtree(staging)
    return path


def _first_token_index_nodes(graph: onnx.GraphProto, prefix: str) -> list[onnx.NodeProto]:
    """Nodes computing ``{prefix}_rows`` = ``[[0, 0], [1, 0], ..., [B-1, 0]]`` (the first-token
    row of every sequence in the batch) and the constants they and the rewrites use
    (``{prefix}_zero``, ``{prefix}_one``, ``{prefix}_axis1``, added as initializers)."""
    zero, idx = f"{prefix}_zero", f"{prefix}_rows"
    graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(np.array(0, dtype=np.int64), zero),
            onnx.numpy_helper.from_array(np.array(1, dtype=np.int64), f"{prefix}_one"),
            onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), f"{prefix}_axis1"),
        ]
    )
    make = onnx.helper.make_node
    return [
        make("Shape", [graph.input[0].name], [f"{prefix}_b1"], start=0, end=1),
        make("Squeeze", [f"{prefix}_b1"], [f"{prefix}_b"]),
        make("Range", [zero, f"{prefix}_b", f"{prefix}_one"], [f"{prefix}_range"]),
        make("Unsqueeze", [f"{prefix}_range", f"{prefix}_axis1"], [f"{prefix}_batch"]),
        make("Mul", [f"{prefix}_batch", zero], [f"{prefix}_zeros"]),
        make("Concat", [f"{prefix}_batch", f"{prefix}_zeros"], [idx], axis=1),
    ]


def _first_token_rows_in_fp32(graph: onnx.GraphProto) -> int:
    """Overwrite row 0 of every int8 MatMul's output with an fp32 product; returns the count.

    ``quantize_dynamic`` turns ``MatMul(X, W)`` into ``DynamicQuantizeLinear(X)`` ->
    ``MatMulInteger(Xq, Wq, x_zp, w_zp)`` -> ``Cast`` -> ``Mul(., x_scale * w_scale)``, usually
    followed by the bias ``Add``. For each, this adds ``Gather(X, 0, axis=1) @
    DequantizeLinear(Wq, w_scale, w_zp) (+ bias)`` and a ``ScatterND`` that puts those rows into
    the (bias-added) int8 result, so ONNX Runtime still fuses the int8 MatMul with its bias.
    """
    inits = {init.name for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_consumer(name: str, op_type: str) -> onnx.NodeProto | None:
        found = consumers.get(name, [])
        return found[0] if len(found) == 1 and found[0].op_type == op_type else None

    prefix = "crossrank_first_token"
    zero, idx = f"{prefix}_zero", f"{prefix}_rows"
    nodes = _first_token_index_nodes(graph, prefix)
    make = onnx.helper.make_node
    after: dict[str, list[onnx.NodeProto]] = {}
    count = 0
    for node in graph.node:
        if node.op_type != "MatMulInteger" or node.input[1] not in inits:
            continue
        quantizer = producer.get(node.input[0])
        cast = only_consumer(node.output[0], "Cast")
        mul = only_consumer(cast.output[0], "Mul") if cast else None
        scales = producer.get(mul.input[1]) if mul else None
        if (
            quantizer is None
            or quantizer.op_type != "DynamicQuantizeLinear"
            or mul is None
            or scales is None
            or len(consumers[node.input[0]]) > 1  # q, k, v: the row only enters attention
        ):
            continue
        weight_scales = [name for name in scales.input if name in inits]
        if len(weight_scales) != 1:  # not the layout quantize_dynamic writes: leave it int8
            continue
        w_scale = weight_scales[0]
        x, out, tail = quantizer.input[0], mul.output[0], mul
        bias_add = only_consumer(out, "Add")
        bias = next((i for i in bias_add.input if i in inits), None) if bias_add else None
        if bias_add is not None and bias is not None:
            out, tail = bias_add.output[0], bias_add
        key = f"{prefix}_{count}"
        new = [
            make("Gather", [x, zero], [f"{key}_x"], axis=1),
            make(
                "DequantizeLinear", [node.input[1], w_scale, *node.input[3:4]], [f"{key}_w"], axis=1
            ),
            make("MatMul", [f"{key}_x", f"{key}_w"], [f"{key}_mm"]),
        ]
        rows = f"{key}_mm"
        if bias is not None:
            new.append(make("Add", [rows, bias], [f"{key}_bias"]))
            rows = f"{key}_bias"
        tail.output[0] = f"{key}_int8"
        new.append(make("ScatterND", [f"{key}_int8", idx, rows], [out]))
        after.setdefault(tail.output[0], []).extend(new)
        count += 1
    for node in graph.node:
        nodes.append(node)
        nodes.extend(after.get(node.output[0], []))
    del graph.node[:]
    graph.node.extend(nodes)
    return count


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
        with working(f"exporting {name} to ONNX (once; later starts reuse it)"):
            _publish(fp32, lambda d: export_onnx(model, d, input_names), info)
        del model
        logger.info("exported %s to ONNX in %.1fs: %s", name, time.perf_counter() - start, fp32)
    if quantize:
        start = time.perf_counter()
        info["quantized"] = "dynamic int8, per-channel weights, first-token rows fp32"
        with working(f"quantizing {name} to int8"):
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

    def export() -> Path:
        return ensure_exported(
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

    path = export()
    try:
        return OnnxRunner(path, tokenizer.pad_id)
    except Exception as err:  # onnxruntime's own types (InvalidProtobuf, Fail ...)
        logger.warning("cached ONNX model %s is unreadable (%s); exporting it again", path, err)
        _discard_entries(path.parent)
    return OnnxRunner(export(), tokenizer.pad_id)


def _discard_entries(entry: Path) -> None:
    """Remove a damaged cache entry and, for an int8 one, the fp32 export it was made from
    (either may be the damaged file). Each is renamed away first, so no process finds a
    half-deleted entry."""
    for path in {entry, entry.with_name(entry.name.removesuffix("-int8"))}:
        trash = path.with_name(f".{path.name}.damaged-{os.getpid()}")
        with suppress(FileNotFoundError):
            os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
