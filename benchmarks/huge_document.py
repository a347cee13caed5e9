"""One huge document against ``crossrank serve``: server memory and other requests' latency.

Issue 13, fault 1: a single ~30 MB document (under the 32 MiB body limit) took the server to
4.1 GB RSS and made a concurrent 3-document request wait 56 s, because the whole text was
tokenized under one process-wide lock. This script measures that, for any crossrank source
tree (``--server-src``, put on the server's PYTHONPATH), so the code before and after the fix
can be compared with the same client.

Per scenario (``truncate``, ``truncate`` with ``--request-timeout 2``, ``chunk``) it starts
``crossrank serve`` on a tiny random-weight model (127.0.0.1, a free port, CPU), sends one
warm-up request, then one request with the huge document and, one second later, three small
3-document requests at once ("during"); when the big request has its answer, three more
("after"). A thread samples the server's RSS from ``/proc/<pid>/status`` every 50 ms; "RSS
after" is read ``--settle`` seconds after the last answer. Bounded: every request has a client
timeout and the server is stopped at the end of each scenario. Loopback only; Linux only.

Example (the code of the fix, then the code before it from a separate worktree)::

    PYTHONPATH=src python benchmarks/huge_document.py --server-src src --label after
    PYTHONPATH=src python benchmarks/huge_document.py --server-src /tmp/before/src --label before
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from crossrank.testing import SKELETON, TINY_CONFIG, build_random_reranker, shared_dir

SCENARIOS: dict[str, list[str]] = {
    "truncate": [],
    "truncate, timeout 2 s": ["--request-timeout", "2"],
    "chunk": ["--long-docs", "chunk"],
}
SERVE = "from crossrank.cli import app; app()"
WORDS = [
    "the",
    "river",
    "city",
    "light",
    "stone",
    "market",
    "winter",
    "north",
    "language",
    "number",
    "bridge",
    "garden",
    "music",
    "paper",
    "window",
    "history",
    "station",
    "mountain",
    "forest",
    "school",
    "letter",
    "island",
    "summer",
    "machine",
]
SMALL_QUERY = "Which bridge crosses the river?"
SMALL_DOCS = [
    "The old stone bridge crosses the river near the market.",
    "Winter in the north is long and dark.",
    "The station is next to the school.",
]


@dataclass
class Outcome:
    """One scenario's measurements (MiB, seconds, HTTP statuses or error names)."""

    scenario: str
    baseline_mib: float = 0.0
    peak_mib: float = 0.0
    after_mib: float = 0.0
    big_status: str = ""
    big_s: float = 0.0
    during: list[tuple[str, float]] = field(default_factory=list)
    after: list[tuple[str, float]] = field(default_factory=list)


