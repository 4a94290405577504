"""The API's endpoints beyond chat (completions with echo/logprobs, embeddings, models/{id}, health), its guard
(chunked over-limit bodies, CORS, key from the environment, bearer scheme) and lm-evaluation-harness against it."""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from tunesmith.finetune.generate import GenerationParams

FIXTURES = Path(__file__).parents[1] / "fixtures" / "lm_eval"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=api.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def in_process(pool):
    from tunesmith.ui.server import build_api

    with TestClient(build_api(pool, concurrency=2), raise_server_exceptions=False) as c:
        yield c


def _root(api) -> str:
    return api.url.removesuffix("/v1")


def _manual_logprobs(gen, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, straight from the model's logits: what the API must report."""
    with torch.inference_mode():
        logits = gen.model(input_ids=torch.tensor([ids], device=gen.device)).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


# -- /v1/completions -----------------------------------------------------------------------------------------------
def test_completion_is_raw_text_generation(client, pool, tiny_run_dir):
    gen, choice = pool.get(tiny_run_dir.name)
    want = gen.generate(PROMPT, choice.params(GenerationParams(max_new_tokens=8, temperature=0)))
    r = client.completions.create(model=tiny_run_dir.name, prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want.text  # no chat template around the prompt
    assert r.choices[0].finish_reason == want.finish_reason and r.choices[0].logprobs is None
    assert r.usage.prompt_tokens == gen.count_tokens(PROMPT) and r.usage.completion_tokens == want.completion_tokens


def test_list_of_prompts_and_n(client, pool, tiny_run_dir):
    gen, _ = pool.get(tiny_run_dir.name)
    prompts = ["one two three", "Once upon a time"]
    r = client.completions.create(model=tiny_run_dir.name, prompt=prompts, max_tokens=5, temperature=0)
    want = [gen.generate(p, GenerationParams(max_new_tokens=5, temperature=0)).text for p in prompts]
    assert [c.text for c in r.choices] == want and [c.index for c in r.choices] == [0, 1]
    r = client.completions.create(model=tiny_run_dir.name, prompt=prompts, max_tokens=3, temperature=1, n=2, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]  # prompt 0's two samples, then prompt 1's


def test_seeded_n_gives_distinct_reproducible_choices(client, pool, tiny_run_dir):
    """Choice j samples with seed + j (as the chat route): the n choices differ, and a rerun repeats them."""
    kw = dict(model=tiny_run_dir.name, prompt=["one two three", "Once upon a time"], max_tokens=12, temperature=1,
              n=2, seed=5)
    first = [c.text for c in client.completions.create(**kw).choices]
    assert first == [c.text for c in client.completions.create(**kw).choices]
    assert first[0] != first[1] and first[2] != first[3]
    gen, _ = pool.get(tiny_run_dir.name)
    alone = gen.generate("Once upon a time", GenerationParams(max_new_tokens=12, temperature=1, seed=6)).text
    assert first[3] == alone  # prompt 1's choice 1 is seed + 1, as an n=1 request with that seed answers


def test_echo_with_max_tokens_0_scores_the_prompt(client, pool, tiny_run_dir):
    gen, _ = pool.get(tiny_run_dir.name)
    r = client.completions.create(model=tiny_run_dir.name, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2,
                                  temperature=0)
    c = r.choices[0]
    ids = gen.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert c.text == PROMPT and "".join(c.logprobs.tokens) == PROMPT
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None  # as OpenAI: nothing before
    assert c.logprobs.token_logprobs[1:] == pytest.approx(_manual_logprobs(gen, ids), abs=1e-4)
    assert c.logprobs.text_offset == [len("".join(c.logprobs.tokens[:i])) for i in range(len(c.logprobs.tokens))]
    for tok, v, top in zip(c.logprobs.tokens[1:], c.logprobs.token_logprobs[1:], c.logprobs.top_logprobs[1:]):
        assert 2 <= len(top) <= 3 and top[tok] == v  # top 2 plus the actual token, as OpenAI sends them
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)


def test_lm_eval_scoring_request(client, pool, tiny_run_dir):
    """What `local-completions` sends per (context, answer): token ids, echo, logprobs=1, max_tokens=1; it sums
    token_logprobs[ctxlen:-1], so exactly one generated token must follow the prompt's."""
    gen, choice = pool.get(tiny_run_dir.name)
    ids = gen.tokenizer("Question: What do bees make?\nAnswer: honey", add_special_tokens=False)["input_ids"]
    r = client.completions.create(model=tiny_run_dir.name, prompt=ids, max_tokens=1, echo=True, logprobs=1,
                                  temperature=0, seed=1234)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:-1] == pytest.approx(_manual_logprobs(gen, ids), abs=1e-4)
    greedy = gen.generate(gen.tokenizer.decode(ids), choice.params(GenerationParams(max_new_tokens=1, temperature=0)))
    assert r.choices[0].text == gen.tokenizer.decode(ids) + greedy.text
    assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()))  # the greedy token is the top one
    as_text = client.completions.create(model=tiny_run_dir.name, prompt=gen.tokenizer.decode(ids), max_tokens=1,
                                        echo=True, logprobs=1, temperature=0)
    assert as_text.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_generated_tokens_have_logprobs(client, tiny_run_dir):
    r = client.completions.create(model=tiny_run_dir.name, prompt=PROMPT, max_tokens=6, logprobs=3, temperature=0)
    c = r.choices[0]
    assert len(c.logprobs.tokens) == r.usage.completion_tokens or c.finish_reason == "stop"  # EOS is not listed
    assert all(v is not None and v <= 0 for v in c.logprobs.token_logprobs)
    # a token holding part of a UTF-8 character is named by its bytes, as OpenAI does; the others spell the text
    assert "".join(t for t in c.logprobs.tokens if not t.startswith("bytes:")) == c.text.replace("\ufffd", "")
    assert c.logprobs.text_offset[:1] == [len(PROMPT)] or not c.text  # offsets count from the prompt's start
    for tok, v, top in zip(c.logprobs.tokens, c.logprobs.token_logprobs, c.logprobs.top_logprobs):
        assert 3 <= len(top) <= 4 and top[tok] == v  # top 3, plus the chosen token when it is not among them


