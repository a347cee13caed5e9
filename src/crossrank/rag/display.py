"""Rich renderables shared by ``crossrank demo``/``eval`` and the notebooks.

They take plain ids, texts and scores (not pipeline objects) so that LangChain documents and
LlamaIndex nodes can be shown with the same before/after table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.console import Group
from rich.panel import Panel
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from crossrank.rag.llm import DRY_RUN_NOTICE

PREVIEW_CHARS = 90
#: The legend under the before/after table.
COLUMNS_LEGEND = (
    "after/before: rank after reranking / in retrieval; move: places gained ↑ or lost ↓; "
    "score: reranker relevance in [0, 1]"
)
#: The legend of the gold column (the corpus's graded relevance labels).
GOLD_LEGEND = "gold: ★★ highly relevant, ★ relevant, · not labelled relevant (the corpus's labels)"


def score_text(score: float) -> Text:
    """``score`` (a probability in [0, 1]) coloured on a red → yellow → green scale."""
    s = min(max(score, 0.0), 1.0)
    red, green = (255, int(510 * s)) if s < 0.5 else (int(510 * (1 - s)), 255)
    return Text(f"{score:.4f}", style=f"bold rgb({red},{green},0)")


def preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def before_after_table(
    query: str,
    retrieved_ids: Sequence[str],
    reranked: Sequence[tuple[str, float]],
    texts: Mapping[str, str],
    *,
    top_n: int = 5,
    relevant: Mapping[str, int] | None = None,
) -> Table:
    """Where each passage sat before (retrieval) and after (reranking).

    Rows are the reranked top ``top_n`` (what the LLM gets) and, below a line, the retrieval
    top ``top_n`` that reranking pushed out. ``relevant`` adds a gold-label column. The
    caption explains the columns (:data:`COLUMNS_LEGEND`, :data:`GOLD_LEGEND`).
    """
    before = {pid: rank for rank, pid in enumerate(retrieved_ids, 1)}
    after = {pid: (rank, score) for rank, (pid, score) in enumerate(reranked, 1)}
    kept = [pid for pid, _ in reranked[:top_n]]
    dropped = [pid for pid in retrieved_ids[:top_n] if pid not in kept]
    # Text, not str, everywhere: passages and answers hold brackets that rich reads as markup.
    table = Table(title=Text(query), title_justify="left", caption_justify="left")
    table.caption = f"{len(retrieved_ids)} retrieved → top {len(kept)} after reranking" + (
        f"; below the line: retrieval top {top_n} that reranking pushed out" if dropped else ""
    )
    table.caption += f"\n{COLUMNS_LEGEND}" + (f"\n{GOLD_LEGEND}" if relevant is not None else "")
    table.add_column("after", justify="right")
    table.add_column("before", justify="right")
    table.add_column("move", justify="right")
    table.add_column("score", justify="right")
    if relevant is not None:
        table.add_column("gold", justify="center")
    table.add_column("id")
    table.add_column("passage", overflow="fold")
    for section, ids in enumerate((kept, dropped)):
        if section and ids:
            table.add_section()
        for pid in ids:
            new_rank, score = after[pid]
            old_rank = before[pid]
            delta = old_rank - new_rank
            move = (
                Text(f"↑{delta}", "green")
                if delta > 0
                else Text(f"↓{-delta}", "red")
                if delta < 0
                else Text("=")
            )
            cells: list[str | Text] = [str(new_rank), str(old_rank), move, score_text(score)]
            if relevant is not None:
                grade = relevant.get(pid, 0)
                cells.append(Text("★" * grade or "·", "yellow" if grade else "dim"))
            cells += [Text(pid), Text(preview(texts[pid]))]
            table.add_row(*cells, style="dim" if section else None)
    return table


def timings_table(timings: Mapping[str, Sequence[float]], title: str = "Stage timings") -> Table:
    """Per stage: number of calls, total and mean milliseconds (input in seconds)."""
    table = Table(title=title, title_justify="left")
    table.add_column("stage")
    table.add_column("calls", justify="right")
    table.add_column("total ms", justify="right")
    table.add_column("mean ms", justify="right")
    for stage, seconds in timings.items():
        if seconds:
            total = 1000 * sum(seconds)
            table.add_row(stage, str(len(seconds)), f"{total:.1f}", f"{total / len(seconds):.1f}")
    return table


def metrics_table(
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    queries: Mapping[str, int],
    title: str = "Retrieval vs retrieval + rerank",
) -> Table:
    """``results[task][system][metric]`` as one row per (task, system)."""
    metrics = list(next(iter(next(iter(results.values())).values())))
    table = Table(title=title, title_justify="left")
    table.add_column("task (queries)")
    table.add_column("system", no_wrap=True)
    for metric in metrics:
        table.add_column(metric, justify="right")
    for task, systems in results.items():
        for i, (system, values) in enumerate(systems.items()):
            table.add_row(
                f"{task} ({queries[task]})" if i == 0 else "",
                system,
                *(f"{values[m]:.4f}" for m in metrics),
            )
        table.add_section()
    return table


def random_weights_banner(model: str) -> Panel:
    """The loud warning shown whenever the reranker has random weights."""
    return Panel(
        Text(
            f"The reranker {model} has RANDOM WEIGHTS (a test/demo stand-in built from the "
            "architecture only). Its scores and its reranked order are MEANINGLESS: this run shows "
            "the pipeline's plumbing, not reranking quality.\nFor real results pass the real "
            "model: --rerank-model BAAI/bge-reranker-v2-m3 (or a local copy of it), or set "
            "CROSSRANK_RERANK_MODEL.",
            style="bold",
        ),
        title="WARNING: RANDOM-WEIGHT RERANKER",
        border_style="bold red",
    )


def dry_run_panel(prompt: str) -> Panel:
    """The labelled dry run: the notice, then the exact prompt (and no answer)."""
    notice = Text(DRY_RUN_NOTICE, style="bold yellow")
    return Panel(
        Group(notice, Rule(style="yellow"), Text(prompt)),
        title="LLM step: DRY RUN",
        border_style="yellow",
    )


def answer_panel(answer: str, model: str) -> Panel:
    return Panel(Text(answer), title=Text(f"LLM answer ({model})"), border_style="green")
