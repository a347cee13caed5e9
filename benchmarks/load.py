"""Load test of ``crossrank serve``: N concurrent clients each sending 1 query x D documents.

Bounded in count (``--requests``) and time (``--max-seconds``), loopback only. Reports
requests/s, pairs/s and latency percentiles, and the ratio of the server's pairs/s to the
engine's offline throughput (``Reranker.score_pairs`` in-process on the same pairs, measured
before the server starts and after it stops; the ratio uses their mean, and two values far
apart mean the machine was busy with something else).

Examples::

    # a random-weight model of the real bge-reranker-v2-m3 tokenizer, tiny (2 layers)
    python benchmarks/load.py --random tiny --clients 8 --requests 200
    # a local model directory, on the GPU
    python benchmarks/load.py --model /models/bge-reranker-v2-m3 --device cuda --clients 32
    # the server process alone without the tokenizer's own threads, and a shorter GIL switch
    python benchmarks/load.py --random full --device cuda --clients 32 \
        --server-env TOKENIZERS_PARALLELISM=false --switch-interval 0.0005
    # an already running server (the offline ratio needs --model too)
    python benchmarks/load.py --url http://127.0.0.1:8000 --model /models/bge-reranker-v2-m3

The server runs in its own process (as in production) unless ``--url`` is given. One
client sends its requests one at a time on httpx's synchronous client (:func:`drive_lone`),
back to back, then again pausing ``--think-ms`` between requests (the
``latency_ms_p50_thinking_*`` figure: an application does other work between two reranks);
several share one async client (:func:`drive`).

Where a lone client's latency goes is reported in parts, each a p50 over the same 1x50
requests as the clients send, each side warmed first by one untimed run of them (new pass
shapes capture CUDA graphs): ``inprocess_p50_ms`` (``Reranker.score``, before the server
starts and after it stops; ``lone_to_inprocess`` divides a lone client's p50 by their mean),
``inprocess_async_p50_ms`` (``Reranker.ascore_raw`` on an event loop, the engine path the
server takes),
``http_floor_p50_ms`` (the same bodies sent to the server with ``top_n: 0``, which it reads,
parses and refuses with a 422 without scoring: transport, JSON, validation and the client
library), and the server's forward passes during the run (``passes``, ``pairs_per_pass``,
``tokens_per_pass``, from its ``/metrics``: whether concurrent requests were merged), the
mean time a request spent inside the server's app (``in_app_mean_ms``, from its request
latency histogram, beside the client's mean, ``client_mean_ms``: the rest is transport and
the client library), with
the CPU it used (``server_cpu_cores``: CPU seconds per second of the run) and the full
garbage collections it ran (``server_full_gcs``), and the event loop and HTTP parser it ran
on (``server_stack``). The before/after in-process figures are minutes apart from the
client's; ``interleaved_lone_to_inprocess`` times both sides in ``--rounds`` alternating
rounds instead (:func:`interleaved`), so that the machine's drift cancels out.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

from crossrank import Reranker
from crossrank.testing import SKELETON, TINY_CONFIG, build_random_reranker, shared_dir

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
PRESETS = {
    "tiny": TINY_CONFIG,
    "small": {
        "num_hidden_layers": 6,
        "hidden_size": 384,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
    },
    "full": {},
}
EXIT_GRACE_S = 120
SERVE = "import typer; from crossrank.cli.serve import serve; typer.run(serve)"


def workload(n_requests: int, docs_per_request: int, seed: int) -> list[tuple[str, list[str]]]:
    """(query, documents) per request: XQuAD-R questions and paragraphs when ../shared is
    present (about 190 tokens per pair), else synthetic sentences."""
    rng = random.Random(seed)
    shared = shared_dir()
    if shared is not None and (shared / "data/xquad-r/en.json").exists():
        data = json.loads((shared / "data/xquad-r/en.json").read_text(encoding="utf-8"))
        paragraphs = [p for a in data["data"] for p in a["paragraphs"]]
        questions = [qa["question"] for p in paragraphs for qa in p["qas"]]
        contexts = [p["context"] for p in paragraphs]
    else:
        words = [
            "planet",
            "red",
            "iron",
            "oxide",
            "surface",
            "moon",
            "orbit",
            "sun",
            "star",
            "light",
            "dust",
            "storm",
        ]
        contexts = [" ".join(rng.choices(words, k=80)) for _ in range(200)]
        questions = [" ".join(rng.choices(words, k=8)) + "?" for _ in range(200)]
    return [
        (rng.choice(questions), rng.sample(contexts, min(docs_per_request, len(contexts))))
        for _ in range(n_requests)
    ]


def model_path(args: argparse.Namespace, tmp: str) -> str:
    if args.model:
        return str(args.model)
    shared = shared_dir()
    if shared is None:
        sys.exit("--random needs ../shared (or $CROSSRANK_SHARED) for the real tokenizer")
    out = Path(tmp) / f"random-{args.random}"
    build_random_reranker(out, shared / SKELETON, **PRESETS[args.random])
    return str(out)


def p50_ms(times: list[float]) -> float:
    return float(np.median(times)) * 1000


def warm_up(reranker: Reranker, work: list[tuple[str, list[str]]]) -> None:
    """Score every request once, untimed, as the server is warmed before its measured run:
    each new pass shape costs its first request a CUDA graph capture, so both sides are
    timed in their steady state, on the same requests."""
    for query, docs in work:
        reranker.score(query, docs)


def inprocess_times(reranker: Reranker, work: list[tuple[str, list[str]]]) -> list[float]:
    """Latency of each request (``Reranker.score``) in-process: what a lone HTTP client's
    latency is compared with."""
    times = []
    for query, docs in work:
        start = time.perf_counter()
        reranker.score(query, docs)
        times.append(time.perf_counter() - start)
    return times


def inprocess_p50_ms(reranker: Reranker, work: list[tuple[str, list[str]]]) -> float:
    return p50_ms(inprocess_times(reranker, work))


def interleaved(
    reranker: Reranker, url: str, work: list[tuple[str, list[str]]], rounds: int, max_s: float
) -> dict[str, Any]:
    """A lone client against the in-process call in alternating rounds over the same requests
    (the in-process engine idle while the server answers, the server idle while it scores):
    the machine's drift over a run (one lease slowed by a fifth within minutes) weighs on both
    sides alike, unlike the before/after in-process figures around the server's run."""
    lone: list[float] = []
    inprocess: list[float] = []
    per_round = []
    for _ in range(rounds):
        here = inprocess_times(reranker, work)
        there = drive_lone(url, work, max_s)[0]
        inprocess += here
        lone += there
        per_round.append(round(p50_ms(there) / p50_ms(here), 3))
    return {
        "interleaved_lone_p50_ms": round(p50_ms(lone), 2),
        "interleaved_inprocess_p50_ms": round(p50_ms(inprocess), 2),
        "interleaved_lone_to_inprocess": round(p50_ms(lone) / p50_ms(inprocess), 3),
        "interleaved_rounds": per_round,
    }


