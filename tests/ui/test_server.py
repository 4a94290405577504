"""The OpenAI-compatible API, driven by the real `openai` client against a live uvicorn server on 127.0.0.1."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tunesmith.finetune.generate import GenerationParams

MSG = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=api.url, api_key="unused", max_retries=0, timeout=60)


def _expected(pool, model: str, max_tokens: int) -> str:
    gen, choice = pool.get(model)
    return gen.generate(MSG, choice.params(GenerationParams(max_new_tokens=max_tokens, temperature=0))).text


def test_models_lists_runs_and_bases(client, tiny_run_dir):
    ids = [m.id for m in client.models.list().data]
    assert ids[:2] == [tiny_run_dir.name, tiny_run_dir.name + ":base"]


def test_completion_matches_the_generation_api(client, pool, tiny_run_dir):
    r = client.chat.completions.create(model=tiny_run_dir.name, messages=MSG, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == _expected(pool, tiny_run_dir.name, 12)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    base = client.chat.completions.create(model=tiny_run_dir.name + ":base", messages=MSG, max_tokens=12, temperature=0)
    assert base.choices[0].message.content == _expected(pool, tiny_run_dir.name + ":base", 12)
    assert base.choices[0].message.content != r.choices[0].message.content


def test_stream_concatenates_to_the_completion(client, pool, tiny_run_dir):
    stream = client.chat.completions.create(model=tiny_run_dir.name, messages=MSG, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _expected(pool, tiny_run_dir.name, 16)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really incremental
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_concurrent_requests_are_batched_and_not_mixed(api, client, pool, tiny_run_dir):
    """Streamed and whole completions in flight together are rows of the same decode steps (continuous batching),
    and each gets its own answer."""
    prompts = [f"question number {i} about france" for i in range(4)]

    def ask(i: int) -> str:
        kw = dict(model=tiny_run_dir.name, messages=[{"role": "user", "content": prompts[i]}], max_tokens=10,
                  temperature=0)
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                           if c.choices)
        return client.chat.completions.create(**kw).choices[0].message.content

    gen, _ = pool.get(tiny_run_dir.name)
    assert gen.continuous_batching
    steps, rows = gen._batcher.steps, gen._batcher.rows_decoded
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(ask, range(4)))
    shared = (gen._batcher.rows_decoded - rows) - (gen._batcher.steps - steps)
    want = [gen.generate([{"role": "user", "content": p}], GenerationParams(max_new_tokens=10, temperature=0)).text
            for p in prompts]
    assert got == want
    assert shared > 0  # some steps decoded more than one request


def test_micro_batcher_shares_generate_calls_without_continuous_batching(tiny_run_dir):
    """The llama.cpp engine and models continuous batching cannot run: whole completions arriving together share one
    left-padded `generate` call, each with its own answer."""
    import torch

    from tunesmith.finetune import load_generator
    from tunesmith.ui.batching import Batcher

    gen = load_generator(tiny_run_dir, dtype=torch.float32, continuous_batching=False)
    batcher = Batcher(max_batch_size=4, window_s=0.2)
    p = GenerationParams(max_new_tokens=10, temperature=0)
    prompts = [f"question number {i} about france" for i in range(4)]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda q: batcher.generate(gen, q, p).text, prompts))
    assert got == [gen.generate(q, p).text for q in prompts]
    assert max(batcher.batch_sizes) > 1


@pytest.mark.parametrize(("kwargs", "error", "param"), [
    ({"model": "../../etc/passwd"}, openai.NotFoundError, "model"),
    ({"temperature": 5}, openai.BadRequestError, "temperature"),
    ({"messages": []}, openai.BadRequestError, "messages"),
    ({"n": 17}, openai.BadRequestError, "n"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, openai.BadRequestError, "messages.0.role"),
])
def test_bad_requests_get_openai_errors(client, tiny_run_dir, kwargs, error, param):
    args = {"model": tiny_run_dir.name, "messages": MSG, "max_tokens": 4, **kwargs}
    with pytest.raises(error) as e:
        client.chat.completions.create(**args)
    body = e.value.body
    assert set(body) >= {"message", "type", "param", "code"} and body["param"].startswith(param)


def test_unknown_route_and_broken_json(api):
    r = httpx.post(f"{api.url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{api.url}/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_api_key(api_with_key, tiny_run_dir):
    bad = openai.OpenAI(base_url=api_with_key.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=api_with_key.url, api_key="sekret", max_retries=0)
    assert good.models.list().data


def test_client_disconnect_cancels_generation(api, tiny_run_dir):
    body = {"model": tiny_run_dir.name, "messages": MSG, "max_tokens": 900, "temperature": 1.0, "stream": True,
            "seed": 0}
    api.app.state.finished.clear()
    with httpx.stream("POST", f"{api.url}/chat/completions", json=body, timeout=30) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                seen += 1
            if seen >= 3:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 10
    while not api.app.state.finished and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(api.app.state.finished) == [(tiny_run_dir.name, "cancelled")]


def test_langchain_chat_openai(api, pool, tiny_run_dir):
    lc = pytest.importorskip("langchain_openai")
    llm = lc.ChatOpenAI(base_url=api.url, api_key="unused", model=tiny_run_dir.name, temperature=0, max_tokens=12,
                        max_retries=0)
    assert llm.invoke("hello there").content == _expected(pool, tiny_run_dir.name, 12)
    assert "".join(c.content for c in llm.stream("hello there")) == _expected(pool, tiny_run_dir.name, 12)


def test_seeded_request_repeats_beside_another(client, tiny_run_dir):
    """A seed used to reseed the process-wide RNG, so a request sampling beside it changed the text."""
    kw = dict(model=tiny_run_dir.name, messages=MSG, max_tokens=16, temperature=1.0, seed=42)
    alone = client.chat.completions.create(**kw).choices[0].message.content
    other = dict(model=tiny_run_dir.name, messages=[{"role": "user", "content": "another prompt"}], max_tokens=24,
                 temperature=1.0)
    with ThreadPoolExecutor(4) as pool:
        noise = [pool.submit(client.chat.completions.create, **other) for _ in range(2)]
        seeded = [pool.submit(client.chat.completions.create, **kw),
                  pool.submit(client.chat.completions.create, stream=False, **kw)]
        got = [f.result().choices[0].message.content for f in seeded]
        [f.result() for f in noise]
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(stream=True, **kw) if c.choices)
    assert got == [alone, alone] and streamed == alone
