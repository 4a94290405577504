"""OpenAI protocol features of `/v1/chat/completions` (structured output, tools, logprobs, penalties, n), driven by the
real `openai` client and LangChain's `ChatOpenAI` against a live server over the tiny run, and checked against the
model itself: manual forward passes for logprobs, a manual greedy loop for the penalty formula."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
import torch
from pydantic import BaseModel

from tunesmith.finetune.generate import GenerationParams
from tunesmith.finetune.logits import PresenceFrequencyPenalty

MSG = [{"role": "user", "content": "hello there"}]


class Pick(BaseModel):
    """Closed choices and a boolean: a random model cannot ramble inside a string, so the object always closes."""

    color: Literal["red", "green", "blue"]
    ok: bool


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=api.url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm(api, tiny_run_dir):
    lc = pytest.importorskip("langchain_openai")
    return lc.ChatOpenAI(base_url=api.url, api_key="unused", model=tiny_run_dir.name, temperature=0, max_tokens=120,
                         max_retries=0)


def _ask(client, tiny_run_dir, **kw):
    return client.chat.completions.create(**{"model": tiny_run_dir.name, "messages": MSG, "max_tokens": 8,
                                             "temperature": 0, **kw})


# -- structured output -------------------------------------------------------------------------------------------
def test_with_structured_output_json_schema_returns_the_object(llm):
    got = llm.with_structured_output(Pick, method="json_schema").invoke("hello there")
    assert isinstance(got, Pick)


def test_json_schema_response_parses_and_follows_the_schema(client, tiny_run_dir):
    schema = Pick.model_json_schema()
    r = _ask(client, tiny_run_dir, max_tokens=120,
             response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    Pick.model_validate_json(r.choices[0].message.content)
    free = _ask(client, tiny_run_dir, max_tokens=120).choices[0].message.content
    with pytest.raises(ValueError):  # the same request without the grammar is no JSON: the grammar did it
        Pick.model_validate_json(free)


def test_json_schema_streams(client, tiny_run_dir):
    chunks = list(_ask(client, tiny_run_dir, max_tokens=120, stream=True, response_format={
        "type": "json_schema", "json_schema": {"name": "pick", "schema": Pick.model_json_schema()}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    Pick.model_validate_json(text)


def test_json_object_mode_writes_a_json_object(client, tiny_run_dir):
    r = _ask(client, tiny_run_dir, max_tokens=40, response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.lstrip().startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_function_calling_needs_a_tool_template(llm, client, tiny_run_dir):
    """ChatML (the tiny run's template, SmolLM2's) cannot show the model a tool list: a clear 400, not a silent
    text answer that LangChain then fails to parse."""
    with pytest.raises(openai.BadRequestError) as e:
        llm.with_structured_output(Pick, method="function_calling").invoke("hello there")
    assert e.value.body["param"] == "tools" and "tool support" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        llm.bind_tools([Pick], tool_choice="any").invoke("hello there")
    # tool_choice "none" means no tools: answered as plain text
    r = _ask(client, tiny_run_dir, tools=[{"type": "function", "function": {"name": "pick", "parameters":
                                                                             Pick.model_json_schema()}}],
             tool_choice="none")
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


# -- logprobs ------------------------------------------------------------------------------------------------------
def _ids(gen, logprobs) -> list[int]:
    """Token ids back from the API's `bytes` (byte-level BPE spells each byte as one printable character)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    enc = bytes_to_unicode()
    return gen.tokenizer.convert_tokens_to_ids(["".join(enc[b] for b in t.bytes) for t in logprobs])


