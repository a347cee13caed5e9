"""Packed (padding-free) forward pass for BERT-family cross-encoders.

Why: reranking pairs vary in length (about 190 tokens on average for a question and a
paragraph, up to ``max_length``), so even a length-sorted padded batch computes padding. This
runner concatenates the pairs of a batch into one token stream, runs variable-length attention
over it (flash attention with cumulative sequence lengths on CUDA), and gathers each pair's
first (``<s>``/``[CLS]``) row for the classification head: the cost of a batch is its real token
count. In the last layer only the CLS rows go through attention output and feed-forward,
since nothing else is read.

It reuses the loaded Hugging Face model's weights; the only copy is a fused query/key/value
matrix per layer (plus bias vectors adjusted so residual adds happen inside the matmuls).
Supported: the families of :mod:`crossrank.backends.families` marked ``packed`` (XLM-RoBERTa /
RoBERTa / CamemBERT: bge-reranker-v2-m3, the BGE rerankers; BERT: ms-marco MiniLM
cross-encoders) with absolute positions and GELU. ``TorchPaddedRunner`` stays the reference and
the CPU path; the CPU code here (per-sequence SDPA) exists so the packing logic is tested in CI.

On CUDA, small passes (up to ``graph_max_tokens``) are replayed from a CUDA graph captured per
(token bucket, sequence slots, max-length bucket), which removes the per-kernel launch cost;
larger passes run eagerly, where the GPU is the bottleneck anyway. Measurements of every
choice: ``docs/gpu-fast-path.md``.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from crossrank.backends.base import Pending, Runner, device_result, on_device
from crossrank.backends.families import family_of
from crossrank.tokenization import EncodedPairs

logger = logging.getLogger(__name__)

# config.hidden_act -> F.gelu(approximate=...)
_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
_GRAPH_TOKEN_STEP = 512  # token buckets of captured graphs are multiples of this
_GRAPH_LEN_STEP = 128  # flash attention's query block: max-length buckets cost nothing extra


@dataclass(frozen=True)
class PackedOptions:
    """Settings of the packed CUDA runner; the defaults are the measured-best choice
    (``benchmarks/gpu_peers.py`` measures each one on and off).

    - ``cuda_graphs``: replay captured CUDA graphs for passes of at most ``graph_max_tokens``
      real tokens (small requests, where launching ~270 kernels one by one costs more than
      running them); larger passes run eagerly.
    - ``gelu_epilogue``: fuse bias + GELU into the feed-forward matmul (cuBLASLt epilogue). The
      epilogue computes the tanh form of GELU, which differs from exact GELU by at most about
      5e-4, below fp16/bf16 rounding of the activations.
    - ``fuse_residual``: fold each residual branch's output bias into the LayerNorm before it
      (and subtract its image from the next projection's bias), so that the residual add
      happens inside the matmul (``addmm_`` into the residual) instead of in two extra passes.
    """

    cuda_graphs: bool = True
    graph_max_tokens: int = 4096
    gelu_epilogue: bool = True
    fuse_residual: bool = True


def stage(parts: list[np.ndarray], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Concatenate 1-D ``parts`` as ``dtype`` into one host buffer, pinned when ``device`` is
    CUDA so that its upload is asynchronous (one allocation and one copy, no pinning of a
    temporary). PyTorch's caching host allocator reuses a pinned block only once the copies
    queued from it are done, so passes can be queued back to back."""
    size = sum(int(p.shape[0]) for p in parts)
    host = torch.empty(size, dtype=dtype, pin_memory=device.type == "cuda")
    np.concatenate(parts, out=host.numpy(), casting="unsafe")
    return host


def unsupported_reason(model: PreTrainedModel) -> str | None:
    """Why the packed runner cannot run ``model`` (``None`` when it can)."""
    config = model.config
    family = family_of(config)
    if family is None or not family.packed:
        model_type = getattr(config, "model_type", "")
        return f"model type {model_type!r} is not a BERT/RoBERTa-family encoder"
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return f"position_embedding_type={config.position_embedding_type!r} is not 'absolute'"
    if getattr(config, "is_decoder", False):
        return "decoder configurations are not supported"
    if config.hidden_act not in _GELU:
        return f"hidden_act={config.hidden_act!r} is not a GELU"
    if config.hidden_size % config.num_attention_heads:
        return "hidden_size is not a multiple of num_attention_heads"
    head_dim = config.hidden_size // config.num_attention_heads
    if head_dim % 8 or head_dim > 256:
        return f"head dimension {head_dim} is not a multiple of 8 up to 256 (flash attention)"
    base = getattr(model, model.base_model_prefix, None)
    if base is None or not hasattr(base, "embeddings") or not hasattr(base, "encoder"):
        return "unexpected module layout (no embeddings/encoder)"
    if _head_modules(model) is None:
        return "unexpected classification head"
    return None


def _head_modules(model: PreTrainedModel) -> tuple[torch.nn.Linear, torch.nn.Linear] | None:
    """(dense + tanh, output projection) applied to the CLS row."""
    family = family_of(model.config)
    classifier = getattr(model, "classifier", None)
    if family is not None and family.head == "classifier":
        dense, out = getattr(classifier, "dense", None), getattr(classifier, "out_proj", None)
    else:
        pooler = getattr(getattr(model, model.base_model_prefix), "pooler", None)
        dense, out = getattr(pooler, "dense", None), classifier
    if isinstance(dense, torch.nn.Linear) and isinstance(out, torch.nn.Linear):
        return dense, out
    return None


# ------------------------------------------------------------------------------ host side
@dataclass(frozen=True)
class PackedBatch:
    """A batch as one token stream: pair ``i`` is ``ids[cu_seqlens[i]:cu_seqlens[i + 1]]``."""

    ids: np.ndarray
    positions: np.ndarray
    type_ids: np.ndarray | None
    cu_seqlens: np.ndarray
    max_len: int

    @property
    def tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def pairs(self) -> int:
        return int(self.cu_seqlens.shape[0] - 1)


def position_ids(ids: np.ndarray, cu_seqlens: np.ndarray, padding_idx: int | None) -> np.ndarray:
    """Position ids of a packed stream, restarting at each sequence.

    RoBERTa rule (``padding_idx`` given, as ``create_position_ids_from_input_ids`` does): the
    k-th non-pad token of a sequence gets ``padding_idx + k`` (k from 1); pad tokens get
    ``padding_idx``. BERT rule (``None``): 0, 1, 2, ... within each sequence.
    """
    lengths = np.diff(cu_seqlens).astype(np.int64)
    starts = np.repeat(cu_seqlens[:-1].astype(np.int64), lengths)
    if padding_idx is None:
        return np.arange(ids.shape[0], dtype=np.int64) - starts
    real = (ids != padding_idx).astype(np.int64)
    running = np.concatenate([[0], np.cumsum(real)])
    within = running[1:] - np.repeat(running[cu_seqlens[:-1]], lengths)
    return within * real + padding_idx


def pack(encoded: EncodedPairs, padding_idx: int | None) -> PackedBatch:
    """Concatenate all pairs of ``encoded`` (in its order) into one stream."""
    rows = np.arange(len(encoded))
    ids, cu_seqlens = encoded.packed(rows)
    type_ids = None if encoded.type_ids is None else encoded.take(rows).type_ids
    return PackedBatch(
        ids=ids,
        positions=position_ids(ids, cu_seqlens, padding_idx),
        type_ids=type_ids,
        cu_seqlens=cu_seqlens,
        max_len=int(encoded.lengths.max()),
    )


# ---------------------------------------------------------------------------- device side
@dataclass(frozen=True)
class _Norm:
    weight: Tensor
    bias: Tensor
    eps: float


@dataclass(frozen=True)
class _Layer:
    """One encoder layer's weights; ``attn_out_b``/``ff_out_b`` are ``None`` once folded."""

    qkv_w: Tensor
    qkv_b: Tensor
    attn_out_w: Tensor
    attn_out_b: Tensor | None
    norm1: _Norm
    ff_in_w: Tensor
    ff_in_b: Tensor
    ff_out_w: Tensor
    ff_out_b: Tensor | None
    norm2: _Norm


def _bias(module: torch.nn.Linear) -> Tensor:
    if module.bias is not None:
        return module.bias.detach()
    return module.weight.new_zeros(module.weight.shape[0])


def _norm(module: torch.nn.LayerNorm) -> _Norm:
    return _Norm(module.weight.detach(), module.bias.detach(), float(module.eps))


def _layer(module: Any) -> _Layer:
    attn = module.attention
    parts = (attn.self.query, attn.self.key, attn.self.value)
    return _Layer(
        qkv_w=torch.cat([p.weight for p in parts]).detach(),
        qkv_b=torch.cat([_bias(p) for p in parts]),
        attn_out_w=attn.output.dense.weight.detach(),
        attn_out_b=_bias(attn.output.dense),
        norm1=_norm(attn.output.LayerNorm),
        ff_in_w=module.intermediate.dense.weight.detach(),
        ff_in_b=_bias(module.intermediate.dense),
        ff_out_w=module.output.dense.weight.detach(),
        ff_out_b=_bias(module.output.dense),
        norm2=_norm(module.output.LayerNorm),
    )


def _fold_residual_biases(layers: list[_Layer], embed_norm: _Norm) -> tuple[list[_Layer], _Norm]:
    """Move each residual branch's output bias into the LayerNorm that precedes the branch.

    ``LN(x + a W^T + b)`` needs a separate add; with ``x' = x + b`` (the preceding LayerNorm's
    shift plus ``b``) it is ``LN(x'.addmm_(a, W^T))``. The branch itself must still see ``x``,
    so its first projection's bias becomes ``b_in - W_in b``. Exact algebra, done in fp32.
    """

    def shifted(norm: _Norm, extra: Tensor | None) -> _Norm:
        if extra is None:
            return norm
        return _Norm(norm.weight, (norm.bias.float() + extra.float()).to(norm.bias.dtype), norm.eps)

    def minus_image(bias: Tensor, weight: Tensor, shift: Tensor | None) -> Tensor:
        if shift is None:
            return bias
        return (bias.float() - weight.float() @ shift.float()).to(bias.dtype)

    folded = []
    for i, layer in enumerate(layers):
        next_out_b = layers[i + 1].attn_out_b if i + 1 < len(layers) else None
        folded.append(
            _Layer(
                qkv_w=layer.qkv_w,
                qkv_b=minus_image(layer.qkv_b, layer.qkv_w, layer.attn_out_b),
                attn_out_w=layer.attn_out_w,
                attn_out_b=None,
                norm1=shifted(layer.norm1, layer.ff_out_b),
                ff_in_w=layer.ff_in_w,
                ff_in_b=minus_image(layer.ff_in_b, layer.ff_in_w, layer.ff_out_b),
                ff_out_w=layer.ff_out_w,
                ff_out_b=None,
                norm2=shifted(layer.norm2, next_out_b),
            )
        )
    return folded, shifted(embed_norm, layers[0].attn_out_b if layers else None)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
    max_q: int,
    max_k: int,
    scale: float,
    cu_host: tuple[list[int], list[int]] | None = None,
    *,
    causal: bool = False,
) -> Tensor:
    """Attention within each sequence of a packed stream; q is ``[tokens, heads, dim]``, k/v
    ``[keys, kv_heads, dim]`` (grouped-query attention when ``kv_heads < heads``).

    ``causal``: aligned bottom-right, query ``j`` of a sequence with ``a`` queries and ``b``
    keys sees keys ``0 .. j + b - a`` (so queries that follow a shared prefix see all of it).
    CUDA: flash attention over cumulative sequence lengths (``flash_attn_varlen_func`` when the
    flash-attn package is installed, else PyTorch's built-in flash kernel, with the key/value
    heads repeated where that build refuses fewer of them). Elsewhere (tests):
    scaled-dot-product attention per sequence, from the host copies in ``cu_host``.
    """
    if q.is_cuda:
        if _flash_attn_varlen is not None:
            return _flash_attn_varlen(
                q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal
            )
        if k.shape[1] != q.shape[1]:
            if not _torch_flash_gqa(q.device):
                k, v = _repeat_kv(k, v, q.shape[1] // k.shape[1])
            # with fewer key heads and max_q == 1 PyTorch's kernel folds the query heads into
            # the sequence dimension, which assumes one query per sequence (a shared-prefix
            # sequence has none); the bound 2 keeps the general path (it only sizes the grid)
            max_q = max(max_q, 2)
        flash = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale
        )
        return flash[0]
    if cu_host is None:
        cu_host = (cu_q.tolist(), cu_k.tolist())
    return _attention_per_sequence(q, k, v, cu_host, scale, causal)


