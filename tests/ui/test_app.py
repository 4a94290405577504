"""The Gradio app over the tiny run, driven by `gradio_client` against a live app on 127.0.0.1."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import Client
from tunesmith.finetune.generate import GenerationParams
from tunesmith.ui.app import _for_model, _text, _user_index


def _expected(pool, model: str, message: str, max_new_tokens: int) -> str:
    gen, choice = pool.get(model)
    p = choice.params(GenerationParams(max_new_tokens=max_new_tokens, temperature=0))
    return gen.generate([{"role": "user", "content": message}], p).text


def _chat(url: str, message: str, model: str, max_new_tokens: int = 24) -> list[str]:
    """Every streamed update of one reply, as a fresh client (its own session) sees it."""
    job = Client(url, verbose=False).submit(message, model, "", None, max_new_tokens, 0.0, 1.0, 1.0, None,
                                            api_name="/chat")
    outputs = list(job)
    final = job.result()  # raises the app's error, if any
    return [*outputs, final]


def test_chat_streams(ui_app, pool, tiny_run_dir):
    updates = _chat(ui_app.local_url, "hello there", tiny_run_dir.name, max_new_tokens=32)
    assert updates[-1] == _expected(pool, tiny_run_dir.name, "hello there", 32)
    assert len(set(updates)) > 2  # the text grew in several steps
    assert all(updates[-1].startswith(u) for u in updates)


def test_two_sessions_at_once_are_not_mixed(ui_app, pool, tiny_run_dir):
    jobs = [("the capital of france", tiny_run_dir.name), ("two plus two", tiny_run_dir.name + ":base"),
            ("hello there", tiny_run_dir.name), ("the json module", tiny_run_dir.name + ":base")]
    with ThreadPoolExecutor(len(jobs)) as ex:
        got = list(ex.map(lambda j: _chat(ui_app.local_url, *j)[-1], jobs))
    assert got == [_expected(pool, model, msg, 24) for msg, model in jobs]


def test_unknown_or_escaping_model_is_refused(ui_app):
    with pytest.raises(Exception, match="Unknown model"):
        _chat(ui_app.local_url, "hi", "../../etc/passwd")


def test_history_helpers():
    hist = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "again"}]
    assert _text(hist[0]) == "hi"
    assert _for_model(" be brief ", hist)[:2] == [{"role": "system", "content": "be brief"},
                                                   {"role": "user", "content": "hi"}]
    assert _user_index(hist, 1) == 0 and _user_index(hist, 2) == 2 and _user_index([], 0) is None