def huge_text(n_chars: int, seed: int = 0) -> str:
    """Pseudo-English of about ``n_chars`` characters (words, numbers, sentence ends)."""
    rng = random.Random(seed)
    sentence = [" ".join(rng.choice(WORDS) for _ in range(12)) + f" {i}." for i in range(997)]
    block = " ".join(sentence)
    return (block * (n_chars // len(block) + 1))[:n_chars]


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssSampler(threading.Thread):
    """The largest RSS of a process seen since start (sampled every ``period`` seconds)."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.period, self.peak = pid, period, 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, rss_mib(self.pid))
            except OSError:
                return
            time.sleep(self.period)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    model: str, server_src: str, extra: list[str], startup_timeout: float
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-c", SERVE, "serve", "--model", model, "--port", str(port)]
    cmd += ["--device", "cpu", *extra]
    env = {**os.environ, "PYTHONPATH": str(Path(server_src).resolve())}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    sys.exit(f"the server did not become ready within {startup_timeout} s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def post(
    http: httpx.AsyncClient, url: str, documents: list[str], timeout: float
) -> tuple[str, float]:
    start = time.perf_counter()
    body = {"query": SMALL_QUERY, "documents": documents}
    try:
        response = await http.post(url + "/v1/rerank", json=body, timeout=timeout)
        status = str(response.status_code)
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    return status, time.perf_counter() - start


async def small_wave(http: httpx.AsyncClient, url: str, timeout: float) -> list[tuple[str, float]]:
    return list(await asyncio.gather(*(post(http, url, SMALL_DOCS, timeout) for _ in range(3))))


async def drive(url: str, document: str, args: argparse.Namespace, out: Outcome) -> None:
    async with httpx.AsyncClient() as http:
        big = asyncio.create_task(post(http, url, [document, *SMALL_DOCS[:2]], args.big_timeout))
        await asyncio.sleep(args.small_delay)
        out.during = await small_wave(http, url, args.small_timeout)
        out.big_status, out.big_s = await big
        out.after = await small_wave(http, url, args.small_timeout)


def run_scenario(name: str, model: str, document: str, args: argparse.Namespace) -> Outcome:
    out = Outcome(name)
    proc, url = start_server(model, args.server_src, SCENARIOS[name], args.startup_timeout)
    try:
        httpx.post(url + "/v1/rerank", json={"query": SMALL_QUERY, "documents": SMALL_DOCS})
        time.sleep(1.0)
        out.baseline_mib = rss_mib(proc.pid)
        sampler = RssSampler(proc.pid)
        sampler.start()
        asyncio.run(drive(url, document, args, out))
        time.sleep(args.settle)
        out.after_mib = rss_mib(proc.pid)
        sampler.stop.set()
        sampler.join()
        out.peak_mib = max(sampler.peak, out.after_mib)
    finally:
        stop_server(proc)
    return out


def latency_cell(results: list[tuple[str, float]]) -> str:
    seconds = [s for _, s in results]
    statuses = ",".join(sorted({st for st, _ in results}))
    return f"{np.median(seconds):.2f} / {max(seconds):.2f} ({statuses})"


def table(label: str, outcomes: list[Outcome]) -> str:
    head = (
        "| code | scenario | RSS before MiB | peak RSS MiB | RSS after MiB | big: status, s "
        "| 3 small during: p50 / max s (status) | 3 small after: p50 / max s (status) |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    rows = [
        f"| {label} | {o.scenario} | {o.baseline_mib:.0f} | {o.peak_mib:.0f} | "
        f"{o.after_mib:.0f} | {o.big_status}, {o.big_s:.1f} | {latency_cell(o.during)} | "
        f"{latency_cell(o.after)} |"
        for o in outcomes
    ]
    return head + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server-src", required=True, help="crossrank src/ dir for the server")
    parser.add_argument("--label", default="", help="First column of the table (e.g. before).")
    parser.add_argument("--doc-mb", type=float, default=30.0, help="Size of the huge document.")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--small-delay", type=float, default=1.0)
    parser.add_argument("--small-timeout", type=float, default=180.0)
    parser.add_argument("--big-timeout", type=float, default=300.0)
    parser.add_argument("--settle", type=float, default=5.0, help="Seconds before 'RSS after'.")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    parser.add_argument("--skeleton", help="config+tokenizer dir (default: the shared skeleton)")
    parser.add_argument("--json", help="Also write the measurements here.")
    args = parser.parse_args()
    shared = shared_dir()
    skeleton = args.skeleton or (shared / SKELETON if shared else None)
    if skeleton is None:
        sys.exit("no model skeleton: pass --skeleton or set CROSSRANK_SHARED")
    document = huge_text(int(args.doc_mb * 1_000_000))
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_random_reranker(Path(tmp) / "tiny", skeleton, **TINY_CONFIG))
        for name in args.scenarios:
            outcomes.append(run_scenario(name, model, document, args))
            print(f"done: {name}", file=sys.stderr, flush=True)
    print(table(args.label or args.server_src, outcomes))
    if args.json:
        Path(args.json).write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))


if __name__ == "__main__":
    main()
