"""Hostile request bodies against `/v1/chat/completions`, in-process: each gets a 4xx in OpenAI's error shape
that names the field, never a 500 or a traceback, and the server answers a good request afterwards."""

from __future__ import annotations

import json
import math
import re

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunesmith.finetune.generate import GenerationParams

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
FIELDS = ["model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "stop", "seed", "n", "top_k", "repetition_penalty"]
HUGE = "x" * 200_000
nasty = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.sampled_from(["", " ", HUGE, "\x00", "\ud800", "../../etc/passwd", "wizard", "tool"]),
)
json_values = st.recursive(nasty, lambda c: st.one_of(st.lists(c, max_size=3),
                                                      st.dictionaries(st.text(max_size=10), c, max_size=3)),
                           max_leaves=8)
messages = st.lists(st.fixed_dictionaries({}, optional={
    "role": st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool", "wizard", ""]), nasty),
    "content": st.one_of(nasty, st.lists(st.dictionaries(st.sampled_from(["type", "text", "image_url"]), nasty,
                                                         max_size=3), max_size=2)),
}), max_size=3)


def _good(run: str) -> dict:
    return {"model": run, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2,
            "temperature": 0}


@pytest.fixture(scope="module")
def client(pool):
    from tunesmith.ui.server import build_api

    with TestClient(build_api(pool, concurrency=2), raise_server_exceptions=False) as c:
        yield c


def _check(r, sent: dict | None = None) -> None:
    """A refusal is a 4xx in OpenAI's shape, naming a field that was sent; success is a real completion."""
    assert r.status_code < 500, r.text[:500]
    assert "Traceback" not in r.text and 'File "' not in r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and len(err["message"]) > 20
        if err["param"] and sent is not None:
            # a field sent, or a missing one; `messages[2].content` names a part of `messages`
            assert re.split(r"[.\[]", err["param"])[0] in {*sent, *FIELDS}, err
    elif "text/event-stream" not in r.headers["content-type"]:
        assert r.json()["choices"][0]["message"]["role"] == "assistant"


def _post(client, body: bytes):
    return client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})


@SETTINGS
@given(blob=st.binary(max_size=300))
def test_random_bytes(client, blob):
    r = _post(client, blob)
    _check(r)
    assert r.status_code != 400 or "JSON" in r.json()["error"]["message"]


@SETTINGS
@given(value=json_values)
def test_random_json_shapes(client, value):
    _check(_post(client, json.dumps(value).encode()))


@SETTINGS
@given(field=st.sampled_from(FIELDS), value=st.one_of(nasty, json_values), drop=st.sets(st.sampled_from(FIELDS)))
def test_one_bad_field(client, tiny_run_dir, field, value, drop):
    body = {k: v for k, v in _good(tiny_run_dir.name).items() if k not in drop}
    body[field] = value
    if field in ("max_tokens", "max_completion_tokens") and isinstance(value, int) and 2 < value <= 1024:
        body[field] = 2  # a valid size: keep the run short, the point is the invalid ones
    _check(_post(client, json.dumps(body).encode()), body)  # NaN / Infinity go out as JS literals


@SETTINGS
@given(msgs=messages)
def test_bad_messages(client, tiny_run_dir, msgs):
    body = {**_good(tiny_run_dir.name), "messages": msgs}
    _check(_post(client, json.dumps(body).encode()), body)


@pytest.mark.parametrize(("raw", "needle"), [
    (b"{not json", "not valid JSON"), (b"\xff\xfe\x00", "UTF-8 JSON object"), (b"[1, 2]", "must be a JSON object"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "finite"),
    (b'{"messages": [{"role": "user", "content": "x"}], "seed": 100000000000000000000000}', "seed"),
])
def test_error_names_the_fix(client, raw, needle):
    r = _post(client, raw)
    assert r.status_code == 400 and needle in r.json()["error"]["message"]


def test_no_silent_truncation(client, pool, tiny_run_dir):
    """Over the context: 400 saying so. Without max_tokens the default is lowered to what still fits."""
    gen, _ = pool.get(tiny_run_dir.name)
    r = client.post("/v1/chat/completions", json={**_good(tiny_run_dir.name),
                                                  "messages": [{"role": "user", "content": "hello " * 5000}]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "messages" and err["code"] == "context_length_exceeded"
    assert "1024" in err["message"] and "Shorten" in err["message"]
    r = client.post("/v1/chat/completions", json={**_good(tiny_run_dir.name), "max_tokens": 10**9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens" and "at most" in r.text
    # a prompt leaving 3 tokens of room, no max_tokens: answered, never past the context
    words = ["hello"] * 1100
    while gen.count_tokens(gen.render([{"role": "user", "content": " ".join(words)}])) > 1021:
        words.pop()
    body = {"model": tiny_run_dir.name, "messages": [{"role": "user", "content": " ".join(words)}], "temperature": 0}
    usage = client.post("/v1/chat/completions", json=body).json()["usage"]
    assert usage["prompt_tokens"] >= 1018 and usage["total_tokens"] <= 1024


def test_empty_stop_string_is_ignored(client, pool, tiny_run_dir):
    """`stop: [""]` used to match at once and cut every answer to one token."""
    body = {**_good(tiny_run_dir.name), "max_tokens": 6, "stop": [""]}
    got = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    gen, choice = pool.get(tiny_run_dir.name)
    want = gen.generate(body["messages"], choice.params(GenerationParams(max_new_tokens=6, temperature=0))).text
    assert got == want


def test_still_serving_after_the_fuzz(client, pool, tiny_run_dir):
    r = client.post("/v1/chat/completions", json={**_good(tiny_run_dir.name), "max_tokens": 8})
    gen, choice = pool.get(tiny_run_dir.name)
    want = gen.generate([{"role": "user", "content": "hello there"}],
                        choice.params(GenerationParams(max_new_tokens=8, temperature=0))).text
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want
    assert not math.isnan(r.json()["usage"]["total_tokens"])
