"""The Gradio app over the tiny run, driven by `gradio_client` against a live app on 127.0.0.1."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import Client

from tunesmith.finetune.generate import GenerationParams
from tunesmith.ui.app import _for_model, _plain, _text, _user_index


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


def test_one_turn_per_session_and_stop_reaches_it():
    from tunesmith.ui.app import Turns

    t = Turns()
    assert t.arm("s1") and not t.arm("s1")  # a second Send while the first is in flight is refused
    assert t.arm("s2")  # another browser is not affected
    turn = t.claim("s1")
    assert turn is not None and t.claim("s1") is None  # a refused chain's generation step finds nothing to run
    assert not t.arm("s1")  # still refused while the reply streams
    assert t.stop("s1") and turn.cancel.is_set()  # Stop reaches the running reply
    t.release("s1", turn)
    assert not t.busy("s1") and t.arm("s1")
    fresh = t.claim("s1")
    t.release("s1", turn)  # a late release of the old turn leaves the new one alone
    assert t.busy("s1") and not fresh.cancel.is_set()
    assert t.busy("s2") and not t.stop("nobody")


def test_a_turn_the_queue_never_ran_is_given_up():
    from tunesmith.ui.app import Turns

    t = Turns(stale_s=0.0)
    assert t.arm("s") and t.arm("s")  # armed, never claimed: the next Send may take over
    t.claim("s")
    assert not t.arm("s")  # a claimed (running) turn is never taken over


def test_sliders_and_chat_api_start_from_generation_params(pool):
    import inspect

    import gradio as gr

    from tunesmith.ui.app import DEFAULTS, build_app

    d = GenerationParams()
    assert DEFAULTS == d
    app = build_app(pool)
    sliders = {b.elem_id: b.value for b in app.blocks.values() if isinstance(b, gr.Slider)}
    for prefix in ("", "doc-"):  # the Chat tab's and the Documents tab's own
        assert (sliders[f"{prefix}temperature"], sliders[f"{prefix}top-p"], sliders[f"{prefix}top-k"],
                sliders[f"{prefix}max-new"], sliders[f"{prefix}rep"]) == (
            d.temperature, d.top_p, d.top_k, d.max_new_tokens, d.repetition_penalty)
    chat = next(f.fn for f in app.fns.values() if f.api_name == "chat")
    sig = inspect.signature(chat).parameters
    assert {k: sig[k].default for k in ("max_new_tokens", "temperature", "top_p", "repetition_penalty")} == {
        "max_new_tokens": d.max_new_tokens, "temperature": d.temperature, "top_p": d.top_p,
        "repetition_penalty": d.repetition_penalty}


def test_status_counts_generation_time_per_pane():
    from tunesmith.finetune.generate import Completion
    from tunesmith.ui.app import _status

    done = [Completion("x", 3, 12, "length"), None]
    assert _status(["tuned", "tuned:base"], done, [0.5, 0.0]) == (
        "**tuned**: 12 tokens in 0.5 s, length · **tuned:base**: generating…")


def test_trained_system_prompt_is_read_from_the_run(tmp_path, tiny_run_dir, tiny_gen):
    import shutil

    import yaml

    from tunesmith.finetune.generate import load_generator

    assert tiny_gen.system_prompt is None  # the tiny run was trained without one
    run = tmp_path / "with-prompt"
    shutil.copytree(tiny_run_dir, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "data": {"system_prompt": "Answer in one word."}}))
    assert load_generator(run).system_prompt == "Answer in one word."


def test_share_needs_a_login(capsys):
    from tunesmith.cli import main
    from tunesmith.ui.app import launch

    assert main(["ui", "--share"]) == 2
    assert "--auth USER:PASSWORD" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--auth USER:PASSWORD"):
        launch(None, share=True)  # refused before anything is served


def test_saved_chat_is_plain_and_keeps_each_replys_model():
    from_gradio = [{"role": "user", "metadata": None, "content": [{"text": "hi", "type": "text"}], "options": None},
                   {"role": "assistant", "metadata": {"title": "tuned"}, "content": [{"text": "yo", "type": "text"}]},
                   "junk", {"role": "system", "content": "x"}]
    assert _plain(from_gradio) == [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "yo", "metadata": {"title": "tuned"}}]
    assert _plain(None) == [] and _plain({"a": 1}) == []
