"""Packed (padding-free) forward pass for decoder (LLM) rerankers, with a shared prefix.

Why: a decoder reranker reads one position per pair (the last token) and one to two rows of
the LM head (the answer tokens), and every pair of a pass starts with the same tokens (the
template prefix and the instruction, and in a 1 x N request the query too). The padded
reference path (:class:`~crossrank.backends.decoder.DecoderPaddedRunner`) computes padding,
and recomputes that common prefix for every pair.

This runner concatenates the pairs into one token stream and runs causal attention over it,
with RoPE, grouped-query attention, RMSNorm and Qwen3's QK-norm taken from the loaded Hugging
Face modules. The longest token prefix common to all pairs of a pass is computed **once**: it
is the stream's first sequence, and every pair's queries attend to its keys and values
followed by their own (a causal model's prefix states do not depend on what follows). On CUDA
with Triton the attention is the shared-prefix kernel of
:mod:`crossrank.backends.prefix_attention`, which reads those keys where the projection wrote
them; elsewhere each sequence's keys are gathered into their own layout for a varlen kernel
(flash attention on CUDA; per-sequence SDPA with a bottom-right causal mask on CPU, so the
packing, prefix and graph-layout logic are tested without a GPU). In the last layer only each
pair's last token goes through attention output and MLP, and the head is only the
answer-token rows (``[k, hidden]``). The elementwise work between the GEMMs (QK-norm, RoPE,
the gated activation) runs in the fused kernels of :mod:`crossrank.backends.fused`.

Output: float32 ``[pairs, num_labels]``, the same as the padded runner's (see
``crossrank.backends.decoder``).

On CUDA, passes of at most ``graph_max_tokens`` stream tokens are replayed from a CUDA graph
captured per shape bucket (tokens and sequence slots; with gathered keys also key count and
longest sequence), padded with a filler sequence and empty sequences, as the encoder runner
does; larger passes run eagerly. Checked on one H200 (random weights of the
Qwen3-Reranker-0.6B and bge-reranker-v2-gemma shapes, bf16; ``benchmarks/gpu_llm.py``): over
a bulk call and 1x50 calls (graph replays and eager passes) the packed scores are as close to
the fp32 padded reference as the padded bf16 path is (0.6B: largest raw difference 0.0323 vs
0.0324; gemma 1.18 vs 1.18), with and without the shared prefix, with the kernel or flash.
Measured there (0.6B shape, XQuAD-R, warmed up): 2,665 pairs/s at 61% MFU, 22.3 ms per 1x50
request (2,399 pairs/s and 25.0 ms with flash on gathered keys). Of a 1x50 request's ~23 ms
the GPU is busy 20 ms with its ~8,800 tokens (GEMMs at ~700 TFLOP/s), from ~3 ms in, once a
first chunk of 12 pairs is tokenized and queued. Tables: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from crossrank.backends.base import Pending, Runner, device_result, on_device
from crossrank.backends.decoder import (
    DecoderFamily,
    DecoderPaddedRunner,
    decoder_body,
    decoder_head,
)
from crossrank.backends.fused import HeadNorm, act_kind, gated_act, rope_heads
from crossrank.backends.packed import (
    capture_cuda_graph,
    kv_heads_for_attention,
    stage,
    varlen_attention,
)
from crossrank.backends.prefix_attention import (
    BLOCK_M,
    block_table,
    kernel_applies,
    last_row_table,
    pad_table,
    prefix_attention,
)
from crossrank.tokenization import EncodedPairs

logger = logging.getLogger(__name__)

_SUPPORTED_TYPES = frozenset({"qwen3", "qwen2", "llama", "gemma"})
_MAX_PREFIX_SCAN = 2048  # tokens compared when looking for the common prefix


def unsupported_reason(model: PreTrainedModel, device: torch.device | None = None) -> str | None:
    """Why the packed decoder runner cannot run ``model`` (on ``device``; ``None`` when it can)."""
    config = model.config
    dtype = next(model.parameters()).dtype
    if (
        device is not None
        and device.type == "cuda"
        and dtype not in (torch.float16, torch.bfloat16)
    ):
        return f"flash attention needs float16 or bfloat16 weights, not {dtype}"
    model_type = getattr(config, "model_type", "")
    if model_type not in _SUPPORTED_TYPES:
        return f"model type {model_type!r} is not one of {sorted(_SUPPORTED_TYPES)}"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention is not supported"
    body = decoder_body(model)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(body, name):
            return f"unexpected module layout (no {name})"
    layer = body.layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    for module, names in (
        (attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
        (mlp, ("gate_proj", "up_proj", "down_proj", "act_fn")),
        (layer, ("input_layernorm", "post_attention_layernorm")),
    ):
        if module is None or not all(hasattr(module, n) for n in names):
            return "unexpected decoder layer layout"
    for name in ("q_norm", "k_norm"):
        if getattr(attn, name, None) is not None and _rms_weights(getattr(attn, name)) is None:
            return f"unsupported {name} ({type(getattr(attn, name)).__name__})"
    return None


@dataclass(frozen=True)
class _Layer:
    input_norm: Callable[[Tensor], Tensor]
    qkv_w: Tensor
    qkv_b: Tensor | None
    q_norm: HeadNorm | None
    k_norm: HeadNorm | None
    out_w: Tensor
    out_b: Tensor | None
    post_norm: Callable[[Tensor], Tensor]
    gate_up_w: Tensor
    down_w: Tensor
    act: Callable[[Tensor], Tensor]
    act_kind: str | None
    scale: float


def _cat_bias(parts: Sequence[torch.nn.Linear]) -> Tensor | None:
    if all(p.bias is None for p in parts):
        return None
    return torch.cat(
        [
            p.bias.detach() if p.bias is not None else p.weight.new_zeros(p.out_features)
            for p in parts
        ]
    )


def _rms_weights(module: Any) -> HeadNorm | None:
    """Weight and epsilon of the RMSNorm of Llama/Qwen2/Qwen3 (``weight * (x / rms(x) in
    float32).to(dtype)``, eps in ``variance_epsilon``); ``None`` for other norms (Gemma's
    ``1 + weight``)."""
    eps, weight = getattr(module, "variance_epsilon", None), getattr(module, "weight", None)
    if module is None or "Gemma" in type(module).__name__ or eps is None or weight is None:
        return None
    return HeadNorm(weight.detach(), float(eps))


def _fused_norm(module: Any) -> Callable[[Tensor], Tensor]:
    """The module's RMSNorm as one ``F.rms_norm`` call: one fused kernel on CUDA instead of
    the module's seven elementwise ones over float32 copies. It computes in float32 too and
    rounds once, after the weight. Other norms keep their module."""
    norm = _rms_weights(module)
    if norm is None:
        return module
    shape = (norm.weight.shape[-1],)
    return lambda x: F.rms_norm(x, shape, norm.weight, norm.eps)


def _add_linear(x: Tensor, a: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x + F.linear(a, weight, bias)``; without a bias one GEMM whose epilogue adds ``x``
    in place (``x`` is the pass's own residual stream: no copy of it first)."""
    if bias is None:
        return x.addmm_(a, weight.t())
    return x + F.linear(a, weight, bias)


