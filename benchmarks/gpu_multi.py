"""One process, one replica per GPU: ``Reranker(device=["cuda:0", "cuda:1", ...])`` vs one GPU.

Same random-weight bge-reranker-v2-m3 and XQuAD-R workload as ``gpu_peers.py``. For calls of
2,000, 4,000 and 16,000 pairs: pairs/s on one GPU and on all GPUs of the machine, and how far
the split call's scores are from the one-GPU call's (max |difference| of fp16 logits, minimum
per-query Kendall tau). Small requests (1x50, 1x10) are below ``split_tokens`` and stay on the
first GPU: their p50 shows that the split costs them nothing.

    python benchmarks/gpu_multi.py --shared DIR --out docs/benchmarks-gpu-multi.md
    python benchmarks/gpu_multi.py --cpu-smoke      # two CPU "devices", tiny model (CI)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT / "src", ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from gpu_peers import Pairs, load_workload  # noqa: E402

from crossrank import Reranker  # noqa: E402
from crossrank.packed import kendall_tau  # noqa: E402
from crossrank.testing import SKELETON, TINY_CONFIG, build_random_reranker, shared_dir  # noqa: E402


def sync(devices: list[str]) -> None:
    for device in devices:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)


def pairs_per_s(reranker: Reranker, pairs: Pairs, devices: list[str], repeats: int) -> float:
    reranker.score_pairs(pairs)  # warm-up (graph captures, allocator)
    times = []
    for _ in range(repeats):
        sync(devices)
        start = time.perf_counter()
        reranker.score_pairs(pairs)
        sync(devices)
        times.append(time.perf_counter() - start)
    return len(pairs) / statistics.median(times)


def p50_ms(reranker: Reranker, requests: list[tuple[str, list[str]]]) -> float:
    for query, docs in requests:  # untimed round
        reranker.score(query, docs)
    times = []
    for query, docs in requests * 2:
        start = time.perf_counter()
        reranker.score(query, docs)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    shared = Path(args.shared) if args.shared else shared_dir()
    if shared is None:
        raise SystemExit("no ../shared: pass --shared DIR (models/ and data/xquad-r inside)")
    smoke = args.cpu_smoke
    if smoke:
        devices, dtype, per_lang, per_query, sizes = ["cpu", "cpu"], "float32", 1, 4, [1, 2]
    else:
        count = torch.cuda.device_count()
        if count < 2:
            raise SystemExit(f"needs at least two CUDA devices, found {count}")
        devices = [f"cuda:{i}" for i in range(count)]
        dtype, per_lang, per_query, sizes = "float16", 20, 50, [1, 2, 8]
    work = load_workload(shared, per_lang=per_lang, per_query=per_query, pool=2 * per_query)
    everything = [
        (q, d) for q, docs in zip(work.queries, work.candidates, strict=True) for d in docs
    ]
    half = len(everything) // 2
    with tempfile.TemporaryDirectory() as tmp:
        overrides = dict(TINY_CONFIG) if smoke else {}
        model = str(build_random_reranker(Path(tmp) / "m", shared / SKELETON, seed=0, **overrides))
        split_tokens = {"split_tokens": 64} if smoke else {}
        one = Reranker(model, device=devices[0], dtype=dtype)
        many = Reranker(model, device=devices, dtype=dtype, **split_tokens)
        result: dict[str, Any] = {"devices": devices, "dtype": dtype, "calls": []}
        if not smoke:
            result["gpu"] = torch.cuda.get_device_name(0)
        for factor in sizes:
            pairs = (everything * factor)[: half * factor]
            a = one.score_pairs(pairs, normalize=False)
            b = many.score_pairs(pairs, normalize=False)
            taus = [
                kendall_tau(a[i : i + per_query], b[i : i + per_query])
                for i in range(0, half, per_query)
            ]
            result["calls"].append(
                {
                    "pairs": len(pairs),
                    "one_gpu_pairs_per_s": pairs_per_s(one, pairs, devices, 1 if smoke else 3),
                    "all_gpus_pairs_per_s": pairs_per_s(many, pairs, devices, 1 if smoke else 3),
                    "max_abs_diff": float(np.abs(a - b).max()),
                    "min_tau": float(min(taus)),
                }
            )
        for size in (per_query, 10):
            requests = [
                (q, docs[:size]) for q, docs in zip(work.queries, work.candidates, strict=True)
            ]
            result[f"p50_ms_1x{size}"] = {
                "one": p50_ms(one, requests),
                "all": p50_ms(many, requests),
            }
        many.close()
        one.close()
    return result


def markdown(result: dict[str, Any], command: str) -> str:
    devices = result["devices"]
    lines = [
        "# Several GPUs in one process",
        "",
        f"Generated by `benchmarks/gpu_multi.py` on {len(devices)} x {result.get('gpu', 'CPU (smoke run)')}, "
        f"{result['dtype']}; `Reranker(device={devices})` against `Reranker(device={devices[0]!r})`.",
        "",
        "| pairs in the call | 1 GPU pairs/s | all GPUs pairs/s | speed-up | max abs diff | min tau |",
        "|---|---|---|---|---|---|",
    ]
    for call in result["calls"]:
        one, many = call["one_gpu_pairs_per_s"], call["all_gpus_pairs_per_s"]
        lines.append(
            f"| {call['pairs']} | {one:.0f} | {many:.0f} | {many / one:.2f}x | "
            f"{call['max_abs_diff']:.1e} | {call['min_tau']:.4f} |"
        )
    lines += ["", "Small requests stay on the first GPU (below `split_tokens`):", ""]
    for key in sorted(k for k in result if k.startswith("p50_ms_")):
        size = key.rsplit("_", 1)[1]
        lines.append(
            f"- {size} p50: {result[key]['one']:.1f} ms on one GPU, {result[key]['all']:.1f} ms "
            "with all GPUs loaded"
        )
    lines += ["", "Command:", "", "```", command, "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", help="folder with models/ and data/xquad-r (default ../shared)")
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--json", help="also write the numbers as JSON here")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, two CPU devices")
    args = parser.parse_args(argv)
    result = run(args)
    command = "python benchmarks/gpu_multi.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    text = markdown(result, command)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
