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

pytestmark = pytest.mark.browser  # the `browser` fixture (conftest.py) skips without Debian's chromium


@pytest.fixture
def page(browser, ui_app):
    pg = browser.new_page(viewport={"width": 1280, "height": 900})
    pg.goto(ui_app.local_url)
    pg.wait_for_selector("#msg textarea", timeout=30_000)
    yield pg
    pg.close()


def _bot_text(page, pane: str = "#chat-a") -> str:
    """The last reply's text, without its title (the model name every reply carries)."""
    bots = page.locator(f'{pane} [data-testid="bot"]')
    if not bots.count():
        return ""
    title = bots.last.locator(".title")
    return bots.last.inner_text().replace(title.first.inner_text() if title.count() else "", "", 1).strip()


def _titles(page, pane: str = "#chat-a") -> list[str]:
    """The model name each reply of a pane carries (its message title)."""
    return [t.strip() for t in page.locator(f'{pane} [data-testid="bot"] .title').all_inner_texts()]


def _send(page, text: str) -> None:
    page.fill("#msg textarea", text)
    page.press("#msg textarea", "Enter")


def _set_number(page, elem_id: str, value: float) -> None:
    """Type into a slider's number box and wait until the slider itself shows it: Gradio applies the typed value a
    moment later, and an event sent before that still carries the old one (a loaded CI machine lost that race)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    slider = page.locator(f"#{elem_id} input[type=range]")
    half_step = float(slider.get_attribute("step") or 1) / 2  # the range snaps to its step (1000 shows as 992)

    def applied() -> bool:
        if abs(float(slider.input_value()) - value) <= half_step:
            return True
        box.fill(str(value))  # typed again until it takes: Enter alone was once lost on a loaded machine
        box.press("Enter")
        box.press("Tab")  # leaving the box commits it too
        return False

    _wait(applied, timeout=15, what=f"{elem_id} = {value}")


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
    _pick(page, "model-b", tiny_run_dir.name)
    page.wait_for_selector("#chat-b", state="visible", timeout=10_000)
    _send(page, "hello there")
    _wait(lambda: page.inner_text("#status").count("tokens in") == 2, what="both replies")
    assert base in page.inner_text("#status") and _bot_text(page, "#chat-a") and _bot_text(page, "#chat-b")


def test_send_while_streaming_is_refused_and_stop_still_stops(page):
    page.click("#settings")
    _set_number(page, "temperature", 0)
    _set_number(page, "max-new", 1000)  # ~20 s unless stopped
    _send(page, "count to ten")
    _wait(lambda: len(_bot_text(page)) > 20, what="first tokens")
    assert page.locator("#send").is_disabled()
    _send(page, "a second message")  # Enter still works in the box: it must be refused, not lost
    _wait(lambda: "still being written" in page.inner_text("body"), timeout=10, what="the refusal")
    assert page.input_value("#msg textarea") == "a second message"
    assert page.locator('#chat-a [data-testid="user"]').count() == 1
    page.click("#stop")  # the first reply's Stop was not replaced by the refused send
    _wait(lambda: "cancelled" in page.inner_text("#status"), timeout=10, what="the cancelled status")
    _wait(lambda: page.locator("#send").is_enabled(), timeout=10, what="Send enabled again")
    _set_number(page, "max-new", 16)
    page.click("#send")
    _wait(lambda: page.locator('#chat-a [data-testid="user"]').count() == 2 and "tokens in" in
          page.inner_text("#status") and "cancelled" not in page.inner_text("#status"), what="the second reply")


def test_compare_with_base_streams_both_panes_at_once(page, tiny_run_dir):
    """Tuned and base side by side generate together: at some moment both panes have text and neither is done."""
    page.click("#settings")
    _set_number(page, "temperature", 0)
    _set_number(page, "max-new", 400)
    _pick(page, "model-b", tiny_run_dir.name + ":base")
    page.wait_for_selector("#chat-b", state="visible", timeout=10_000)
    _send(page, "count to ten")
    both = []

    def poll() -> bool:
        status = page.inner_text("#status")
        if "tokens in" not in status and _bot_text(page, "#chat-a") and _bot_text(page, "#chat-b"):
            both.append(status)
        return status.count("tokens in") == 2

    _wait(poll, timeout=60, what="both replies")
    assert both, "one pane finished before the other started: the two models did not stream at the same time"


def test_over_long_message_keeps_the_text_and_later_messages_work(page):
    long = "word " * 1500  # the tiny model reads 1024 tokens
    _send(page, long)
    _wait(lambda: "reads at most 1024" in page.inner_text("#status"), timeout=15, what="the context error")
    _wait(lambda: page.input_value("#msg textarea") == long, timeout=5, what="the text back in the box")
    assert page.locator('#chat-a [data-testid="user"]').count() == 0  # the failed turn left the history
    assert "Error" not in page.inner_text("#chat-a")  # no error badge left on the pane
    page.fill("#msg textarea", "")
    page.click("#settings")
    _set_number(page, "max-new", 16)
    _send(page, "hello")
    _wait(lambda: "tokens in" in page.inner_text("#status"), what="the next reply")
    assert page.locator('#chat-a [data-testid="user"]').count() == 1


def test_each_reply_keeps_its_model_and_a_reload_keeps_the_chat(page, tiny_run_dir):
    tuned, base = tiny_run_dir.name, tiny_run_dir.name + ":base"
    page.click("#settings")
    _set_number(page, "max-new", 16)
    _send(page, "hello")
    _wait(lambda: "tokens in" in page.inner_text("#status"), what="first reply")
    _pick(page, "model-a", base)
    time.sleep(0.5)
    assert _titles(page) == [tuned]  # switching the box does not relabel what the other model wrote
    _send(page, "again")
    _wait(lambda: base in page.inner_text("#status") and "tokens in" in page.inner_text("#status"),
          what="second reply")
    _wait(lambda: _titles(page) == [tuned, base], timeout=5, what="per-reply titles")
    page.reload()
    page.wait_for_selector("#msg textarea", timeout=30_000)
    _wait(lambda: _titles(page) == [tuned, base], what="the chat restored after reload")  # 10 s was short on a slow VM


def test_the_edit_box_shows_the_whole_message(page):
    page.click("#settings")
    _set_number(page, "max-new", 16)
    page.fill("#msg textarea", "\n".join(f"line {i}: some words to fill the line up" for i in range(8)))
    page.click("#send")
    _wait(lambda: "tokens in" in page.inner_text("#status"), what="the reply")
    page.locator('#chat-a [data-testid="user"]').first.hover()
    page.locator('#chat-a button[aria-label="Edit"]').first.click()
    box = page.locator("#chat-a textarea").first
    box.wait_for(timeout=5_000)
    width, client_h, scroll_h = box.evaluate("e => [e.clientWidth, e.clientHeight, e.scrollHeight]")
    assert width >= 400 and scroll_h <= client_h + 2, (width, client_h, scroll_h)  # no wrapping into a sliver


def test_a_deleted_run_falls_back_on_refresh(browser, tmp_path, tiny_run_dir):
    """The run picked in the Model box is deleted: Refresh picks the default and says so, and sending works; the
    default run's trained system prompt is pre-filled."""
    import shutil

    import yaml

    from tunesmith.ui.app import build_app, launch
    from tunesmith.ui.pool import ModelPool

    runs = tmp_path / "runs"
    shutil.copytree(tiny_run_dir, runs / "keep")
    shutil.copytree(tiny_run_dir, runs / "doomed")
    cfg = yaml.safe_load((runs / "keep" / "config.yaml").read_text())
    (runs / "keep" / "config.yaml").write_text(yaml.safe_dump({**cfg, "data": {"system_prompt": "Be terse."}}))
    app = launch(build_app(ModelPool(runs, default=str(runs / "keep"))), port=None, block=False)
    try:
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.goto(app.local_url)
        pg.wait_for_selector("#msg textarea", timeout=30_000)
        pg.click("#settings")
        _wait(lambda: pg.input_value("#system textarea") == "Be terse.", timeout=15, what="trained system prompt")
        _pick(pg, "model-a", "doomed")
        _wait(lambda: pg.input_value("#system textarea") == "", timeout=15, what="doomed's (empty) prompt")
        shutil.rmtree(runs / "doomed")
        pg.click("#refresh")
        _wait(lambda: "doomed is no longer in" in pg.inner_text("#status"), timeout=10, what="the fallback note")
        assert pg.input_value("#model-a input") == "keep"
        _set_number(pg, "max-new", 16)
        _send(pg, "hello")
        _wait(lambda: "tokens in" in pg.inner_text("#status"), what="a reply from the default")
        assert "not in the list of choices" not in pg.inner_text("body")
    finally:
        app.close()


