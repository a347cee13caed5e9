"""Where one 1x50 request of an LLM reranker spends its time on the GPU (a diagnostic).

Job: on random weights of the Qwen3-Reranker-0.6B shape (bf16, the fast path), split one
XQuAD-R 1x50 request into tokenization, host-side packing and the forward pass (GPU time and
the CPU time to launch it), list the forward's kernels by GPU time (``torch.profiler``), and
time the attention kernels PyTorch offers on the same request's layout. It is how the figures
in ``docs/benchmarks.md`` (section "LLM rerankers") were found; it asserts nothing.

Run on the lent machine: ``python benchmarks/gpu_llm_profile.py --shared .bench/shared
--tokenizer-dir .bench/qwen-tokenizer`` (about a minute; most of it builds the model).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_llm import build_model
from gpu_peers import load_workload, timed

from crossrank import Reranker
from crossrank.backends.decoder_packed import common_prefix, pack_with_prefix
from crossrank.backends.packed import varlen_attention


def wall_ms(fn: Callable[[], Any], n: int = 15) -> float:
    """Median wall time of ``fn`` in ms, the GPU drained before and after each call."""
    return 1e3 * statistics.median(timed(fn, torch.device("cuda")) for _ in range(n))


def gpu_us(fn: Callable[[], Any], n: int = 20) -> float:
    """Mean GPU time of ``fn`` in microseconds (CUDA events around ``n`` back-to-back runs)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / n


def request_split(engine: Reranker, pairs: list[tuple[str, str]]) -> Any:
    """Print the request's parts; returns its packed batch."""
    runner = engine.runner
    queries, docs = [q for q, _ in pairs], [d for _, d in pairs]
    encoded = engine.encode(queries, docs)
    batch = pack_with_prefix(encoded, common_prefix(encoded))
    print(
        f"1x50: {encoded.total_tokens} tokens, shared prefix {batch.prefix}, "
        f"{batch.ids.shape[0]} computed, {batch.key_index.shape[0]} keys"
    )
    print(f"  end to end (score_pairs)   {wall_ms(lambda: engine.score_pairs(pairs)):.2f} ms")
    print(f"  tokenization               {wall_ms(lambda: engine.encode(queries, docs)):.2f} ms")
    print(
        f"  prefix + packing           {wall_ms(lambda: pack_with_prefix(encoded, batch.prefix)):.2f} ms"
    )
    print(f"  runner, one pass           {wall_ms(lambda: runner.run(encoded)):.2f} ms")
    device_batch = runner._upload(batch)
    with torch.inference_mode():
        runner._forward(device_batch)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        began = time.perf_counter()
        start.record()
        runner._forward(device_batch)
        end.record()
        launch = 1e3 * (time.perf_counter() - began)
        torch.cuda.synchronize()
        print(f"  forward: GPU {start.elapsed_time(end):.2f} ms, CPU to launch it {launch:.2f} ms")
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner._forward(device_batch)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
    return encoded, batch


def attention_options(encoded: Any, batch: Any, heads: int = 16, dim: int = 128) -> None:
    """GPU time of one layer's attention on this request, by kernel and layout."""
    cuda, bf16 = "cuda", torch.bfloat16
    t, k = batch.ids.shape[0], batch.key_index.shape[0]
    q, keys = (torch.randn(n, heads, dim, device=cuda, dtype=bf16) for n in (t, k))
    cu_q = torch.as_tensor(batch.cu_q, device=cuda)
    cu_k = torch.as_tensor(batch.cu_k, device=cuda)
    with torch.inference_mode():
        shared = gpu_us(
            lambda: varlen_attention(
                q, keys, keys, cu_q, cu_k, batch.max_q, batch.max_k, 0.08, causal=True
            )
        )
        print(f"flash varlen, shared prefix ({t} queries, {k} keys): {shared:.0f} us")
        lengths = encoded.lengths
        cu = torch.as_tensor(np.concatenate([[0], np.cumsum(lengths)]), device=cuda).int()
        whole = torch.randn(int(lengths.sum()), heads, dim, device=cuda, dtype=bf16)
        longest = int(lengths.max())
        plain = gpu_us(
            lambda: varlen_attention(
                whole, whole, whole, cu, cu, longest, longest, 0.08, causal=True
            )
        )
        print(f"flash varlen, no prefix ({int(lengths.sum())} tokens): {plain:.0f} us")
        padded = torch.randn(len(lengths), heads, longest, dim, device=cuda, dtype=bf16)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            try:
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    took = gpu_us(
                        lambda: F.scaled_dot_product_attention(
                            padded, padded, padded, is_causal=True
                        )
                    )
                print(f"SDPA {backend}, padded {tuple(padded.shape)}: {took:.0f} us")
            except RuntimeError as err:
                print(f"SDPA {backend}: not available ({str(err).splitlines()[0][:80]})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", required=True, help="folder with data/xquad-r")
    parser.add_argument("--tokenizer-dir", required=True, help="a prebuilt Qwen tokenizer")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model("0.6b", Path(args.tokenizer_dir), Path(tmp), quick=False)
        engine = Reranker(str(model_dir), device="cuda", dtype=torch.bfloat16, fast_path=True)
        work = load_workload(Path(args.shared), 20, 50, 50)
        requests = [
            [(q, d) for d in docs[:50]]
            for q, docs in zip(work.queries, work.candidates, strict=True)
        ]
        for pairs in requests[:4]:  # warm-up: kernels compiled, graphs captured
            engine.score_pairs(pairs)
        encoded, batch = request_split(engine, requests[5])
        attention_options(encoded, batch)
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
