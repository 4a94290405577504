"""The generation API on the tiny model: stop strings, streaming increments, batching, cancel, base vs tuned."""

from __future__ import annotations

import threading
import time

import pytest

from tunesmith.finetune.generate import GenerationParams, load_generator

MSG = [{"role": "user", "content": "hello there"}]
GREEDY = GenerationParams(max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def gen(tiny_run_dir):
    return load_generator(tiny_run_dir)


def test_generate_counts_and_finish_reason(gen):
    c = gen.generate(MSG, GREEDY)
    assert c.finish_reason in ("length", "stop")
    assert c.prompt_tokens == gen.count_tokens(gen.render(MSG))
    assert 1 <= c.completion_tokens <= 12
    assert gen.render(MSG).endswith("<|im_start|>assistant\n")


def test_stream_concatenates_to_generate(gen):
    chunks = list(gen.stream(MSG, GREEDY))
    assert chunks[-1].done and chunks[-1].completion is not None
    text = "".join(c.text for c in chunks)
    assert text == gen.generate(MSG, GREEDY).text
    assert len([c for c in chunks if c.text]) > 1  # really incremental


def test_multi_token_stop_string_is_cut(gen):
    full = gen.generate(MSG, GREEDY).text
    assert len(full) > 6
    stop = full[3:7]
    c = gen.generate(MSG, GenerationParams(max_new_tokens=12, temperature=0, stop=[stop]))
    assert c.text == full[: full.find(stop)] and c.finish_reason == "stop"
    streamed = "".join(ch.text for ch in gen.stream(MSG, GenerationParams(max_new_tokens=12, temperature=0, stop=[stop])))
    assert streamed == c.text


def test_batch_matches_single_greedy(gen):
    prompts = [MSG, [{"role": "user", "content": "a considerably longer question about the capital of france"}]]
    batched = gen.batch(prompts, GREEDY)
    single = [gen.generate(p, GREEDY) for p in prompts]
    assert [b.text for b in batched] == [s.text for s in single]
    assert [b.prompt_tokens for b in batched] == [s.prompt_tokens for s in single]


def test_base_differs_from_tuned(gen):
    tuned = gen.generate(MSG, GREEDY).text
    base = gen.generate(MSG, GenerationParams(max_new_tokens=12, temperature=0, use_adapter=False)).text
    assert tuned != base
    assert gen.generate(MSG, GREEDY).text == tuned  # adapter back on afterwards


def test_cancel_stops_generation(gen):
    cancel = threading.Event()
    # greedy: this random model then never writes EOS (it runs to its context's end, ~5 s), so only the cancel can
    # end the answer; sampled, it drew EOS after 36-860 tokens, sometimes before the cancel came
    params = GenerationParams(max_new_tokens=100000, temperature=0)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("c", gen.generate(MSG, params, cancel=cancel)))
    t.start()
    time.sleep(0.3)
    cancel.set()
    t.join(timeout=10)
    assert not t.is_alive()
    assert out["c"].finish_reason == "cancelled" and out["c"].completion_tokens < 100000


def test_closing_stream_stops_thread(gen):
    it = gen.stream(MSG, GenerationParams(max_new_tokens=100000, temperature=1.0))
    next(it)
    it.close()
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name == "tunesmith-generate"]


def test_bad_params_are_rejected():
    with pytest.raises(ValueError, match="top_p"):
        GenerationParams(top_p=0)
    assert GenerationParams(stop=["", "END"]).stop == ["END"]


def test_prompt_over_the_context_is_refused_not_cut(gen):
    from tunesmith.finetune.generate import ContextError

    long = [{"role": "user", "content": "word " * 2000}]  # the tiny model reads 1024 positions
    with pytest.raises(ContextError, match="reads at most 1024"):
        gen.generate(long, GREEDY)
    near = [{"role": "user", "content": "word " * 150}]
    c = gen.generate(near, GenerationParams(max_new_tokens=500, temperature=0))
    assert c.prompt_tokens + c.completion_tokens <= 1024  # the answer stops at the context's end
