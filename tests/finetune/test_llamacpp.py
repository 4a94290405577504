"""llama.cpp (the xllamacpp wheel): the export check on a tiny run and on the embedded model's quickstart-sized run,
and `LlamaCppGenerator` behaving as `Generator` does (streaming, stop strings, cancellation, usage, finish reasons)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tunesmith.finetune.export import export_gguf
from tunesmith.finetune.generate import GenerationParams, load_generator

pytest.importorskip("xllamacpp", reason="llama.cpp checks need the xllamacpp wheel: pip install xllamacpp")

Q = [{"role": "user", "content": "Which module defines dumps?"}]
GREEDY = GenerationParams(max_new_tokens=12, temperature=0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def exported(tiny_run_dir: Path):
    """The run exported with the llama.cpp check on, where `--engine llama.cpp` looks for it (RUN/gguf/)."""
    return export_gguf(tiny_run_dir, "f16")


@pytest.fixture(scope="module")
def cpp(exported, tiny_run_dir: Path):
    return load_generator(tiny_run_dir, engine="llama.cpp")


def test_llamacpp_check_answers_like_transformers(exported):
    check = exported.llamacpp
    assert check is not None and check["same_answer"], check
    assert check["prompt_tokens"] > 10  # the template embedded in the file, tokenized as transformers does


def test_greedy_answer_and_usage_match_transformers(cpp, tiny_gen):
    want, got = tiny_gen.generate(Q, GREEDY), cpp.generate(Q, GREEDY)
    assert got.text.rstrip("\ufffd") == want.text.rstrip("\ufffd")
    assert (got.prompt_tokens, got.completion_tokens, got.finish_reason) == (want.prompt_tokens, 12, "length")
    assert cpp.count_tokens(cpp.render(Q)) == got.prompt_tokens and cpp.has_adapter is False


def test_stream_joins_to_the_answer_and_cuts_stop_strings(cpp):
    full = cpp.generate(Q, GREEDY).text
    stop = full.rstrip("\ufffd")[4:6]
    chunks = list(cpp.stream(Q, GenerationParams(max_new_tokens=12, temperature=0, stop=[stop])))
    done = chunks[-1]
    assert done.done and done.completion.finish_reason == "stop"
    text = "".join(c.text for c in chunks)
    assert text == done.completion.text == full[: full.find(stop)] and stop not in text


def test_cancel_stops_generation(cpp):
    cancel = threading.Event()
    it = cpp.stream(Q, GenerationParams(max_new_tokens=200, temperature=0), cancel=cancel)
    next(it)
    cancel.set()
    last = list(it)[-1]
    assert last.done and last.completion.finish_reason == "cancelled" and last.completion.completion_tokens < 200


def test_logprobs_match_transformers_and_scoring_is_refused(cpp, tiny_gen):
    p = GenerationParams(max_new_tokens=4, temperature=0, repetition_penalty=1.0, logprobs=True, top_logprobs=2)
    want, got = tiny_gen.generate(Q, p).logprobs, cpp.generate(Q, p).logprobs
    assert [g.token for g in got] == [w.token for w in want] and all(len(g.top) == 2 for g in got)
    assert [g.logprob for g in got] == pytest.approx([w.logprob for w in want], abs=0.02)  # f16 weights vs fp32
    streamed = list(cpp.stream(Q, p))[-1]
    assert streamed.done and [g.token for g in streamed.logprobs] == [g.token for g in got]
    with pytest.raises(ValueError, match="--engine transformers"):
        cpp.score([Q], ["yes", "no"])


@pytest.mark.slow
def test_embedded_quickstart_run_exports_and_llamacpp_stops_at_eos(tmp_path):
    """A quickstart-sized run of the embedded SmolLM2 (a few steps of configs/quickstart.yaml): f16 must answer the
    probe exactly as transformers and stop at EOS; q8_0 must agree above its threshold."""
    from tunesmith.finetune import load_config, train

    out = tmp_path / "quick"
    train(load_config("configs/quickstart.yaml", [f"output_dir={out}", "train.max_steps=4", "train.eval_every=0",
                                                  "train.save_every=0"]))
    res = export_gguf(out, "f16")
    assert res.agreement == 1.0 and res.pre_tokenizer == "smollm"
    check = res.llamacpp
    assert check["same_answer"], check
    assert check["stops_at_eos"] and check["finish_reason"] == "stop", check  # no run-on text past EOS
    q8 = export_gguf(out, "q8_0")
    assert q8.agreement >= 0.9 and q8.size_bytes < 0.6 * res.size_bytes
    gen = load_generator(out, engine="llama.cpp")
    reply = gen.generate([{"role": "user", "content": "Which module defines dumps?"}],
                         GenerationParams(max_new_tokens=64, temperature=0))
    assert reply.finish_reason == "stop" and reply.text.strip()


def test_api_answers_what_llamacpp_cannot_serve_with_400(cpp, tiny_run_dir):
    """Scoring (echo + logprobs) and base-model answers need transformers: a 400 naming the fix, not a 500."""
    from fastapi.testclient import TestClient

    from tunesmith.ui.pool import ModelPool
    from tunesmith.ui.server import build_api

    pool = ModelPool(tiny_run_dir.parent, default=str(tiny_run_dir), engine="llama.cpp")
    client = TestClient(build_api(pool))
    r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 1, "echo": True, "logprobs": 1,
                                             "temperature": 0})
    assert r.status_code == 400 and "--engine transformers" in r.json()["error"]["message"], r.text
    ok = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert ok.status_code == 200, ok.text
