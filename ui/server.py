"""An OpenAI-compatible API over the model pool: `/v1/chat/completions` (streamed as SSE or not), `/v1/models`,
and (ui/openai_routes.py) `/v1/completions` and `/v1/embeddings`; `/health` for load balancers.

So that the `openai` client, LangChain's `ChatOpenAI` and anything else that speaks the OpenAI wire format can
use a tuned model by pointing `base_url` at this server. The request's `model` picks among the pool's models
(`quickstart`, `quickstart:base`, `embedded`...). Errors use OpenAI's shape, `{"error": {"message", "type",
"param", "code"}}`, because clients parse it to raise their own exception types.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunesmith.finetune import (
    Chunk,
    Completion,
    ContextError,
    GeneratedLogprob,
    GenerationParams,
    Generator,
    ModelLoadError,
    Prompt,
    UnsupportedRequest,
    aiter_chunks,
    fit_context,
    merge_streams,
)

from .batching import Batcher
from .openai_chat import (
    RequestError,
    ToolPlan,
    check_tool_messages,
    choice_json,
    logprobs_json,
    plan_tools,
    response_schema,
    tool_fields,
    usage_json,
)
from .pool import BASE_SUFFIX, ModelChoice, ModelPool, UnknownModelError


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
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None


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
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # not OpenAI's, but what local models are tuned with; vLLM and llama.cpp servers accept the same names
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)


def _messages(req: ChatRequest) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            if any(p.type != "text" for p in m.content):
                raise ApiError(400, f"messages[{i}] has a non-text part; this server's models read text only.",
                               param=f"messages[{i}].content")
            text = "".join(p.text or "" for p in m.content)
        else:
            text = m.content or ""
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text, **tool_fields(m)})
    return out


def _params(req: ChatRequest, max_new_tokens: int, json_schema: dict[str, Any] | None = None) -> GenerationParams:
    """Missing sampling fields take GenerationParams' defaults: the UI and the API answer alike."""
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true.", param="top_logprobs")
    # an empty stop string would match at once and end every answer after one token
    stop = [s for s in ([req.stop] if isinstance(req.stop, str) else req.stop or []) if s]
    given: dict[str, Any] = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
             "repetition_penalty": req.repetition_penalty, "presence_penalty": req.presence_penalty,
             "frequency_penalty": req.frequency_penalty}
    try:
        return GenerationParams(max_new_tokens=max_new_tokens, stop=stop, seed=req.seed, json_schema=json_schema,
                                logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs or 0,
                                **{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        raise ApiError(400, str(e)) from e


_EXAMPLE = '{"model": "...", "messages": [{"role": "user", "content": "Hello"}]}'
MAX_BODY_BYTES = 16 * 2**20
"""Larger request bodies are refused with 413; reading stops at the limit (no context holds that much text)."""


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
                         "(fields as in OpenAI's API for this route).", param=where)


class _Guard:
    """Every request, on every route (unknown ones included): the API key first, then the body size.

    The size is checked on the bytes actually received, not only on Content-Length: a chunked upload has none, and
    reading it whole before refusing it cost 40 s and 250 MB for 40 MiB. The body is read here (at most
    MAX_BODY_BYTES of it) and handed on to the app, which then reads it from memory."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        error = None
        if self.api_key is not None and not hmac.compare_digest(_bearer(headers.get("authorization", "")).encode(),
                                                                self.api_key.encode()):
            error = ApiError(401, "Incorrect API key. Pass the key the server was started with (--api-key or "
                                  "TUNESMITH_API_KEY) as `api_key=` / `Authorization: Bearer ...`.",
                             code="invalid_api_key")
        length = headers.get("content-length", "0")
        if error is None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            error = _too_large()
        body: bytes | None = b""
        if error is None:
            body, over = await _read_body(receive)
            if body is None:  # the client went away mid-upload: nobody to answer
                return
            error = _too_large() if over else None
        if error is not None:
            await error.response()(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect, which a stream waits for to stop generating

        await self.app(scope, replay, send)


def _bearer(header: str) -> str:
    """The key in `Authorization: Bearer KEY`; the scheme is case-insensitive (RFC 9110), and a bare key is taken too."""
    scheme, _, rest = header.strip().partition(" ")
    return rest.strip() if scheme.lower() == "bearer" else header.strip()


def _too_large() -> ApiError:
    return ApiError(413, f"Request body over {MAX_BODY_BYTES // 2**20} MB (or a bad Content-Length); send less text.",
                    code="request_too_large")


async def _read_body(receive: Receive) -> tuple[bytes | None, bool]:
    """(body, over the limit); stops reading at MAX_BODY_BYTES, so an endless chunked upload costs nothing more.
    Body None: the client disconnected first."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, False
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return b"", True
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts), False


