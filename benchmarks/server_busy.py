"""Does the server keep a device busy under concurrent clients? (any machine, no GPU)

The real server app (``create_app``, on uvicorn in this process) with the real tokenizer and
``benchmarks/async_path.py``'s stand-in device: a pass takes ``tokens / rate`` seconds off
the GIL, one after the other as on a GPU stream. The rate is the H200's on
bge-reranker-v2-m3 divided by ``--slowdown``, so that this machine's cores can tokenize as
fast as the device scores (on 2 cores: a slowdown of 6 or more). N clients send 1 x 50
XQuAD-R requests (``benchmarks/load.py``'s workload and driver); the report gives pairs/s,
the device's busy share (its pass time over the run's wall time: 1.0 means the queue never
left it waiting) and the passes' size. A busy share well under 1 here would point at the
server's queueing; near 1 here and a gap on the GPU points at what only the GPU host has
(kernel launches under the GIL, CUDA graph captures, a faster device).

Example::

    CROSSRANK_SHARED=../shared PYTHONPATH=src:. python benchmarks/server_busy.py --slowdown 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable

import numpy as np

from benchmarks.async_path import H200_TOKENS_PER_S, TimedDevice, stand_in_engine
from benchmarks.load import drive, workload
from crossrank.backends.setup import DEFAULT_BATCH_TOKENS
from crossrank.server import create_app
from crossrank.server.runner import BackgroundServer
from crossrank.tokenization import EncodedPairs


class CountingDevice(TimedDevice):
    """The stand-in device, adding up the time its passes take."""

    def __init__(self, tokens_per_s: float, submit_s: float) -> None:
        super().__init__(tokens_per_s, submit_s)
        self.busy_s = 0.0
        self.passes = 0

    def submit(self, encoded: EncodedPairs) -> Callable[[], np.ndarray]:
        self.busy_s += encoded.total_tokens / self.tokens_per_s
        self.passes += 1
        return super().submit(encoded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slowdown", type=float, default=6.0, help="Device rate: H200's / this.")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--submit-ms", type=float, default=0.5, help="Python time per launch.")
    args = parser.parse_args()
    device = CountingDevice(H200_TOKENS_PER_S / args.slowdown, args.submit_ms / 1000)
    # the CUDA token budget, so that passes are cut as on the GPU
    reranker = stand_in_engine(device, batch_tokens=DEFAULT_BATCH_TOKENS["cuda"])
    work = workload(args.requests, 50, 0)
    with BackgroundServer(create_app(reranker)) as server:
        server.wait_ready()
        asyncio.run(drive(server.url, work[: args.clients], args.clients, 120))  # warm
        device.busy_s, device.passes = 0.0, 0
        latencies, pairs, failures, wall = asyncio.run(drive(server.url, work, args.clients, 300))
    report = {
        "slowdown": args.slowdown,
        "clients": args.clients,
        "requests_ok": len(latencies),
        "requests_failed": failures,
        "pairs_per_s": round(pairs / wall, 1),
        "device_busy": round(device.busy_s / wall, 3),
        "passes": device.passes,
        "pairs_per_pass": round(pairs / device.passes, 1) if device.passes else None,
        "latency_ms_p50": round(float(np.median(latencies)) * 1000, 1) if latencies else None,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
