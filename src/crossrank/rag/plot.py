"""The picture of an evaluation: what reranking changed, and where the time went.

``crossrank eval --plot PATH`` and the notebooks draw the same figure from the same payload
(the dict ``crossrank eval --json`` writes): on the left nDCG@10 and Recall@5 per task (one
task per language pair of XQuAD-R), retrieval alone beside retrieval + rerank; on the right
the mean milliseconds of each pipeline stage. People compare bar lengths faster than columns
of four-digit numbers. matplotlib is the optional ``plot`` extra.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossrank.errors import require_extra

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The metrics drawn, from those ``crossrank eval`` computes.
PLOTTED_METRICS = ("nDCG@10", "Recall@5")
SYSTEM_COLOURS = {"retrieval": "#9aa5b1", "retrieval+rerank": "#2f7ed8"}


def eval_figure(payload: Mapping[str, Any], metrics: Sequence[str] = PLOTTED_METRICS) -> Figure:
    """The figure for an eval payload: ``payload["tasks"][task]["metrics"][system][metric]``
    and ``payload["timings"][stage]`` with ``calls`` and ``total_s``."""
    require_extra("matplotlib", "plot", feature="plotting evaluation results")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    quality, latency = figure.subplots(1, 2, width_ratios=[3, 2])
    _quality_bars(quality, payload["tasks"], metrics)
    _latency_bars(latency, payload["timings"])
    title = f"{payload.get('dataset', '')}: retrieval top {payload.get('top_k', '?')} vs + rerank"
    if payload.get("random_weight_reranker"):
        title += "  (RANDOM-WEIGHT reranker: scores meaningless)"
    figure.suptitle(title)
    return figure


def _quality_bars(axes: Any, tasks: Mapping[str, Any], metrics: Sequence[str]) -> None:
    systems = list(SYSTEM_COLOURS)
    groups = [(task, metric) for task in tasks for metric in metrics]
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        values = [tasks[task]["metrics"][system][metric] for task, metric in groups]
        positions = [g + (i - (len(systems) - 1) / 2) * width for g in range(len(groups))]
        bars = axes.bar(positions, values, width, label=system, color=SYSTEM_COLOURS[system])
        axes.bar_label(bars, fmt="%.2f", fontsize=7)
    axes.set_xticks(range(len(groups)), [f"{task}\n{metric}" for task, metric in groups])
    axes.tick_params(axis="x", labelsize=8)
    axes.set_ylim(0, 1.1)
    axes.set_ylabel("score")
    axes.set_title("Quality per task: before vs after reranking")
    axes.legend(loc="upper left", fontsize=8)


def _latency_bars(axes: Any, timings: Mapping[str, Mapping[str, float]]) -> None:
    stages = [s for s, t in timings.items() if t["calls"]]
    means = [1000 * timings[s]["total_s"] / timings[s]["calls"] for s in stages]
    bars = axes.barh(stages, means, color="#f28f43")
    axes.bar_label(bars, fmt="%.1f ms", fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("mean ms per call")
    axes.set_title("Stage latency")
    axes.margins(x=0.25)


def eval_png(payload: Mapping[str, Any]) -> bytes:
    """:func:`eval_figure` as PNG bytes (for ``IPython.display.Image`` in a notebook)."""
    buffer = io.BytesIO()
    eval_figure(payload).savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def save_eval_plot(payload: Mapping[str, Any], path: Path) -> Path:
    """Write :func:`eval_figure` to ``path``; the suffix picks the format (.png, .svg, .pdf)."""
    eval_figure(payload).savefig(path, dpi=120)
    return path
