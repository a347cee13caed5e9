"""The two RAG notebooks, executed offline in a Jupyter kernel (as nbmake does), then probed:
a cell appended by the test reports what the notebook retrieved, reranked and prompted."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import crossrank

if TYPE_CHECKING:
    from tests.rag.conftest import Expected


NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
SOURCE = str(Path(crossrank.__file__).resolve().parents[1])
#: Notebook -> how its cells name the passage id of a retrieved/reranked item.
ID_OF = {"langchain_rag.ipynb": "x.id", "llamaindex_rag.ipynb": "x.node.node_id"}


@pytest.mark.parametrize("name", sorted(ID_OF))
def test_notebook_runs_offline(
    name: str,
    offline_env: dict[str, str],
    expected: Expected,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for var, value in {**offline_env, "COLUMNS": "200"}.items():
        monkeypatch.setenv(var, value)
    # The kernel imports the crossrank under test, whatever the working directory.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([SOURCE, os.environ.get("PYTHONPATH", "")]))
    for var in ("CROSSRANK_LLM_BASE_URL", "CROSSRANK_LLM_MODEL", "CROSSRANK_LLM_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert notebook.metadata.kernelspec.name == "python3"
    id_of = ID_OF[name]
    probe = (
        "import json\n"
        "print('PROBE' + json.dumps({'question': QUESTION, "
        f"'retrieved': [{id_of} for x in retrieved], 'reranked': [{id_of} for x in reranked], "
        "'prompt': prompt, 'stages': list(timings)}))"
    )
    notebook.cells.append(nbformat.v4.new_code_cell(probe))
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()

    texts = [
        output.get("text", "") + "".join(output.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    ]
    [report] = [t for t in texts if t.startswith("PROBE")]
    got = json.loads(report[len("PROBE") :])
    expected.assert_top_k(got["question"], got["retrieved"], k=50)
    assert got["reranked"] == expected.reranked(got["question"], got["retrieved"], n=5)
    assert expected.prompt_ids(got["prompt"]) == got["reranked"]
    everything = "\n".join(texts)
    assert "WARNING: RANDOM-WEIGHT RERANKER" in everything  # the banner's title never wraps
    assert "LLM step: DRY RUN" in everything
    assert "retrieve top 50" in got["stages"] and "rerank 50" in got["stages"]
    images = [
        output["data"]["image/png"]
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 1 and len(images[0]) > 10_000  # the `crossrank eval --plot` figure
