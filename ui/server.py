"""An OpenAI-compatible API over the model pool: `/v1/chat/completions` (streamed as SSE or not) and `/v1/models`.

So that the `openai` client, LangChain's `ChatOpenAI` and anything else that speaks the OpenAI wire format can
use a tuned model by pointing `base_url` at this server. The request's `model` picks among the pool's models
(`quickstart`, `quickstart:base`, `embedded`...). Errors use OpenAI's shape, `{"error": {"message", "type",
"param", "code"}}`, because clients parse it to raise their own exception types.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from tunesmith.finetune.generate import Chunk, Completion, GenerationParams, Generator
from tunesmith.finetune.model import ModelLoadError

from .batching import Batcher
from .pool import ContextError, ModelChoice, ModelPool, UnknownModelError, fit_context
from .streaming import aiter_stream


class ApiError(Exception):
    """An error answered in OpenAI's shape with `status`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart] | None = None


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request that mean something for a local model; others are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    stop: str | list[str] | None = Field(None, max_length=4)  # OpenAI's limit: up to 4 stop strings
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # torch.manual_seed takes 64 bits
    n: int = Field(1, ge=1)
    # not OpenAI's, but what local models are tuned with; vLLM and llama.cpp servers accept the same names
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)


def _messages(req: ChatRequest) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            if any(p.type != "text" for p in m.content):
                raise ApiError(400, f"messages[{i}] has a non-text part; this server's models read text only.",
                               param=f"messages[{i}].content")
            text = "".join(p.text or "" for p in m.content)
        else:
            text = m.content or ""
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    return out


def _params(req: ChatRequest, max_new_tokens: int) -> GenerationParams:
    if req.n != 1:
        raise ApiError(400, "n > 1 is not supported; send n requests (they are batched together).", param="n")
    # an empty stop string would match at once and end every answer after one token
    stop = [s for s in ([req.stop] if isinstance(req.stop, str) else req.stop or []) if s]
    try:
        return GenerationParams(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            repetition_penalty=req.repetition_penalty or 1.0,
            stop=stop, seed=req.seed,
        )
    except ValueError as e:
        raise ApiError(400, str(e)) from e


_EXAMPLE = '{"model": "...", "messages": [{"role": "user", "content": "Hello"}]}'
MAX_BODY_BYTES = 16 * 2**20
"""Larger request bodies are refused with 413 before they are read (no context holds that much text anyway)."""


def _validation_error(e: RequestValidationError) -> ApiError:
    """The first problem in a request body, named by its field (`messages.0.role`), with what to send instead."""
    err = e.errors()[0] if e.errors() else {}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":  # loc holds a character offset here, not a field
        return ApiError(400, f"The request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')} "
                             f"at character {loc[0] if loc else 0}). Send a UTF-8 JSON object like {_EXAMPLE}.")
    # pydantic names union branches too (`content.str`, `content.list[_TextPart]`); they are no fields
    where = ".".join(x for x in loc if not (x in ("str", "int", "float", "bool") or "[" in x))
    if not where:
        return ApiError(400, f"The request body must be a JSON object like {_EXAMPLE}, with content-type "
                             "application/json.")
    return ApiError(400, f"Invalid request: {where}: {err.get('msg', 'invalid')}. Fix `{where}` and retry "
                         "(fields as in OpenAI's chat completions API).", param=where)