def _layer(module: Any, head_dim: int) -> _Layer:
    attn, mlp = module.self_attn, module.mlp
    qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
    return _Layer(
        input_norm=_fused_norm(module.input_layernorm),
        qkv_w=torch.cat([p.weight.detach() for p in qkv]),
        qkv_b=_cat_bias(qkv),
        q_norm=_rms_weights(getattr(attn, "q_norm", None)),
        k_norm=_rms_weights(getattr(attn, "k_norm", None)),
        out_w=attn.o_proj.weight.detach(),
        out_b=None if attn.o_proj.bias is None else attn.o_proj.bias.detach(),
        post_norm=_fused_norm(module.post_attention_layernorm),
        gate_up_w=torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()]),
        down_w=mlp.down_proj.weight.detach(),
        act=mlp.act_fn,
        act_kind=act_kind(mlp.act_fn),
        scale=float(getattr(attn, "scaling", head_dim**-0.5)),
    )


# ------------------------------------------------------------------------------ host side
@dataclass(frozen=True)
class PrefixBatch:
    """A pass as one token stream: the shared prefix once (sequence 0, possibly empty), then
    each pair's remaining tokens. ``cu_q``/``cu_k`` are the cumulative query/key lengths per
    sequence (a pair's keys are the prefix then its own tokens), ``key_index`` picks each
    sequence's keys out of the stream, ``last`` each pair's last token in the stream.
    ``blocks``/``last_blocks``: the same attention as tables of query blocks for the
    shared-prefix kernel (:mod:`crossrank.backends.prefix_attention`), which reads the keys
    in the stream itself (every layer; the last layer's only query per pair)."""

    ids: np.ndarray
    positions: np.ndarray
    cu_q: np.ndarray
    cu_k: np.ndarray
    key_index: np.ndarray
    last: np.ndarray
    blocks: np.ndarray
    last_blocks: np.ndarray
    prefix: int
    bound: tuple[int, int] | None = None  # (max_q, max_k) upper bounds fixed by a graph

    @property
    def max_q(self) -> int:
        return self.bound[0] if self.bound else int(np.diff(self.cu_q).max())

    @property
    def max_k(self) -> int:
        return self.bound[1] if self.bound else int(np.diff(self.cu_k).max())