def server_stack() -> str:
    """The event loop and HTTP parser uvicorn picks in this environment (``auto``), which a
    server started here shares: ``crossrank[server]`` installs uvloop and httptools."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"{loop}/{'httptools' if importlib.util.find_spec('httptools') else 'h11'}"


def inprocess_async_p50_ms(reranker: Reranker, work: list[tuple[str, list[str]]]) -> float:
    """Median latency of one request through the engine's async path in-process
    (``Reranker.ascore_raw``, what the server awaits)."""

    async def run() -> list[float]:
        times = []
        for query, docs in work:
            start = time.perf_counter()
            await reranker.ascore_raw(query, docs)
            times.append(time.perf_counter() - start)
        return times

    return p50_ms(asyncio.run(run()))


def http_floor_p50_ms(url: str, work: list[tuple[str, list[str]]]) -> float:
    """Median round trip of the same bodies refused after parsing (``top_n: 0`` is a 422),
    one at a time as :func:`drive_lone` sends them: what HTTP, JSON, validation and the
    client cost without any scoring."""
    times = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for query, docs in work:
            start = time.perf_counter()
            r = http.post("/v2/rerank", json={"query": query, "documents": docs, "top_n": 0})
            times.append(time.perf_counter() - start)
            if r.status_code != 422:
                sys.exit(f"expected a 422 for top_n=0, got {r.status_code}: {r.text[:200]}")
    return p50_ms(times)


#: Server counters read from ``/metrics`` before and after the measured run: (sample name,
#: labels).
COUNTERS = {
    "passes": ("crossrank_batch_pairs_count", {}),
    "pairs": ("crossrank_batch_pairs_sum", {}),
    "tokens": ("crossrank_batch_tokens_sum", {}),
    "cpu_s": ("process_cpu_seconds_total", {}),
    "full_gcs": ("python_gc_collections_total", {"generation": "2"}),
    "in_app_s": ("crossrank_http_request_duration_seconds_sum", {"route": "/v2/rerank"}),
    "in_app_n": ("crossrank_http_request_duration_seconds_count", {"route": "/v2/rerank"}),
}


def server_counters(url: str) -> np.ndarray:
    """The server's :data:`COUNTERS` so far (0 for one it does not expose), in that order."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): float(sample.value)
        for family in text_string_to_metric_families(httpx.get(url + "/metrics").text)
        for sample in family.samples
    }
    return np.array(
        [
            samples.get((name, tuple(sorted(labels.items()))), 0.0)
            for name, labels in COUNTERS.values()
        ]
    )