def test_base_model_scores_differ(client, tiny_run_dir):
    args = {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 0}
    tuned = client.completions.create(model=tiny_run_dir.name, **args).choices[0].logprobs.token_logprobs
    base = client.completions.create(model=tiny_run_dir.name + ":base", **args).choices[0].logprobs.token_logprobs
    assert tuned[1:] != pytest.approx(base[1:])


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"max_tokens": 0}, "max_tokens"),  # without echo there is nothing to return
    ({"stream": True}, "stream"),
    ({"suffix": "!"}, "suffix"),
    ({"prompt": [[1, 2, 10**9]]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"logprobs": 50}, "logprobs"),
    ({"max_tokens": 10**6}, "max_tokens"),
])
def test_bad_completion_requests(client, tiny_run_dir, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**{"model": tiny_run_dir.name, "prompt": PROMPT, "max_tokens": 2, **kwargs})
    assert e.value.body["param"] == param


_NASTY = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=20),
                   st.sampled_from(["", "x" * 50_000, "\ud800", "../../etc/passwd"]),
                   st.lists(st.one_of(st.integers(-5, 2**40), st.text(max_size=5)), max_size=4))
_COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "echo", "logprobs", "temperature", "top_p", "stop", "seed", "n",
                      "stream", "suffix", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty"]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(_COMPLETION_FIELDS), value=_NASTY, echo=st.booleans())
