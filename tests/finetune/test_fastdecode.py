"""Compiled decode, one prompt or a batch: the same answers as eager decoding, and never silently the wrong adapter state."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from tunesmith.finetune import compiling, fastdecode
from tunesmith.finetune.generate import GenerationParams, Generator, load_generator

PROMPT = [{"role": "user", "content": "hello there, how are you?"}]
GREEDY = GenerationParams(max_new_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def compiled(tiny_run_dir: Path) -> Generator:
    return load_generator(tiny_run_dir, dtype=torch.float32, compile_decode=True)


def test_cache_length_fits_the_answer() -> None:
    assert [fastdecode.cache_length(n, None) for n in (1, 64, 65, 1100)] == [64, 64, 128, 1152]
    assert fastdecode.cache_length(1100, 1120) == 1120  # never past the context
    assert fastdecode.cache_length(600, 8192) == 640


def test_compiled_decode_answers_as_eager(compiled: Generator, tiny_gen: Generator) -> None:
    assert compiled.compiled_decode and compiled.why_no_compile is None
    assert hasattr(compiled.model.get_base_model(), "_compiled_call")  # transformers' compiled forward was used
    assert compiled.model.get_base_model().config._attn_implementation == fastdecode.ATTENTION
    want = tiny_gen.generate(PROMPT, GREEDY)
    got = compiled.generate(PROMPT, GREEDY)
    assert got.completion_tokens == want.completion_tokens > 1 and got.text == want.text
    assert "".join(c.text for c in compiled.stream(PROMPT, GREEDY)) == want.text
    sampled = GenerationParams(max_new_tokens=12, temperature=0.8, seed=3)
    assert compiled.generate(PROMPT, sampled).text == tiny_gen.generate(PROMPT, sampled).text


def test_grouped_attention_equals_transformers_sdpa() -> None:
    """One query token over 2 key/value heads shared by 6 query heads, with a padding mask: the same output as
    transformers' SDPA (which repeats the key/value heads under torch.compile)."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    q, k, v = torch.randn(2, 6, 1, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    mask[0, ..., 25:] = False
    got, _ = fastdecode.grouped_sdpa(module, q, k, v, mask, scaling=0.25)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    assert got.shape == want.shape == (2, 1, 6, 16)
    torch.testing.assert_close(got, want)


def test_one_compiled_step_serves_every_cache_length(compiled: Generator, tiny_gen: Generator) -> None:
    """After load (two warm-up answers) no answer length recompiles: the second graph's cache length is symbolic."""
    from torch._dynamo.utils import counters

    before = dict(counters["stats"])
    for n in (5, 70, 150):  # caches of 64, 128 and 192 positions
        p = GenerationParams(max_new_tokens=n, temperature=0)
        assert compiled.generate(PROMPT, p).text == tiny_gen.generate(PROMPT, p).text
    assert counters["stats"]["unique_graphs"] == before.get("unique_graphs", 0)


