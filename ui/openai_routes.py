"""The OpenAI endpoints beyond chat: `/v1/completions` (raw text, `echo` and `logprobs`) and `/v1/embeddings`.

`/v1/completions` is what lm-evaluation-harness's `local-completions` model scores multiple-choice tasks with: it
sends the context plus each answer with `echo=true, logprobs=1, max_tokens=1, temperature=0` and sums the answer
tokens' logprobs. That request is answered from one forward pass over the prompt (the greedy next token comes from
the same logits), so scoring costs no generate loop. `/v1/embeddings` serves the offline MiniLM that the chains'
retrieval uses, so one server covers a RAG client's chat model and its embeddings.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, cast

import anyio
import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from tunesmith.finetune import (
    Completion,
    ContextError,
    GenerationParams,
    Generator,
    TokenLogprobs,
    context_length,
    cut_at_stop,
    token_key,
)

from .batching import Batcher
from .pool import ModelChoice
from .server import ApiError, _Slots

DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for `/v1/completions` (chat answers default to the server's own, longer limit)."""
MAX_CHOICES = 128
"""Prompts x n per request: one request must not hold the model for minutes while others queue."""
MAX_EMBED_INPUTS = 2048
"""OpenAI's limit on inputs per embeddings request."""


class CompletionRequest(BaseModel):
    """OpenAI's (legacy) completion request: a raw text prompt, no chat template."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    stop: str | list[str] | None = Field(None, max_length=16)  # OpenAI allows 4; lm-eval tasks send more
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    n: int = Field(1, ge=1)
    stream: bool = False
    suffix: str | None = None
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: str = "float"
    dimensions: int | None = None


def _prompts(req: CompletionRequest, gen: Generator) -> list[str | list[int]]:
    """The request's prompts as text or token-id lists (checked against the vocabulary)."""
    p = req.prompt
    prompts: list[str | list[int]]
    if isinstance(p, str):
        prompts = [p]
    elif p and isinstance(p[0], int):  # one prompt of token ids (pydantic made every item an int)
        prompts = [cast("list[int]", p)]
    else:  # several prompts
        prompts = list(cast("list[str] | list[list[int]]", p))
    if not prompts:
        raise ApiError(400, "prompt is an empty list; send a string or a list of strings.", param="prompt")
    vocab = len(gen.tokenizer)
    for i, q in enumerate(prompts):
        if isinstance(q, str):
            _check_text(q, f"prompt[{i}]", "prompt")
        elif any(not 0 <= t < vocab for t in q):
            bad = next(t for t in q if not 0 <= t < vocab)
            raise ApiError(400, f"prompt[{i}] holds token id {bad}, outside {gen.name}'s vocabulary (0..{vocab - 1}). "
                                "Send token ids of this model's tokenizer, or text.", param="prompt")
    return prompts