def test_completions_fuzz_never_500(in_process, tiny_run_dir, field, value, echo):
    """One hostile field in a good request: a 4xx naming a field, or a real completion; never a 500."""
    body = {"model": tiny_run_dir.name, "prompt": "hello", "max_tokens": 2, "temperature": 0, "echo": echo,
            "logprobs": 1, field: value}
    r = in_process.post("/v1/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text[:300]
    if r.status_code >= 400:
        assert r.json()["error"]["param"] in (*_COMPLETION_FIELDS, None), r.text[:300]
    else:
        assert r.json()["object"] == "text_completion" and len(r.json()["choices"]) >= 1


# -- /v1/embeddings ------------------------------------------------------------------------------------------------
def test_embeddings_are_the_offline_minilm(client, api):
    from tunesmith.chains.embeddings import default_embeddings

    texts = ["a cat sat on the mat", "quarterly revenue grew"]
    r = client.embeddings.create(model="anything", input=texts)  # the openai client asks for base64 and decodes it
    want = np.array(default_embeddings().embed_documents(texts))
    got = np.array([d.embedding for d in r.data])
    assert got.shape == (2, 384) and np.allclose(got, want, atol=1e-5)
    assert r.model == default_embeddings().name and r.usage.prompt_tokens > 4
    plain = httpx.post(f"{api.url}/embeddings", json={"input": texts[0], "encoding_format": "float"}, timeout=60).json()
    assert np.allclose(plain["data"][0]["embedding"], want[0], atol=1e-5)
    b64 = httpx.post(f"{api.url}/embeddings", json={"input": texts[:1], "encoding_format": "base64"}, timeout=60).json()
    assert np.allclose(np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), "<f4"), want[0], atol=1e-6)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="x", input=texts, dimensions=128)


# -- /v1/models/{id}, /health, 404s --------------------------------------------------------------------------------
def test_model_by_id(client, tiny_run_dir):
    for name in (tiny_run_dir.name, tiny_run_dir.name + ":base"):
        assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_health_names_the_loaded_models(api, pool, tiny_run_dir):
    pool.get(tiny_run_dir.name)
    r = httpx.get(f"{_root(api)}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and tiny_run_dir.name in r.json()["loaded"]
    assert str(tiny_run_dir.parent) not in r.text


def test_404s_name_no_absolute_path(api, client, tiny_run_dir):
    messages = []
    for call in (lambda: client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}]),
                 lambda: client.completions.create(model="../../etc/passwd", prompt="x"),
                 lambda: client.models.retrieve("nope")):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        messages.append(e.value.body["message"])
    messages.append(httpx.get(f"{api.url}/nothing").json()["error"]["message"])
    for m in messages:
        assert str(tiny_run_dir.parent) not in m and "/tmp" not in m, m
    assert "/v1/models" in messages[0] and "/v1/completions" in messages[-1]  # and they say where to look instead


