"""Retrieval-only vs retrieval+rerank metrics with ir-measures (pytrec_eval underneath).

Each run is handed to ir-measures with rank-derived scores (``k - rank``), not the raw model
scores: trec_eval breaks score ties by document id, which would silently reorder passages
that a saturated reranker scores identically. Our own ordering is what is measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from crossrank.rag.corpus import Corpus
from crossrank.rag.pipeline import QueryRun

#: Report label -> ir-measures measure name.
MEASURES = {
    "nDCG@5": "nDCG@5",
    "nDCG@10": "nDCG@10",
    "MRR@10": "RR@10",
    "Recall@5": "R@5",
    "Recall@50": "R@50",
}
SYSTEMS = ("retrieval", "retrieval+rerank")


def _scored(query_id: str, passage_ids: Sequence[str]) -> list[Any]:
    from ir_measures import ScoredDoc

    return [
        ScoredDoc(query_id, pid, float(len(passage_ids) - i)) for i, pid in enumerate(passage_ids)
    ]


def evaluate(corpus: Corpus, runs: Sequence[tuple[str, QueryRun]]) -> dict[str, dict[str, float]]:
    """``{system: {metric: value}}`` over ``runs`` (``(query id, run)`` pairs of ``corpus``)."""
    return evaluate_ids(
        corpus,
        [
            (qid, [h.passage.id for h in run.retrieved], [r.hit.passage.id for r in run.reranked])
            for qid, run in runs
        ],
    )


def evaluate_ids(
    corpus: Corpus, runs: Sequence[tuple[str, Sequence[str], Sequence[str]]]
) -> dict[str, dict[str, float]]:
    """:func:`evaluate` for any pipeline (LangChain, LlamaIndex): ``runs`` are ``(query id,
    retrieved passage ids, reranked passage ids)``, best first."""
    import ir_measures
    from ir_measures import Qrel

    measures = {label: ir_measures.parse_measure(name) for label, name in MEASURES.items()}
    qrels = [
        Qrel(qid, pid, grade)
        for qid, _, _ in runs
        for pid, grade in corpus.query(qid).relevant.items()
    ]
    retrieved = [d for qid, ids, _ in runs for d in _scored(qid, ids)]
    reranked = [d for qid, _, ids in runs for d in _scored(qid, ids)]
    out: dict[str, dict[str, float]] = {}
    for system, scored in zip(SYSTEMS, (retrieved, reranked), strict=True):
        values = ir_measures.calc_aggregate(list(measures.values()), qrels, scored)
        out[system] = {label: float(values[m]) for label, m in measures.items()}
    return out
