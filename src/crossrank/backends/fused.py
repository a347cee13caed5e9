"""Fused kernels for the packed decoder pass: the elementwise work between its GEMMs.

Why: profiled on one H200 (torch 2.11, bf16, random weights of the Qwen3-Reranker-0.6B
shape, one 1x50 XQuAD-R request = 8,824 stream tokens, eager), the pass took 40.6 ms on the
GPU, of which the GEMMs 10.7 ms (at ~730 TFLOP/s) and flash attention 5.0 ms; the rest,
~23 ms, was elementwise: Qwen3's QK-norm (plus the copies that make the split q/k views
contiguous for it), rotate-half RoPE (a cat, a negation, four products and a sum per
projection), the key/value gather of the shared-prefix layout, and SiLU(gate) x up. Each is
a pass over memory with a launch; fused, each projection is read once and written once.
After (same request, same host): the pass 20.1 ms, the fused kernels 2.6 ms of it, 1x50 end
to end 48.5 -> 28.9 ms (``benchmarks/gpu_llm_profile.py``, ``docs/benchmarks.md``).

What (Triton, on CUDA tensors):

- :func:`rope_heads`: for the rows of one projection (every token for q; the pass's key
  layout for k, which also copies v; the last tokens in the last layer), an optional RMSNorm
  over each head and RoPE, computed in float32 and rounded once.
- :func:`gated_act`: ``act(gate) * up`` of the fused gate/up GEMM output, for SiLU and
  tanh-GELU (:func:`act_kind` recognises the model's activation by its values).

Where Triton is absent or the tensors are not on CUDA the same functions run the reference
maths in PyTorch ops (the Hugging Face modules' order of operations). Under Triton's
interpreter (``TRITON_INTERPRET=1`` when Triton is first imported) the kernels also run on
CPU tensors, which is how the tests run them without a GPU (``tests/backends/test_fused.py``
against maths written out independently, and the packed runner through them against the
padded reference runner).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # Triton reads TRITON_INTERPRET when it is imported
    import triton
    import triton.language as tl
except Exception:  # not installed, or broken for this torch: the PyTorch ops serve
    triton = None
    tl = None


@dataclass(frozen=True)
class HeadNorm:
    """An RMSNorm over each head (Qwen3's ``q_norm``/``k_norm``): ``weight * x / rms(x)``."""

    weight: Tensor
    eps: float


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: Run the kernels on CPU tensors too when Triton's interpreter is on (the tests set this;
#: interpreted kernels are slow, so CPU code paths keep the PyTorch ops otherwise).
INTERPRET_ON_CPU = False


def use_kernels(x: Tensor) -> bool:
    """Whether the Triton kernels run on ``x``'s device (CUDA; CPU under the interpreter)."""
    on_cpu = INTERPRET_ON_CPU and x.device.type == "cpu" and _interpreting()
    return triton is not None and (x.is_cuda or on_cpu)


# ------------------------------------------------------------------------------ reference
def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on ``[tokens, heads, dim]`` (the rotate-half convention of Llama/Qwen/Gemma)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _gather_heads(x: Tensor, heads: int, rows: Tensor | None, repeat: int) -> Tensor:
    x = x.reshape(x.shape[0], heads, -1)
    x = x if rows is None else x.index_select(0, rows)
    return x if repeat == 1 else x.repeat_interleave(repeat, dim=1)


def _rope_heads_reference(
    x: Tensor, heads: int, cos: Tensor, sin: Tensor, norm: HeadNorm | None, rows: Tensor | None
) -> Tensor:
    x = _gather_heads(x, heads, rows, 1)
    if rows is not None:
        cos, sin = cos.index_select(0, rows), sin.index_select(0, rows)
    if norm is not None:
        x = F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    return _rotate(x, cos.to(x.dtype), sin.to(x.dtype))


# ------------------------------------------------------------------------------ public
def rope_heads(
    x: Tensor,
    heads: int,
    cos: Tensor,
    sin: Tensor,
    norm: HeadNorm | None = None,
    rows: Tensor | None = None,
    values: Tensor | None = None,
    repeat: int = 1,
) -> tuple[Tensor, Tensor | None]:
    """RoPE (after ``norm`` over each head when given) of ``x`` ``[tokens, heads * dim]``
    (a column slice of the fused projection is fine), at the rows ``rows`` (``None``: all),
    with ``cos``/``sin`` ``[tokens, dim]`` of each source token: ``[rows, heads * repeat,
    dim]``, each head repeated ``repeat`` times in place (grouped-query attention for a
    kernel that needs as many key heads as query heads). ``values`` (same layout as ``x``):
    its same rows and heads, without RoPE, as the second output (else ``None``)."""
    if use_kernels(x) and _kernel_shape_ok(x.shape[1] // heads):
        return _rope_heads_kernel(x, heads, cos, sin, norm, rows, values, repeat)
    out = _rope_heads_reference(x, heads, cos, sin, norm, rows)
    out = out if repeat == 1 else out.repeat_interleave(repeat, dim=1)
    return out, None if values is None else _gather_heads(values, heads, rows, repeat)


def gated_act(gate_up: Tensor, kind: str | None, act: Callable[[Tensor], Tensor]) -> Tensor:
    """``act(gate) * up`` where ``gate_up = [gate | up]`` ``[tokens, 2 * inner]``; ``kind``
    (from :func:`act_kind`) selects the fused kernel, ``None`` runs ``act`` as given."""
    if kind is not None and use_kernels(gate_up) and gate_up.is_contiguous():
        return _gated_act_kernel(gate_up, kind)
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up


_ACTS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
}


def act_kind(act: Callable[[Tensor], Tensor]) -> str | None:
    """Which fused activation ``act`` computes (``"silu"``, ``"gelu_tanh"``), judged by its
    values on a float32 probe; ``None`` when it is neither."""
    probe = torch.linspace(-6.0, 6.0, 97)
    with torch.no_grad():
        got = act(probe)
    for name, fn in _ACTS.items():
        if torch.allclose(got, fn(probe), rtol=0, atol=1e-6):
            return name
    return None


# ------------------------------------------------------------------------------ kernels
def _kernel_shape_ok(dim: int) -> bool:
    """Head dims the RoPE kernel takes: even, with a power-of-two half (64, 128, ...)."""
    half = dim // 2
    return dim % 2 == 0 and half >= 2 and half & (half - 1) == 0


def _rope_heads_kernel(
    x: Tensor,
    heads: int,
    cos: Tensor,
    sin: Tensor,
    norm: HeadNorm | None,
    rows: Tensor | None,
    values: Tensor | None,
    repeat: int,
) -> tuple[Tensor, Tensor | None]:
    dim, out_heads = x.shape[1] // heads, heads * repeat
    count = x.shape[0] if rows is None else rows.shape[0]
    out = x.new_empty(count, out_heads, dim)
    v_out = x.new_empty(count, out_heads, dim) if values is not None else out
    v = values if values is not None else x
    cos, sin = cos.contiguous(), sin.contiguous()
    weight = norm.weight if norm is not None else cos  # unread without a norm
    _rope_heads_kernel_jit[(count,)](
        x, x.stride(0), v, v.stride(0), rows if rows is not None else cos, cos, sin, weight,
        out, v_out, norm.eps if norm is not None else 0.0,
        OUT_HEADS=out_heads, OUT_P2=_next_pow2(out_heads), REPEAT=repeat, HALF=dim // 2,
        INDEXED=rows is not None, NORM=norm is not None, COPY=values is not None,
    )  # fmt: skip
    return out, (v_out if values is not None else None)


def _gated_act_kernel(gate_up: Tensor, kind: str) -> Tensor:
    tokens, inner = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(tokens, inner)
    block = 1024
    grid = (tokens, -(-inner // block))
    _gated_act_kernel_jit[grid](gate_up, out, inner, GELU=kind == "gelu_tanh", BLOCK=block)
    return out


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


if triton is not None:

    @triton.jit
    def _rope_heads_kernel_jit(  # type: ignore[no-untyped-def]
        x, x_stride, v, v_stride, rows, cos, sin, weight, out, v_out, eps,
        OUT_HEADS: tl.constexpr, OUT_P2: tl.constexpr, REPEAT: tl.constexpr,
        HALF: tl.constexpr, INDEXED: tl.constexpr, NORM: tl.constexpr, COPY: tl.constexpr,
    ):  # fmt: skip
        i = tl.program_id(0).to(tl.int64)
        src = i
        if INDEXED:
            src = tl.load(rows + i).to(tl.int64)
        h = tl.arange(0, OUT_P2)[:, None]  # output head; it reads source head h // REPEAT
        d = tl.arange(0, HALF)[None, :]
        live = (h < OUT_HEADS) & (d < HALF)
        base = x + src * x_stride + (h // REPEAT) * (2 * HALF) + d
        a = tl.load(base, mask=live, other=0.0).to(tl.float32)
        b = tl.load(base + HALF, mask=live, other=0.0).to(tl.float32)
        if NORM:
            mean = (tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / (2 * HALF)
            r = (1.0 / tl.sqrt(mean + eps))[:, None]
            a = a * r * tl.load(weight + d).to(tl.float32)
            b = b * r * tl.load(weight + HALF + d).to(tl.float32)
        c1 = tl.load(cos + src * (2 * HALF) + d).to(tl.float32)
        c2 = tl.load(cos + src * (2 * HALF) + HALF + d).to(tl.float32)
        s1 = tl.load(sin + src * (2 * HALF) + d).to(tl.float32)
        s2 = tl.load(sin + src * (2 * HALF) + HALF + d).to(tl.float32)
        dst = i * (OUT_HEADS * 2 * HALF) + h * (2 * HALF) + d
        tl.store(out + dst, (a * c1 - b * s1).to(out.dtype.element_ty), mask=live)
        tl.store(out + dst + HALF, (b * c2 + a * s2).to(out.dtype.element_ty), mask=live)
        if COPY:
            vsrc = v + src * v_stride + (h // REPEAT) * (2 * HALF) + d
            tl.store(v_out + dst, tl.load(vsrc, mask=live), mask=live)
            tl.store(v_out + dst + HALF, tl.load(vsrc + HALF, mask=live), mask=live)

    @triton.jit
    def _gated_act_kernel_jit(  # type: ignore[no-untyped-def]
        gate_up, out, inner, GELU: tl.constexpr, BLOCK: tl.constexpr
    ):
        t = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = j < inner
        g = tl.load(gate_up + t * 2 * inner + j, mask=live, other=0.0).to(tl.float32)
        u = tl.load(gate_up + t * 2 * inner + inner + j, mask=live, other=0.0).to(tl.float32)
        if GELU:  # tanh(z) = 2 sigmoid(2z) - 1 (saturated in float32 beyond |z| = 10)
            z = tl.clamp(0.7978845608028654 * (g + 0.044715 * g * g * g), -10.0, 10.0)
            a = 0.5 * g * (2.0 * tl.sigmoid(2.0 * z))
        else:
            a = g * tl.sigmoid(g)
        tl.store(out + t * inner + j, (a * u).to(out.dtype.element_ty), mask=live)