def build_api(pool: ModelPool, api_key: str | None = None, concurrency: int = 16, max_queue: int = 64,
              default_max_tokens: int = 512, batcher: Batcher | None = None,
              cors_origins: list[str] | None = None) -> FastAPI:
    """The FastAPI app. `concurrency` requests generate at once (non-streamed ones among them are batched);
    up to `max_queue` more wait, further ones get 429. `cors_origins`: web pages allowed to call the API from a
    browser (`["*"]` for any); none by default."""
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, api_key=api_key)
    if cors_origins:  # added last, so outermost: preflights carry no key and are answered before the guard
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["*"], max_age=600)
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

    @app.exception_handler(ContextError)
    async def _context(request: Request, e: ContextError) -> JSONResponse:  # found while generating (llama.cpp)
        return ApiError(400, str(e), param=e.param, code="context_length_exceeded").response()

    @app.exception_handler(UnsupportedRequest)
    async def _unsupported(request: Request, e: UnsupportedRequest) -> JSONResponse:  # what this engine cannot do
        return ApiError(400, str(e)).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:  # OpenAI's shape, never a traceback
        return ApiError(500, f"Internal error ({type(e).__name__}); the server log has the details.",
                        type_="server_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 400:  # FastAPI could not decode the body at all (e.g. not UTF-8)
            return ApiError(400, f"{e.detail}. Send a UTF-8 JSON object like {_EXAMPLE}.").response()
        if e.status_code in (404, 405):  # the route, never a file path: clients only ever see URL paths
            return ApiError(e.status_code, f"No route {request.method} {request.url.path}. This server answers "
                            f"{_ROUTES}.", code="not_found" if e.status_code == 404 else None).response()
        return ApiError(e.status_code, str(e.detail)).response()

    def _load(name: str | None) -> tuple[Generator, ModelChoice]:
        try:
            return pool.get(name)
        except UnknownModelError as e:  # pool's message names the runs folder's absolute path: not for clients
            raise _unknown_model(name) from e
        except ModelLoadError as e:
            raise ApiError(500, str(e), type_="server_error") from e

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        now = int(time.time())
        return {"object": "list", "data": [{"id": n, "object": "model", "created": now, "owned_by": "tunesmith"}
                                           for n in pool.names()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in pool.names():
            raise _unknown_model(model_id)
        return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "tunesmith"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """For load balancers and scripts waiting for start-up: 200 once serving, with the models in memory."""
        loaded, names = set(pool.loaded()), []
        for n in pool.names():  # names, not sources: a source is an absolute path
            with contextlib.suppress(UnknownModelError):  # a run deleted since it was listed
                if not n.endswith(BASE_SUFFIX) and pool.resolve(n).source in loaded:
                    names.append(n)
        return {"status": "ok", "default": pool.default, "loaded": names}

    from .openai_routes import add_routes  # here: that module imports this one

    add_routes(app, _load, slots, batcher, finished)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatRequest) -> JSONResponse | StreamingResponse:
        messages = _messages(req)
        try:
            schema = response_schema(req.response_format)
        except RequestError as e:
            raise ApiError(400, str(e), param=e.param) from e
        _params(req, 1, schema)  # refuse bad parameters before loading a model
        gen, choice = await anyio.to_thread.run_sync(_load, req.model)
        try:
            check_tool_messages(gen, messages)
            plan = plan_tools(gen, messages, req.tools, req.tool_choice)
            if plan is not None and plan.schema is not None:
                if schema is not None:
                    raise RequestError("A forced tool call is JSON of the tool's parameters already; send either "
                                       "response_format or tool_choice, not both.", "response_format")
                schema = plan.schema
            prompt = plan.prompt if plan is not None else messages
            _, max_new = await anyio.to_thread.run_sync(
                fit_context, gen, prompt, req.max_completion_tokens or req.max_tokens, default_max_tokens)
        except RequestError as e:
            raise ApiError(400, str(e), param=e.param) from e
        except ContextError as e:
            raise ApiError(400, str(e), param=e.param, code="context_length_exceeded") from e
        except Exception as e:  # a template that rejects these roles or this order: the request's fault
            raise ApiError(400, f"The chat template of {choice.name} rejected these messages: {e}",
                           param="messages") from e
        params = choice.params(_params(req, max_new, schema))
        # choice i samples with seed + i: reproducible, and choice 0 is what n=1 with that seed answers
        per_choice = [params if params.seed is None else replace(params, seed=params.seed + i) for i in range(req.n)]
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        slots.admit()
        if not req.stream:
            await slots.acquire()
            try:
                outs: list[Completion] = await asyncio.gather(
                    *(anyio.to_thread.run_sync(batcher.generate, gen, prompt, p) for p in per_choice))
            finally:
                slots.release()
            finished.extend((choice.name, out.finish_reason) for out in outs)
            return JSONResponse({
                "id": cid, "object": "chat.completion", "created": created, "model": choice.name,
                "choices": [choice_json(i, out, plan, _finish(out.finish_reason)) for i, out in enumerate(outs)],
                "usage": usage_json(outs),
            })
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            _sse(gen, prompt, per_choice, plan, choice.name, cid, created, include_usage, slots, finished),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


async def _sse(gen: Generator, prompt: Prompt, per_choice: list[GenerationParams], plan: ToolPlan | None, model: str,
               cid: str, created: int, include_usage: bool, slots: _Slots,
               finished: deque[tuple[str, str]]) -> AsyncIterator[str]:
    """Server-sent events, one stream per choice (`n`), merged as their tokens come; if the client goes away,
    Starlette cancels this generator and `finally` stops the model. With tools, a choice's text is held back
    until it is known to be a call or an answer."""
    cancel = threading.Event()
    acquired = False

    def event(i: int, delta: dict[str, Any], finish: str | None = None,
              logprobs: list[GeneratedLogprob] | None = None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": logprobs_json(logprobs)}]}
        return f"data: {json.dumps(body)}\n\n"

    try:
        await slots.acquire()  # here, not in the handler: a generator that never starts never runs `finally`
        acquired = True
        for i in range(len(per_choice)):
            yield event(i, {"role": "assistant", "content": ""})
        streams = [_recorded(gen.stream(prompt, p, cancel=cancel), model, finished) for p in per_choice]
        outs: list[Completion] = []
        async for i, chunk in aiter_chunks(merge_streams(streams), cancel):
            if chunk.text and plan is None:
                yield event(i, {"content": chunk.text}, logprobs=chunk.logprobs)
            if not (chunk.done and chunk.completion is not None):
                continue
            out = chunk.completion
            outs.append(out)
            if plan is None:
                yield event(i, {}, _finish(out.finish_reason), logprobs=chunk.logprobs)
                continue
            done = choice_json(i, out, plan, _finish(out.finish_reason))
            calls = [{"index": k, **c} for k, c in enumerate(done["message"].get("tool_calls") or [])]
            yield event(i, {"tool_calls": calls} if calls else {"content": out.text}, logprobs=out.logprobs)
            yield event(i, {}, done["finish_reason"])
        if include_usage and outs:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": usage_json(outs)}
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


_ROUTES = ("GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, POST /v1/completions, "
           "POST /v1/embeddings, GET /health")


def _unknown_model(name: str | None) -> ApiError:
    return ApiError(404, f"Unknown model {name!r}. GET /v1/models lists the models this server offers.",
                    param="model", code="model_not_found")


def _finish(reason: str) -> str:
    return "stop" if reason == "cancelled" else reason


def serve(pool: ModelPool, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          concurrency: int = 16, cors_origins: list[str] | None = None) -> None:
    """Run the API with uvicorn until interrupted (loads the default model first, so the first request is fast)."""
    import uvicorn

    pool.get(None)
    uvicorn.run(build_api(pool, api_key=api_key, concurrency=concurrency, cors_origins=cors_origins), host=host,
                port=port, log_level="info")
