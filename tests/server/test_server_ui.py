"""The web UI at / in headless Chromium: key field when auth is on, cards ordered by score,
green bars above 0.5 and red at or below, raw logits, indexes, the raw-values table."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from crossrank import Reranker
from crossrank.server import ServerSettings, create_app
from crossrank.server.runner import BackgroundServer
from tests.conftest import DOCS as SAMPLE_DOCS
from tests.conftest import QUERY

pytestmark = pytest.mark.timeout(300)

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
KEY = "ui-test-key"
#: The sample documents as a user pastes them (one per line, so no empty one), plus markup.
DOCS = [*(doc for doc in SAMPLE_DOCS if doc), "<b>markup</b> stays text"]
GREEN, RED = "rgb(22, 163, 74)", "rgb(220, 38, 38)"


@pytest.fixture(scope="module")
def centred_reranker(tiny_model_dir):
    """A random model whose classifier bias is shifted so these documents' scores straddle
    0.5: both bar colours then appear whatever tokenizer the fixtures built."""
    r = Reranker(str(tiny_model_dir), device="cpu")
    raw = r.score(QUERY, DOCS, normalize=False)
    with torch.no_grad():
        r.model.classifier.out_proj.bias -= float(np.median(raw)) + 1e-3
    yield r
    r.close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent: install Debian's chromium to run UI tests")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def test_rerank_page(browser, centred_reranker):
    want = centred_reranker.score(QUERY, DOCS)
    raw = centred_reranker.score(QUERY, DOCS, normalize=False)
    assert (want > 0.5).any() and (want <= 0.5).any()
    app = create_app(centred_reranker, ServerSettings(api_key=KEY))
    with BackgroundServer(app) as srv:
        srv.wait_ready()
        page = browser.new_page(viewport={"width": 1100, "height": 1300})
        page.goto(srv.url + "/")
        page.wait_for_selector("#api-key-row:not([hidden])")  # the server asked for a key
        page.fill("#query", QUERY)
        page.fill("#documents", "\n".join(DOCS) + "\n\n")
        page.fill("#top-n", "6")
        page.click("#rerank")
        page.wait_for_selector("#error", state="visible")
        assert page.inner_text("#error").startswith("401")
        page.fill("#api-key", KEY)
        page.click("#rerank")
        page.wait_for_selector(".card")

        cards = page.query_selector_all(".card")
        order = np.argsort(-want, kind="stable")
        assert [int(c.get_attribute("data-index")) for c in cards] == list(order[:6])
        for card in cards:
            i = int(card.get_attribute("data-index"))
            score = float(card.query_selector(".score").inner_text())
            assert score == pytest.approx(float(want[i]), abs=1e-4)
            raw_text = card.query_selector(".raw").inner_text()
            assert float(raw_text.split()[-1]) == pytest.approx(float(raw[i]), abs=1e-3)
            assert card.query_selector(".index").inner_text() == f"index {i}"
            assert card.query_selector(".text").inner_text() == DOCS[i]
            fill = card.query_selector(".bar-fill")
            colour = fill.evaluate("e => getComputedStyle(e).backgroundColor")
            assert colour == (GREEN if want[i] > 0.5 else RED)
        assert "ms" in page.inner_text("#elapsed")
        assert page.inner_text("#model") == os.path.basename(centred_reranker.model_name)

        rows = page.query_selector_all("#raw-table tbody tr")
        assert len(rows) == len(DOCS)  # every document, not only the cards
        assert not page.is_visible("#raw-table")  # collapsed until opened
        page.click("#raw-details summary")
        assert page.is_visible("#raw-table")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "server-ui.png"), full_page=True)

        page.fill("#threshold", "0.5")  # a threshold keeps scores >= it
        page.click("#rerank")
        page.wait_for_function(
            f"document.querySelectorAll('.card').length === {min(6, int((want >= 0.5).sum()))}"
        )
        page.close()
