"""Continuous batching: rows that join, leave, jump the write position and outgrow the cache answer exactly as each
prompt would alone, and concurrent callers (streams too) really share decode steps."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from tunesmith.finetune.continuous import Answer, ContinuousBatcher
from tunesmith.finetune.generate import GenerationParams, Generator, load_generator

PROMPT = [{"role": "user", "content": "hello there, how are you?"}]


@pytest.fixture(scope="module")
def eager(tiny_run_dir: Path) -> Generator:
    """The reference: one `generate` call per request."""
    return load_generator(tiny_run_dir, dtype=torch.float32, continuous_batching=False)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _alone(model: Any, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_rows_joining_and_leaving_answer_as_alone(tiny_gen: Generator) -> None:
    """A long answer; others join mid-way: one shorter prompt, one longer than the write position (a masked gap for
    the rows in flight), one into a finished row's slot. The cache grows past 64 positions and drops a front no row
    reads. Every row's tokens equal that prompt decoded alone by transformers' `generate`."""
    model = tiny_gen.model
    batcher = ContinuousBatcher(model)
    plan = {"a": (_prompt(10, 0), 150), "b": (_prompt(40, 1), 30), "c": (_prompt(100, 2), 40), "d": (_prompt(5, 3), 150)}
    answers = {k: Answer(ids, n, set()) for k, (ids, n) in plan.items()}
    joined: dict[str, int] = {}  # row count of the batch when each newcomer was submitted

    def on_a(new: list[int]) -> None:
        for key, at in (("b", 20), ("c", 40), ("d", 100)):
            if len(new) == at:
                joined[key] = sum(r is not None for r in batcher.rows)
                batcher.submit(answers[key])

    answers["a"].on_tokens = on_a
    batcher.submit(answers["a"]).result()
    for key in "bcd":
        answers[key].done.result(timeout=60)
    with torch.inference_mode():
        for key, (ids, n) in plan.items():
            assert answers[key].new == _alone(model, ids, n), key
    assert joined == {"b": 1, "c": 2, "d": 1}  # b finished (30 tokens) before d came, so d took its slot
    assert batcher.grown and batcher.dropped  # the cache grew, and later dropped positions nobody read
    assert batcher.steps < batcher.rows_decoded  # steps were shared
    assert not batcher.rows and not batcher.layers  # idle: the cache is freed


def test_concurrent_streams_share_steps_and_answer_as_alone(tiny_gen: Generator, eager: Generator) -> None:
    assert tiny_gen.why_no_batching is None and tiny_gen._batcher is not None
    batcher = tiny_gen._batcher
    prompts: list[Any] = [PROMPT, "hi", "tell me a story about a cat", "2+2?"]
    params = [GenerationParams(max_new_tokens=n, temperature=0) for n in (40, 12, 30, 25)]
    params[1] = GenerationParams(max_new_tokens=30, temperature=0.9, seed=5)  # its own sampler, beside greedy rows
    params[3] = GenerationParams(max_new_tokens=25, temperature=0, presence_penalty=1.5, repetition_penalty=1.3)
    texts: list[str] = [""] * len(prompts)
    start = threading.Barrier(len(prompts))
    steps, rows = batcher.steps, batcher.rows_decoded

    def stream(i: int) -> None:
        start.wait()
        texts[i] = "".join(c.text for c in tiny_gen.stream(prompts[i], params[i]))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert texts == [eager.generate(q, p).text for q, p in zip(prompts, params)]
    assert batcher.rows_decoded - rows > batcher.steps - steps  # streams shared decode steps
    assert tiny_gen.batch(prompts, params[0]) == eager.batch(prompts, params[0])  # Completion for Completion


def test_stop_strings_cancel_and_slots(tiny_run_dir: Path, eager: Generator) -> None:
    """Two slots for five prompts; a stop string ends one row, a cancelled request ends only its own rows."""
    gen = load_generator(tiny_run_dir, dtype=torch.float32)
    assert gen._batcher is not None
    gen._batcher.slots = 2
    seen: list[int] = []
    step = gen._batcher.step
    gen._batcher.step = lambda **kw: (seen.append(kw["input_ids"].shape[0]), step(**kw))[1]
    prompts: list[Any] = [PROMPT, "hi", "tell me a story about a cat", "2+2?", "ok"]
    p = GenerationParams(max_new_tokens=30, temperature=0, stop=["e"])
    assert gen.batch(prompts, p) == eager.batch(prompts, p)
    assert max(seen) == 2
    cancel = threading.Event()
    gen._batcher.slots = 16
    other = threading.Thread(target=lambda: out.append(gen.generate("hi", GenerationParams(max_new_tokens=60,
                                                                                         temperature=0))))
    out: list[Any] = []
    stream = gen.stream(PROMPT, GenerationParams(max_new_tokens=200, temperature=0), cancel=cancel)
    next(stream)
    other.start()
    cancel.set()
    last = list(stream)[-1]
    other.join()
    assert last.completion is not None and last.completion.finish_reason == "cancelled"
    assert out[0].finish_reason == "length" and out[0].text == eager.generate("hi", GenerationParams(
        max_new_tokens=60, temperature=0)).text


def test_json_and_logprobs_rows_and_base_answers_through_generate(tiny_gen: Generator, eager: Generator) -> None:
    """A JSON schema and logprobs are a row's own (its enforcer, its raw logits): the same answers as `generate`,
    decoded in the batch; base-model answers keep one `generate` call each (no batch step runs)."""
    assert tiny_gen._batcher is not None
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    rows = [GenerationParams(max_new_tokens=12, temperature=0, logprobs=True, top_logprobs=2),
            GenerationParams(max_new_tokens=30, temperature=0, json_schema=schema)]
    for p in rows:
        steps = tiny_gen._batcher.steps
        got, want = tiny_gen.generate(PROMPT, p), eager.generate(PROMPT, p)
        assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
        assert tiny_gen._batcher.steps > steps
        if p.logprobs:
            assert got.logprobs is not None and want.logprobs is not None and len(got.logprobs) == len(want.logprobs)
            for g, w in zip(got.logprobs, want.logprobs):
                assert g.token == w.token and g.logprob == pytest.approx(w.logprob, abs=1e-4)
                assert [t for t, *_ in g.top] == [t for t, *_ in w.top]
    json_batch = tiny_gen.batch([PROMPT, "hi", "2+2?"], rows[1])
    assert [c.text for c in json_batch] == [c.text for c in eager.batch([PROMPT, "hi", "2+2?"], rows[1])]
    steps = tiny_gen._batcher.steps
    base = GenerationParams(max_new_tokens=8, temperature=0, use_adapter=False)
    assert tiny_gen.generate(PROMPT, base) == eager.generate(PROMPT, base)
    assert tiny_gen._batcher.steps == steps


def test_an_error_reaches_every_caller_and_the_batcher_recovers(tiny_run_dir: Path) -> None:
    gen = load_generator(tiny_run_dir, dtype=torch.float32)
    assert gen._batcher is not None
    step = gen._batcher.step

    def broken(**kw: Any) -> Any:
        raise RuntimeError("boom")

    gen._batcher.step = broken
    with pytest.raises(RuntimeError, match="boom"):
        gen.batch(["hi", "ok"], GenerationParams(max_new_tokens=5, temperature=0))
    gen._batcher.step = step
    assert gen.generate("hi", GenerationParams(max_new_tokens=5, temperature=0)).completion_tokens == 5


def test_long_prompts_prefill_in_chunks_between_decode_steps(tiny_gen: Generator,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """With a row decoding, a 70-token prompt is prefilled 16 tokens a forward, the row getting a token between each
    and the cache made room for the prompt in a step of its own before the last chunk; the prompt queued behind it waits its turn, a prompt cancelled after its first chunk ends with no tokens, and
    alone (no row decoding) a prompt over PREFILL_TOKENS is chunked too. Every answer is as alone."""
    model = tiny_gen.model
    batcher = ContinuousBatcher(model, prefill_chunk=16)
    carrier = Answer(_prompt(10, 0), 60, set())
    long, behind, dropped = Answer(_prompt(70, 1), 20, set()), Answer(_prompt(20, 2), 10, set()), \
        Answer(_prompt(40, 3), 5, set())
    seen: list[tuple[list[int], int]] = []  # (prompt lengths of each prefill forward, carrier's tokens then)
    prefill = batcher._prefill

    def logged(group: Any, budget: int) -> Any:
        seen.append(([len(a.ids) for a, _, _ in group], len(carrier.new)))
        out = prefill(group, budget)
        if batcher._next is not None and batcher._next[0] is dropped and batcher._next[1]:
            dropped.cancel.set()  # cancelled half-prefilled
        return out

    batcher._prefill = logged  # type: ignore[method-assign]

    def on_carrier(new: list[int]) -> None:
        if len(new) == 3:
            for a in (long, behind, dropped):
                batcher.submit(a)

    carrier.on_tokens = on_carrier
    batcher.submit(carrier).result()
    for a in (long, behind, dropped):
        a.done.result(timeout=60)
    long_calls = [n for sizes, n in seen if sizes == [70]]
    assert len(long_calls) == 5 and long_calls == sorted(set(long_calls))  # 16+16+16+16+6: a decode step between
    assert long_calls[-1] - long_calls[-2] == 2  # before the last chunk, room (`at` moved to 70, a row): a step apart
    assert [sizes for sizes, _ in seen[6:]] == [[20], [20], [40]]  # then `behind` (16+4), then `dropped` once
    assert batcher.chunks == 4 + 1 + 1
    assert dropped.cancelled and dropped.new == [] and dropped.done.done()
    with torch.inference_mode():
        for a in (carrier, long, behind):
            assert a.new == _alone(model, a.ids, a.max_new_tokens)
    monkeypatch.setattr("tunesmith.finetune.continuous.PREFILL_TOKENS", 32)
    alone = Answer(_prompt(70, 4), 8, set())
    before = batcher.chunks
    batcher.submit(alone).result()
    assert batcher.chunks - before == 2  # 32 + 32 + 6
    with torch.inference_mode():
        assert alone.new == _alone(model, alone.ids, 8)
