"""Causal attention over a packed token stream whose sequences share one prefix, in one
Triton kernel that reads the keys and values where the projection wrote them.

Why: in the decoder runner's shared-prefix layout (:mod:`crossrank.backends.decoder_packed`)
every pair's queries attend to the prefix's keys, then to their own. A varlen flash kernel
needs each sequence's keys contiguous, so the prefix's keys and values were gathered (and
repeated for grouped-query heads) into a second layout every layer, and PyTorch's
FlashAttention-2 ran at ~75 TFLOP/s on these ~250-token sequences (5.0 ms of a 20 ms 1x50
pass on one H200). This kernel walks the prefix's keys, then the sequence's own, straight
from the stream (grouped-query heads read their shared key head), one program per block of
query rows and head, from a host-built table of blocks: no gather, no padding to the longest
sequence, and the grid of a CUDA graph depends only on the table's length.

Measured on one H200 (bf16, the Qwen3-0.6B shape: 16 query / 8 key-value heads of 128; a
1x50 layout of 8,536 stream tokens with a 75-token prefix; ``.bench`` diagnostics): one
layer's attention 104 us against 134 us for FlashAttention-2 on the gathered keys (~110
TFLOP/s of the causal work actually needed), the last layer's 38 against 77 us. Of 36
configurations tried, 64 query rows with 4 warps were the fastest (128-row blocks and 8 warps
slower); 32 keys per step did 97 us, 64 (kept: the setting measured end to end) 104 us. End
to end (engines alternating in one process, 120 requests each) a 1x50 request took 23.4 ms
against 26.1 ms with the gathered flash path. Tried and not kept: one program attending with
both query heads of a key/value group (keys and values loaded once for the two; 128-row
tiles, 8 warps): 116 against 105 us per layer, 38.5 against 41 us for the last, and 1x50 end
to end 22.6 against 22.4 ms (engines alternating, a later session).

The table (:func:`block_table`) has one row per block of at most ``BLOCK_M`` query rows of
one sequence: ``(first query row, rows, own position of the first row, first own key row,
prefix keys)``. Query row ``r`` of a block sees the ``prefix keys`` rows ``0 ..`` of the
stream and its sequence's own key rows up to its own position (causal). Rows of zero are
padding (graph buckets) and compute nothing.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from crossrank.backends.fused import tl, triton, use_kernels

BLOCK_M = 64  # query rows per program in the full layers
_LAST_BLOCK_M = 16  # the last layer's blocks hold one row (each pair's last token)
_FIELDS = 5


def block_table(
    starts: np.ndarray, lengths: np.ndarray, prefixes: np.ndarray, block_m: int = BLOCK_M
) -> np.ndarray:
    """Blocks of every query row of sequences laid out back to back in the stream: sequence
    ``i`` has ``lengths[i]`` rows from row ``starts[i]`` (its own keys are the same rows) and
    sees ``prefixes[i]`` prefix keys. ``int32 [blocks, 5]``."""
    per_seq = -(-lengths // block_m)
    seq = np.repeat(np.arange(len(lengths)), per_seq)
    within = np.arange(int(per_seq.sum())) - np.repeat(np.cumsum(per_seq) - per_seq, per_seq)
    pos0 = within * block_m
    table = np.empty((len(seq), _FIELDS), dtype=np.int32)
    table[:, 0] = starts[seq] + pos0
    table[:, 1] = np.minimum(block_m, lengths[seq] - pos0)
    table[:, 2] = pos0
    table[:, 3] = starts[seq]
    table[:, 4] = prefixes[seq]
    return table


def last_row_table(starts: np.ndarray, lengths: np.ndarray, prefix: int) -> np.ndarray:
    """One block per sequence for its last token alone, as query row ``i`` of a compact
    ``[sequences, heads, dim]`` query tensor (the decoder's last layer)."""
    table = np.empty((len(starts), _FIELDS), dtype=np.int32)
    table[:, 0] = np.arange(len(starts))
    table[:, 1] = 1
    table[:, 2] = lengths - 1
    table[:, 3] = starts
    table[:, 4] = prefix
    return table


def pad_table(table: np.ndarray, blocks: int) -> np.ndarray:
    """``table`` followed by empty blocks up to ``blocks`` rows."""
    return np.concatenate([table, np.zeros((blocks - len(table), _FIELDS), np.int32)])


def kernel_applies(q: Tensor, dim: int) -> bool:
    """Whether :func:`prefix_attention` runs here: Triton on the tensor's device, a
    power-of-two head size of 16 to 256."""
    return use_kernels(q) and 16 <= dim <= 256 and dim & (dim - 1) == 0


def prefix_attention(
    q: Tensor, k: Tensor, v: Tensor, table: Tensor, scale: float, *, last_rows: bool = False
) -> Tensor:
    """Attention of ``q`` ``[rows, heads, dim]`` over ``k``/``v`` ``[tokens, kv_heads, dim]``
    (row strides free, so column slices of a fused projection serve) for the blocks of
    ``table`` (device ``int32 [blocks, 5]``, see the module docstring). ``last_rows``: the
    table is a :func:`last_row_table`. Rows no block covers are left unwritten."""
    rows, heads, dim = q.shape
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(1) != dim or t.stride(2) != 1:  # the kernel steps rows by stride(0) only
            raise ValueError(f"{name} must have contiguous heads, strides {t.stride()}")
    out = q.new_empty(rows, heads, dim)
    block_m = _LAST_BLOCK_M if last_rows else BLOCK_M
    block_n = 64 if dim <= 128 else 32
    grid = (table.shape[0], heads)
    _prefix_attention_jit[grid](
        q, k, v, out, table,
        q.stride(0), k.stride(0), v.stride(0), out.stride(0),
        scale * 1.4426950408889634,  # log2(e): the kernel works in base 2
        GROUP=heads // k.shape[1], DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n, FIELDS=_FIELDS,
        # float32 in full precision (Triton's default rounds it to TF32 on the GPU)
        PRECISION="ieee" if q.dtype == torch.float32 else None,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _attend(  # type: ignore[no-untyped-def]
        qt, k, v, key_rows, key_live, seen, k_stride, v_stride, m_i, l_i, acc, scale_log2,
        DIM: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One block of keys into the online softmax (``seen``: which scores count)."""
        d = tl.arange(0, DIM)[None, :]
        kt = tl.load(k + key_rows[:, None] * k_stride + d, mask=key_live[:, None], other=0.0)
        s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * scale_log2
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        vt = tl.load(v + key_rows[:, None] * v_stride + d, mask=key_live[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        return m_new, l_i * alpha + tl.sum(p, axis=1), acc

    @triton.jit
    def _prefix_attention_jit(  # type: ignore[no-untyped-def]
        q, k, v, out, table, q_stride, k_stride, v_stride, o_stride, scale_log2,
        GROUP: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        FIELDS: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        block, head = tl.program_id(0), tl.program_id(1)
        fields = table + block * FIELDS
        row0 = tl.load(fields)
        rows = tl.load(fields + 1)
        pos0 = tl.load(fields + 2)
        kstart = tl.load(fields + 3)
        prefix = tl.load(fields + 4)
        kv_head = head // GROUP
        m = tl.arange(0, BLOCK_M)
        n = tl.arange(0, BLOCK_N)
        d = tl.arange(0, DIM)[None, :]
        q_rows = (row0 + m).to(tl.int64)[:, None]
        q_live = (m < rows)[:, None]
        qt = tl.load(q + q_rows * q_stride + head * DIM + d, mask=q_live, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DIM], tl.float32)
        kh, vh = k + kv_head * DIM, v + kv_head * DIM
        # while loops: Triton's interpreter (the tests) takes no loaded value as a range bound
        start = 0
        while start < prefix:  # the shared prefix: all of it is seen
            cols = start + n
            live = cols < prefix
            m_i, l_i, acc = _attend(
                qt, kh, vh, cols.to(tl.int64), live, live[None, :], k_stride, v_stride,
                m_i, l_i, acc, scale_log2, DIM, PRECISION,
            )  # fmt: skip
            start += BLOCK_N
        own_end = pos0 + rows
        start = 0
        while start < own_end:  # its own keys, causal
            cols = start + n
            seen = cols[None, :] <= (pos0 + m)[:, None]
            m_i, l_i, acc = _attend(
                qt, kh, vh, (kstart + cols).to(tl.int64), cols < own_end, seen, k_stride,
                v_stride, m_i, l_i, acc, scale_log2, DIM, PRECISION,
            )  # fmt: skip
            start += BLOCK_N
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # padding rows saw no key
        tl.store(
            out + q_rows * o_stride + head * DIM + d, acc.to(out.dtype.element_ty), mask=q_live
        )