def _params(req: CompletionRequest) -> GenerationParams:
    """The sampling parameters (max_new_tokens set later), refusing what this server cannot do before a model is
    loaded. Missing fields take GenerationParams' defaults, as on the chat route."""
    if req.stream:
        raise ApiError(400, "stream=true is not supported on /v1/completions; send stream=false, or use "
                            "/v1/chat/completions for streamed answers.", param="stream")
    if req.suffix:
        raise ApiError(400, "suffix (insertion) is not supported: these models only continue text. Drop `suffix`.",
                       param="suffix")
    if req.max_tokens == 0 and not req.echo:
        raise ApiError(400, "max_tokens=0 without echo returns nothing; ask for max_tokens >= 1, or set echo=true "
                            "to get the prompt's logprobs back.", param="max_tokens")
    given: dict[str, Any] = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
             "repetition_penalty": req.repetition_penalty, "presence_penalty": req.presence_penalty,
             "frequency_penalty": req.frequency_penalty}
    stop = [s for s in ([req.stop] if isinstance(req.stop, str) else req.stop or []) if s]
    try:
        return GenerationParams(max_new_tokens=1, stop=stop, seed=req.seed, logprobs=req.logprobs is not None,
                                top_logprobs=req.logprobs or 0, **{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        raise ApiError(400, str(e)) from e


def _check_text(text: str, where: str, param: str) -> None:
    """JSON may carry lone UTF-16 surrogates (`"\\ud800"`) that no tokenizer reads: a 400, not a crash."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{where} is not valid Unicode text ({e.reason} at character {e.start}); send UTF-8 "
                            "text.", param=param) from None


def _decode(gen: Generator, ids: list[int], skip_special_tokens: bool = False) -> str:
    """The text of one sequence of token ids (transformers types `decode` as `str | list[str]`: a batch gives a
    list)."""
    text = gen.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert isinstance(text, str)
    return text


def _fit(gen: Generator, n_prompt: int, max_tokens: int, asked: bool, i: int) -> int:
    """max_tokens that fits beside this prompt: as for chat, an explicit one that does not fit is a 400."""
    limit = context_length(gen)
    if limit is None:
        return max_tokens
    if n_prompt > limit or (n_prompt == limit and max_tokens > 0):
        raise ApiError(400, f"prompt[{i}] is {n_prompt} tokens but {gen.name} reads at most {limit}. Shorten it.",
                       param="prompt", code="context_length_exceeded")
    room = limit - n_prompt
    if asked and max_tokens > room:
        raise ApiError(400, f"max_tokens={max_tokens} does not fit: prompt[{i}] is {n_prompt} tokens of {gen.name}'s "
                            f"{limit}-token context, so at most {room} new tokens fit.", param="max_tokens",
                       code="context_length_exceeded")
    return min(max_tokens, room)


_Generated = tuple[str, float, dict[str, float], int]
"""A generated token for `logprobs`: its name (`token_key`), logprob, top alternatives, and characters of text."""


def _logprobs_json(lp: TokenLogprobs | None, generated: list[_Generated], prompt_chars: int) -> dict[str, Any]:
    """OpenAI's `logprobs`: the echoed prompt's tokens (`lp`, if echoed), then the generated ones. Each top dict
    also holds the chosen token, as OpenAI's does ("up to logprobs + 1 entries")."""
    tokens: list[str] = list(lp.tokens) if lp else []
    values: list[float | None] = list(lp.token_logprobs) if lp else []
    offsets = list(lp.text_offset) if lp else []
    tops: list[dict[str, float | None] | None] = [None if top is None else {tok: v, **top} for tok, v, top in
                                                  zip(tokens, values, lp.top_logprobs)] if lp else []
    at = prompt_chars
    for tok, v, top, chars in generated:
        tokens.append(tok)
        values.append(v)
        offsets.append(at)
        tops.append({tok: v, **top})
        at += chars
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _complete_one(gen: Generator, choice: ModelChoice, prompt: str | list[int], out: Completion | None,
                  req: CompletionRequest, params: GenerationParams,
                  greedy_one: bool) -> tuple[str, dict[str, Any] | None, Completion]:
    """(choice text, logprobs object or None, completion) for one prompt; runs in a worker thread.

    `out` None: nothing was generated (max_tokens=0, or lm-eval's one greedy token, read off the prompt's pass)."""
    text = prompt if isinstance(prompt, str) else _decode(gen, prompt)
    top_n = req.logprobs or 0
    lp = None
    if greedy_one or (req.echo and req.logprobs is not None):
        lp = gen.prompt_logprobs(prompt, top_n, use_adapter=choice.use_adapter)
    generated: list[_Generated] = []
    if greedy_one:
        assert lp is not None and lp.next_id is not None and lp.next_logprob is not None
        new, stopped = cut_at_stop(_decode(gen, [lp.next_id], skip_special_tokens=True), params.stop)
        out = Completion(new, len(lp.ids), 1, "stop" if lp.next_ends or stopped else "length")
        # listed even when it ends the text (EOS): lm-eval drops exactly one token after the prompt's
        generated = [(lp.next_token, lp.next_logprob, lp.next_top, len(new))]
    elif out is None:
        n = len(prompt) if isinstance(prompt, list) else gen.count_tokens(prompt)
        out = Completion("", n, 0, "length")
    else:
        generated = [(token_key(g.token, g.bytes), g.logprob, {token_key(t, b): v for t, v, b in g.top[:top_n]},
                      len(g.token)) for g in out.logprobs or []]
    answer = (text if req.echo else "") + out.text
    if req.logprobs is None:
        return answer, None, out
    return answer, _logprobs_json(lp if req.echo else None, generated, len(text)), out


def add_routes(app: FastAPI, load: Callable[[str | None], tuple[Generator, ModelChoice]], slots: _Slots,
               batcher: Batcher, finished: deque[tuple[str, str]]) -> None:
    """Register `/v1/completions` and `/v1/embeddings` on the API built by `server.build_api`."""

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> JSONResponse:
        base = _params(req)
        gen, choice = await anyio.to_thread.run_sync(load, req.model)
        prompts = _prompts(req, gen)
        if len(prompts) * req.n > MAX_CHOICES:
            raise ApiError(400, f"{len(prompts)} prompts x n={req.n} is over {MAX_CHOICES} choices per request; "
                                "split them over several requests.", param="n" if req.n > 1 else "prompt")
        asked = req.max_tokens is not None
        max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        sizes = await anyio.to_thread.run_sync(
            lambda: [len(q) if isinstance(q, list) else gen.count_tokens(q) for q in prompts])
        if any(s == 0 for s in sizes):
            raise ApiError(400, "prompt is empty; send some text (this server adds no start token).", param="prompt")
        max_tokens = min(_fit(gen, s, max_tokens, asked, i) for i, s in enumerate(sizes))
        # lm-eval's scoring request: the one greedy token comes from the prompt's own forward pass
        # (penalties on generated tokens cannot change the first one; repetition_penalty counts the prompt's)
        greedy_one = (max_tokens == 1 and base.temperature == 0 and base.repetition_penalty == 1.0
                      and (req.echo or req.logprobs is not None))
        params = choice.params(replace(base, max_new_tokens=max(1, max_tokens)))
        rows = [q for q in prompts for _ in range(req.n)]
        slots.admit()
        await slots.acquire()
        try:
            run = params if max_tokens > 0 and not greedy_one else None
            outs = await anyio.to_thread.run_sync(_generate, gen, prompts, req.n, run, batcher)
            results = []
            for q, out in zip(rows, outs):
                try:
                    results.append(await anyio.to_thread.run_sync(_complete_one, gen, choice, q, out, req, params,
                                                                 greedy_one))
                except ContextError as e:
                    raise ApiError(400, str(e), param="prompt", code="context_length_exceeded") from e
        finally:
            slots.release()
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, (text, logprobs, out) in enumerate(results):
            finished.append((choice.name, out.finish_reason))
            choices.append({"index": i, "text": text, "logprobs": logprobs,
                            "finish_reason": "stop" if out.finish_reason == "cancelled" else out.finish_reason})
            completion_tokens += out.completion_tokens
            prompt_tokens += sizes[i // req.n] if i % req.n == 0 else 0
        return JSONResponse({
            "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": choice.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> JSONResponse:
        given = [req.input] if isinstance(req.input, str) else list(req.input)
        texts = [t for t in given if isinstance(t, str)]
        if not texts or len(texts) < len(given):
            raise ApiError(400, "input must be a string or a non-empty list of strings (token ids are not supported: "
                                "send the text).", param="input")
        for i, t in enumerate(texts):
            _check_text(t, f"input[{i}]", "input")
        if len(texts) > MAX_EMBED_INPUTS:
            raise ApiError(400, f"{len(texts)} inputs; at most {MAX_EMBED_INPUTS} per request.", param="input")
        if req.encoding_format not in ("float", "base64"):
            raise ApiError(400, f"encoding_format {req.encoding_format!r}: use 'float' or 'base64'.",
                           param="encoding_format")
        emb = await anyio.to_thread.run_sync(_embedder)
        if req.dimensions is not None and req.dimensions != 384:
            raise ApiError(400, f"dimensions={req.dimensions}: {emb.name} gives 384-dimensional vectors only; drop "
                                "`dimensions` or send 384.", param="dimensions")
        slots.admit()
        await slots.acquire()
        try:
            vectors, tokens = await anyio.to_thread.run_sync(_embed, emb, texts)
        finally:
            slots.release()
        data = []
        for i, v in enumerate(vectors):
            value: Any = (base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                          else v.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        return JSONResponse({"object": "list", "data": data, "model": emb.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _generate(gen: Generator, prompts: Sequence[str | list[int]], n: int, params: GenerationParams | None,
              batcher: Batcher) -> list[Completion | None]:
    """`n` completions of each prompt, prompt-major (as `choices` lists them), batched. A single row joins the
    batcher, to share a call with other requests. With a seed, choice j samples with seed + j, as in the chat route:
    reproducible, and choice 0 is what n=1 answers. Token-id prompts are decoded to text first: generation takes
    text."""
    if params is None:
        return [None] * (len(prompts) * n)
    texts = [q if isinstance(q, str) else _decode(gen, q) for q in prompts]
    if len(texts) * n == 1:
        return [batcher.generate(gen, texts[0], params)]
    if params.seed is None:  # identical params: one batch of every row
        return list(gen.batch([t for t in texts for _ in range(n)], params, max_batch_size=batcher.max_batch_size))
    by_choice = [gen.batch(texts, replace(params, seed=params.seed + j), max_batch_size=batcher.max_batch_size)
                 for j in range(n)]
    return [by_choice[j][i] for i in range(len(texts)) for j in range(n)]


def _embedder() -> Any:
    """The chains' MiniLM (one per process). 500 with the install command when the package is missing."""
    try:
        from tunesmith.chains import default_embeddings

        return default_embeddings()
    except Exception as e:
        raise ApiError(500, f"Embeddings are unavailable: {e}", type_="server_error") from e


def _embed(emb: Any, texts: list[str]) -> tuple[np.ndarray, int]:
    """Unit vectors (float32) and the word pieces read; inputs over the model's 256 pieces are cut, as
    sentence-transformers does for this model."""
    tokens = sum(min(len(ids), emb.max_length) for ids in emb.tokenizer(texts, add_special_tokens=True)["input_ids"])
    return np.asarray(emb.embed_documents(texts), dtype=np.float32), tokens
