"""The shared-prefix attention kernel (Triton; on CPU through Triton's interpreter) against
attention written out per sequence with PyTorch's scaled-dot-product attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crossrank.backends import prefix_attention as pa

from .conftest import DEVICE

pytest.importorskip("triton", reason="the attention kernel needs Triton (pip install triton)")

SCALE = 0.125


def stream(prefix: int, own: list[int], heads: int, kv_heads: int, dim: int, dtype):
    """A fused projection [tokens, (heads + 2 kv_heads) * dim] split into q/k/v views."""
    tokens = prefix + sum(own)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype, device=DEVICE)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    return (
        q.reshape(tokens, heads, dim).contiguous(),
        k.unflatten(1, (kv_heads, dim)),
        v.unflatten(1, (kv_heads, dim)),
    )


def expected(q, k, v, prefix: int, own: list[int], rows: list[tuple[int, int]]) -> torch.Tensor:
    """Sequence 0 is the prefix (causal); sequence i > 0 sees all of the prefix, then its own
    tokens causally. ``rows``: (query row in ``q``, stream token it stands for)."""
    group = q.shape[1] // k.shape[1]
    kf, vf = (t.float().repeat_interleave(group, dim=1) for t in (k, v))
    starts = np.concatenate([[0], prefix + np.cumsum([0, *own[:-1]])])
    ends = np.concatenate([[prefix], prefix + np.cumsum(own)])
    out = torch.zeros(len(rows), q.shape[1], q.shape[2])
    for i, (row, token) in enumerate(rows):
        seq = int(np.searchsorted(ends, token, side="right"))
        keys = list(range(starts[seq], token + 1))
        if seq > 0:
            keys = list(range(prefix)) + keys
        att = F.scaled_dot_product_attention(
            q[row].float()[:, None], kf[keys].transpose(0, 1), vf[keys].transpose(0, 1), scale=SCALE
        )
        out[i] = att[:, 0]
    return out


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(
    ("prefix", "own", "heads", "kv_heads", "dim", "dtype"),
    [
        (5, [3, 70, 1, 9], 4, 2, 32, torch.float32),  # a sequence over one block of rows
        (0, [17, 4], 2, 1, 16, torch.float32),  # no shared prefix
        (66, [2, 5], 2, 2, 32, torch.float16),  # a prefix over one block of keys
        # bfloat16 on the GPU only: Triton's interpreter computes its dot products wrongly
        *([(9, [40, 3], 4, 1, 64, torch.bfloat16)] if DEVICE.type == "cuda" else []),
    ],
)
def test_full_layer_matches_attention_per_sequence(prefix, own, heads, kv_heads, dim, dtype):
    torch.manual_seed(0)
    q, k, v = stream(prefix, own, heads, kv_heads, dim, dtype)
    starts = np.concatenate([[0], prefix + np.cumsum([0, *own[:-1]])])
    lengths = np.array([prefix, *own])
    table = pa.block_table(starts, lengths, np.array([0] + [prefix] * len(own)))
    table = pa.pad_table(table, len(table) + 2)  # graph padding computes nothing
    got = pa.prefix_attention(q, k, v, torch.from_numpy(table).to(DEVICE), SCALE)
    want = expected(q, k, v, prefix, own, [(t, t) for t in range(q.shape[0])])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float().cpu(), want, atol=tol, rtol=tol)


@pytest.mark.usefixtures("interpret")
def test_last_rows_see_the_prefix_and_their_own_tokens():
    torch.manual_seed(1)
    prefix, own = 7, [4, 1, 30]
    q, k, v = stream(prefix, own, 4, 2, 32, torch.float32)
    starts = prefix + np.cumsum([0, *own[:-1]])
    last = starts + np.array(own) - 1
    table = pa.last_row_table(starts, np.array(own), prefix)
    q_last = q[torch.from_numpy(last).to(DEVICE)].contiguous()
    got = pa.prefix_attention(
        q_last, k, v, torch.from_numpy(table).to(DEVICE), SCALE, last_rows=True
    )
    want = expected(q_last, k, v, prefix, own, [(i, int(t)) for i, t in enumerate(last)])
    torch.testing.assert_close(got.float().cpu(), want, atol=1e-4, rtol=1e-4)


def test_heads_must_be_contiguous():
    q = torch.zeros(4, 2, 16)
    kv = torch.zeros(4, 16, 2).transpose(1, 2)  # heads strided by 1: not a projection's slice
    with pytest.raises(ValueError, match="k must have contiguous heads"):
        pa.prefix_attention(q, kv, kv, torch.zeros(1, 5, dtype=torch.int32), SCALE)
