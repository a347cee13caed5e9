"""The fused decoder kernels (Triton, run by Triton's CPU interpreter) against the reference
maths in PyTorch ops, and the packed decoder runner through them against the padded
reference runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crossrank.backends import fused
from crossrank.backends.decoder import BGE_GEMMA, QWEN3

from .llm_assets import SAMPLE_DOCUMENTS, SAMPLE_QUERIES
from .test_decoder_packed import runners

pytest.importorskip("triton", reason="the fused kernels need Triton (pip install triton)")
from .conftest import DEVICE


def rope_tables(tokens: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.randint(0, 200, (tokens,)).float()
    freqs = positions[:, None] / 10000 ** (torch.arange(0, dim, 2).float() / dim)[None]
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def reference_rope(x: torch.Tensor, cos, sin, weight=None, eps=1e-6) -> torch.Tensor:
    """RMSNorm then rotate-half RoPE, written out in float32 (``[tokens, heads, dim]``)."""
    x = x.float()
    if weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_norm", [True, False])
def test_rope_heads_kernel(dtype: torch.dtype, with_norm: bool):
    torch.manual_seed(0)
    tokens, heads, kv_heads, dim = 23, 4, 2, 32
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype, device=DEVICE)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    cos, sin = (t.to(DEVICE) for t in rope_tables(tokens, dim))
    weight = torch.randn(dim, dtype=dtype, device=DEVICE) if with_norm else None
    norm = fused.HeadNorm(weight, 1e-6) if weight is not None else None
    rows = torch.tensor(
        [5, 0, 5, 22, 7, 3, 3], device=DEVICE
    )  # repeats, as the shared-prefix key layout has
    tol = 1e-5 if dtype == torch.float32 else 2e-2

    got_q, none = fused.rope_heads(q, heads, cos, sin, norm)
    want_q = reference_rope(q.reshape(tokens, heads, dim), cos, sin, weight)
    assert none is None and got_q.dtype == dtype and got_q.shape == (tokens, heads, dim)
    torch.testing.assert_close(got_q.float(), want_q, atol=tol, rtol=tol)

    # keys: gathered rows, each head repeated for the query heads it serves; values beside
    got_k, got_v = fused.rope_heads(k, kv_heads, cos, sin, norm, rows, v, repeat=2)
    want_k = reference_rope(k.reshape(tokens, kv_heads, dim), cos, sin, weight)[rows]
    want_v = v.reshape(tokens, kv_heads, dim)[rows]
    assert got_k.shape == (len(rows), heads, dim)
    for head in range(heads):
        torch.testing.assert_close(got_k[:, head].float(), want_k[:, head // 2], atol=tol, rtol=tol)
        assert got_v is not None and torch.equal(got_v[:, head], want_v[:, head // 2])


@pytest.mark.parametrize("with_norm", [True, False])
def test_rope_heads_reference_path(with_norm: bool):
    """Without the interpreter (CPU tensors) the PyTorch ops give the same maths."""
    torch.manual_seed(1)
    tokens, heads, dim = 9, 2, 16
    x = torch.randn(tokens, heads * dim)
    cos, sin = rope_tables(tokens, dim)
    weight = torch.randn(dim) if with_norm else None
    norm = fused.HeadNorm(weight, 1e-6) if weight is not None else None
    rows = torch.tensor([8, 1, 1])
    got, copied = fused.rope_heads(x, heads, cos, sin, norm, rows, x, repeat=3)
    want = reference_rope(x.reshape(tokens, heads, dim), cos, sin, weight)[rows]
    torch.testing.assert_close(got[:, ::3], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, 2::3], want, atol=1e-5, rtol=1e-5)
    assert copied is not None and torch.equal(copied[:, 1::3], x.reshape(tokens, heads, dim)[rows])


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
def test_gated_act_kernel(kind: str, dtype: torch.dtype):
    torch.manual_seed(2)
    gate_up = 3 * torch.randn(
        11, 2 * 1500, dtype=dtype, device=DEVICE
    )  # more than one block per row
    gate, up = gate_up.float().chunk(2, dim=-1)
    act = F.silu if kind == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
    got = fused.gated_act(gate_up, kind, act)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.dtype == dtype and got.shape == (11, 1500)
    torch.testing.assert_close(got.float(), act(gate) * up, atol=tol, rtol=tol)


def test_act_kind_recognises_only_the_fused_activations():
    assert fused.act_kind(torch.nn.SiLU()) == "silu"
    assert fused.act_kind(lambda t: F.gelu(t, approximate="tanh")) == "gelu_tanh"
    assert fused.act_kind(F.gelu) is None  # exact GELU differs from the tanh form
    assert fused.act_kind(torch.relu) is None


@pytest.mark.usefixtures("interpret_on_cpu")
@pytest.mark.parametrize(("model", "family"), [("qwen3", QWEN3), ("gemma", BGE_GEMMA)])
def test_packed_runner_through_the_kernels(
    model: str, family, tiny_qwen3_dir: Path, tiny_gemma_dir: Path
):
    """Qwen3 (QK-norm, SiLU) and gemma (no QK-norm, tanh-GELU): the packed runner with the
    kernels gives the padded reference runner's logits, with the shared prefix."""
    prompt, padded, packed, _ = runners(
        tiny_qwen3_dir if model == "qwen3" else tiny_gemma_dir, family
    )
    assert all(layer.act_kind is not None for layer in packed.layers)
    assert packed.prefix_kernel  # attention through the shared-prefix kernel too
    encoded = prompt.encode([SAMPLE_QUERIES[0]] * 3, SAMPLE_DOCUMENTS[:3])
    np.testing.assert_allclose(packed.run(encoded), padded.run(encoded), atol=1e-4)
    assert packed.stats.prefix_tokens_saved > 0