def offline_pairs_per_s(reranker: Reranker, work: list[tuple[str, list[str]]]) -> float:
    pairs = [(q, d) for q, docs in work for d in docs]
    reranker.score_pairs(pairs[:64])  # warm up
    start = time.perf_counter()
    reranker.score_pairs(pairs)
    return len(pairs) / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: argparse.Namespace, model: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-c",
        SERVE
        if args.switch_interval is None
        else f"import sys; sys.setswitchinterval({args.switch_interval}); {SERVE}",
        "--model",
        model,
        "--port",
        str(port),
        "--device",
        args.device,
        "--max-docs",
        str(args.docs),
        "--max-length",
        str(args.max_length),
    ]
    if args.max_batch_tokens:
        cmd += ["--max-batch-tokens", str(args.max_batch_tokens)]
    log = tempfile.NamedTemporaryFile(prefix="crossrank-serve-", suffix=".log", delete=False)  # noqa: SIM115 (the server writes it for its whole life)
    env = {**os.environ, **dict(item.split("=", 1) for item in args.server_env)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(log.name).read_text(errors="replace")[-3000:]
            sys.exit(f"the server exited with status {proc.returncode}; its log ends:\n{tail}")
        try:
            if httpx.get(url + "/ready").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"the server was not ready within {args.startup_timeout} s")


async def drive(
    url: str, work: list[tuple[str, list[str]]], clients: int, max_seconds: float
) -> tuple[list[float], int, int, float]:
    """Send ``work`` from ``clients`` concurrent connections; latencies of the 200s, the pairs
    they scored, the number of failures and the wall time."""
    latencies: list[float] = []
    pairs = failures = 0
    queue = list(reversed(work))
    deadline = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failures, pairs
        while queue and time.monotonic() < deadline:
            query, docs = queue.pop()
            start = time.perf_counter()
            r = await http.post("/v2/rerank", json={"query": query, "documents": docs})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - start)
                pairs += len(docs)
            else:
                failures += 1

    async with httpx.AsyncClient(base_url=url, timeout=max_seconds, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return latencies, pairs, failures, time.perf_counter() - start


def drive_lone(
    url: str, work: list[tuple[str, list[str]]], max_seconds: float, think_s: float = 0.0
) -> tuple[list[float], int, int, float]:
    """:func:`drive` for one client, as a lone application calls a reranker: one request at a
    time on httpx's synchronous client (what the Cohere SDK and the LangChain and LlamaIndex
    integrations use), which costs about 1 ms less per request than its async client;
    ``think_s`` seconds between a response and the next request (an application does other
    work, such as its LLM call, between two reranks)."""
    latencies: list[float] = []
    pairs = failures = 0
    deadline = time.monotonic() + max_seconds
    with httpx.Client(base_url=url, timeout=max_seconds) as http:
        start = time.perf_counter()
        for query, docs in work:
            if time.monotonic() >= deadline:
                break
            sent = time.perf_counter()
            r = http.post("/v2/rerank", json={"query": query, "documents": docs})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - sent)
                pairs += len(docs)
            else:
                failures += 1
            time.sleep(think_s)
        return latencies, pairs, failures, time.perf_counter() - start