def test_narrow_screens_stack_the_panes(browser, ui_app, tiny_run_dir):
    pg = browser.new_page(viewport={"width": 700, "height": 900})
    try:
        pg.goto(ui_app.local_url)
        pg.wait_for_selector("#msg textarea", timeout=30_000)
        _pick(pg, "model-b", tiny_run_dir.name + ":base")
        pg.wait_for_selector("#chat-b", state="visible", timeout=10_000)
        a, b = pg.locator("#chat-a").bounding_box(), pg.locator("#chat-b").bounding_box()
        assert b["y"] >= a["y"] + a["height"] - 1  # one under the other
        assert abs(a["width"] - b["width"]) < 2 and a["width"] > 500  # each the full width
    finally:
        pg.close()


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


def test_documents_tab(browser, pool, tmp_path):
    """Asking before uploading, a refused file, a quoted answer with sources, a written answer streamed with the
    tab's own sampling, Stop and Clear. `ask` stands in for `tunesmith.chains`' RAG here (the chain has its own
    tests, test_documents.py runs it for real); it records what the UI handed it."""
    from tunesmith.ui.app import build_app, launch
    from tunesmith.ui.documents import DocAnswer, list_documents

    seen = []

    def ask(gen, folder, question, params, *, extractive, on_token):
        seen.append({"docs": list_documents(folder), "question": question, "extractive": extractive,
                     "temperature": params.temperature})
        if extractive:
            return DocAnswer(f"answer to {question}", ["notes.md: Paris is the capital of France."])
        for i in range(400):  # writes until stopped: on_token raises once Stop is pressed
            on_token(f"w{i} ")
            time.sleep(0.05)
        return DocAnswer("not stopped", [])

    (tmp_path / "notes.md").write_text("Paris is the capital of France.\n")
    (tmp_path / "paper.pdf").write_bytes(b"%PDF-1.4 not text")
    app = launch(build_app(pool, ask=ask), port=None, block=False)
    try:
        pg = browser.new_page(viewport={"width": 1280, "height": 1400})
        pg.goto(app.local_url)
        pg.get_by_role("tab", name="Documents").click()
        pg.fill("#doc-msg textarea", "capital?")
        pg.press("#doc-msg textarea", "Enter")  # nothing uploaded yet: said in words, the question kept
        _wait(lambda: "Upload at least one text document first" in pg.inner_text("#doc-status"), what="the hint")
        assert pg.input_value("#doc-msg textarea") == "capital?"
        files = pg.locator("#doc-files input[type=file]")
        files.set_input_files(str(tmp_path / "paper.pdf"))
        _wait(lambda: "paper.pdf: refused, only text files" in pg.inner_text("#doc-report"), what="the refusal")
        files.set_input_files(str(tmp_path / "notes.md"))
        _wait(lambda: "notes.md: indexed" in pg.inner_text("#doc-report"), what="upload report")
        assert "1 document(s) in this session" in pg.inner_text("#doc-report")
        pg.press("#doc-msg textarea", "Enter")
        _wait(lambda: "Paris is the capital" in pg.inner_text("#doc-sources"), what="sources")
        assert seen[-1] == {"docs": ["notes.md"], "question": "capital?", "extractive": True, "temperature": 0.7}
        assert "answer to capital?" in pg.inner_text("#doc-chat")
        assert "Error" not in pg.inner_text("#doc-chat") + pg.inner_text("#doc-status")  # no stuck error badge

        pg.click("#doc-settings")
        _set_number(pg, "doc-temperature", 0.3)  # this tab's own setting; the Chat tab's stays at its default
        pg.locator("#doc-mode label", has_text="Write an answer").click()
        pg.fill("#doc-msg textarea", "more?")
        pg.press("#doc-msg textarea", "Enter")
        _wait(lambda: "w5 " in pg.inner_text("#doc-chat"), what="the streamed answer")
        pg.click("#doc-stop")
        _wait(lambda: "stopped" in pg.inner_text("#doc-status"), timeout=10, what="stopped")
        stopped_at = pg.inner_text("#doc-chat")
        time.sleep(0.5)
        assert pg.inner_text("#doc-chat") == stopped_at and "not stopped" not in stopped_at
        assert seen[-1]["extractive"] is False and seen[-1]["temperature"] == 0.3
        pg.click("#doc-clear")
        _wait(lambda: pg.locator('#doc-chat [data-testid="bot"]').count() == 0, timeout=5, what="cleared")
    finally:
        app.close()
