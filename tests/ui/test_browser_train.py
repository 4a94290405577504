"""The Train and Runs tabs in a real browser (Debian chromium through playwright), on the tiny model: upload a file,
check the preview, start, watch progress and the curve, stop, resume, finish, chat with the new run, open its Run
view and evaluate it.

Run with `pytest -m browser tests/ui/test_browser_train.py`. `TUNESMITH_SCREENSHOT=1` also rewrites
docs/img/train_tab.png.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from test_browser import _bot_text, _pick, _send, _set_number, _wait

pytestmark = pytest.mark.browser  # the `browser` fixture (conftest.py) skips without Debian's chromium
ROOT = Path(__file__).parents[2]


@pytest.fixture
def train_app(tiny_model_dir, tmp_path, monkeypatch):
    """The app over an empty runs folder, with the tiny model as the base model offered (and the chat's default)."""
    from tunesmith.ui.app import build_app, launch
    from tunesmith.ui.pool import ModelPool

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the training child: a tiny model runs faster on one thread
    runs = tmp_path / "runs"
    app = launch(build_app(ModelPool(runs, default=str(tiny_model_dir))), port=None, block=False)
    yield app, runs
    app.close()


def _data(tmp_path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a + b}."}]} for a in range(4) for b in range(3)]
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(value)
    box.press("Tab")  # leaving the box sends the `input` event


def _wait_text(page, selector: str, text: str, timeout: float = 30.0) -> None:
    """Wait until `selector` shows `text`; a timeout says what it showed instead."""
    try:
        _wait(lambda: text in page.inner_text(selector), timeout=timeout, what=f"{text!r} in {selector}")
    except AssertionError as e:
        raise AssertionError(f"{e}; it shows: {page.inner_text(selector)[-600:]!r}") from None


def _step(page) -> int:
    text = page.inner_text("#train-status")
    return int(text.split("step ")[1].split("/")[0]) if "step " in text else 0


def test_train_watch_stop_resume_chat_and_run_view(browser, train_app, tiny_model_dir, tmp_path):
    import yaml

    app, runs = train_app
    pg = browser.new_page(viewport={"width": 1280, "height": 1600})
    pg.goto(app.local_url)
    pg.get_by_role("tab", name="Train").click()
    mine = tmp_path / "mine.yaml"  # a YAML file loaded into the form; the keys the form lacks are kept
    mine.write_text(yaml.safe_dump({"base_model": str(tiny_model_dir), "output_dir": "somewhere/loaded",
                                    "data": {"train": ["examples/data/train.jsonl"]},
                                    "train": {"lr": 0.003, "grad_accum": 2}}))
    with pg.expect_file_chooser() as chooser:
        pg.click("#train-yaml-upload")
    chooser.value.set_files(str(mine))
    _wait(lambda: pg.input_value("#train-lr input") == "0.003", what="the loaded lr in the form")
    assert pg.locator("#train-name textarea, #train-name input").first.input_value() == "loaded" and "Loaded into the form" in pg.inner_text("#train-error")
    _pick(pg, "train-base", "model (model folder)")
    pg.locator("#train-files input[type=file]").set_input_files(str(_data(tmp_path)))
    _wait_text(pg, "#train-upload-report", "sums.jsonl: uploaded")
    _wait_text(pg, "#train-data-report", "sums.jsonl: format messages", timeout=60)
    assert "12 records" in pg.inner_text("#train-data-report")
    _wait(lambda: "sums.jsonl:1" in pg.inner_text("#train-preview"), what="the preview of the upload's first record")
    assert "What is 0 plus 0?" in pg.inner_text("#train-preview .context >> nth=0")  # the prompt: context only
    assert "0." in pg.inner_text("#train-preview .trained >> nth=0")  # the reply: trained on
    _fill(pg, "train-name", "sums")
    _fill(pg, "train-steps", "300")
    _fill(pg, "train-max-length", "64")
    _fill(pg, "train-lr", "2")  # a bad value: the CLI's message next to the form, Start refuses
    _wait_text(pg, "#train-error", "train.lr must be in (0, 1], got 2.0")
    _fill(pg, "train-lr", "0.01")
    _wait(lambda: pg.inner_text("#train-error").strip() == "", what="the message gone")
    pg.click("#train-yaml-box")
    _wait(lambda: "max_steps: 300" in pg.inner_text("#train-yaml") and "sums.jsonl" in pg.inner_text("#train-yaml"),
          what="the YAML in sync")
    assert "grad_accum: 2" in pg.inner_text("#train-yaml")

    pg.click("#train-estimate")  # the dry run: two real steps in a child process
    _wait(lambda: pg.locator("#train-estimate-out").is_visible() and "s/step measured" in
          pg.input_value("#train-estimate-out textarea"), timeout=120, what="the estimate")
    assert "peak" in pg.input_value("#train-estimate-out textarea")

    pg.click("#train-start")
    _wait(lambda: _step(pg) >= 3, timeout=120, what="the first steps")
    assert "/300" in pg.inner_text("#train-status") and "loss" in pg.inner_text("#train-status")
    shot = pg.locator("#train-curve").screenshot()
    _wait(lambda: _step(pg) >= 15, timeout=120, what="more steps")
    _wait(lambda: pg.locator("#train-curve").screenshot() != shot, timeout=10, what="the curve to change")
    if os.environ.get("TUNESMITH_SCREENSHOT"):  # the README's picture: the form, the preview and the live view
        pg.get_by_text("The YAML that will run").click()  # folded again: the YAML is long
        time.sleep(1.5)  # the plot redraws on each new row: not mid-redraw
        pg.screenshot(path=str(ROOT / "docs" / "img" / "train_tab.png"), full_page=True)

    pg.click("#train-stop")
    _wait_text(pg, "#train-status", "stopped", timeout=60)
    assert list((runs / "sums" / "checkpoints").glob("step-*/state.pt"))
    assert "checkpoint saved" in pg.inner_text("#train-log")
    stopped_at = _step(pg)
    pg.reload()  # the job is the server's: a fresh page shows it
    pg.get_by_role("tab", name="Train").click()
    _wait(lambda: "stopped" in pg.inner_text("#train-status"), timeout=15, what="the job after a reload")
    pg.click("#train-resume")
    _wait_text(pg, "#train-status", "finished", timeout=300)
    assert _step(pg) == 300 and stopped_at < 300
    assert f"resumed from {runs / 'sums' / 'checkpoints'}" in (runs / "sums" / "train.log").read_text()

    pg.get_by_role("tab", name="Chat").click()  # the new run is in the lists without a restart
    _pick(pg, "model-a", "sums")
    pg.click("#settings")
    _set_number(pg, "max-new", 16)
    _send(pg, "What is 2 plus 1?")
    _wait(lambda: "tokens in" in pg.inner_text("#status"), what="a reply from the new run")
    assert "sums" in pg.inner_text("#status") and _bot_text(pg)

    pg.get_by_role("tab", name="Runs").click()
    _wait_text(pg, "#run-summary", "optimizer steps", timeout=15)
    assert "300" in pg.inner_text("#run-summary") and "records" in pg.inner_text("#run-data")
    assert pg.locator("#run-curve img").count() == 1
    _pick(pg, "run-eval-file", "sums's data: sums.jsonl")  # the copy the run kept (the upload was the old page's)
    pg.click("#run-eval")
    _wait_text(pg, "#run-eval-table", "perplexity", timeout=180)
    header = pg.inner_text("#run-eval-table").split("metric")[1].splitlines()[0].split()
    assert header == ["tuned", "base"]  # the base-vs-tuned table `tunesmith eval` prints
    _wait(lambda: "done" in pg.inner_text("#run-eval-status"), timeout=10, what="the eval job's end")
    pg.close()