def kv_heads_for_attention(device: torch.device, heads: int, kv_heads: int) -> int:
    """Key/value heads :func:`varlen_attention` takes on ``device`` without copying them:
    ``kv_heads`` where the kernel does grouped-query attention itself (the flash-attn
    package; the CPU path), else ``heads`` (PyTorch's built-in flash kernel, in the builds
    that refuse fewer key/value heads). A caller that already writes its keys out can write
    them repeated for free instead of paying a copy here."""
    if device.type != "cuda" or _flash_attn_varlen is not None or _torch_flash_gqa(device):
        return kv_heads
    return heads


@functools.cache
def _torch_flash_gqa(device: torch.device) -> bool:
    """Whether PyTorch's flash kernel takes fewer key/value heads than query heads."""
    q = torch.zeros(2, 2, 64, device=device, dtype=torch.float16)
    kv = torch.zeros(2, 1, 64, device=device, dtype=torch.float16)
    cu = torch.tensor([0, 2], device=device, dtype=torch.int32)
    try:
        torch.ops.aten._flash_attention_forward(q, kv, kv, cu, cu, 2, 2, 0.0, False, False)
    except RuntimeError as err:
        logger.info("flash attention repeats key/value heads (%s)", str(err).split("\n")[0])
        return False
    return True