def common_prefix(encoded: EncodedPairs) -> int:
    """Length of the token prefix shared by every pair, leaving each pair at least one token
    of its own (its last token is always computed per pair)."""
    if len(encoded) < 2:
        return 0
    width = min(int(encoded.lengths.min()) - 1, _MAX_PREFIX_SCAN)
    if width <= 0:
        return 0
    starts = encoded.ids[encoded.offsets[:, None] + np.arange(width)[None, :]]
    same = (starts == starts[0]).all(axis=0)
    return width if same.all() else int(np.argmin(same))


def pack_with_prefix(
    encoded: EncodedPairs, prefix: int, *, gather_keys: bool = True
) -> PrefixBatch:
    """Lay ``encoded`` out as ``prefix`` shared tokens followed by each pair's own tokens;
    ``gather_keys=False`` leaves out the gathered key layout (``cu_k`` zeros, no
    ``key_index``), which only the varlen kernel reads."""
    rows = np.arange(len(encoded))
    own = encoded.lengths - prefix
    ids, cu_own = EncodedPairs(encoded.ids, encoded.offsets + prefix, own).packed(rows)
    head = encoded.ids[encoded.offsets[0] : encoded.offsets[0] + prefix]
    starts = np.repeat(cu_own[:-1].astype(np.int64), own)
    positions = np.concatenate(
        [np.arange(prefix), prefix + np.arange(len(ids), dtype=np.int64) - starts]
    )
    cu_q = np.concatenate([[0], prefix + cu_own]).astype(np.int32)
    if gather_keys:
        cu_k, key_index = _gathered_keys(prefix, own)
    else:
        cu_k, key_index = np.zeros(len(cu_q), np.int32), np.empty(0, np.int64)
    firsts = cu_q[:-1].astype(np.int64)
    sees_prefix = np.full(len(own) + 1, prefix)
    sees_prefix[0] = 0
    return PrefixBatch(
        ids=np.concatenate([head, ids]),
        positions=positions,
        cu_q=cu_q,
        cu_k=cu_k,
        key_index=key_index,
        last=(prefix + cu_own[1:] - 1).astype(np.int64),
        blocks=block_table(firsts, np.diff(cu_q), sees_prefix),
        last_blocks=last_row_table(firsts[1:], own, prefix),
        prefix=prefix,
    )


