"""LLM (decoder) rerankers on one GPU: crossrank against the peers, text in -> scores out.

Job: measure crossrank on random weights of the Qwen3-Reranker-0.6B shape (and the 4B shape
with ``--shapes 0.6b,4b,gemma``) and of the bge-reranker-v2-gemma shape, bf16, on the
XQuAD-R workload (40 questions x 50 paragraphs from ``--shared``), next to the model card's
transformers recipe (left-padded batches, logits of every position, then the last), the best
plain-transformers variant (length-sorted batches of 64, ``logits_to_keep=1``),
sentence-transformers ``CrossEncoder`` on a seq-cls conversion of the same weights, and, for
the gemma shape, FlagEmbedding's ``FlagLLMReranker`` (skipped, saying why, when absent).
Reports bulk pairs/s, 1x50 p50/p99 ms and MFU over the tokens each system computes, as a
markdown table, and for crossrank the largest raw-score difference to the float32 padded
reference runner (one bulk call and four 1xN calls: eager passes and graph replays) beside that
of the padded runner in the benchmark dtype: the fast path's correctness check on the GPU. The Qwen tokenizer is built from dashscope's ``qwen.tiktoken``; on a machine
without dashscope pass a prebuilt one with ``--tokenizer-dir`` (``build_qwen_tokenizer``).

Run: ``python benchmarks/gpu_llm.py --shared /path/shared --tokenizer-dir qwen-tokenizer``
(< 8 minutes on one H200); ``--quick`` is the CPU smoke run of the tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_peers import (
    Row,
    free,
    load_workload,
    measure_peak,
    percentile,
    timed,
)

from crossrank import Reranker
from crossrank.backends.decoder import QWEN3, QWEN3_PREFIX, QWEN3_SUFFIX
from crossrank.testing import (
    BGE_RERANKER_GEMMA_CONFIG,
    QWEN3_RERANKER_0_6B_CONFIG,
    TINY_DECODER_CONFIG,
    build_qwen_tokenizer,
    build_random_decoder_reranker,
    shared_dir,
)

log = logging.getLogger("gpu_llm")
Pairs = list[tuple[str, str]]
#: Qwen3-Reranker-4B's shape (its config.json on the Hub): the 0.6B config otherwise.
QWEN3_4B = {
    "hidden_size": 2560,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 9728,
    "head_dim": 128,
}
SHAPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "0.6b": (QWEN3_RERANKER_0_6B_CONFIG, {}),
    "4b": (QWEN3_RERANKER_0_6B_CONFIG, QWEN3_4B),
    "gemma": (BGE_RERANKER_GEMMA_CONFIG, {}),
}


def linear_flops_per_token(config: Any) -> float:
    """Matmul FLOPs per token of a GQA decoder with a gated MLP (attention scores aside)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return 2.0 * layers * (h * (q + 2 * kv) + q * h + 3 * h * inter)


def build_model(kind: str, tokenizer_dir: Path, root: Path, quick: bool) -> Path:
    base, overrides = SHAPES[kind]
    tokenizer = tokenizer_dir
    if kind == "gemma":  # the Qwen vocabulary plus a <bos> (see tests/backends/llm_assets.py)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        tok.add_special_tokens({"bos_token": "<bos>"})
        tokenizer = root / "bos-tokenizer"
        tok.save_pretrained(tokenizer)
    if quick:
        overrides = {
            **TINY_DECODER_CONFIG,
            **({"num_key_value_heads": 1} if kind == "gemma" else {}),
        }
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if quick else torch.bfloat16)  # halves the write
    # random initialization on the GPU: a 4B model takes minutes on the host's cores
    device = "cuda" if torch.cuda.is_available() and not quick else "cpu"
    try:
        with torch.device(device):
            return build_random_decoder_reranker(root / kind, tokenizer, base, **overrides)
    finally:
        torch.set_default_dtype(before)


class LlmBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.quick = args.quick
        self.device = torch.device(args.device or ("cpu" if args.quick else "cuda"))
        self.dtype = torch.float32 if args.quick else torch.bfloat16
        shared = Path(args.shared) if args.shared else shared_dir()
        if shared is None:
            raise SystemExit("no --shared folder with data/xquad-r")
        per_lang, per_query = (1, 4) if args.quick else (20, 50)
        self.work = load_workload(shared, per_lang, per_query, per_query)
        self.bulk = self.work.bulk
        self.repeats = 1 if args.quick else args.repeats
        self.peak = measure_peak(self.device)
        self.rows: list[Row] = []
        self.out = args.out
        self.parity_sets: list[Pairs] = []
        self.ref32: Any = None
        self.padded_diff = float("nan")

    # ------------------------------------------------------------------ measuring
    def measure(self, name: str, score: Callable[[Pairs], Any], tokens: Callable[[], int]) -> Row:
        """Bulk pairs/s (best of ``repeats``), then 1xN latency over every question, after one
        untimed run of the same requests (as ``load.py`` warms both its sides)."""
        free(self.device)
        score(self.bulk[: self.work.per_query])  # warm-up: one 1xN request (CUDA graphs)
        score(self.bulk[:8])
        bulk = min(timed(lambda: score(self.bulk), self.device) for _ in range(self.repeats))
        computed = tokens()
        requests = [
            [(query, d) for d in docs[: self.work.per_query]]
            for query, docs in zip(self.work.queries, self.work.candidates, strict=True)
        ]
        for pairs in requests:  # steady state: each new pass shape captures its CUDA graph
            score(pairs)
        latencies = [1e3 * timed(lambda p=pairs: score(p), self.device) for pairs in requests]
        row = Row(name, pairs_per_s=len(self.bulk) / bulk)
        row.p50_50, row.p99_50 = percentile(latencies, 50), percentile(latencies, 99)
        if self.device.type == "cuda":
            row.mem_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        row.extra["tokens"] = computed
        self.rows.append(row)
        log.info("%s: %.0f pairs/s, p50 %.1f ms", name, row.pairs_per_s, row.p50_50)
        return row

    def mfu(self, row: Row, config: Any) -> None:
        if self.peak and row.pairs_per_s:
            seconds = len(self.bulk) / row.pairs_per_s
            row.mfu = linear_flops_per_token(config) * row.extra["tokens"] / seconds / self.peak

    # ------------------------------------------------------------------- systems
    def guarded(self, name: str, fn: Callable[[], Any]) -> None:
        """Run one system; a failure becomes a row saying why, and the next system runs."""
        try:
            fn()
        except Exception as err:
            log.exception("%s failed", name)
            self.rows.append(Row(name, note=f"failed: {type(err).__name__}: {str(err)[:160]}"))
        free(self.device)
        self.write()

    def write(self) -> None:
        """The table so far, to ``--out`` (a run stopped at its time limit keeps its rows)."""
        if self.out:
            Path(self.out).write_text(self.table() + "\n", encoding="utf-8")

    def references(self, model_dir: Path) -> None:
        """Raw scores (``normalize=False``) of the padded reference runner in float32 and in
        the benchmark dtype, on one bulk call and on 1xN calls: what the fast path's
        agreement is judged against (in the row's note)."""
        self.parity_sets = [self.bulk[:200]] + [
            [(q, d) for d in docs[: self.work.per_query]]
            for q, docs in list(zip(self.work.queries, self.work.candidates, strict=True))[:4]
        ]
        self.ref32 = self.raw_scores(model_dir, torch.float32, False)
        padded = self.raw_scores(model_dir, self.dtype, False)
        self.padded_diff = float(np.max(np.abs(padded - self.ref32)))

    def raw_scores(self, model_dir: Path, dtype: torch.dtype, fast_path: bool | None) -> Any:
        engine = Reranker(str(model_dir), device=str(self.device), dtype=dtype, fast_path=fast_path)
        try:
            return self.parity_scores(engine)
        finally:
            engine.close()
            free(self.device)

    def parity_scores(self, engine: Reranker) -> Any:
        return np.concatenate(
            [engine.score_pairs(p, normalize=False).ravel() for p in self.parity_sets]
        ).astype(np.float64)

    def crossrank(
        self, model_dir: Path, label: str, share_prefix: bool = True, prefix_kernel: bool = True
    ) -> Row:
        engine = Reranker(str(model_dir), device=str(self.device), dtype=self.dtype)
        runner = engine.runner
        if hasattr(runner, "share_prefix"):
            runner.share_prefix = share_prefix
            runner.prefix_kernel = runner.prefix_kernel and prefix_kernel
        elif not share_prefix or not prefix_kernel:
            raise RuntimeError("the padded reference runner has no shared prefix to turn off")
        stats = getattr(runner, "stats", None)
        start = [0]

        def score(pairs: Pairs) -> Any:
            if stats is not None:
                start[0] = stats.tokens_computed
            return engine.score_pairs(pairs)

        def tokens() -> int:
            if stats is not None:
                return int(stats.tokens_computed - start[0])
            encoded = engine.encode([q for q, _ in self.bulk], [d for _, d in self.bulk])
            return encoded.total_tokens

        suffix = "" if share_prefix else ", no shared prefix"
        if getattr(runner, "prefix_kernel", True) is False:
            suffix += ", varlen attention on gathered keys"
        name = f"crossrank {label} ({runner.__class__.__name__}{suffix})"
        diff = None
        if self.ref32 is not None:
            diff = float(np.max(np.abs(self.parity_scores(engine) - self.ref32)))
        row = self.measure(name, score, tokens)
        if diff is not None:
            row.max_diff = diff
            row.note = (
                f"max raw-score diff to the fp32 padded reference {diff:.3g} "
                f"(padded {str(self.dtype).removeprefix('torch.')}: {self.padded_diff:.3g})"
            )
        self.mfu(row, engine.model.config if engine.model is not None else None)
        engine.close()
        return row

    def transformers_rows(self, model_dir: Path, label: str) -> None:
        """The model card's recipe and the best plain variant (Qwen3 prompt)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        model = (
            AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=self.dtype, attn_implementation="sdpa"
            )
            .to(self.device)
            .eval()
        )
        prefix = tok.encode(QWEN3_PREFIX, add_special_tokens=False)
        suffix = tok.encode(QWEN3_SUFFIX, add_special_tokens=False)
        yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
        instruction = QWEN3.default_instruction
        computed = [0]

        def run(pairs: Pairs, keep_one: bool) -> np.ndarray:
            texts = [f"<Instruct>: {instruction}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
            enc = tok(texts, truncation=True, max_length=512 - len(prefix) - len(suffix))
            enc["input_ids"] = [prefix + ids + suffix for ids in enc["input_ids"]]
            enc["attention_mask"] = [[1] * len(ids) for ids in enc["input_ids"]]
            inputs = tok.pad(enc, padding=True, return_tensors="pt").to(self.device)
            computed[0] += int(inputs["input_ids"].numel())
            with torch.inference_mode():
                extra = {"logits_to_keep": 1} if keep_one else {}
                last = model(**inputs, **extra).logits[:, -1, :]
                return (last[:, yes] - last[:, no]).float().cpu().numpy()

        def card(pairs: Pairs) -> np.ndarray:
            return np.concatenate([run(pairs[i : i + 16], False) for i in range(0, len(pairs), 16)])

        def sorted64(pairs: Pairs) -> np.ndarray:
            order = np.argsort([len(q) + len(d) for q, d in pairs])
            out = np.empty(len(pairs), np.float32)
            for i in range(0, len(pairs), 64):
                rows = order[i : i + 64]
                out[rows] = run([pairs[j] for j in rows], True)
            return out

        for name, fn in (
            ("model card recipe (batch 16)", card),
            ("sorted batches of 64, logits_to_keep=1", sorted64),
        ):

            def tokens(fn: Callable[[Pairs], np.ndarray] = fn) -> int:
                computed[0] = 0
                fn(self.bulk)
                return computed[0]

            row = self.measure(f"transformers {label}: {name}", fn, tokens)
            self.mfu(row, model.config)

    def sentence_transformers_row(self, model_dir: Path, label: str, root: Path) -> None:
        """``CrossEncoder`` on a seq-cls conversion: score head = LM rows yes - no."""
        try:
            from sentence_transformers import CrossEncoder
        except ImportError as err:
            self.rows.append(Row(f"sentence-transformers {label}", note=f"skipped: {err}"))
            return
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        tok = AutoTokenizer.from_pretrained(model_dir)
        causal = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype)
        yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
        config = causal.config
        config.architectures, config.num_labels = ["Qwen3ForSequenceClassification"], 1
        seq = AutoModelForSequenceClassification.from_config(config, dtype=self.dtype)
        seq.model.load_state_dict(causal.model.state_dict())
        head = causal.get_output_embeddings().weight
        seq.score.weight.data.copy_((head[yes] - head[no])[None])
        out = root / f"{label}-seq-cls"
        seq.save_pretrained(out)
        tok.save_pretrained(out)
        del causal, seq
        encoder = CrossEncoder(
            str(out),
            device=str(self.device),
            max_length=512,
            model_kwargs={"torch_dtype": self.dtype},
        )
        head_text = f"{QWEN3_PREFIX}<Instruct>: {QWEN3.default_instruction}\n<Query>: "

        def score(pairs: Pairs) -> np.ndarray:
            texts = [(f"{head_text}{q}\n", f"<Document>: {d}{QWEN3_SUFFIX}") for q, d in pairs]
            return encoder.predict(texts, batch_size=64, show_progress_bar=False)

        def tokens() -> int:
            return sum(len(tok(q + d)["input_ids"]) + 70 for q, d in self.bulk)

        row = self.measure(f"sentence-transformers CrossEncoder {label} (seq-cls)", score, tokens)
        row.note = "MFU on real tokens (padding not counted)"
        self.mfu(row, config)

    def flag_row(self, model_dir: Path) -> None:
        try:
            from FlagEmbedding import FlagLLMReranker
        except ImportError as err:
            self.rows.append(Row("FlagEmbedding FlagLLMReranker gemma", note=f"skipped: {err}"))
            return
        reranker = FlagLLMReranker(str(model_dir), use_bf16=True, devices=[str(self.device)])

        def score(pairs: Pairs) -> Any:
            return reranker.compute_score([list(p) for p in pairs], batch_size=64, max_length=512)

        self.measure("FlagEmbedding FlagLLMReranker gemma", score, lambda: 0)

    def shape(self, kind: str, model_dir: Path, root: Path, args: argparse.Namespace) -> None:
        """Every system on one model shape; the peers only for shapes named in ``--peers``."""
        label = kind if not args.quick else f"{kind} (tiny)"
        self.ref32 = None
        if kind in args.parity.split(","):
            self.guarded(f"padded references {label}", lambda: self.references(model_dir))
        self.guarded(f"crossrank {label}", lambda: self.crossrank(model_dir, label))
        if self.device.type == "cuda" and kind in args.ablation.split(","):
            self.guarded(
                f"crossrank {label}, no shared prefix",
                lambda: self.crossrank(model_dir, label, share_prefix=False),
            )
            self.guarded(
                f"crossrank {label}, flash varlen",
                lambda: self.crossrank(model_dir, label, prefix_kernel=False),
            )
        if kind not in args.peers.split(","):
            return
        if kind == "gemma":
            self.guarded("FlagLLMReranker", lambda: self.flag_row(model_dir))
            return
        self.guarded("transformers", lambda: self.transformers_rows(model_dir, label))
        self.guarded(
            "sentence-transformers",
            lambda: self.sentence_transformers_row(model_dir, label, root),
        )

    # ---------------------------------------------------------------------- table
    def table(self) -> str:
        lines = [
            "| system | bulk pairs/s | 1x50 p50 ms | 1x50 p99 ms | MFU | peak GiB | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:

            def f(v: float | None, fmt: str) -> str:
                return "" if v is None else format(v, fmt)

            lines.append(
                f"| {r.system} | {f(r.pairs_per_s, '.0f')} | {f(r.p50_50, '.1f')} | "
                f"{f(r.p99_50, '.1f')} | {f(r.mfu and 100 * r.mfu, '.1f')}{'%' if r.mfu else ''} | "
                f"{f(r.mem_gib, '.1f')} | {r.note} |"
            )
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", help="folder with data/xquad-r (default ../shared)")
    parser.add_argument("--tokenizer-dir", help="a prebuilt Qwen tokenizer (else from dashscope)")
    parser.add_argument("--shapes", default="0.6b,gemma", help="of 0.6b, 4b, gemma")
    parser.add_argument(
        "--peers", default="0.6b,gemma", help="shapes that also get the peers' rows"
    )
    parser.add_argument(
        "--ablation",
        default="0.6b,gemma",
        help="shapes that also run without the shared prefix, and without the shared-prefix "
        "attention kernel (a varlen flash kernel on gathered keys instead)",
    )
    parser.add_argument(
        "--parity", default="0.6b,gemma", help="shapes checked against the fp32 padded runner"
    )
    parser.add_argument("--repeats", type=int, default=3, help="bulk runs per system (best)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--quick", action="store_true", help="tiny models on CPU, seconds")
    parser.add_argument("--out", help="also write the table here")
    parser.add_argument("--json", help="also write every row as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bench = LlmBench(args)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer_dir = (
            Path(args.tokenizer_dir) if args.tokenizer_dir else build_qwen_tokenizer(root / "qwen")
        )
        for kind in args.shapes.split(","):
            bench.shape(kind, build_model(kind, tokenizer_dir, root, args.quick), root, args)
    print(bench.table())
    if args.json:
        rows = [{**r.__dict__} for r in bench.rows]
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