class _Guard:
    """Every request, on every route (unknown ones included): the API key first, then the body size."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            error = None
            if self.api_key is not None:
                got = headers.get("authorization", "").removeprefix("Bearer ").strip()
                if not hmac.compare_digest(got.encode(), self.api_key.encode()):
                    error = ApiError(401, "Incorrect API key. Pass the key the server was started with (--api-key) "
                                          "as `api_key=` / `Authorization: Bearer ...`.", code="invalid_api_key")
            length = headers.get("content-length", "0")
            if error is None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
                error = ApiError(413, f"Request body over {MAX_BODY_BYTES // 2**20} MB (or a bad Content-Length); "
                                      "send less text.", code="request_too_large")
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_api(pool: ModelPool, api_key: str | None = None, concurrency: int = 4, max_queue: int = 64,
              default_max_tokens: int = 512, batcher: Batcher | None = None) -> FastAPI:
    """The FastAPI app. `concurrency` requests generate at once (non-streamed ones among them are batched);
    up to `max_queue` more wait, further ones get 429."""
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, api_key=api_key)
    batcher = batcher or Batcher(max_batch_size=concurrency)
    slots = _Slots(concurrency, max_queue)
    finished: deque[tuple[str, str]] = deque(maxlen=256)
    app.state.finished = finished
    """(model, finish_reason) of recent generations, newest last: how tests see a cancelled stream."""
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_error(e).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:  # OpenAI's shape, never a traceback
        return ApiError(500, f"Internal error ({type(e).__name__}); the server log has the details.",
                        type_="server_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 400:  # FastAPI could not decode the body at all (e.g. not UTF-8)
            return ApiError(400, f"{e.detail}. Send a UTF-8 JSON object like {_EXAMPLE}.").response()
        return ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).response()

    def _load(name: str | None) -> tuple[Generator, ModelChoice]:
        try:
            return pool.get(name)
        except UnknownModelError as e:
            raise ApiError(404, str(e), param="model", code="model_not_found") from e
        except ModelLoadError as e:
            raise ApiError(500, str(e), type_="server_error") from e

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        now = int(time.time())
        return {"object": "list", "data": [{"id": n, "object": "model", "created": now, "owned_by": "tunesmith"}
                                           for n in pool.names()]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatRequest) -> JSONResponse | StreamingResponse:
        messages = _messages(req)
        _params(req, 1)  # refuse bad parameters before loading a model
        gen, choice = await anyio.to_thread.run_sync(_load, req.model)
        try:
            _, max_new = await anyio.to_thread.run_sync(
                fit_context, gen, messages, req.max_completion_tokens or req.max_tokens, default_max_tokens)
        except ContextError as e:
            raise ApiError(400, str(e), param=e.param, code="context_length_exceeded") from e
        except Exception as e:  # a template that rejects these roles or this order: the request's fault
            raise ApiError(400, f"The chat template of {choice.name} rejected these messages: {e}",
                           param="messages") from e
        params = choice.params(_params(req, max_new))
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        slots.admit()
        if not req.stream:
            await slots.acquire()
            try:
                out: Completion = await anyio.to_thread.run_sync(batcher.generate, gen, messages, params)
            finally:
                slots.release()
            finished.append((choice.name, out.finish_reason))
            return JSONResponse({
                "id": cid, "object": "chat.completion", "created": created, "model": choice.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                             "finish_reason": _finish(out.finish_reason), "logprobs": None}],
                "usage": _usage(out),
            })
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            _sse(gen, messages, params, choice.name, cid, created, include_usage, slots, finished),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


async def _sse(gen: Generator, messages: list[dict[str, str]], params: GenerationParams, model: str, cid: str,
               created: int, include_usage: bool, slots: _Slots,
               finished: deque[tuple[str, str]]) -> AsyncIterator[str]:
    """Server-sent events; if the client goes away, Starlette cancels this generator and `finally` stops the model."""
    cancel = threading.Event()
    acquired = False

    def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    try:
        await slots.acquire()  # here, not in the handler: a generator that never starts never runs `finally`
        acquired = True
        yield event({"role": "assistant", "content": ""})
        async for chunk in aiter_stream(_recorded(gen.stream(messages, params, cancel=cancel), model, finished)):
            if chunk.text:
                yield event({"content": chunk.text})
            if chunk.done and chunk.completion is not None:
                yield event({}, _finish(chunk.completion.finish_reason))
                if include_usage:
                    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": _usage(chunk.completion)}
                    yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as e:  # headers are sent already: report in-band, as OpenAI does
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
    finally:
        cancel.set()  # no-op when finished; otherwise the generate loop ends at its next token
        if acquired:
            slots.release()


class _Slots:
    """`n` generations at once; at most `max_queue` requests wait for one, further ones are refused with 429."""

    def __init__(self, n: int, max_queue: int) -> None:
        self.n, self.max_queue, self.waiting = max(1, n), max_queue, 0
        self._sem: asyncio.Semaphore | None = None

    @property
    def sem(self) -> asyncio.Semaphore:
        if self._sem is None:  # created on first use: it must belong to the server's event loop
            self._sem = asyncio.Semaphore(self.n)
        return self._sem

    def admit(self) -> None:
        if self.sem.locked() and self.waiting >= self.max_queue:
            raise ApiError(429, f"Server busy: {self.max_queue} requests already wait. Retry shortly.",
                           type_="rate_limit_error", code="queue_full")

    async def acquire(self) -> None:
        self.waiting += 1
        try:
            await self.sem.acquire()
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self.sem.release()


def _recorded(stream: Iterator[Chunk], model: str, finished: deque[tuple[str, str]]) -> Iterator[Chunk]:
    """Note how each stream ended, even one nobody reads to the end any more (the pump thread drains it)."""
    for chunk in stream:
        if chunk.done and chunk.completion is not None:
            finished.append((model, chunk.completion.finish_reason))
        yield chunk


def _finish(reason: str) -> str:
    return "stop" if reason == "cancelled" else reason


def _usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def serve(pool: ModelPool, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          concurrency: int = 4) -> None:
    """Run the API with uvicorn until interrupted (loads the default model first, so the first request is fast)."""
    import uvicorn

    pool.get(None)
    uvicorn.run(build_api(pool, api_key=api_key, concurrency=concurrency), host=host, port=port, log_level="info")
