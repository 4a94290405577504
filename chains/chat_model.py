"""`TunedChatModel`: a LangChain chat model over a tunesmith run (base + LoRA adapter), a merged model, or `embedded`.

All generation goes through `tunesmith.finetune.Generator`, so chains get the run's own chat template,
multi-token stop strings, usage counts and real cancellation for free. What this file adds is the LangChain side:
message conversion, callbacks, and a `batch` that is one left-padded `generate` call instead of a thread per input.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import closing
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.load import dumpd
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import get_config_list
from pydantic import ConfigDict, Field, model_validator

from tunesmith.finetune import Completion, GenerationParams, Generator, ModelLoadError, aiter_chunks, load_generator

from .errors import ChainModelError

_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool", "SystemMessageChunk": "system",
          "HumanMessageChunk": "user", "AIMessageChunk": "assistant", "ToolMessageChunk": "tool"}
_CALL_OVERRIDES = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "use_adapter",
                   "json_schema")
"""Keyword arguments that `invoke(..., temperature=0.2)` or `.bind(max_tokens=8)` may change per call."""
_IGNORED = {"api_key", "max_retries", "base_url"}
"""Standard LangChain arguments that mean nothing for a local model: accepted (so generic code works) and unused."""


class TunedChatModel(BaseChatModel):
    """Chat with a fine-tuned run through LangChain: `invoke`, `stream`, `batch`, `ainvoke`, `astream`, `abatch`.

    Pass `generator=` to share one loaded model between several chat models (e.g. a greedy one for
    classification and a sampling one for chat); otherwise `model` is loaded when the object is created.
    """

    model: str = "embedded"
    """A run folder (config.yaml + adapter/), a merged model folder, `embedded`, a local HF folder or .gguf file."""
    adapter: str | None = None
    """A checkpoint inside the run, e.g. `checkpoints/step-100`; default: the run's final adapter."""
    generator: Generator | None = Field(default=None, exclude=True, repr=False)
    """An already loaded model to use instead of loading `model` again."""
    max_tokens: int = Field(default=256, alias="max_new_tokens")
    """New tokens per answer (also accepted as `max_new_tokens`)."""
    temperature: float = 0.0
    """0 = greedy. The default is greedy because chains (labels, JSON) want the same answer every time."""
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.1
    """A little above 1: small models otherwise loop on their last sentence."""
    stop: list[str] | None = None
    """Stop strings; the answer ends before the first one (it is not part of the text)."""
    seed: int | None = None
    use_adapter: bool = True
    """False answers with the base model alone (the adapter stays loaded), for tuned-vs-base comparisons."""
    json_schema: dict | None = None
    """Constrain every answer to JSON of this schema (GenerationParams.json_schema); usually set per call,
    `.bind(json_schema=...)`, as `extract_chain` and `with_structured_output` do."""
    streaming: bool = False
    """If True, `invoke` streams internally (so streaming callbacks get tokens); the result is the same."""
    timeout: float | None = None
    """Seconds after which a generation is cut off (finish_reason `cancelled`); None = no limit."""

    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_typos(cls, data: Any) -> Any:
        """LangChain models ignore unknown keyword arguments; a typo (`temprature=`) would then pass silently."""
        if isinstance(data, dict):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias} | _IGNORED
            unknown = sorted(set(data) - known)
            if unknown:
                raise TypeError(f"TunedChatModel got unknown argument(s) {unknown}; known: {sorted(cls.model_fields)}")
        return data

    @model_validator(mode="after")
    def _load(self) -> TunedChatModel:
        if self.generator is None:
            self.generator = _load_generator(self.model, self.adapter)
        self._params()  # fail at construction time, not at the first call, on a bad temperature or top_p
        return self

    # -- LangChain plumbing --------------------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "tunesmith"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model_name, **{k: getattr(self, k) for k in _CALL_OVERRIDES}, "stop": self.stop}

    @property
    def model_name(self) -> str:
        return self.generator.name if self.generator is not None else self.model

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="tunesmith",
            ls_model_name=str(kwargs.get("model") or self.model_name),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    # -- one place that turns (messages, stop, kwargs) into a prompt and GenerationParams ------------------------
    def _params(self, stop: list[str] | None = None, **kwargs: Any) -> GenerationParams:
        unknown = sorted(set(kwargs) - set(_CALL_OVERRIDES) - {"stream"})
        if "model" in unknown:
            raise ValueError(
                f"TunedChatModel serves one loaded model ({self.model_name}); it cannot switch per call. "
                "Create another one with load_chat_model(SOURCE) instead of passing model=."
            )
        if unknown:
            raise TypeError(f"TunedChatModel got unknown argument(s) {unknown}; per-call options: {list(_CALL_OVERRIDES)}")
        v = {k: kwargs.get(k, getattr(self, k)) for k in _CALL_OVERRIDES}
        return GenerationParams(
            max_new_tokens=v["max_tokens"], temperature=v["temperature"], top_p=v["top_p"], top_k=v["top_k"],
            repetition_penalty=v["repetition_penalty"], seed=v["seed"], use_adapter=v["use_adapter"],
            json_schema=v["json_schema"], stop=[*(self.stop or []), *(stop or [])],
        )

    def _gen(self) -> Generator:
        assert self.generator is not None  # set by the validator
        return self.generator

    def _cancel_event(self) -> threading.Event:
        """A fresh cancel flag; with `timeout` set, a timer raises it so a runaway generation stops by itself."""
        cancel = threading.Event()
        if self.timeout:
            timer = threading.Timer(self.timeout, cancel.set)
            timer.daemon = True
            timer.start()
        return cancel

    def _message(self, c: Completion) -> AIMessage:
        return AIMessage(content=c.text, usage_metadata=_usage(c), response_metadata=self._metadata(c))

    def _metadata(self, c: Completion) -> dict[str, Any]:
        return {"finish_reason": c.finish_reason, "model_name": self.model_name}

    # -- invoke / stream ----------------------------------------------------------------------------------------
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        params = self._params(stop, **kwargs)
        if self.streaming:
            c = self._stream_completion(messages, params, run_manager)
            return ChatResult(generations=[ChatGeneration(message=self._message(c))])
        c = self._gen().generate(to_chat(messages), params, self._cancel_event())
        return ChatResult(generations=[ChatGeneration(message=self._message(c))])

    def _stream_completion(self, messages: list[BaseMessage], params: GenerationParams,
                           run_manager: CallbackManagerForLLMRun | None) -> Completion:
        for chunk in self._gen().stream(to_chat(messages), params, self._cancel_event()):
            if chunk.text and run_manager:
                run_manager.on_llm_new_token(chunk.text)
            if chunk.done:
                assert chunk.completion is not None
                return chunk.completion
        raise RuntimeError("Generator.stream ended without a final chunk")  # a bug in finetune/generate.py

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        # `closing`: when the consumer stops early, the inner stream is closed, which sets its cancel flag
        with closing(self._gen().stream(to_chat(messages), self._params(stop, **kwargs), self._cancel_event())) as it:
            for chunk in it:
                out = self._chunk(chunk.text, chunk.completion)
                if run_manager and chunk.text:
                    run_manager.on_llm_new_token(chunk.text, chunk=out)
                yield out

    def _chunk(self, text: str, final: Completion | None) -> ChatGenerationChunk:
        """Usage and finish_reason go on the last chunk only, so adding the chunks up counts them once."""
        if final is None:
            return ChatGenerationChunk(message=AIMessageChunk(content=text))
        msg = AIMessageChunk(content=text, usage_metadata=_usage(final), response_metadata=self._metadata(final),
                             chunk_position="last")
        return ChatGenerationChunk(message=msg, generation_info={"finish_reason": final.finish_reason})

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        params = self._params(stop, **kwargs)
        cancel = self._cancel_event()
        try:
            c = await asyncio.to_thread(self._gen().generate, to_chat(messages), params, cancel)
        finally:
            cancel.set()  # a cancelled task stops the generate loop at its next token instead of finishing
        return ChatResult(generations=[ChatGeneration(message=self._message(c))])

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        """The sync stream is read by finetune's pump thread; when the consuming task is cancelled (or stops
        reading), `cancel` is set and the generate thread stops at its next token."""
        params = self._params(stop, **kwargs)
        cancel = self._cancel_event()
        try:
            async for chunk in aiter_chunks(self._gen().stream(to_chat(messages), params, cancel), cancel):
                out = self._chunk(chunk.text, chunk.completion)
                if run_manager and chunk.text:
                    await run_manager.on_llm_new_token(chunk.text, chunk=out)
                yield out
        finally:
            cancel.set()

    # -- batch: one padded generate call, not a thread per input -----------------------------------------------
    def batch(self, inputs: list[LanguageModelInput], config: RunnableConfig | list[RunnableConfig] | None = None,
              *, return_exceptions: bool = False, **kwargs: Any) -> list[AIMessage]:
        """All inputs in one left-padded `Generator.batch` call (up to 16 rows per forward pass).

        Each input still gets its own callback run (tracing sees N chat-model runs). Per-call options
        (`stop=`, `max_tokens=`...) apply to every input alike.
        """
        return self._batch(inputs, config, None, return_exceptions, **kwargs)

    async def abatch(self, inputs: list[LanguageModelInput],
                     config: RunnableConfig | list[RunnableConfig] | None = None, *, return_exceptions: bool = False,
                     **kwargs: Any) -> list[AIMessage]:
        cancel = self._cancel_event()
        try:
            return await asyncio.to_thread(self._batch, inputs, config, cancel, return_exceptions, **kwargs)
        finally:
            cancel.set()

    def _batch(self, inputs: Sequence[LanguageModelInput], config: RunnableConfig | list[RunnableConfig] | None,
               cancel: threading.Event | None, return_exceptions: bool, **kwargs: Any) -> list[Any]:
        if not inputs:
            return []
        stop = kwargs.pop("stop", None)
        params = self._params(stop, **kwargs)
        conversations = [self._convert_input(i).to_messages() for i in inputs]
        runs = []
        serialized = dumpd(self)  # what tracing records about this model, as BaseChatModel's own calls send it
        for cfg, msgs in zip(get_config_list(config, len(inputs)), conversations):
            manager = CallbackManager.configure(
                cfg.get("callbacks"), self.callbacks, self.verbose, cfg.get("tags"), self.tags,
                {**(cfg.get("metadata") or {}), **self._get_ls_params(stop=stop, **kwargs)}, self.metadata,
            )
            (run,) = manager.on_chat_model_start(
                serialized, [msgs], invocation_params=self._identifying_params, name=cfg.get("run_name"),
                run_id=cfg.pop("run_id", None), batch_size=len(inputs),
            )
            runs.append(run)
        try:
            completions = self._gen().batch([to_chat(m) for m in conversations], params, cancel or self._cancel_event())
        except Exception as e:
            for run in runs:
                run.on_llm_error(e)
            if return_exceptions:
                return [e] * len(inputs)
            raise
        out = []
        for run, c in zip(runs, completions):
            msg = self._message(c)
            run.on_llm_end(LLMResult(generations=[[ChatGeneration(message=msg)]]))
            out.append(msg)
        return out

    # -- structured output: JSON in the prompt, parsed and retried (the model has no tool calling) -----------
    def with_structured_output(self, schema: Any, *, include_raw: bool = False,
                               **kwargs: Any) -> Runnable[LanguageModelInput, Any]:
        """Answer as an instance of `schema` (a Pydantic class, or a JSON-schema dict -> a dict).

        There is no tool calling: the schema goes into a system message and decoding is constrained to JSON of
        that schema (`json_schema`), so the reply parses unless `max_tokens` cuts it; it is then validated, and a
        failure is fed back for `max_retries` more tries (default 2). `method=` and `strict=` are accepted for
        LangChain compatibility and change nothing.
        """
        from .extract import structured_runnable

        unknown = set(kwargs) - {"method", "strict", "max_retries", "tools"}
        if unknown:
            raise TypeError(f"with_structured_output got unknown argument(s) {sorted(unknown)}")
        return structured_runnable(self, schema, max_retries=kwargs.get("max_retries", 2), include_raw=include_raw)

    def with_params(self, params: GenerationParams) -> TunedChatModel:
        """A copy that shares the loaded model but generates with `params` (as the UI's settings give them)."""
        return self.model_copy(update={
            "max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
            "top_k": params.top_k, "repetition_penalty": params.repetition_penalty, "seed": params.seed,
            "use_adapter": params.use_adapter, "json_schema": params.json_schema, "stop": list(params.stop) or self.stop,
        })