def _repeat_kv(k: Tensor, v: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Keys and values repeated ``groups`` times along the heads (grouped-query attention)."""
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def _attention_per_sequence(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_host: tuple[list[int], list[int]],
    scale: float,
    causal: bool,
) -> Tensor:
    """The CPU form of :func:`varlen_attention`: SDPA per sequence."""
    starts_q, starts_k = cu_host
    groups = q.shape[1] // k.shape[1]
    out = q.new_zeros(q.shape)  # a sequence without keys gets zeros, as flash attention writes
    for i in range(len(starts_q) - 1):
        qs, qe, ks, ke = starts_q[i], starts_q[i + 1], starts_k[i], starts_k[i + 1]
        if qe == qs or ke == ks:
            continue
        a, b = qe - qs, ke - ks
        mask = torch.ones(a, b, dtype=torch.bool, device=q.device).tril(b - a) if causal else None
        keys, values = _repeat_kv(k[ks:ke], v[ks:ke], groups)
        o = F.scaled_dot_product_attention(
            q[qs:qe].transpose(0, 1),
            keys.transpose(0, 1),
            values.transpose(0, 1),
            attn_mask=mask,
            scale=scale,
        )
        out[qs:qe] = o.transpose(0, 1)
    return out


def _find_flash_attn() -> Callable[..., Tensor] | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    return flash_attn_varlen_func


_flash_attn_varlen = _find_flash_attn()


@dataclass
class _DeviceBatch:
    """Device tensors of one packed pass (views into one int32 upload)."""

    ids: Tensor
    positions: Tensor
    type_ids: Tensor | None
    cu_seqlens: Tensor
    cu_cls: Tensor  # 0, 1, ..., pairs: one query row (the CLS row) per pair in the last layer
    max_len: int
    cu_host: list[int] | None = None  # host copy of cu_seqlens, for the CPU attention


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: Tensor  # int32 buffer the graph reads: ids | positions | cu | cu_cls [| type ids]
    logits: Tensor  # the graph's output
    tokens: int
    slots: int


def capture_cuda_graph(
    graph: torch.cuda.CUDAGraph, forward: Callable[[], Tensor], device: torch.device, pool: Any
) -> Tensor:
    """Capture ``forward`` (a pass over fixed input buffers) into ``graph``, allocating from the
    memory ``pool``; returns the graph's output tensor, rewritten by each replay."""
    # warm-up (cuBLAS handles, workspaces) and capture on a stream of ``device``:
    # torch.cuda.graph's default capture stream is one per process, made on whichever
    # device was current at the first capture, so a second GPU's capture would land on it
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        forward()
    torch.cuda.current_stream(device).wait_stream(stream)
    # thread-local capture: other threads (other devices' replicas, other engines) keep
    # using CUDA while this one captures
    with (
        _GC_PAUSE,
        torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"),
    ):
        output = forward()
    return output


class _GcPause:
    """While any thread is inside, the garbage collector does not run by itself.

    A collection on the capturing thread would run deleters that call into CUDA (pinned host
    memory, events), which a capture forbids. Collecting before each capture instead
    (``gc.collect()``) held the GIL for tens of milliseconds in a server process full of
    objects, and graphs are captured while requests are served: in one H200 load test (32
    clients) 38% of the GIL-holding samples were in that collection, with every other
    thread, the event loop included, waiting. Pausing costs nothing; the garbage is
    collected as usual afterwards.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._was_enabled = False

    def __enter__(self) -> None:
        with self._lock:
            if self._inside == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._inside += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0 and self._was_enabled:
                gc.enable()


_GC_PAUSE = _GcPause()


@dataclass
class RunnerStats:
    """Counters for benchmarks and debugging."""

    graph_passes: int = 0
    eager_passes: int = 0
    graphs_captured: int = 0


class PackedRunner(Runner):
    """Padding-free runner (see the module docstring)."""

    packed = True

    def __init__(
        self,
        model: PreTrainedModel,
        device: torch.device,
        options: PackedOptions | None = None,
    ) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the packed fast path cannot run this model: {reason}")
        self.options = options or PackedOptions()
        self.device = device
        config = model.config
        self.hidden = int(config.hidden_size)
        self.heads = int(config.num_attention_heads)
        self.head_dim = self.hidden // self.heads
        self.scale = self.head_dim**-0.5
        self.dtype = next(model.parameters()).dtype
        family = family_of(config)
        assert family is not None  # checked by unsupported_reason
        self.padding_idx: int | None = (
            int(config.pad_token_id) if family.positions_from_padding else None
        )
        self.gelu = _GELU[config.hidden_act]
        if self.options.gelu_epilogue and device.type == "cuda":
            self.gelu = "epilogue"
        base = getattr(model, model.base_model_prefix)
        emb = base.embeddings
        self.word = emb.word_embeddings.weight.detach()
        self.pos = emb.position_embeddings.weight.detach()
        self.types = emb.token_type_embeddings.weight.detach()
        # BERT tokenizers return token type ids; RoBERTa-family models use type 0 throughout
        self.typed = self.padding_idx is None or self.types.shape[0] > 1
        self.layers = [_layer(module) for module in base.encoder.layer]
        self.emb_norm = _norm(emb.LayerNorm)
        if self.options.fuse_residual:
            self.layers, self.emb_norm = _fold_residual_biases(self.layers, self.emb_norm)
        head = _head_modules(model)
        assert head is not None  # checked by unsupported_reason
        self.head_dense_w, self.head_dense_b = head[0].weight.detach(), _bias(head[0])
        self.head_out_w, self.head_out_b = head[1].weight.detach(), _bias(head[1])
        self._graphs: dict[tuple[int, int, int], _Graph] = {}
        self._graph_pool: Any = None
        self._lock = threading.Lock()
        self.stats = RunnerStats()

    # -------------------------------------------------------------------------- public
    def submit(self, encoded: EncodedPairs) -> Pending:
        """Queue the pass on the device; the result waits for it (see ``Runner``)."""
        batch = pack(encoded, self.padding_idx)
        with self._lock, on_device(self.device), torch.inference_mode():
            return device_result(self._logits(batch))

    # ------------------------------------------------------------------------ internals
    def _use_graph(self, tokens: int) -> bool:
        return (
            self.options.cuda_graphs
            and self.device.type == "cuda"
            and tokens <= self.options.graph_max_tokens
        )

    def _logits(self, batch: PackedBatch) -> Tensor:
        if self._use_graph(batch.tokens):
            graph = self._graph_for(batch)
            self._fill(graph, batch)
            graph.graph.replay()
            self.stats.graph_passes += 1
            # the next replay overwrites the graph's output: copy it (queued, in stream order)
            return graph.logits[: batch.pairs].clone()
        self.stats.eager_passes += 1
        return self._forward(self._upload(batch))

    def _upload(self, batch: PackedBatch) -> _DeviceBatch:
        t, b = batch.tokens, batch.pairs
        parts = [batch.ids, batch.positions, batch.cu_seqlens, np.arange(b + 1)]
        if batch.type_ids is not None:
            parts.append(batch.type_ids)
        dev = stage(parts, torch.int32, self.device).to(self.device, non_blocking=True)
        on_cpu = self.device.type != "cuda"
        return _DeviceBatch(
            ids=dev[:t],
            positions=dev[t : 2 * t],
            type_ids=dev[2 * t + 2 * b + 2 :] if batch.type_ids is not None else None,
            cu_seqlens=dev[2 * t : 2 * t + b + 1],
            cu_cls=dev[2 * t + b + 1 : 2 * t + 2 * b + 2],
            max_len=batch.max_len,
            cu_host=batch.cu_seqlens.tolist() if on_cpu else None,
        )

    def _residual(self, x: Tensor, a: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``x + a W^T (+ b)``: accumulated into ``x`` by the matmul when the bias is folded."""
        if bias is None:
            return x.addmm_(a, weight.t())
        return x + F.linear(a, weight, bias)

    def _forward(self, db: _DeviceBatch) -> Tensor:
        """Logits ``[pairs, num_labels]`` (model dtype) of one packed pass."""
        tokens = db.ids.shape[0]
        x = F.embedding(db.ids, self.word) + F.embedding(db.positions, self.pos)
        if db.type_ids is not None:
            x = x + F.embedding(db.type_ids, self.types)
        else:
            x = x + self.types[0]
        norm = self.emb_norm
        x = F.layer_norm(x, (self.hidden,), norm.weight, norm.bias, norm.eps)
        # zero-length slots of a captured graph point past the end: clamp (their rows are unused)
        cls_rows = db.cu_seqlens[:-1].clamp(max=tokens - 1)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            qkv = F.linear(x, layer.qkv_w, layer.qkv_b)
            q, k, v = qkv.view(x.shape[0], 3, self.heads, self.head_dim).unbind(1)
            cu_q, max_q, host_q = db.cu_seqlens, db.max_len, db.cu_host
            if i == last:  # only the CLS rows are read after the last layer
                q, x = q.index_select(0, cls_rows), x.index_select(0, cls_rows)
                cu_q, max_q = db.cu_cls, 1
                host_q = None if db.cu_host is None else list(range(len(db.cu_host)))
            cu_host = None if db.cu_host is None or host_q is None else (host_q, db.cu_host)
            a = varlen_attention(
                q,
                k,
                v,
                cu_q,
                db.cu_seqlens,
                max_q,
                db.max_len,
                self.scale,
                cu_host,
            ).reshape(-1, self.hidden)
            n1, n2 = layer.norm1, layer.norm2
            x = self._residual(x, a, layer.attn_out_w, layer.attn_out_b)
            x = F.layer_norm(x, (self.hidden,), n1.weight, n1.bias, n1.eps)
            if self.gelu == "epilogue":
                h = torch._addmm_activation(layer.ff_in_b, x, layer.ff_in_w.t(), use_gelu=True)
            else:
                h = F.gelu(F.linear(x, layer.ff_in_w, layer.ff_in_b), approximate=self.gelu)
            x = self._residual(x, h, layer.ff_out_w, layer.ff_out_b)
            x = F.layer_norm(x, (self.hidden,), n2.weight, n2.bias, n2.eps)
        pooled = torch.tanh(F.linear(x, self.head_dense_w, self.head_dense_b))
        return F.linear(pooled, self.head_out_w, self.head_out_b)

    # ---- CUDA graphs
    def _graph_key(self, tokens: int, pairs: int, max_len: int) -> tuple[int, int, int]:
        """(token bucket, sequence slots, max-length bucket) of the graph for a pass.

        The bucket's unused tokens form filler sequences of at most 128 tokens; the slots hold
        the real pairs, the fillers and empty sequences, rounded up to a power of two."""
        bucket = -(-tokens // _GRAPH_TOKEN_STEP) * _GRAPH_TOKEN_STEP
        length = -(-max_len // _GRAPH_LEN_STEP) * _GRAPH_LEN_STEP
        fillers = -(-(bucket - tokens) // _GRAPH_LEN_STEP)
        slots = 1 << (max(pairs + fillers, 16) - 1).bit_length()
        return bucket, slots, length

    def _graph_for(self, batch: PackedBatch) -> _Graph:
        """The graph serving ``batch``'s shape, captured (with ``batch`` as its inputs) if new."""
        key = self._graph_key(batch.tokens, batch.pairs, batch.max_len)
        graph = self._graphs.get(key)
        if graph is not None:
            return graph
        bucket, slots, length = key
        inputs = torch.empty(self._graph_size(bucket, slots), dtype=torch.int32, device=self.device)
        graph = _Graph(torch.cuda.CUDAGraph(), inputs, inputs, bucket, slots)
        self._fill(graph, batch)
        db = self._graph_views(inputs, bucket, slots, length)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph.logits = capture_cuda_graph(
            graph.graph, lambda: self._forward(db), self.device, self._graph_pool
        )
        self._graphs[key] = graph
        self.stats.graphs_captured += 1
        logger.debug("captured a CUDA graph for (tokens, slots, max_len)=%s", key)
        return graph

    def _graph_size(self, bucket: int, slots: int) -> int:
        return 2 * bucket + 2 * (slots + 1) + (bucket if self.typed else 0)

    def _graph_views(self, inputs: Tensor, bucket: int, slots: int, length: int) -> _DeviceBatch:
        """The graph's inputs as views of its buffer (layout written by :meth:`_fill`)."""
        return _DeviceBatch(
            ids=inputs[:bucket],
            positions=inputs[bucket : 2 * bucket],
            type_ids=inputs[2 * bucket + 2 * slots + 2 :] if self.typed else None,
            cu_seqlens=inputs[2 * bucket : 2 * bucket + slots + 1],
            cu_cls=inputs[2 * bucket + slots + 1 : 2 * bucket + 2 * slots + 2],
            max_len=length,
        )

    def _fill(self, graph: _Graph, batch: PackedBatch) -> None:
        """Write ``batch`` into the graph's input buffer; filler sequences of at most 128
        tokens cover the bucket's unused tokens, and empty sequences the unused slots."""
        bucket, slots = graph.tokens, graph.slots
        t, b = batch.tokens, batch.pairs
        fill_ends = np.minimum(np.arange(t, bucket, _GRAPH_LEN_STEP) + _GRAPH_LEN_STEP, bucket)
        fill_lengths = np.diff(np.concatenate([[t], fill_ends]))
        cu = np.concatenate(
            [batch.cu_seqlens, fill_ends, np.full(slots - b - len(fill_ends), bucket)]
        )
        fill_positions = np.arange(bucket - t) - np.repeat(
            np.cumsum(fill_lengths) - fill_lengths, fill_lengths
        )
        pad = self.padding_idx
        parts = [
            batch.ids,
            np.full(bucket - t, pad if pad is not None else 0),
            batch.positions,
            fill_positions + (pad + 1 if pad is not None else 0),
            cu,
            np.arange(slots + 1),
        ]
        if self.typed:
            types = batch.type_ids if batch.type_ids is not None else np.zeros(t, np.int64)
            parts += [types, np.zeros(bucket - t, np.int64)]
        graph.inputs.copy_(stage(parts, torch.int32, self.device), non_blocking=True)
