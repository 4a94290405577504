"""TunedChatModel on the tiny random run: streaming, stop strings, usage, batch, async, cancellation, errors.

The tiny model writes gibberish, so these tests check mechanics (same text by every path, counts, timing), never content.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage

from tunesmith.chains import ChainModelError, TunedChatModel, load_chat_model
from tunesmith.chains.chat_model import to_chat


def _generate_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("tunesmith-generate", "tunesmith-pump") and t.is_alive()]


def _wait_no_generate_thread(timeout: float) -> float:
    start = time.monotonic()
    while _generate_threads():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"generate thread still running {timeout} s after cancelling")
        time.sleep(0.02)
    return time.monotonic() - start


def test_invoke_fills_usage_and_finish_reason(tiny_chat: TunedChatModel) -> None:
    msg = tiny_chat.invoke("Hello")
    assert msg.content
    assert msg.response_metadata["finish_reason"] == "length"  # 12 tokens of gibberish never end on their own
    assert msg.response_metadata["model_name"] == tiny_chat.model_name
    u = msg.usage_metadata
    assert u["output_tokens"] == 12
    prompt = tiny_chat.generator.render([{"role": "user", "content": "Hello"}])
    assert u["input_tokens"] == tiny_chat.generator.count_tokens(prompt)
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"]


def test_stream_is_incremental_and_matches_invoke(tiny_chat: TunedChatModel) -> None:
    chunks = list(tiny_chat.stream("Hello"))
    texts = [c.content for c in chunks if c.content]
    assert len(texts) >= 3, "expected text token by token, not one block"
    full = chunks[0]
    for c in chunks[1:]:
        full += c
    assert full.content == tiny_chat.invoke("Hello").content
    assert isinstance(chunks[-1], AIMessageChunk) and chunks[-1].chunk_position == "last"
    assert [c for c in chunks if c.usage_metadata] == [chunks[-1]], "usage must be on exactly one chunk"
    assert full.usage_metadata["output_tokens"] == 12
    assert full.response_metadata["finish_reason"] == "length"


def test_multi_token_stop_string_is_cut_and_excluded(tiny_chat: TunedChatModel) -> None:
    text = tiny_chat.invoke("Hello").content
    gen = tiny_chat.generator
    stop = next(text[i:j] for i in range(1, len(text)) for j in range(i + 3, len(text))
                if "\ufffd" not in text[i:j] and text.find(text[i:j]) == i and gen.count_tokens(text[i:j]) >= 2)
    cut = text[: text.find(stop)]
    msg = tiny_chat.invoke("Hello", stop=[stop])
    assert msg.content == cut
    assert msg.response_metadata["finish_reason"] == "stop"
    assert msg.usage_metadata["output_tokens"] < 12
    streamed = "".join(c.content for c in tiny_chat.stream("Hello", stop=[stop]))
    assert streamed == cut
    bound = tiny_chat.model_copy(update={"stop": [stop]})  # stop set on the model, as in `stop=` at construction
    assert bound.invoke("Hello").content == cut


def test_batch_is_one_padded_generate_call_with_the_same_answers(tiny_chat: TunedChatModel,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = ["Hello", "Which module defines dumps?", [SystemMessage("Be brief."), HumanMessage("Hi")]]
    singles = [tiny_chat.invoke(p) for p in prompts]
    gen = tiny_chat.generator
    calls = []
    real_batch = gen.batch
    monkeypatch.setattr(gen, "batch", lambda ps, *a, **kw: calls.append(len(ps)) or real_batch(ps, *a, **kw))
    monkeypatch.setattr(gen, "generate", lambda *a, **kw: pytest.fail("batch must not call generate per input"))
    batched = tiny_chat.batch(prompts)
    assert calls == [3]
    assert [m.content for m in batched] == [m.content for m in singles]
    assert [m.usage_metadata for m in batched] == [m.usage_metadata for m in singles]
    assert asyncio.run(tiny_chat.abatch(prompts))[1].content == singles[1].content
    assert calls == [3, 3]


def test_sampling_params_and_adapter_switch(tiny_chat: TunedChatModel) -> None:
    a = tiny_chat.invoke("Hello", temperature=1.0, seed=1).content
    b = tiny_chat.invoke("Hello", temperature=1.0, seed=1).content
    assert a == b, "the same seed must give the same sample"
    assert tiny_chat.invoke("Hello", max_tokens=3).usage_metadata["output_tokens"] == 3
    assert tiny_chat.invoke("Hello", use_adapter=False).content != tiny_chat.invoke("Hello").content
    with pytest.raises(TypeError, match="temprature"):
        tiny_chat.invoke("Hello", temprature=0.5)
    with pytest.raises(ValueError, match="load_chat_model"):
        tiny_chat.invoke("Hello", model="other-model")


def test_async_invoke_and_stream(tiny_chat: TunedChatModel) -> None:
    async def go():
        msg = await tiny_chat.ainvoke("Hello")
        chunks = [c async for c in tiny_chat.astream("Hello")]
        return msg, chunks

    msg, chunks = asyncio.run(go())
    assert "".join(c.content for c in chunks) == msg.content == tiny_chat.invoke("Hello").content
    assert sum(1 for c in chunks if c.content) >= 3
    assert chunks[-1].usage_metadata["output_tokens"] == 12


def test_cancelled_astream_task_stops_the_generate_thread(tiny_chat: TunedChatModel) -> None:
    """900 tokens take ~20 s on the tiny model; cancelling after the first chunk must end the thread at once."""
    long = tiny_chat.model_copy(update={"max_tokens": 900})

    async def consume(got: list[str]) -> None:
        async for c in long.astream("Hello"):
            got.append(c.content)

    async def go() -> float:
        got: list[str] = []
        task = asyncio.create_task(consume(got))
        while not got:
            await asyncio.sleep(0.01)
        assert _generate_threads(), "generation should be running"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return len(got)

    start = time.monotonic()
    asyncio.run(go())
    _wait_no_generate_thread(timeout=5)
    assert time.monotonic() - start < 10


def test_cancelled_ainvoke_and_closed_stream_stop_generation(tiny_chat: TunedChatModel) -> None:
    long = tiny_chat.model_copy(update={"max_tokens": 900})

    async def go() -> None:
        task = asyncio.create_task(long.ainvoke("Hello"))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    _wait_no_generate_thread(timeout=5)

    it = long.stream("Hello")
    next(it), next(it)
    it.close()  # the consumer walks away: the generate thread must not run on for 900 tokens
    _wait_no_generate_thread(timeout=5)


def test_timeout_cuts_generation(tiny_chat: TunedChatModel) -> None:
    slow = tiny_chat.model_copy(update={"max_tokens": 900, "timeout": 0.3})
    start = time.monotonic()
    msg = slow.invoke("Hello")
    assert msg.response_metadata["finish_reason"] == "cancelled"
    assert time.monotonic() - start < 5


def test_messages_convert_to_chat_roles() -> None:
    from langchain_core.messages import AIMessage, ChatMessage

    msgs = [SystemMessage("s"), HumanMessage("u", name="bob"), AIMessage("a"), ChatMessage(role="user", content="c")]
    assert to_chat(msgs) == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                             {"role": "assistant", "content": "a"}, {"role": "user", "content": "c"}]
    with pytest.raises(ValueError, match="text only"):
        to_chat([HumanMessage(content=[{"type": "image", "url": "http://x/y.png"}])])


def test_missing_run_names_the_path_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / "runs" / "real-run").mkdir(parents=True)
    with pytest.raises(ChainModelError, match=r"No run or model at .*typo.*real-run.*embedded"):
        load_chat_model(str(tmp_path / "runs" / "typo"))


def test_unfinished_run_and_mismatched_base_are_clear(tiny_run_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "killed-run"
    shutil.copytree(tiny_run_dir, broken)
    shutil.rmtree(broken / "adapter")
    with pytest.raises(ChainModelError, match="no finished adapter.*--resume"):
        load_chat_model(broken)

    other = tmp_path / "other-base-run"
    shutil.copytree(tiny_run_dir, other)
    (other / "adapter" / "tunesmith_base.json").write_text(json.dumps(
        {"fingerprint": "llama|4096|32|32|32000|11008", "base_model": "some-7b", "summary": "7B"}))
    with pytest.raises(ChainModelError, match="different base model"):
        load_chat_model(other)


def test_structured_output_is_constrained_json_and_reports_a_cut_reply(tiny_chat: TunedChatModel) -> None:
    """The tiny model is random, yet decoding held to the schema gives a valid City; 12 tokens cannot hold one."""
    from pydantic import BaseModel

    class City(BaseModel):
        name: str

    out = tiny_chat.with_structured_output(City, include_raw=True, max_retries=1).invoke("Name a city.")
    assert out["parsed"] is None and "cut off at max_tokens=12" in str(out["parsing_error"])
    assert out["raw"].content
    roomy = tiny_chat.model_copy(update={"max_tokens": 300})
    assert isinstance(roomy.with_structured_output(City).invoke("Name a city."), City)