def test_logprobs_agree_with_a_forward_pass(client, pool, tiny_run_dir):
    r = _ask(client, tiny_run_dir, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert b"".join(bytes(t.bytes) for t in content).decode(errors="replace") == r.choices[0].message.content
    assert len(content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    for t in content:
        assert len(t.top_logprobs) == 3
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert t.top_logprobs[0].bytes == t.bytes and t.top_logprobs[0].logprob == t.logprob  # greedy: the top one
    gen, _ = pool.get(tiny_run_dir.name)
    prompt = gen.tokenizer(gen.render(MSG), add_special_tokens=False)["input_ids"]
    ids = _ids(gen, content)
    with torch.inference_mode():
        logits = gen.model(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1: -1].float()
    manual = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]
    # the pool loads bf16 on this CPU: a full forward and generate's cached steps round differently
    assert torch.allclose(manual, torch.tensor([t.logprob for t in content]), atol=0.05)
    plain = _ask(client, tiny_run_dir)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_logprobs_stream_in_chunks(client, tiny_run_dir):
    whole = _ask(client, tiny_run_dir, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    chunks = list(_ask(client, tiny_run_dir, logprobs=True, top_logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.bytes, round(t.logprob, 4)) for t in streamed] == [(t.bytes, round(t.logprob, 4)) for t in whole]


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.3, "seed": 0, "frequency_penalty": 1.0}])
def test_generation_logprobs_match_the_model_exactly(tiny_gen, sampling):
    """fp32, so exact: each entry is log_softmax of the raw logits after the tokens before it, not of the scores
    temperature and penalties made of them."""
    c = tiny_gen.generate(MSG, GenerationParams(max_new_tokens=6, logprobs=True, top_logprobs=2, **sampling))
    ids = _ids(tiny_gen, c.logprobs)
    prompt = tiny_gen.tokenizer(tiny_gen.render(MSG), add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = tiny_gen.model(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1: -1]
    lp = torch.log_softmax(logits.float(), -1)
    assert torch.allclose(lp.gather(-1, torch.tensor(ids)[:, None])[:, 0], torch.tensor([t.logprob for t in c.logprobs]),
                          atol=1e-4)
    if sampling["temperature"] == 0:
        assert ids == lp.argmax(-1).tolist()  # greedy picked the top token at every step


# -- penalties -----------------------------------------------------------------------------------------------------
def test_penalty_formula_counts_generated_tokens_only():
    ids = torch.tensor([[5, 5, 1, 1, 2]])  # prompt [5, 5], generated [1, 1, 2]
    out = PresenceFrequencyPenalty(presence=0.5, frequency=0.25, prompt_len=2)(ids, torch.zeros(1, 8))
    want = torch.zeros(8)
    want[1], want[2] = -(0.5 + 2 * 0.25), -(0.5 + 0.25)
    assert torch.equal(out[0], want)  # token 5 is only in the prompt: not penalized


def test_penalties_follow_openai_formula_in_generation(tiny_gen):
    """Greedy decoding with penalties equals a manual greedy loop that applies OpenAI's formula to the logits."""
    presence, frequency, steps = 0.03, 0.02, 12  # the size of the tiny model's logit gaps: changes some picks
    prompt = tiny_gen.tokenizer(tiny_gen.render(MSG), add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = tiny_gen.model(input_ids=torch.tensor([prompt + ids])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=logits.shape[0]).float()
            ids.append(int((logits - presence * (counts > 0) - frequency * counts).argmax()))
    p = GenerationParams(max_new_tokens=steps, temperature=0, presence_penalty=presence, frequency_penalty=frequency,
                         logprobs=True)
    got = tiny_gen.generate(MSG, p)
    plain = tiny_gen.generate(MSG, GenerationParams(max_new_tokens=steps, temperature=0, logprobs=True))
    assert _ids(tiny_gen, got.logprobs) == ids[: len(got.logprobs)]
    assert _ids(tiny_gen, plain.logprobs) != ids[: len(plain.logprobs)]  # the penalties did change the answer


def test_big_penalty_stops_repeats(client, tiny_run_dir):
    def tokens(**kw) -> list[tuple[int, ...]]:
        r = _ask(client, tiny_run_dir, max_tokens=30, logprobs=True, **kw)
        return [tuple(t.bytes) for t in r.choices[0].logprobs.content]

    plain = tokens()
    assert len(set(plain)) < len(plain)  # greedy on the random model repeats tokens
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalized = tokens(**kw)
        assert len(set(penalized)) == len(penalized), kw


# -- n -------------------------------------------------------------------------------------------------------------
def test_n_choices_are_reproducible_with_a_seed(client, tiny_run_dir):
    kw = {"n": 2, "temperature": 1.0, "seed": 7, "max_tokens": 10}
    first, again = _ask(client, tiny_run_dir, **kw), _ask(client, tiny_run_dir, **kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1] and texts[0] != texts[1]
    assert [c.message.content for c in again.choices] == texts
    single = _ask(client, tiny_run_dir, **{**kw, "n": 1})
    assert single.choices[0].message.content == texts[0]  # choice i samples with seed + i
    assert first.usage.prompt_tokens == single.usage.prompt_tokens


def test_n_streams_every_choice(client, tiny_run_dir):
    chunks = list(_ask(client, tiny_run_dir, n=2, stream=True, stream_options={"include_usage": True}))
    text = {0: "", 1: ""}
    finishes = {}
    for c in chunks:
        for ch in c.choices:
            text[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert set(finishes) == {0, 1} and text[0] == text[1] == _ask(client, tiny_run_dir).choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 2 * _ask(client, tiny_run_dir).usage.completion_tokens


# -- errors --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "param"), [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"n": 17}, "n"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/Gone"}}}}}}, "response_format.json_schema.schema"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages[0]"),
])
def test_bad_protocol_requests_name_the_field(client, tiny_run_dir, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, tiny_run_dir, **kwargs)
    assert e.value.body["param"].startswith(param)


def test_api_defaults_are_generation_params_defaults():
    from tunesmith.ui.server import ChatRequest, _params

    got, want = _params(ChatRequest(messages=MSG), 5), GenerationParams()
    assert (got.temperature, got.top_p, got.top_k, got.presence_penalty) == (want.temperature, want.top_p, want.top_k,
                                                                             want.presence_penalty)


# -- tools, with a template that renders them ----------------------------------------------------------------------
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nCall a tool: reply {\"name\": ..., \"arguments\": {...}}.\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}<tool_call>{{ call.function | tojson }}"
    "</tool_call>{% endfor %}{% else %}{{ message['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tool_api(api, tiny_run_dir, tmp_path_factory):
    """The tiny run with a Hermes-style template that lists `tools` (as Qwen 2.5's does), served like `api`."""
    import shutil
    import socket

    from tunesmith.ui.pool import ModelPool
    from tunesmith.ui.server import build_api

    # tests/ui/conftest.py's live-server class, taken from the fixture's object: every conftest is a module named
    # `conftest`, so with tests/chains collected too, `sys.modules["conftest"]` is another one
    live_api = type(api)
    run = tmp_path_factory.mktemp("tool-runs") / "tool-run"
    shutil.copytree(tiny_run_dir, run)
    for f in run.rglob("chat_template.jinja"):
        f.write_text(TOOL_TEMPLATE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with live_api(build_api(ModelPool(run.parent, default=str(run)), concurrency=2), port) as live:
        yield live


@pytest.fixture(scope="module")
def tool_llm(tool_api):
    lc = pytest.importorskip("langchain_openai")
    return lc.ChatOpenAI(base_url=tool_api.url, api_key="unused", model="tool-run", temperature=0, max_tokens=300,
                         max_retries=0)


class Box(BaseModel):
    pick: Pick
    flag: bool


def test_function_calling_returns_the_object(tool_llm):
    assert isinstance(tool_llm.with_structured_output(Pick, method="function_calling").invoke("hello there"), Pick)
    msg = tool_llm.bind_tools([Pick], tool_choice="any").invoke("hello there")
    assert [c["name"] for c in msg.tool_calls] == ["Pick"]
    Pick.model_validate(msg.tool_calls[0]["args"])


def test_nested_parameters_keep_their_defs(tool_api):
    """Pydantic puts a nested model in `$defs` (LangChain inlines them, raw clients do not); the grammar resolves
    `$ref` at its root only."""
    client = openai.OpenAI(base_url=tool_api.url, api_key="unused", max_retries=0, timeout=120)
    assert "$defs" in Box.model_json_schema()
    r = client.chat.completions.create(
        model="tool-run", messages=MSG, max_tokens=300, temperature=0,
        tools=[{"type": "function", "function": {"name": "box", "parameters": Box.model_json_schema()}}],
        tool_choice={"type": "function", "function": {"name": "box"}})
    Box.model_validate_json(r.choices[0].message.tool_calls[0].function.arguments)


def test_tool_calls_stream_and_round_trip(tool_api):
    client = openai.OpenAI(base_url=tool_api.url, api_key="unused", max_retries=0, timeout=120)
    tools = [{"type": "function", "function": {"name": "pick", "parameters": Pick.model_json_schema()}},
             {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {},
                                                                               "additionalProperties": False}}}]
    kw = {"model": "tool-run", "max_tokens": 120, "temperature": 0, "tools": tools, "tool_choice": "required"}
    r = client.chat.completions.create(messages=MSG, **kw)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name in ("pick", "noop")
    chunks = list(client.chat.completions.create(messages=MSG, stream=True, **kw))
    streamed = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(t.function.name, t.function.arguments) for t in streamed] == [(call.function.name,
                                                                             call.function.arguments)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    # the call and its result go back into the conversation, rendered by the template
    history = [*MSG, {"role": "assistant", "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "done"}]
    again = client.chat.completions.create(messages=history, **{**kw, "tool_choice": "auto", "max_tokens": 8})
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(messages=MSG, **{**kw, "tool_choice": {"type": "function",
                                                                               "function": {"name": "missing"}}})
    assert e.value.body["param"] == "tool_choice"