def test_batches_decode_compiled_as_eager_and_compile_nothing(compiled: Generator, tiny_gen: Generator,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Continuous batches of any size decode through the compiled step and answer as eager batches do; the batch
    graph was compiled at load, so no batch size, answer length or single answer compiles a new one."""
    from torch._dynamo.utils import counters

    assert compiled._batcher is not None
    assert compiled._batcher.step.__wrapped__ is compiled.model.get_base_model()._compiled_call  # type: ignore[attr-defined]
    steps: list[int] = []
    step = compiled._batcher.step

    def counted(**kwargs: Any) -> Any:
        steps.append(kwargs["input_ids"].shape[0])
        return step(**kwargs)

    monkeypatch.setattr(compiled._batcher, "step", counted)
    graphs = counters["stats"]["unique_graphs"]
    prompts: list[Any] = [PROMPT, "hi", "tell me a story about a cat", "2+2?", [{"role": "user", "content": "ok"}]]
    for n, size in ((24, 3), (70, 5), (5, 2)):
        p = GenerationParams(max_new_tokens=n, temperature=0)
        got = compiled.batch(prompts[:size], p)
        want = tiny_gen.batch(prompts[:size], p)
        assert [(c.text, c.finish_reason) for c in got] == [(c.text, c.finish_reason) for c in want]
        assert [c.prompt_tokens for c in got] == [c.prompt_tokens for c in want]
    assert compiled.generate(PROMPT, GREEDY).text == tiny_gen.generate(PROMPT, GREEDY).text
    assert {3, 5, 2, 1} <= set(steps)  # every batch size and the single answer decoded compiled
    assert counters["stats"]["unique_graphs"] == graphs


def test_adapter_switched_off_is_never_decoded_with_the_adapter(compiled: Generator, tiny_gen: Generator) -> None:
    """The guards dropped for speed are identities and tensor metadata; an adapter switched off (a value guard)
    must recompile, not reuse the graph traced with the adapter on."""
    base = GenerationParams(max_new_tokens=24, temperature=0, use_adapter=False)
    want = tiny_gen.generate(PROMPT, base).text
    assert want != tiny_gen.generate(PROMPT, GREEDY).text  # the adapter changes this answer
    assert compiled.generate(PROMPT, base).text == want  # use_adapter=False: the eager path
    with compiled.model.disable_adapter():  # switched off behind the Generator's back: the compiled path
        assert compiled.generate(PROMPT, GREEDY).text == want


def test_no_compiler_decodes_eager_and_says_why(tiny_run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tunesmith.finetune.compiling.compiler", lambda: None)
    gen = load_generator(tiny_run_dir, dtype=torch.float32, compile_decode=True)
    assert not gen.compiled_decode and gen.why_no_compile is not None and "C++ compiler" in gen.why_no_compile
    assert gen.generate(PROMPT, GREEDY).completion_tokens > 0


def test_a_model_call_running_beside_it_recompiles_nothing(compiled: Generator, tiny_gen: Generator) -> None:
    """Another model call running (a base-model answer, scoring, another model) takes its CPU share beside the
    continuous batch's loop, which keeps its team: dynamo guards on the thread count, so a loop that shrank its
    team recompiled the step in the middle of users' answers."""
    import threading

    from torch._dynamo.utils import counters

    from tunesmith.finetune.sharing import cpu_share

    graphs = counters["stats"]["unique_graphs"]
    inside, leave = threading.Event(), threading.Event()

    def other_call() -> None:
        with cpu_share():
            inside.set()
            leave.wait()

    t = threading.Thread(target=other_call)
    t.start()
    inside.wait()
    try:
        assert compiled.generate(PROMPT, GREEDY).text == tiny_gen.generate(PROMPT, GREEDY).text
    finally:
        leave.set()
        t.join()
    assert counters["stats"]["unique_graphs"] == graphs


def test_every_thread_running_a_compiled_step_has_room_for_every_models_graphs(compiled: Generator) -> None:
    """Every model's forward goes through one transformers wrapper, whose graphs dynamo caps (8, a setting each
    thread has its own of): the threads that run compiled steps (the batch loop's, each `generate` caller's) raise
    it to hold every compiled model's graphs."""
    need = compiling.graph_limit()
    assert need >= 8 + fastdecode.GRAPHS_PER_MODEL
    seen: list[int] = []
    assert compiled._batcher is not None
    step = compiled._batcher.step
    compiled._batcher.step = lambda **kw: (seen.append(torch._dynamo.config.recompile_limit), step(**kw))[1]
    try:
        compiled.generate(PROMPT, GenerationParams(max_new_tokens=3, temperature=0))
    finally:
        compiled._batcher.step = step
    assert len(seen) == 2 and seen[1] >= need  # the first step set it in the loop's thread (a new thread)
    fresh: list[int] = []
    thread = threading.Thread(target=lambda: (fastdecode.CompiledDecode.kwargs(compiled._compiled, 8, None),
                                              fresh.append(torch._dynamo.config.recompile_limit)))
    thread.start()
    thread.join()
    assert fresh == [need] and 8 <= torch._dynamo.config.recompile_limit <= need
