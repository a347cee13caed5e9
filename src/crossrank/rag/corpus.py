"""Evaluation corpora: the multilingual demo corpus shipped in the package, and XQuAD-R.

A :class:`Corpus` is a pool of passages plus labelled queries (graded relevance by passage
id). The demo corpus is one corpus; XQuAD-R gives one corpus per retrieval task (en→en,
zh→zh and the cross-lingual zh→en), each with the paragraphs of the target language as its
pool.

XQuAD-R is not shipped: it is read from a folder given explicitly (``crossrank eval
--data-dir``, or ``$CROSSRANK_SHARED``), never from a guessed location.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

DATASETS = ("demo", "xquad-r")
#: XQuAD-R tasks: (query language, passage language).
XQUAD_TASKS = {"en-en": ("en", "en"), "zh-zh": ("zh", "zh"), "zh-en": ("zh", "en")}
#: Where XQuAD-R lies inside the shared asset folder (``$CROSSRANK_SHARED``).
XQUAD_SUBDIR = Path("data", "xquad-r")


@dataclass(frozen=True)
class Passage:
    id: str
    text: str
    lang: str
    topic: str = ""


@dataclass(frozen=True)
class Query:
    """A query and its graded relevance labels (passage id -> grade; unlisted = 0)."""

    id: str
    text: str
    lang: str
    relevant: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Corpus:
    """Passages and labelled queries; construction checks that every id resolves."""

    name: str
    passages: tuple[Passage, ...]
    queries: tuple[Query, ...]
    _by_id: dict[str, Passage] = field(init=False, repr=False, compare=False)
    _queries: dict[str, Query] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_id: dict[str, Passage] = {}
        for i, passage in enumerate(self.passages):
            if not passage.id or passage.id in by_id:
                raise ValueError(f"{self.name}: passages[{i}] has a missing or duplicate id")
            by_id[passage.id] = passage
        queries: dict[str, Query] = {}
        for i, query in enumerate(self.queries):
            if not query.id or query.id in queries:
                raise ValueError(f"{self.name}: queries[{i}] has a missing or duplicate id")
            queries[query.id] = query
            unknown = sorted(set(query.relevant) - set(by_id))
            if unknown:
                raise ValueError(f"{self.name}: query {query.id} labels unknown passages {unknown}")
        object.__setattr__(self, "_by_id", by_id)
        object.__setattr__(self, "_queries", queries)

    def passage(self, passage_id: str) -> Passage:
        return self._by_id[passage_id]

    def query(self, query_id: str) -> Query:
        return self._queries[query_id]

    def query_by_text(self, text: str) -> Query | None:
        """The labelled query with exactly this text, so ad-hoc questions get labels too."""
        return next((q for q in self.queries if q.text == text), None)


def load_demo_corpus() -> Corpus:
    """The multilingual keyword-trap corpus shipped in the package (see ``DEMO_CORPUS.md``)."""
    source = resources.files("crossrank").joinpath("data", "demo_corpus.json")
    data = json.loads(source.read_text(encoding="utf-8"))
    return Corpus(
        name="demo",
        passages=tuple(
            Passage(p["id"], p["text"], p["lang"], p.get("topic", "")) for p in data["passages"]
        ),
        queries=tuple(
            Query(q["id"], q["text"], q["lang"], dict(q["relevant"])) for q in data["queries"]
        ),
    )


def xquad_dir(data_dir: str | Path) -> Path:
    """The XQuAD-R folder in ``data_dir``: the shared asset folder (holding
    ``data/xquad-r/{en,zh}.json``) or the XQuAD-R folder itself."""
    for candidate in (Path(data_dir) / XQUAD_SUBDIR, Path(data_dir)):
        if all((candidate / f"{lang}.json").is_file() for lang in ("en", "zh")):
            return candidate
    raise FileNotFoundError(
        f"XQuAD-R not found in {str(data_dir)!r}: expected {XQUAD_SUBDIR}/{{en,zh}}.json "
        "(or {en,zh}.json) there"
    )


def _read_squad(path: Path, lang: str) -> tuple[list[Passage], dict[str, tuple[str, str]]]:
    """Paragraphs as passages, and question id -> (question, id of the paragraph holding it)."""
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    passages: list[Passage] = []
    questions: dict[str, tuple[str, str]] = {}
    for a, article in enumerate(data["data"]):
        for p, paragraph in enumerate(article["paragraphs"]):
            pid = f"{lang}-{a}-{p}"
            passages.append(Passage(pid, paragraph["context"], lang, article.get("title", "")))
            for qa in paragraph["qas"]:
                questions[qa["id"]] = (qa["question"], pid)
    return passages, questions


def load_xquad_r(data_dir: str | Path) -> dict[str, Corpus]:
    """XQuAD-R question → paragraph retrieval tasks en-en, zh-zh and zh-en, from ``data_dir``
    (see :func:`xquad_dir`).

    The relevant paragraph of a question is the one holding it; for zh-en it is the English
    paragraph holding the parallel question (same question id).
    """
    directory = xquad_dir(data_dir)
    read = {lang: _read_squad(directory / f"{lang}.json", lang) for lang in ("en", "zh")}
    tasks: dict[str, Corpus] = {}
    for task, (query_lang, passage_lang) in XQUAD_TASKS.items():
        passages, target_questions = read[passage_lang]
        queries: list[Query] = []
        for qid, (text, _) in read[query_lang][1].items():
            if qid not in target_questions:
                raise ValueError(f"xquad-r {task}: question {qid} has no {passage_lang} parallel")
            queries.append(Query(qid, text, query_lang, {target_questions[qid][1]: 1}))
        tasks[task] = Corpus(f"xquad-r/{task}", tuple(passages), tuple(queries))
    return tasks


def load_dataset(name: str, data_dir: str | Path | None = None) -> dict[str, Corpus]:
    """Evaluation tasks of a dataset by name (one of :data:`DATASETS`); XQuAD-R needs
    ``data_dir``."""
    if name == "demo":
        return {"demo": load_demo_corpus()}
    if name == "xquad-r":
        if data_dir is None:
            raise FileNotFoundError(
                "XQuAD-R is not shipped with crossrank: give the folder that holds "
                f"{XQUAD_SUBDIR}/{{en,zh}}.json with --data-dir or CROSSRANK_SHARED"
            )
        return load_xquad_r(data_dir)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