def load_chat_model(source: str | os.PathLike[str] | Generator = "embedded", **params: Any) -> TunedChatModel:
    """`load_chat_model("runs/quickstart", temperature=0)`; `source` may also be an already loaded `Generator`."""
    if isinstance(source, Generator):
        return TunedChatModel(generator=source, model=source.name, **params)
    return TunedChatModel(model=str(source), **params)


def as_chat_model(model: BaseChatModel | Generator | str, params: GenerationParams | None = None) -> BaseChatModel:
    """What every pipeline accepts as its model: a chat model, a loaded Generator, or a run/model name."""
    if isinstance(model, BaseChatModel):
        return model.with_params(params) if params and isinstance(model, TunedChatModel) else model
    chat = load_chat_model(model)
    return chat.with_params(params) if params else chat


def to_chat(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages -> the [{"role", "content"}] list the run's chat template renders."""
    out = []
    for m in messages:
        role = m.role if isinstance(m, ChatMessage) else _ROLES.get(m.type)
        if role is None:
            raise ValueError(f"TunedChatModel cannot send a {type(m).__name__} ({m.type!r}) to the model")
        if isinstance(m.content, list) and any(isinstance(b, dict) and b.get("type") not in ("text", None)
                                               for b in m.content):
            kinds = sorted({b["type"] for b in m.content
                            if isinstance(b, dict) and b.get("type") not in ("text", None)})
            raise ValueError(f"TunedChatModel reads text only; this {type(m).__name__} has {kinds} content blocks")
        out.append({"role": role, "content": m.text})
    return out


def _usage(c: Completion) -> UsageMetadata:
    # the ignore: langchain-core marks the *_token_details keys typing.NotRequired, which mypy's 3.10 typeshed
    # lacks, so it reads them as required
    return {"input_tokens": c.prompt_tokens, "output_tokens": c.completion_tokens,  # type: ignore[typeddict-item]
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def _load_generator(source: str, adapter: str | None) -> Generator:
    """finetune resolves the source (one rule for runs, folders, .gguf, `embedded`, hub ids); chains re-raise its
    error as a ChainModelError."""
    try:
        return load_generator(source, adapter=adapter)
    except ModelLoadError as e:
        raise ChainModelError(str(e)) from e