def _gathered_keys(prefix: int, own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``cu_k`` and ``key_index`` of the stream: sequence 0's keys are the prefix, pair
    ``i``'s the prefix, then its own tokens."""
    key_lengths = np.concatenate([[prefix], prefix + own])
    cu_k = np.zeros(len(key_lengths) + 1, dtype=np.int32)
    np.cumsum(key_lengths, out=cu_k[1:])
    shared = np.tile(np.arange(prefix), len(own) + 1)
    owned = prefix + np.arange(int(own.sum()))
    key_index = np.empty(int(cu_k[-1]), dtype=np.int64)
    is_shared = np.zeros(int(cu_k[-1]), dtype=bool)
    within = np.arange(int(cu_k[-1])) - np.repeat(cu_k[:-1].astype(np.int64), key_lengths)
    is_shared[within < prefix] = True
    key_index[is_shared] = shared
    key_index[~is_shared] = owned
    return cu_k, key_index


# ---------------------------------------------------------------------------- device side
@dataclass
class _DeviceBatch:
    ids: Tensor
    positions: Tensor
    cu_q: Tensor
    cu_k: Tensor
    cu_last: Tensor  # 0, 0, 1, ..., pairs: one query (the last token) per pair, none for the prefix
    key_index: Tensor
    last: Tensor
    blocks: Tensor
    last_blocks: Tensor
    max_q: int
    max_k: int
    host: tuple[list[int], list[int]] | None  # cu_q, cu_k on the host (CPU attention)
    buffers: tuple[Tensor, Tensor]  # the int32 and int64 device buffers the above view


_TOKEN_STEP = 256  # graph token buckets
_KEY_STEP = 512  # graph key buckets
_LEN_STEP = 128  # max-length buckets (flash attention's block)


def _graph_key(batch: PrefixBatch, gathered: bool = True) -> tuple[int, int, int, int, int]:
    """(tokens, keys, sequences, max_q, max_k) of the graph serving ``batch``, each rounded
    up to a bucket: the unused tokens form one filler sequence (with at least as many keys as
    queries), and the sequence slots are a power of two. Without ``gathered`` keys (the
    shared-prefix kernel reads the stream's) only tokens and sequences vary."""
    t, k = batch.ids.shape[0], batch.key_index.shape[0]
    tokens = -(-t // _TOKEN_STEP) * _TOKEN_STEP
    sequences = 1 << max(len(batch.last) + 2, 16).bit_length()
    if not gathered:
        return (tokens, 0, sequences, 0, 0)
    keys = -(-(k + tokens - t) // _KEY_STEP) * _KEY_STEP
    max_q = max(batch.max_q, tokens - t, 1)
    max_k = max(batch.max_k, keys - k, 1)
    return (
        tokens,
        keys,
        sequences,
        -(-max_q // _LEN_STEP) * _LEN_STEP,
        -(-max_k // _LEN_STEP) * _LEN_STEP,
    )


def _pad_batch(batch: PrefixBatch, key: tuple[int, int, int, int, int]) -> PrefixBatch:
    """``batch`` laid out in a graph's shape (see :func:`_graph_key`): a filler sequence takes
    the unused tokens and keys (its keys are filler tokens, so no real row is touched), then
    empty sequences. In the last layer every sequence but the prefix has one query row
    (``last``); the rows of the filler and empty slots point at token 0 and are dropped."""
    tokens, keys, sequences, max_q, max_k = key
    t, k = batch.ids.shape[0], batch.key_index.shape[0]
    filler_q, filler_k = tokens - t, keys - k
    empty = sequences - len(batch.last) - 2
    filler_keys = t + np.arange(filler_k) % max(filler_q, 1) if filler_q else np.zeros(filler_k)
    filler = block_table(np.array([t]), np.array([filler_q]), np.array([0]))
    return PrefixBatch(
        ids=np.concatenate([batch.ids, np.zeros(filler_q, np.int64)]),
        positions=np.concatenate([batch.positions, np.arange(filler_q)]),
        cu_q=np.concatenate([batch.cu_q, [tokens], np.full(empty, tokens)]).astype(np.int32),
        cu_k=np.concatenate([batch.cu_k, [keys], np.full(empty, keys)]).astype(np.int32),
        key_index=np.concatenate([batch.key_index, filler_keys]).astype(np.int64),
        last=np.concatenate([batch.last, np.zeros(empty + 1, np.int64)]),
        # the most blocks a pass of these tokens and sequence slots can need; the last
        # layer's padding rows have empty blocks and are dropped
        blocks=pad_table(np.concatenate([batch.blocks, filler]), tokens // BLOCK_M + sequences),
        last_blocks=pad_table(batch.last_blocks, sequences - 1),
        prefix=batch.prefix,
        bound=(max_q, max_k),
    )


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, Tensor]  # the buffers the graph reads, refilled before each replay
    logits: Tensor  # the graph's output


@dataclass
class DecoderRunnerStats:
    """Counters for benchmarks and debugging."""

    passes: int = 0
    graph_passes: int = 0
    graphs_captured: int = 0
    tokens_computed: int = 0
    prefix_tokens_saved: int = 0


class DecoderPackedRunner(Runner):
    """Padding-free decoder runner with a shared prefix (see the module docstring)."""

    packed = True

    def __init__(
        self,
        model: PreTrainedModel,
        device: torch.device,
        family: DecoderFamily,
        answer_ids: Sequence[int],
        *,
        share_prefix: bool = True,
        min_shared_tokens: int = 8,
        cuda_graphs: bool = True,
        graph_max_tokens: int = 4096,
    ) -> None:
        reason = unsupported_reason(model, device)
        if reason is not None:
            raise ValueError(f"the packed decoder path cannot run this model: {reason}")
        config = model.config
        body = decoder_body(model)
        self.device = device
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        kv_size = self.kv_heads * self.head_dim
        self._qkv_sizes = [self.heads * self.head_dim, kv_size, kv_size]
        # keys/values are written out per pass anyway: repeated there if attention needs it
        self._kv_repeat = kv_heads_for_attention(device, self.heads, self.kv_heads) // self.kv_heads
        #: attention by the shared-prefix kernel (Triton) rather than a varlen flash kernel
        self.prefix_kernel = kernel_applies(torch.empty(0, device=device), self.head_dim)
        self.embed = body.embed_tokens
        self.rotary = body.rotary_emb
        self.final_norm = body.norm
        self.layers = [_layer(m, self.head_dim) for m in body.layers]
        self.head_w, self.head_b = decoder_head(model, family, answer_ids)
        self.share_prefix = share_prefix
        self.min_shared_tokens = min_shared_tokens
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.graph_max_tokens = graph_max_tokens
        self._graphs: dict[tuple[int, int, int, int, int], _Graph] = {}
        self._graph_pool: Any = None
        self._lock = threading.Lock()
        self.stats = DecoderRunnerStats()

    def submit(self, encoded: EncodedPairs) -> Pending:
        prefix = common_prefix(encoded) if self.share_prefix else 0
        if prefix < self.min_shared_tokens:
            prefix = 0
        batch = pack_with_prefix(encoded, prefix, gather_keys=not self.prefix_kernel)
        self.stats.passes += 1
        self.stats.tokens_computed += int(batch.ids.shape[0])
        self.stats.prefix_tokens_saved += prefix * (len(encoded) - 1)
        with self._lock, on_device(self.device), torch.inference_mode():
            if self.cuda_graphs and batch.ids.shape[0] <= self.graph_max_tokens:
                self.stats.graph_passes += 1
                return device_result(self._replay(batch))
            return device_result(self._forward(self._upload(batch)))

    def _upload(
        self, batch: PrefixBatch, pad_to: tuple[int, int, int, int, int] | None = None
    ) -> _DeviceBatch:
        """Device tensors of ``batch`` (padded to a graph's shape when ``pad_to`` is given)."""
        batch, staged = self._stage(batch, pad_to)
        small, index = (host.to(self.device, non_blocking=True) for host in staged)
        t, n = batch.ids.shape[0], len(batch.last) + 2
        at = 2 * t + 3 * n
        blocks = small[at : at + batch.blocks.size].view(-1, batch.blocks.shape[1])
        return _DeviceBatch(
            ids=small[:t],
            positions=small[t : 2 * t],
            cu_q=small[2 * t : 2 * t + n],
            cu_k=small[2 * t + n : 2 * t + 2 * n],
            cu_last=small[2 * t + 2 * n : at],
            blocks=blocks,
            last_blocks=small[at + batch.blocks.size :].view(-1, batch.blocks.shape[1]),
            key_index=index[: batch.key_index.shape[0]],
            last=index[batch.key_index.shape[0] :],
            max_q=batch.max_q,
            max_k=batch.max_k,
            host=None if self.device.type == "cuda" else (batch.cu_q.tolist(), batch.cu_k.tolist()),
            buffers=(small, index),
        )

    def _stage(
        self, batch: PrefixBatch, pad_to: tuple[int, int, int, int, int] | None
    ) -> tuple[PrefixBatch, tuple[Tensor, Tensor]]:
        """``batch`` (padded when ``pad_to`` is given) and its two host buffers (int32 and
        int64), laid out as :meth:`_upload` views them: what a graph's inputs are refilled
        with."""
        if pad_to is not None:
            batch = _pad_batch(batch, pad_to)
        cu_last = np.concatenate([[0], np.arange(len(batch.last) + 1)])
        tables = [batch.blocks.ravel(), batch.last_blocks.ravel()]
        parts = [batch.ids, batch.positions, batch.cu_q, batch.cu_k, cu_last, *tables]
        big = [batch.key_index, batch.last]
        return batch, (
            stage(parts, torch.int32, self.device),
            stage(big, torch.int64, self.device),
        )

    # ---- CUDA graphs
    def _replay(self, batch: PrefixBatch) -> Tensor:
        """Run ``batch`` through the captured graph of its shape bucket (captured if new)."""
        key = _graph_key(batch, gathered=not self.prefix_kernel)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(batch, key)
        # the same shape bucket lays its inputs out alike: refill the two buffers whole,
        # straight from the staged (pinned) host buffers
        _, staged = self._stage(batch, key)
        for mine, host in zip(graph.inputs, staged, strict=True):
            mine.copy_(host, non_blocking=True)
        graph.graph.replay()
        # the next replay overwrites the graph's output: copy it (queued, in stream order)
        return graph.logits[: len(batch.last)].clone()

    def _capture(self, batch: PrefixBatch, key: tuple[int, int, int, int, int]) -> _Graph:
        db = self._upload(batch, key)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        cuda_graph = torch.cuda.CUDAGraph()
        logits = capture_cuda_graph(
            cuda_graph, lambda: self._forward(db), self.device, self._graph_pool
        )
        graph = _Graph(cuda_graph, db.buffers, logits)
        self._graphs[key] = graph
        self.stats.graphs_captured += 1
        logger.debug("captured a CUDA graph for (tokens, keys, sequences, max_q, max_k)=%s", key)
        return graph

    def _forward(self, db: _DeviceBatch) -> Tensor:
        """Answer-token logits ``[pairs, k]`` of one packed pass."""
        x = self.embed(db.ids.long())
        # float32 cos/sin (the rotary module reads only the device and dtype of its input)
        cos, sin = (
            t[0]
            for t in self.rotary(x.new_empty(0, dtype=torch.float32), db.positions.long()[None])
        )
        last_layer = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            q, k, v = F.linear(layer.input_norm(x), layer.qkv_w, layer.qkv_b).split(
                self._qkv_sizes, dim=-1
            )
            last = i == last_layer  # only each pair's last token is read after the last layer
            q, _ = rope_heads(q, self.heads, cos, sin, layer.q_norm, db.last if last else None)
            if last:
                x = x.index_select(0, db.last)
            a = self._attention(db, layer, q, k, v, (cos, sin), last).reshape(q.shape[0], -1)
            x = _add_linear(x, a, layer.out_w, layer.out_b)
            gate_up = F.linear(layer.post_norm(x), layer.gate_up_w)
            x = _add_linear(x, gated_act(gate_up, layer.act_kind, layer.act), layer.down_w, None)
        return F.linear(self.final_norm(x), self.head_w, self.head_b)

    def _attention(
        self,
        db: _DeviceBatch,
        layer: _Layer,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        rope: tuple[Tensor, Tensor],
        last: bool,
    ) -> Tensor:
        """Each pair's queries (``q``, RoPE done) over the prefix's keys, then its own
        (``last``: one query per pair); ``k``/``v`` are the stream's projections, ``rope``
        its cos/sin. The shared-prefix kernel reads them in the stream where it runs, else a
        varlen kernel reads them gathered into each sequence's layout."""
        cos, sin = rope
        if self.prefix_kernel:
            k, _ = rope_heads(k, self.kv_heads, cos, sin, layer.k_norm)
            v = v.unflatten(-1, (self.kv_heads, self.head_dim))
            blocks = db.last_blocks if last else db.blocks
            return prefix_attention(q, k, v, blocks, layer.scale, last_rows=last)
        k, gathered_v = rope_heads(
            k, self.kv_heads, cos, sin, layer.k_norm, db.key_index, v, self._kv_repeat
        )
        assert gathered_v is not None
        cu_q, max_q, host = db.cu_q, db.max_q, db.host
        if last:
            cu_q, max_q = db.cu_last, 1
            host = None if host is None else (db.cu_last.tolist(), host[1])
        return varlen_attention(
            q, k, gathered_v, cu_q, db.cu_k, max_q, db.max_k, layer.scale, host, causal=True
        )


def choose_decoder_runner(
    model: PreTrainedModel,
    device: torch.device,
    pad_id: int,
    family: DecoderFamily,
    answer_ids: Sequence[int],
    fast_path: bool | None,
) -> Runner:
    """The runner for a decoder reranker, with the encoder rule of ``choose_runner``:
    ``None`` (auto) picks the packed runner on CUDA in fp16/bf16 where it applies, the padded
    reference runner elsewhere; ``False`` always the padded runner; ``True`` the packed runner
    or a ``ValueError`` saying why it cannot run."""
    if fast_path is False:
        return DecoderPaddedRunner(model, device, pad_id, family, answer_ids)
    reason = unsupported_reason(model, device)
    if fast_path is None and (device.type != "cuda" or reason is not None):
        if device.type == "cuda":
            logger.info("packed decoder path off: %s", reason)
        return DecoderPaddedRunner(model, device, pad_id, family, answer_ids)
    if reason is not None:
        raise ValueError(f"fast_path was requested but cannot be used: {reason}")
    return DecoderPackedRunner(model, device, family, answer_ids)
