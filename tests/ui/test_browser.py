"""The web app in a real browser (Debian chromium through playwright): type, watch the reply stream, Stop, switch run.

Run with `pytest -m browser`. Needs `apt-get install chromium` and `pip install playwright` (never
`playwright install`: the Debian chromium is used). `TUNESMITH_SCREENSHOT=1 pytest -m "browser and slow"` also
rewrites docs/img/ui.png with the real embedded model.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs `pip install playwright`")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, ui_app):
    pg = browser.new_page(viewport={"width": 1280, "height": 900})
    pg.goto(ui_app.local_url)
    pg.wait_for_selector("#msg textarea", timeout=30_000)
    yield pg
    pg.close()


def _bot_text(page, pane: str = "#chat-a") -> str:
    bots = page.locator(f'{pane} [data-testid="bot"]')
    return bots.last.inner_text() if bots.count() else ""


def _send(page, text: str) -> None:
    page.fill("#msg textarea", text)
    page.press("#msg textarea", "Enter")


def _set_number(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _pick(page, elem_id: str, option: str) -> None:
    page.click(f"#{elem_id} input")
    page.locator("[role=option]", has_text=option).filter(has_text=option).first.click()


def _wait(cond, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_type_see_streamed_reply(page):
    _send(page, "hello there")
    page.wait_for_selector('#chat-a [data-testid="user"]', timeout=10_000)
    lengths = []
    _wait(lambda: lengths.append(len(_bot_text(page))) or "tokens in" in page.inner_text("#status"), what="reply")
    assert _bot_text(page).strip()
    grew = sorted(set(lengths))
    assert len(grew) > 2, f"reply did not stream (lengths seen: {grew})"


def test_stop_really_stops(page):
    page.click("#settings")
    _set_number(page, "temperature", 0)
    _set_number(page, "max-new", 1000)  # greedy on the tiny run runs to the limit (its context is 1024): ~20 s unless stopped
    _send(page, "count to ten")
    _wait(lambda: len(_bot_text(page)) > 20, what="first tokens")
    page.click("#stop")
    _wait(lambda: "cancelled" in page.inner_text("#status"), timeout=10, what="the cancelled status")
    stopped_at = _bot_text(page)
    time.sleep(1.0)
    assert _bot_text(page) == stopped_at  # nothing more arrives: the generate loop ended


def test_switch_run_and_compare_side_by_side(page, tiny_run_dir):
    base = tiny_run_dir.name + ":base"
    _pick(page, "model-a", base)
    _wait(lambda: base in page.inner_text("#chat-a"), timeout=10, what="pane relabelled")
    _pick(page, "model-b", tiny_run_dir.name)
    page.wait_for_selector("#chat-b", state="visible", timeout=10_000)
    _send(page, "hello there")
    _wait(lambda: page.inner_text("#status").count("tokens in") == 2, what="both replies")
    assert base in page.inner_text("#status") and _bot_text(page, "#chat-a") and _bot_text(page, "#chat-b")


@pytest.mark.slow
def test_screenshot_with_the_embedded_model(browser, tmp_path):
    """The README screenshot: the real SmolLM2-135M-Instruct, one question, streamed reply."""
    from tunesmith.ui.app import build_app, launch
    from tunesmith.ui.pool import ModelPool

    repo = Path(__file__).resolve().parents[2]
    pool = ModelPool(repo / "runs", default="embedded")
    app = launch(build_app(pool), port=None, block=False)  # Gradio picks a free port from 7860 up
    try:
        pg = browser.new_page(viewport={"width": 1280, "height": 860})
        pg.goto(app.local_url)
        pg.wait_for_selector("#msg textarea", timeout=30_000)
        runs = pool.runs()
        if runs:  # tuned vs its base, side by side
            _pick(pg, "model-a", runs[0])
            _pick(pg, "model-b", runs[0] + ":base")
        _send(pg, "Which Python module reads and writes JSON? Show a short example.")
        _wait(lambda: pg.inner_text("#status").count("tokens in") == (2 if runs else 1), timeout=240, what="reply")
        out = repo / "docs" / "img" / "ui.png" if os.environ.get("TUNESMITH_SCREENSHOT") else tmp_path / "ui.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(out), full_page=True)
        assert out.stat().st_size > 10_000
    finally:
        app.close()


def test_documents_tab_uploads_and_answers_with_sources(browser, pool, tmp_path):
    """Upload filtering and the answer + sources display. `ask` stands in for `tunesmith.chains`' RAG here (the
    chain has its own tests); it records what the UI handed it."""
    from tunesmith.ui.app import build_app, launch
    from tunesmith.ui.documents import DocAnswer, list_documents

    seen = {}

    def ask(gen, folder, question, params):
        seen.update(docs=list_documents(folder), question=question)
        return DocAnswer(f"answer to {question}", ["notes.md: Paris is the capital of France."])

    (tmp_path / "notes.md").write_text("Paris is the capital of France.\n")
    (tmp_path / "run.sh").write_text("echo pwned\n")
    app = launch(build_app(pool, ask=ask), port=None, block=False)
    try:
        pg = browser.new_page()
        pg.goto(app.local_url)
        pg.get_by_role("tab", name="Documents").click()
        files = pg.locator("#doc-files input[type=file]")
        files.set_input_files(str(tmp_path / "run.sh"))  # Gradio refuses the type before our own check runs
        _wait(lambda: "Invalid file type: run.sh" in pg.inner_text("body"), what="refusal")
        files.set_input_files(str(tmp_path / "notes.md"))
        _wait(lambda: "notes.md: indexed" in pg.inner_text("body"), what="upload report")
        assert "1 document(s) in this session" in pg.inner_text("body")
        pg.fill("#doc-msg textarea", "capital?")
        pg.press("#doc-msg textarea", "Enter")
        _wait(lambda: "Paris is the capital" in pg.inner_text("#doc-sources"), what="sources")
        assert seen == {"docs": ["notes.md"], "question": "capital?"}
        assert "answer to capital?" in pg.inner_text("#doc-chat")
    finally:
        app.close()