def run_clients(
    url: str, work: list[tuple[str, list[str]]], clients: int, max_seconds: float
) -> tuple[list[float], int, int, float]:
    """The measured run: :func:`drive_lone` for one client, else :func:`drive`."""
    if clients == 1:
        return drive_lone(url, work, max_seconds)
    return asyncio.run(drive(url, work, clients, max_seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="Hub id or local directory of the served model.")
    source.add_argument(
        "--random",
        choices=sorted(PRESETS),
        default="tiny",
        help="Random-weight model of the real architecture (default: tiny).",
    )
    parser.add_argument("--url", help="Target a running server (loopback only).")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="Total requests (bound).")
    parser.add_argument("--docs", type=int, default=50, help="Documents per request.")
    parser.add_argument("--max-seconds", type=float, default=120, help="Time bound.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="An environment variable for the server process only (repeatable), e.g. "
        "TOKENIZERS_PARALLELISM=false, while the in-process figures keep this environment.",
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval for the server process (seconds; Python's default 0.005): "
        "how long a thread that wants the GIL waits before the holder must give it up.",
    )
    parser.add_argument(
        "--think-ms",
        type=float,
        default=10.0,
        help="A lone client (--clients 1) is also timed pausing this long between a response "
        "and its next request (0: not).",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="A lone client (--clients 1) is also timed against the in-process call in this "
        "many alternating rounds over all requests (0: not).",
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        parser.error("--url must point at this machine (127.0.0.1, localhost or ::1)")
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes NAME=VALUE")
    if args.requests < 1 or args.clients < 1 or args.docs < 1:
        parser.error("--requests, --clients and --docs must be positive")

    work = workload(args.requests, args.docs, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = None if args.url and not args.model else model_path(args, tmp)
        reranker = None
        offline: list[float] = []
        single_ms: list[float] = []  # before the server starts, after it stops
        single_async_ms = None
        if model is not None:  # measured before the server starts and after it stops
            reranker = Reranker(
                model,
                device=args.device,
                max_length=args.max_length,
                batch_tokens=args.max_batch_tokens,
            )
            offline.append(offline_pairs_per_s(reranker, work))
            warm_up(reranker, work)
            single_ms.append(inprocess_p50_ms(reranker, work))
            single_async_ms = inprocess_async_p50_ms(reranker, work)
        proc = None
        url = args.url
        if url is None:
            assert model is not None
            proc, url = start_server(args, model)
        try:
            run_clients(url, work, args.clients, args.max_seconds)  # warm, as warm_up
            floor_ms = http_floor_p50_ms(url, work)
            before = server_counters(url)
            latencies, pairs, failures, wall = run_clients(
                url, work, args.clients, args.max_seconds
            )
            counted = server_counters(url) - before
            passes, pass_pairs, pass_tokens, cpu_s, full_gcs, in_app_s, in_app_n = counted
            thinking = []
            if args.clients == 1 and args.think_ms > 0:
                thinking = drive_lone(url, work, args.max_seconds, args.think_ms / 1000)[0]
            alternating = {}
            if args.clients == 1 and args.rounds > 0 and reranker is not None:
                alternating = interleaved(reranker, url, work, args.rounds, args.max_seconds)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
        if reranker is not None:
            offline.append(offline_pairs_per_s(reranker, work))
            single_ms.append(inprocess_p50_ms(reranker, work))
            reranker.close()

    done = len(latencies)
    lat = np.asarray(latencies) * 1000
    report = {
        "model": args.model or f"random-{args.random}",
        "device": args.device,
        "cpus": os.cpu_count(),
        "clients": args.clients,
        "docs_per_request": args.docs,
        "requests_ok": done,
        "requests_failed": failures,
        "wall_s": round(wall, 2),
        "requests_per_s": round(done / wall, 2),
        "pairs_per_s": round(pairs / wall, 1),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if done else None,
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 1) if done else None,
        "offline_pairs_per_s": [round(x, 1) for x in offline] or None,  # before, after
        "server_to_offline": round(pairs / wall / float(np.mean(offline)), 3) if offline else None,
        "inprocess_p50_ms": [round(x, 1) for x in single_ms] or None,  # before, after
        "lone_to_inprocess": round(float(np.percentile(lat, 50)) / float(np.mean(single_ms)), 3)
        if done and single_ms and args.clients == 1
        else None,
        f"latency_ms_p50_thinking_{args.think_ms:g}ms": round(p50_ms(thinking), 1)
        if thinking
        else None,
        "inprocess_async_p50_ms": round(single_async_ms, 1) if single_async_ms else None,
        "http_floor_p50_ms": round(floor_ms, 1),
        "in_app_mean_ms": round(1000 * in_app_s / in_app_n, 1) if in_app_n else None,
        "client_mean_ms": round(float(np.mean(lat)), 1) if done else None,
        "passes": int(passes),
        "pairs_per_pass": round(pass_pairs / passes, 1) if passes else None,
        "tokens_per_pass": round(pass_tokens / passes) if passes else None,
        "server_cpu_cores": round(cpu_s / wall, 2),  # CPU seconds per second of the run
        "server_full_gcs": int(full_gcs),
        "server_stack": None if args.url else server_stack(),
        **alternating,
    }
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        width = max(map(len, report))
        for key, value in report.items():
            print(f"{key:<{width}}  {value}", flush=True)
    # A run on a GPU host once printed its report and then never exited (not reproduced on
    # CPU): should the interpreter take longer than this to shut down, every thread's stack
    # goes to stderr and the process exits with status 1, instead of waiting for an outer
    # timeout with nothing to show.
    faulthandler.dump_traceback_later(EXIT_GRACE_S, exit=True)


if __name__ == "__main__":
    main()