# -- the guard: body size, key, CORS ------------------------------------------------------------------------------
def test_chunked_over_limit_body_is_refused_while_reading(api, tiny_run_dir):
    """40 MiB without Content-Length (chunked): refused with 413 once 16 MB are in, not parsed and tokenized."""
    def body():
        yield b'{"model": "' + tiny_run_dir.name.encode() + b'", "prompt": "'
        for _ in range(40):
            yield b"word " * (2**20 // 5)
        yield b'", "max_tokens": 1}'

    start = time.monotonic()
    r = httpx.post(f"{api.url}/completions", content=body(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert time.monotonic() - start < 10
    assert httpx.get(f"{api.url}/models", timeout=10).status_code == 200  # and it keeps answering


def test_chunked_body_under_the_limit_still_works(api, tiny_run_dir):
    payload = json.dumps({"model": tiny_run_dir.name, "prompt": PROMPT, "max_tokens": 2, "temperature": 0}).encode()
    r = httpx.post(f"{api.url}/completions", content=iter([payload[:10], payload[10:]]),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]


def test_bearer_scheme_is_case_insensitive(api_with_key):
    for auth, status in (("bearer sekret", 200), ("BEARER  sekret", 200), ("Bearer sekret", 200),
                         ("bearer wrong", 401), ("Basic sekret", 401), ("", 401)):
        assert httpx.get(f"{api_with_key.url}/models", headers={"Authorization": auth}).status_code == status, auth


def test_cors_preflight_and_headers(pool):
    from tunesmith.ui.server import build_api

    origin = "http://localhost:3000"
    pre = {"Origin": origin, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    with TestClient(build_api(pool, api_key="k", cors_origins=[origin])) as c:
        r = c.options("/v1/chat/completions", headers=pre)  # a browser sends no key on a preflight
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = c.get("/v1/models", headers={"Origin": origin, "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        r = c.get("/v1/models", headers={"Origin": origin})  # a refused key is readable by the page too
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == origin
        assert c.options("/v1/models", headers={**pre, "Origin": "http://evil.test"}).status_code == 400
    with TestClient(build_api(pool)) as c:  # off by default: no CORS headers at all
        r = c.get("/v1/models", headers={"Origin": origin})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def _serve_args(*argv: str) -> argparse.Namespace:
    from tunesmith.ui.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_api_key_from_the_environment(monkeypatch):
    from tunesmith.ui.cli import serve_options

    monkeypatch.delenv("TUNESMITH_API_KEY", raising=False)
    assert serve_options(_serve_args()) == {"api_key": None, "cors_origins": None}
    monkeypatch.setenv("TUNESMITH_API_KEY", "from-env")
    assert serve_options(_serve_args())["api_key"] == "from-env"
    assert serve_options(_serve_args("--api-key", "flag"))["api_key"] == "flag"  # the flag wins
    opts = serve_options(_serve_args("--cors-origins", "http://a.test, http://b.test,"))
    assert opts["cors_origins"] == ["http://a.test", "http://b.test"]


def test_serve_command_takes_the_key_and_origins(tiny_run_dir, tmp_path):
    """`tunesmith serve` itself: the key from TUNESMITH_API_KEY, CORS from --cors-origins, /health once up."""
    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    origin = "http://localhost:3000"
    env = {**os.environ, "TUNESMITH_API_KEY": "from-env"}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("tunesmith")), "serve", str(tiny_run_dir), "--port",
                             str(port), "--cors-origins", origin], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, up = time.monotonic() + 90, None
        while up is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                up = httpx.get(f"http://127.0.0.1:{port}/health", headers={"authorization": "bearer from-env"})
            except httpx.TransportError:
                time.sleep(0.3)
        assert up is not None and up.status_code == 200, (tmp_path / "serve.log").read_text()[-2000:]
        assert up.json()["loaded"] == [tiny_run_dir.name]
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 401
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer from-env",
                                                                    "Origin": origin})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


# -- lm-evaluation-harness -----------------------------------------------------------------------------------------
def _task(name: str) -> dict:
    task = yaml.safe_load((FIXTURES / name).read_text())
    task["dataset_kwargs"]["data_files"]["test"] = str(FIXTURES / "tiny_mc.jsonl")  # lm-eval reads it from the cwd
    return task


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm_eval is not installed (pip install lm_eval)")
@pytest.mark.parametrize("tokenized", [True, False], ids=["token-ids", "text"])
def test_lm_eval_local_completions(api, pool, tiny_run_dir, tokenized):
    """lm-eval's own `local-completions` model runs a multiple-choice and a generation task through /v1/completions;
    every answer's log-likelihood must equal the one computed from the model directly, every generation the one
    the generation API writes."""
    import lm_eval

    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=[_task("tiny_mc.yaml"), _task("tiny_gen.yaml")], log_samples=True,
        model_args={"base_url": f"{api.url}/completions", "model": tiny_run_dir.name, "max_retries": 1,
                    "tokenizer": str(tiny_run_dir / "tokenizer"), "tokenizer_backend": "huggingface",
                    "tokenized_requests": tokenized})
    assert 0 <= out["results"]["tunesmith_tiny_mc"]["acc,none"] <= 1
    gen, choice = pool.get(tiny_run_dir.name)
    assert len(out["samples"]["tunesmith_tiny_mc"]) == len(out["samples"]["tunesmith_tiny_gen"]) == 4
    for s in out["samples"]["tunesmith_tiny_mc"]:
        context = f"Question: {s['doc']['question']}\nAnswer:"
        for answer, resp in zip(s["doc"]["choices"], s["resps"]):
            ctx = gen.tokenizer(context, add_special_tokens=False)["input_ids"]
            whole = gen.tokenizer(context + " " + answer, add_special_tokens=False)["input_ids"]
            want = sum(_manual_logprobs(gen, whole)[len(ctx) - 1:])
            assert resp[0][0] == pytest.approx(want, abs=1e-3), (context, answer)
    params = choice.params(GenerationParams(max_new_tokens=8, temperature=0, stop=["\n", "Question:"]))
    for s in out["samples"]["tunesmith_tiny_gen"]:
        context = f"Question: {s['doc']['question']}\nAnswer:"
        assert s["resps"][0][0] == gen.generate(context, params).text
