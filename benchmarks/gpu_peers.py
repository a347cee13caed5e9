"""crossrank against FlagEmbedding and sentence-transformers on one GPU, end to end.

Workload (issue 7): a random-weight model of the exact bge-reranker-v2-m3 architecture (built
from ``../shared/models/bge-reranker-v2-m3-skeleton``, real XLM-R tokenizer), 40 real XQuAD-R
questions (20 en, 20 zh) x 50 paragraphs of the same language (the question's own paragraph
and 49 others), about 190 tokens per pair. Text in -> scores out, for every system:

- bulk: all 2,000 pairs in one call, pairs/s (median of the repeats);
- latency: one request of 1 query x 50 (and x 100) paragraphs, p50/p99 over 80 requests;
- GPU memory peak (``torch.cuda.max_memory_allocated``, weights included);
- MFU: model FLOPs over real tokens per second / the measured fp16 matmul peak;
- correctness: max |logit difference| against the padded fp32 reference (a plain
  transformers forward) and the Kendall tau of each query's 50-paragraph ranking (>= 0.99).

Also measured: each fast-path step on its own (packing, GELU epilogue, residual add inside the
matmul, CUDA graphs, tokenization overlap, bf16), the model-only rates of the packed runner
and of a length-sorted padded transformers forward, and tokenization alone. ``--micro``,
``--profile`` and ``--scan-init`` log attention/LayerNorm/tokenizer variants, the top CUDA
kernels and how random models of several init ranges rank in fp16/bf16 vs fp32.

    python benchmarks/gpu_peers.py                      # GPU; writes docs/benchmarks-gpu.md
    python benchmarks/gpu_peers.py --cpu-smoke --out /tmp/b.md   # tiny model, seconds, CPU
    python benchmarks/gpu_peers.py --workload longdocs --out /tmp/long.md  # 3-10 paragraphs/doc
    python benchmarks/gpu_peers.py --tokenizers-parallelism off --out /tmp/off.md
        # every system in a child process with TOKENIZERS_PARALLELISM=false

Random weights give meaningless but realistic-speed scores; rankings of a random model are
close to ties, so the tau column is a stricter test than on the real model.
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import gc
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from crossrank import Reranker  # noqa: E402
from crossrank.backends.packed import PackedOptions, PackedRunner  # noqa: E402
from crossrank.testing import (  # noqa: E402
    SKELETON,
    TINY_CONFIG,
    build_random_reranker,
    kendall_tau,
    shared_dir,
)

log = logging.getLogger("gpu_peers")
#: The engine's tokenization-overlap options per ablation step: None = tokenize the whole
#: call, then score (overlap never starts); "large" = the engine's setting before small calls
#: were split (overlap above 128 pairs, 16-pair first chunk); "all" = the engine's default.
OVERLAP_SETTINGS: dict[str | None, dict[str, int]] = {
    None: {"overlap_min_pairs": 1 << 30},
    "large": {"overlap_min_pairs": 128, "overlap_first_chunk": 16},
    "all": {},
}
Pairs = list[tuple[str, str]]
ScoreFn = Callable[[Pairs], np.ndarray]


@dataclass
class Workload:
    queries: list[str]  # one per question
    candidates: list[list[str]]  # 100 paragraphs per question (the first 50 are the bulk set)
    per_query: int

    @property
    def bulk(self) -> Pairs:
        return [
            (q, d)
            for q, docs in zip(self.queries, self.candidates, strict=False)
            for d in docs[: self.per_query]
        ]


@dataclass
class Row:
    system: str
    pairs_per_s: float | None = None
    p50_50: float | None = None
    p99_50: float | None = None
    p50_100: float | None = None
    p99_100: float | None = None
    mem_gib: float | None = None
    mfu: float | None = None
    max_diff: float | None = None
    min_tau: float | None = None
    tau_fail: int | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def load_workload(shared: Path, per_lang: int, per_query: int, pool: int) -> Workload:
    queries: list[str] = []
    candidates: list[list[str]] = []
    rng = random.Random(0)
    for lang in ("en", "zh"):
        data = json.loads((shared / f"data/xquad-r/{lang}.json").read_text(encoding="utf-8"))
        paragraphs: list[str] = []
        questions: list[tuple[str, int]] = []
        for article in data["data"]:
            for paragraph in article["paragraphs"]:
                paragraphs.append(paragraph["context"])
                questions.append((paragraph["qas"][0]["question"], len(paragraphs) - 1))
        for question, own in rng.sample(questions, per_lang):
            others = rng.sample([i for i in range(len(paragraphs)) if i != own], pool - 1)
            docs = [paragraphs[i] for i in [own, *others]]
            rng.shuffle(docs)
            queries.append(question)
            candidates.append(docs)
    return Workload(queries, candidates, per_query)


def long_documents(work: Workload, seed: int = 0) -> Workload:
    """The same questions with long candidates: each document is 3 to 10 of the question's
    candidate paragraphs joined (its own paragraph where it was), well over 512 tokens."""
    rng = random.Random(seed)
    joined = []
    for docs in work.candidates:
        sizes = [rng.randint(3, 10) for _ in docs]
        joined.append(
            [
                " ".join(docs[(i + j) % len(docs)] for j in range(size))
                for i, size in enumerate(sizes)
            ]
        )
    return Workload(work.queries, joined, work.per_query)


def model_flops(lengths: np.ndarray, config: Any) -> float:
    """Forward FLOPs of the encoder + head over real tokens (matmuls and attention)."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    per_token = 2 * layers * (4 * h * h + 2 * h * inter)
    attention = 4 * layers * h * float((lengths.astype(np.float64) ** 2).sum())
    return per_token * float(lengths.sum()) + attention + 2 * len(lengths) * h * h


def measure_peak(device: torch.device) -> float | None:
    """Dense fp16 matmul rate (8192^3, median of 10) in FLOP/s: the MFU denominator."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * 8192**3 / statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.smoke = args.cpu_smoke
        self.rows: list[Row] = []
        self.ablation: list[Row] = []
        self.facts: dict[str, Any] = {}
        shared = Path(args.shared) if args.shared else shared_dir()
        if shared is None:
            raise SystemExit("no ../shared: pass --shared DIR (models/ and data/xquad-r inside)")
        self.shared = shared
        if self.smoke:
            self.work = load_workload(shared, per_lang=1, per_query=4, pool=8)
        else:
            self.work = load_workload(shared, per_lang=20, per_query=50, pool=100)
        if args.workload == "longdocs":
            self.work = long_documents(self.work)
        self.pairs = self.work.bulk
        self.reference: np.ndarray | None = None
        self.lengths: np.ndarray | None = None
        self.peak: float | None = None
        self.started = time.perf_counter()

    # ------------------------------------------------------------------------ setup
    def build_model(self, tmp: Path) -> Path:
        overrides: dict[str, Any] = dict(TINY_CONFIG) if self.smoke else {}
        if self.args.init_range is not None:
            overrides["initializer_range"] = self.args.init_range
        start = time.perf_counter()
        path = build_random_reranker(tmp / "model", self.shared / SKELETON, seed=0, **overrides)
        self.facts["model_build_s"] = round(time.perf_counter() - start, 1)
        return path

    def environment(self) -> None:
        import transformers

        facts = self.facts
        facts["python"] = platform.python_version()
        facts["torch"] = torch.__version__
        facts["transformers"] = transformers.__version__
        try:
            import sentence_transformers

            facts["sentence_transformers"] = sentence_transformers.__version__
        except Exception as err:  # reported, not fatal
            facts["sentence_transformers"] = f"unavailable: {err}"
        try:
            from importlib.metadata import version

            import FlagEmbedding  # noqa: F401

            facts["FlagEmbedding"] = version("FlagEmbedding")
        except Exception as err:
            facts["FlagEmbedding"] = f"unavailable: {type(err).__name__}: {err}"
        facts["cpu_count"] = os.cpu_count()
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            facts["gpu"] = props.name
            facts["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            facts["capability"] = ".".join(map(str, torch.cuda.get_device_capability(self.device)))
            try:
                q = torch.randn(10, 2, 64, device=self.device, dtype=torch.float16)
                cu = torch.tensor([0, 4, 10], device=self.device, dtype=torch.int32)
                torch.ops.aten._flash_attention_forward(q, q, q, cu, cu, 6, 6, 0.0, False, False)
                facts["aten_flash_varlen"] = "ok"
            except Exception as err:
                facts["aten_flash_varlen"] = f"failed: {err}"
            self.peak = measure_peak(self.device)
            facts["fp16_matmul_peak_tflops"] = round((self.peak or 0) / 1e12, 1)
        log.info("environment: %s", json.dumps(facts))

    # --------------------------------------------------------------- measurement core
    def measure(
        self,
        name: str,
        score: ScoreFn,
        *,
        latency: bool = True,
        repeats: int | None = None,
        note: str = "",
        bulk_only: Callable[[], Any] | None = None,
    ) -> Row:
        """Warm up, check scores against the reference, then time bulk and latency."""
        row = Row(system=name, note=note)
        device = self.device
        pairs = self.pairs
        per_query = self.work.per_query
        start = time.perf_counter()
        scores = np.asarray(score(pairs), dtype=np.float64).reshape(-1)
        row.extra["first_call_s"] = round(time.perf_counter() - start, 2)
        if self.reference is not None:
            ref = self.reference
            row.max_diff = float(np.abs(scores - ref).max())
            taus = [
                kendall_tau(ref[i : i + per_query], scores[i : i + per_query])
                for i in range(0, len(ref), per_query)
            ]
            row.min_tau = float(min(taus))
            row.tau_fail = int(sum(t < 0.99 for t in taus))
            row.extra["mean_tau"] = float(np.mean(taus))
        reps = repeats or (1 if self.smoke else 3)
        run = bulk_only or (lambda: score(pairs))
        times = [timed(run, device) for _ in range(reps)]
        row.pairs_per_s = len(pairs) / statistics.median(times)
        if self.peak and self.lengths is not None:
            row.mfu = (
                model_flops(self.lengths, self.config) * row.pairs_per_s / len(pairs) / self.peak
            )
        if latency:
            # the CPU smoke run times one request per query, once: it only has to run
            sizes = [(per_query, "p50_50", "p99_50")]
            if not self.smoke:
                sizes.append((2 * per_query, "p50_100", "p99_100"))
            for size, p50, p99 in sizes:
                lat = self.latencies(score, size)
                setattr(row, p50, percentile(lat, 50))
                setattr(row, p99, percentile(lat, 99))
            if not self.smoke:
                lat = self.latencies(score, 10)
                row.extra["p50_10_ms"] = round(percentile(lat, 50), 2)
                row.note = (row.note + f" 1x10 p50 {percentile(lat, 50):.1f} ms").strip()
        if device.type == "cuda":
            row.mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
        log.info("row: %s", json.dumps(asdict(row)))
        return row

    def latencies(self, score: ScoreFn, size: int) -> list[float]:
        """Milliseconds per request of 1 query x ``size`` paragraphs, for every question:
        one untimed round (it also captures CUDA graphs of these shapes), then timed ones."""
        requests = [
            [(q, d) for d in docs[:size]]
            for q, docs in zip(self.work.queries, self.work.candidates, strict=True)
        ]
        if not self.smoke:
            for request in requests:
                score(request)
        rounds = 1 if self.smoke else 2
        return [
            timed(lambda r=r: score(r), self.device) * 1e3 for _ in range(rounds) for r in requests
        ]

    def guarded(self, table: list[Row], name: str, fn: Callable[[], Row | None]) -> None:
        # a row that hangs leaves Python stacks in the log
        faulthandler.dump_traceback_later(150, repeat=True)
        try:
            self._guarded(table, name, fn)
        finally:
            faulthandler.cancel_dump_traceback_later()

    def _guarded(self, table: list[Row], name: str, fn: Callable[[], Row | None]) -> None:
        elapsed = time.perf_counter() - self.started
        if self.args.time_budget and elapsed > self.args.time_budget:
            table.append(Row(system=name, note=f"skipped: time budget spent ({elapsed:.0f} s)"))
            self.write()
            return
        try:
            row = fn()
        except Exception as err:
            log.error("%s failed:\n%s", name, traceback.format_exc())
            row = Row(system=name, note=f"failed: {type(err).__name__}: {str(err)[:160]}")
        if row is not None:
            table.append(row)
        free(self.device)
        self.write()

    # ------------------------------------------------------------------------ systems
    def crossrank(self, model: Path, dtype: str, fast_path: bool | PackedOptions) -> Reranker:
        return Reranker(str(model), device=str(self.device), dtype=dtype, fast_path=fast_path)

    def run(self) -> None:
        self.environment()
        with tempfile.TemporaryDirectory() as tmp:
            model = self.build_model(Path(tmp))
            self.run_all(model)

    def run_all(self, model: Path) -> None:
        device, smoke = self.device, self.smoke
        fp = "float32" if smoke else "float16"
        queries = [q for q, _ in self.pairs]
        docs = [d for _, d in self.pairs]

        # the reference: padded fp32 transformers forward
        ref = Reranker(str(model), device=str(device), dtype="float32", fast_path=False)
        self.config = ref.model.config
        self.reference = ref.score_pairs(self.pairs, normalize=False).astype(np.float64)
        encoded = ref.encode(queries, docs)
        self.lengths = encoded.lengths
        self.facts["pairs"] = len(self.pairs)
        self.facts["mean_tokens_per_pair"] = round(float(encoded.lengths.mean()), 1)
        tok = []
        for size in (self.work.per_query, len(self.pairs)):
            times = [
                timed(lambda s=size, r=ref: r.encode(queries[:s], docs[:s]), device)
                for _ in range(5)
            ]
            tok.append(round(statistics.median(times) * 1e3, 1))
        self.facts["tokenize_ms_1x50"], self.facts["tokenize_ms_bulk"] = tok
        del ref
        free(device)
        if self.args.scan_init and not smoke:
            self.scan_init([float(v) for v in self.args.scan_init.split(",")])
        if self.args.micro and not smoke:
            try:
                self.micro(encoded)
            except Exception:
                log.error("micro failed:\n%s", traceback.format_exc())
            free(device)
        if self.args.profile and not smoke:
            try:
                self.profile(model, encoded)
            except Exception:
                log.error("profile failed:\n%s", traceback.format_exc())
            free(device)

        # ---- crossrank as shipped (fast path auto) and the padded engine path
        fast_on = True if smoke else None  # on CPU the packed runner is forced for the smoke run
        self.guarded(
            self.rows,
            f"crossrank ({fp}, fast path)",
            lambda: self.measure(
                f"crossrank ({fp}, fast path)", self._scorer(self.crossrank(model, fp, fast_on))
            ),
        )
        if self.args.crossrank_only:
            return
        main_only = self.args.main_only
        if not main_only:
            self.guarded(
                self.rows,
                f"crossrank ({fp}, padded, fast_path=False)",
                lambda: self.measure(
                    f"crossrank ({fp}, padded, fast_path=False)",
                    self._scorer(self.crossrank(model, fp, False)),
                ),
            )
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        if gpus >= 2 and not smoke:  # one process, one replica per GPU (issue 7's multi-GPU)
            devices = [f"cuda:{i}" for i in range(gpus)]
            name = f"crossrank ({fp}, fast path, device={devices})"
            self.guarded(
                self.rows,
                name,
                lambda: self.measure(
                    name, self._scorer(Reranker(str(model), device=devices, dtype=fp))
                ),
            )
        # ---- peers
        self.guarded(
            self.rows, "FlagEmbedding FlagReranker fp16, batch 128", lambda: self.flag(model)
        )
        for batch in (128,) if main_only else (32, 128):
            self.guarded(
                self.rows,
                f"sentence-transformers CrossEncoder fp16, batch {batch}",
                lambda b=batch: self.cross_encoder(model, b),
            )
        if main_only:  # crossrank and its peers only: runs that compare settings
            return
        # ---- model-only rates (no tokenization)
        self.guarded(
            self.rows,
            "transformers forward only, length-sorted, padded",
            lambda: self.hf_forward_only(model, encoded),
        )
        self.guarded(
            self.rows,
            "crossrank packed runner only (pre-tokenized)",
            lambda: self.runner_only(model, encoded),
        )
        # ---- one step at a time
        self.ablate(model, fp)

    def _scorer(self, reranker: Reranker) -> ScoreFn:
        def score(pairs: Pairs) -> np.ndarray:
            if len({q for q, _ in pairs}) == 1:  # one request: the score() front door
                return reranker.score(pairs[0][0], [d for _, d in pairs], normalize=False)
            return reranker.score_pairs(pairs, normalize=False)

        return score

    def flag(self, model: Path) -> Row:
        from FlagEmbedding import FlagReranker

        use_fp16 = not self.smoke
        device = f"cuda:{self.device.index or 0}" if self.device.type == "cuda" else "cpu"
        reranker = FlagReranker(
            str(model), use_fp16=use_fp16, devices=[device], batch_size=128, max_length=512
        )

        def score(pairs: Pairs) -> np.ndarray:
            out = reranker.compute_score(
                [list(p) for p in pairs], batch_size=128, max_length=512, normalize=False
            )
            return np.atleast_1d(np.asarray(out, dtype=np.float64))

        return self.measure("FlagEmbedding FlagReranker fp16, batch 128", score)

    def cross_encoder(self, model: Path, batch: int) -> Row:
        from sentence_transformers import CrossEncoder

        dtype = torch.float32 if self.smoke else torch.float16
        encoder = CrossEncoder(
            str(model), device=str(self.device), max_length=512, model_kwargs={"dtype": dtype}
        )
        identity = torch.nn.Identity()

        def score(pairs: Pairs) -> np.ndarray:
            out = encoder.predict(
                pairs,
                batch_size=batch,
                activation_fn=identity,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            return np.asarray(out, dtype=np.float64).reshape(-1)

        return self.measure(f"sentence-transformers CrossEncoder fp16, batch {batch}", score)

    def hf_forward_only(self, model: Path, encoded: Any) -> Row:
        """Plain transformers forward (SDPA), length-sorted batches of 128, inputs on device."""
        from transformers import AutoModelForSequenceClassification

        dtype = torch.float32 if self.smoke else torch.float16
        hf = (
            AutoModelForSequenceClassification.from_pretrained(
                str(model), dtype=dtype, attn_implementation="sdpa"
            )
            .to(self.device)
            .eval()
        )
        order = np.argsort(-encoded.lengths, kind="stable")
        batches = []
        for start in range(0, len(order), 128):
            rows = order[start : start + 128]
            tensors = encoded.padded(rows, int(hf.config.pad_token_id))
            batches.append(
                (rows, {k: torch.from_numpy(v).to(self.device) for k, v in tensors.items()})
            )
        out = np.empty(len(encoded), dtype=np.float64)

        def run() -> None:
            with torch.inference_mode():
                for rows, inputs in batches:
                    out[rows] = hf(**inputs).logits[:, 0].float().cpu().numpy()

        def score(pairs: Pairs) -> np.ndarray:
            run()
            return out.copy()

        return self.measure(
            "transformers forward only, length-sorted, padded SDPA, batch 128",
            score,
            latency=False,
            note="no tokenization",
        )

    def runner_only(self, model: Path, encoded: Any) -> Row:
        from crossrank.batching import plan_batches

        reranker = self.crossrank(model, "float32" if self.smoke else "float16", True)
        runner = reranker.runner
        batches = plan_batches(encoded.lengths, reranker.batch_tokens, packed=True)
        parts = [(rows, encoded.take(rows)) for rows in batches]
        out = np.empty(len(encoded), dtype=np.float64)

        def score(pairs: Pairs) -> np.ndarray:
            for rows, part in parts:
                out[rows] = runner.run(part)[:, 0]
            return out.copy()

        row = self.measure(
            "crossrank packed runner only (pre-tokenized)",
            score,
            latency=False,
            note="no tokenization",
        )
        sizes = [(self.work.per_query, "p50_50", "p99_50")]
        if not self.smoke:
            sizes.append((2 * self.work.per_query, "p50_100", "p99_100"))
        for size, p50, p99 in sizes:
            requests = [
                reranker.encode([q] * size, docs[:size])
                for q, docs in zip(self.work.queries, self.work.candidates, strict=False)
            ]
            for request in requests:
                runner.run(request)
            lat = [
                timed(lambda r=r: runner.run(r), self.device) * 1e3
                for _ in range(1 if self.smoke else 2)
                for r in requests
            ]
            setattr(row, p50, percentile(lat, 50))
            setattr(row, p99, percentile(lat, 99))
        return row

    def ablate(self, model: Path, fp: str) -> None:
        """Each fast-path step measured on its own, one engine per step."""

        plain = PackedOptions(cuda_graphs=False, gelu_epilogue=False, fuse_residual=False)
        # overlap: None = tokenize the whole call, then score; "large" = chunked tokenization
        # overlapped with the GPU above 128 pairs only; "all" = the engine's default
        steps: list[tuple[str, str, PackedOptions, str | None]] = [
            ("packed, eager, exact GELU, no overlap", fp, plain, None),
        ]
        if not self.smoke:
            no_graphs = PackedOptions(cuda_graphs=False)
            steps += [
                (
                    "+ GELU epilogue",
                    fp,
                    PackedOptions(cuda_graphs=False, fuse_residual=False),
                    None,
                ),
                ("+ residual add inside the matmul", fp, no_graphs, None),
                ("+ CUDA graphs up to 4096 tokens", fp, PackedOptions(), None),
                ("+ tokenization overlap above 128 pairs", fp, PackedOptions(), "large"),
                (
                    "+ 12-pair first chunk above 32 pairs (= default)",
                    fp,
                    PackedOptions(),
                    "all",
                ),
                ("default, bf16", "bfloat16", PackedOptions(), "all"),
            ]
        for name, dtype, options, overlap in steps:

            def one(
                name: str = name,
                dtype: str = dtype,
                options: PackedOptions = options,
                overlap: str | None = overlap,
            ) -> Row:
                free(self.device)
                reranker = Reranker(
                    str(model),
                    device=str(self.device),
                    dtype=dtype,
                    fast_path=options,
                    **OVERLAP_SETTINGS[overlap],
                )
                row = self.measure(f"{name} [{dtype}]", self._scorer(reranker))
                row.extra["runner_stats"] = asdict(reranker.runner.stats)  # type: ignore[attr-defined]
                reranker.close()
                return row

            self.guarded(self.ablation, name, one)

    def scan_init(self, values: list[float]) -> None:
        """Per-query Kendall tau of the plain transformers forward in fp16/bf16 against fp32,
        for random models of several init ranges: which random model has rankings that fp16
        rounding does not flip (a trained reranker's scores are far apart)."""
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        skeleton = self.shared / SKELETON
        tokenizer = AutoTokenizer.from_pretrained(skeleton)
        order = sorted(range(len(self.pairs)), key=lambda i: len(self.pairs[i][1]))
        batches = []
        for start in range(0, len(order), 128):
            rows = order[start : start + 128]
            enc = tokenizer(
                [self.pairs[i][0] for i in rows],
                [self.pairs[i][1] for i in rows],
                truncation="only_second",
                max_length=512,
                padding=True,
                return_tensors="pt",
            )
            batches.append((rows, {k: v.to(self.device) for k, v in enc.items()}))
        per_query = self.work.per_query
        results = {}
        for value in values:
            config = AutoConfig.from_pretrained(skeleton, initializer_range=value)
            torch.manual_seed(0)
            with torch.device(self.device):
                model = AutoModelForSequenceClassification.from_config(config).eval()
            scores: dict[str, np.ndarray] = {}
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                cast = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
                out = np.empty(len(self.pairs))
                with torch.inference_mode():
                    for rows, inputs in batches:
                        out[rows] = cast(**inputs).logits[:, 0].float().cpu().numpy()
                scores[str(dtype).split(".")[-1]] = out
                del cast
            ref = scores["float32"]
            entry: dict[str, Any] = {"score_std": float(ref.std())}
            for name in ("float16", "bfloat16"):
                taus = [
                    kendall_tau(ref[i : i + per_query], scores[name][i : i + per_query])
                    for i in range(0, len(ref), per_query)
                ]
                entry[name] = {
                    "min_tau": round(min(taus), 4),
                    "fails": int(sum(t < 0.99 for t in taus)),
                    "max_diff": float(np.abs(scores[name] - ref).max()),
                }
            results[str(value)] = entry
            log.info("init scan %s: %s", value, json.dumps(entry))
            del model
            free(self.device)
        self.facts["init_scan"] = results

    def micro(self, encoded: Any) -> None:
        """Attention backends, LayerNorm and tokenizer paths on their own (into facts)."""
        from crossrank.backends.packed import varlen_attention
        from crossrank.batching import plan_batches

        facts: dict[str, Any] = {}
        dev = self.device

        def bench(fn: Callable[[], Any], reps: int = 20) -> float:
            for _ in range(3):
                fn()
            times = []
            for _ in range(reps):
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return round(statistics.median(times), 3)

        rows = plan_batches(encoded.lengths, 65536, packed=True)[0]
        lengths = encoded.lengths[rows]
        cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=dev)
        t, m = int(lengths.sum()), int(lengths.max())
        qkv = torch.randn(t, 3, 16, 64, device=dev, dtype=torch.float16)
        q, k, v = qkv.unbind(1)
        ref = varlen_attention(q, k, v, cu, cu, m, m, 0.125)
        for name, fn in (
            ("flash strided", lambda: varlen_attention(q, k, v, cu, cu, m, m, 0.125)),
            (
                "flash contiguous copies",
                lambda: varlen_attention(
                    q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, m, m, 0.125
                ),
            ),
            (
                "cudnn strided",
                lambda: torch.ops.aten._cudnn_attention_forward(
                    q, k, v, None, cu, cu, m, m, False, 0.0, False, False, scale=0.125
                )[0],
            ),
        ):
            try:
                out = fn()
                facts[f"attention {name} ms"] = bench(fn)
                facts[f"attention {name} max diff"] = float((out.float() - ref.float()).abs().max())
            except Exception as err:
                facts[f"attention {name}"] = f"failed: {type(err).__name__}: {str(err)[:200]}"
        facts["attention tokens"] = t
        x = torch.randn(t, 1024, device=dev, dtype=torch.float16)
        w = torch.randn(1024, device=dev, dtype=torch.float16)
        b = torch.randn(1024, device=dev, dtype=torch.float16)
        facts["layer_norm eager ms"] = bench(
            lambda: torch.nn.functional.layer_norm(x, (1024,), w, b)
        )
        try:
            compiled = torch.compile(torch.nn.functional.layer_norm, dynamic=True)
            out = compiled(x, (1024,), w, b)
            facts["layer_norm compiled ms"] = bench(lambda: compiled(x, (1024,), w, b))
            facts["layer_norm compiled max diff"] = float(
                (out.float() - torch.nn.functional.layer_norm(x, (1024,), w, b).float()).abs().max()
            )
        except Exception as err:
            facts["layer_norm compiled"] = f"failed: {type(err).__name__}: {str(err)[:200]}"
        # tokenizer paths
        from transformers import AutoTokenizer

        from crossrank.tokenization import PairTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.shared / SKELETON)
        pair_tok = PairTokenizer(tokenizer, max_length=512, query_max_length=384)
        backend = tokenizer.backend_tokenizer
        for n in (50, len(self.pairs)):
            qs = [p[0] for p in self.pairs[:n]]
            ds = [p[1] for p in self.pairs[:n]]

            def raw(fast: bool, qs: list[str] = qs, ds: list[str] = ds) -> list[list[int]]:
                backend.enable_truncation(512, strategy="only_second")
                backend.no_padding()
                call = backend.encode_batch_fast if fast else backend.encode_batch
                return [e.ids for e in call(list(zip(qs, ds, strict=True)))]

            enc = pair_tok.encode(qs, ds)
            expected = [
                enc.ids[o : o + n_].tolist() for o, n_ in zip(enc.offsets, enc.lengths, strict=True)
            ]
            for name, fn in (
                ("PairTokenizer.encode", lambda qs=qs, ds=ds: pair_tok.encode(qs, ds)),
                ("backend encode_batch + ids", lambda: raw(False)),
                ("backend encode_batch_fast + ids", lambda: raw(True)),
            ):
                times = []
                for _ in range(7):
                    start = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - start)
                facts[f"tokenize {n} {name} ms"] = round(statistics.median(times) * 1e3, 2)
            facts[f"tokenize {n} backend ids equal"] = (
                raw(False) == expected and raw(True) == expected
            )
        self.facts["micro"] = facts
        log.info("micro: %s", json.dumps(facts, indent=1))

    def profile(self, model: Path, encoded: Any) -> None:
        """Top CUDA kernels of one bulk pass and of one 1x50 pass (eager), into the log."""
        from torch.profiler import ProfilerActivity, profile

        from crossrank.batching import plan_batches

        reranker = self.crossrank(model, "float16", True)
        runner = reranker.runner
        big = encoded.take(plan_batches(encoded.lengths, reranker.batch_tokens, packed=True)[0])
        small = encoded.take(np.arange(self.work.per_query))
        eager = PackedRunner(reranker.model, reranker.device, PackedOptions(cuda_graphs=False))
        for label, run, part in (("bulk pass", runner, big), ("1x50 eager", eager, small)):
            for _ in range(3):
                run.run(part)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run.run(part)
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14)
            log.info("profile %s (%d tokens):\n%s", label, part.total_tokens, table)

    # ------------------------------------------------------------------------ output
    def write(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(self.markdown(), encoding="utf-8")
        if self.args.json:
            payload = {
                "facts": self.facts,
                "rows": [asdict(r) for r in self.rows],
                "ablation": [asdict(r) for r in self.ablation],
            }
            Path(self.args.json).write_text(json.dumps(payload, indent=1), encoding="utf-8")

    def markdown(self) -> str:
        f = self.facts
        lines = [
            "# GPU benchmark: crossrank vs FlagEmbedding vs sentence-transformers",
            "",
            "Generated by `benchmarks/gpu_peers.py`"
            + (" (CPU smoke run: tiny model, timings meaningless)" if self.smoke else "")
            + ".",
            "",
            f"Device: {f.get('gpu', 'cpu')} ({f.get('gpu_memory_gib', '-')} GiB, capability "
            f"{f.get('capability', '-')}), {f.get('cpu_count')} CPU cores; torch {f.get('torch')}, "
            f"transformers {f.get('transformers')}, sentence-transformers "
            f"{f.get('sentence_transformers')}, FlagEmbedding {f.get('FlagEmbedding')}; measured "
            f"fp16 matmul peak {f.get('fp16_matmul_peak_tflops', '-')} TFLOP/s.",
            "",
            f"Workload: {f.get('pairs')} pairs, {f.get('mean_tokens_per_pair')} tokens per pair on "
            f"average; tokenization alone (crossrank, one batched call): "
            f"{f.get('tokenize_ms_1x50')} ms for 1x50, {f.get('tokenize_ms_bulk')} ms for all "
            "pairs.",
            "",
            *self.table(self.rows),
            "",
            "## The fast path, one step at a time",
            "",
            *self.table(self.ablation),
            "",
            *self.scan_lines(),
            "## Method",
            "",
            __doc__.split("\n\n    python")[0].strip(),
            "",
            "p50/p99 are over 80 timed requests (each of the 40 questions twice) after one untimed "
            "round of the same 40 requests; bulk is the median of 3 calls after one warm-up call (which also "
            "gives the scores checked). Each system is loaded fresh and its GPU memory peak "
            "counted from its load. max |diff| compares raw logits with the padded fp32 "
            "reference; min tau is the lowest per-query Kendall tau (fails = queries below 0.99).",
            "",
            "Command:",
            "",
            "```",
            self.args.command,
            "```",
            "",
        ]
        return "\n".join(lines)

    def scan_lines(self) -> list[str]:
        scan = self.facts.get("init_scan")
        if not scan:
            return []
        lines = [
            "## Random-model rankings vs precision",
            "",
            "Per-query Kendall tau of the plain transformers forward in fp16/bf16 against fp32 "
            "(random models of several `initializer_range`s, same workload):",
            "",
            "| init range | score std | fp16 min tau (fails) | fp16 max diff "
            "| bf16 min tau (fails) | bf16 max diff |",
            "|---|---|---|---|---|---|",
        ]
        for value, e in scan.items():
            h, b = e["float16"], e["bfloat16"]
            lines.append(
                f"| {value} | {e['score_std']:.3g} | {h['min_tau']} ({h['fails']}) | "
                f"{h['max_diff']:.2e} | {b['min_tau']} ({b['fails']}) | {b['max_diff']:.2e} |"
            )
        return [*lines, ""]

    @staticmethod
    def table(rows: list[Row]) -> list[str]:
        def num(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        out = [
            "| system | pairs/s | 1x50 p50 / p99 ms | 1x100 p50 / p99 ms | GPU mem GiB | MFU "
            "| max abs diff | min tau (fails) | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            tau = "-" if r.min_tau is None else f"{r.min_tau:.4f} ({r.tau_fail})"
            out.append(
                f"| {r.system} | {num(r.pairs_per_s, '.0f')} | {num(r.p50_50, '.1f')} / "
                f"{num(r.p99_50, '.1f')} | {num(r.p50_100, '.1f')} / {num(r.p99_100, '.1f')} | "
                f"{num(r.mem_gib, '.2f')} | {num(r.mfu, '.2f')} | {num(r.max_diff, '.2e')} | "
                f"{tau} | {r.note} |"
            )
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", help="folder with models/ and data/xquad-r (default ../shared)")
    parser.add_argument("--out", default=str(ROOT / "docs/benchmarks-gpu.md"))
    parser.add_argument("--json", help="also write all numbers as JSON here")
    parser.add_argument("--device", default=None)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, seconds")
    parser.add_argument(
        "--init-range",
        type=float,
        default=None,
        help="initializer_range of the random model (default: the config's)",
    )
    parser.add_argument(
        "--scan-init",
        default="",
        help="comma-separated init ranges: fp16/bf16 vs fp32 ranking agreement",
    )
    parser.add_argument("--profile", action="store_true", help="log the top CUDA kernels")
    parser.add_argument(
        "--micro",
        action="store_true",
        help="attention backends, LayerNorm and tokenizer paths on their own",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=0,
        help="skip the remaining systems once this many seconds have passed",
    )
    parser.add_argument(
        "--main-only",
        action="store_true",
        help="crossrank (fast path), FlagReranker and CrossEncoder batch 128 only: no padded "
        "engine row, model-only rows or ablation (for comparing environments in one lease)",
    )
    parser.add_argument(
        "--crossrank-only",
        action="store_true",
        help="the crossrank fast-path row only (settings compared where the peers were "
        "already measured)",
    )
    parser.add_argument(
        "--workload",
        choices=("xquad", "longdocs"),
        default="xquad",
        help="xquad: XQuAD-R paragraphs; longdocs: 3-10 of them joined per document",
    )
    parser.add_argument(
        "--tokenizers-parallelism",
        choices=("default", "off"),
        default="default",
        help="off: run everything (crossrank and the peers) in a child process with "
        "TOKENIZERS_PARALLELISM=false, as many RAG applications and forked workers do",
    )
    args = parser.parse_args(argv)
    if args.tokenizers_parallelism == "off" and os.environ.get("TOKENIZERS_PARALLELISM") != "false":
        child = [
            sys.executable,
            str(Path(__file__).resolve()),
            *(argv if argv is not None else sys.argv[1:]),
        ]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        return subprocess.run(child, env=env, check=False).returncode
    args.command = "python benchmarks/gpu_peers.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    if args.device is None:
        args.device = "cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    bench = Bench(args)
    bench.run()
    bench.write()
    print("\n".join([*bench.table(bench.rows), "", *bench.table(bench.ablation)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
