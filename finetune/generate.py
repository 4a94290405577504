"""The one generation API: `chains/`, `ui/`, `tunesmith chat` and `tunesmith eval` all call this.

It owns the things every front end otherwise gets subtly wrong: the chat template the run was trained with,
multi-token stop strings (cut from the returned text), incremental UTF-8-safe streaming, cancellation that
really stops the generate loop, left-padded batching, and usage counts.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .model import LoadedRun, load_run

Messages = list[dict[str, str]]
Prompt = str | Messages


@dataclass
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.7
    """0 means greedy decoding."""
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    """Stop strings; generation ends at the first one and it is not part of the returned text."""
    seed: int | None = None
    use_adapter: bool = True
    """False answers with the base model alone (same weights in memory), for tuned-vs-base comparisons."""

    def __post_init__(self) -> None:
        self.stop = [s for s in self.stop if s]  # "" would match everywhere and end every answer at once
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """"stop" (EOS or a stop string), "length" (max_new_tokens reached) or "cancelled"."""


@dataclass
class Chunk:
    """One streamed piece: `text` is the new text only; the last chunk has `done=True` and the totals."""

    text: str
    done: bool = False
    completion: Completion | None = None


class ContextError(ValueError):
    """A prompt, or prompt plus `max_new_tokens`, does not fit the model's context; `param` names the culprit."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def context_length(gen: Generator) -> int | None:
    """Tokens the model reads at most (prompt + answer): its config's `max_position_embeddings`, if it has one."""
    n = getattr(getattr(gen.model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def fit_context(gen: Generator, messages: Messages, max_new_tokens: int | None, default: int) -> tuple[int, int]:
    """(prompt tokens, max_new_tokens to use) for `messages`, or ContextError: a prompt is never cut silently.

    A `max_new_tokens` asked for explicitly must fit beside the prompt (as OpenAI answers, 400 otherwise); the
    `default` is lowered to what fits, since nobody asked for it.
    """
    n = gen.count_tokens(gen.render(messages))
    limit = context_length(gen)
    if limit is None:
        return n, max_new_tokens or default
    if n >= limit:
        raise ContextError(f"The prompt is {n} tokens but {gen.name} reads at most {limit} (its context, prompt and "
                           "answer together). Shorten the messages: drop early turns or long pasted text.", "messages")
    room = limit - n
    if max_new_tokens is not None and max_new_tokens > room:
        raise ContextError(f"max_tokens={max_new_tokens} does not fit: the prompt is {n} tokens of {gen.name}'s "
                           f"{limit}-token context, so at most {room} new tokens fit. Ask for <= {room}, or shorten "
                           "the messages.", "max_tokens")
    return n, max_new_tokens or min(default, room)


class _RWLock:
    """Many tuned-model generations may run at once; switching the adapter off (base mode) needs the model alone."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    def acquire(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._cond.wait_for(lambda: not self._writer and self._readers == 0)
                self._writer = True
            else:
                self._cond.wait_for(lambda: not self._writer)
                self._readers += 1

    def release(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._writer = False
            else:
                self._readers -= 1
            self._cond.notify_all()


class _Watch(StoppingCriteria):
    """Per-row stop: cancel event, stop strings in the decoded new text, and streaming hand-off of new tokens."""

    def __init__(self, gen: Generator, prompt_len: int, stop: Sequence[str], cancel: threading.Event | None,
                 on_tokens: Any = None) -> None:
        self.gen, self.prompt_len, self.stop, self.cancel, self.on_tokens = gen, prompt_len, list(stop), cancel, on_tokens
        self.hit_stop: set[int] = set()
        self.cancelled = False
        self._tail = max((len(s) for s in self.stop), default=0) + 16

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kw: Any) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len:]
        if self.on_tokens is not None:
            self.on_tokens(new[0])
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.cancel is not None and self.cancel.is_set():
            self.cancelled = True
            return done | True
        if self.stop:
            for i in range(new.shape[0]):
                # only the last few tokens can complete a new stop string
                tail = self.gen.tokenizer.decode(new[i, -self._tail:], skip_special_tokens=True)
                if any(s in tail for s in self.stop):
                    self.hit_stop.add(i)
                    done[i] = True
        return done


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class Generator:
    """Generation over a loaded run. Thread-safe; create one per model and share it."""

    def __init__(self, loaded: LoadedRun) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self._lock = _RWLock()
        self.has_adapter = hasattr(self.model, "disable_adapter")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- prompts ---------------------------------------------------------------------------------------------
    def render(self, prompt: Prompt) -> str:
        """Chat messages -> the exact prompt text the run was trained on (its saved chat template)."""
        if isinstance(prompt, str):
            return prompt
        if not self.tokenizer.chat_template:
            raise ValueError(
                f"{self.name}'s tokenizer has no chat template; pass a plain string prompt or set data.chat_template "
                "when training."
            )
        return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        texts = [self.render(p) for p in prompts]
        self.tokenizer.padding_side = "left"  # left padding keeps every row's last prompt token adjacent to its answer
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.device) for k, v in enc.items()}

    def _gen_kwargs(self, p: GenerationParams) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "max_new_tokens": p.max_new_tokens,
            "repetition_penalty": p.repetition_penalty,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self._eos_ids(),
        }
        if p.temperature > 0:
            kw.update(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or None)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        gc = getattr(self.model, "generation_config", None)
        g = getattr(gc, "eos_token_id", None)
        ids |= set(g) if isinstance(g, list) else {g}
        return sorted(i for i in ids if i is not None)

    # -- core ------------------------------------------------------------------------------------------------
    def _run(self, prompts: Sequence[Prompt], p: GenerationParams, cancel: threading.Event | None,
             on_tokens: Any = None) -> list[Completion]:
        enc = self._encode(prompts)
        plen = enc["input_ids"].shape[1]
        limit = context_length(self)
        if limit is not None:  # a prompt is never cut silently; the answer stops at the context's end ("length")
            longest = int(enc["attention_mask"].sum(dim=1).max())
            if longest >= limit:
                raise ContextError(f"The prompt is {longest} tokens but {self.name} reads at most {limit} (its context, "
                                   "prompt and answer together). Shorten the prompt.", "messages")
            p = replace(p, max_new_tokens=min(p.max_new_tokens, limit - longest))
        watch = _Watch(self, plen, p.stop, cancel, on_tokens)
        base_mode = not p.use_adapter and self.has_adapter
        self._lock.acquire(exclusive=base_mode)
        try:
            if p.seed is not None:
                torch.manual_seed(p.seed)
            with torch.inference_mode(), (self.model.disable_adapter() if base_mode else contextlib.nullcontext()):
                out = self.model.generate(**enc, **self._gen_kwargs(p), stopping_criteria=StoppingCriteriaList([watch]))
        finally:
            self._lock.release(exclusive=base_mode)
        results = []
        eos = set(self._eos_ids())
        for i in range(out.shape[0]):
            new = out[i, plen:].tolist()
            n_prompt = int(enc["attention_mask"][i].sum())
            ended = next((j for j, t in enumerate(new) if t in eos), None)
            if ended is not None:
                new = new[: ended + 1]
            while new and new[-1] == self.tokenizer.pad_token_id and new[-1] not in eos:
                new.pop()
            text, stopped = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), p.stop)
            if watch.cancelled:
                reason = "cancelled"
            elif ended is not None or stopped or i in watch.hit_stop:
                reason = "stop"
            else:
                reason = "length"
            results.append(Completion(text, n_prompt, len(new), reason))
        return results

    def generate(self, prompt: Prompt, params: GenerationParams | None = None,
                 cancel: threading.Event | None = None) -> Completion:
        return self._run([prompt], params or GenerationParams(), cancel)[0]

    def batch(self, prompts: Sequence[Prompt], params: GenerationParams | None = None,
              cancel: threading.Event | None = None, max_batch_size: int = 16) -> list[Completion]:
        """One left-padded `generate` call per `max_batch_size` prompts (not a thread per prompt)."""
        p = params or GenerationParams()
        out: list[Completion] = []
        for i in range(0, len(prompts), max_batch_size):
            out += self._run(prompts[i: i + max_batch_size], p, cancel)
        return out

    def stream(self, prompt: Prompt, params: GenerationParams | None = None,
               cancel: threading.Event | None = None) -> Iterator[Chunk]:
        """Yield text as it is generated. Closing the iterator early (or setting `cancel`) stops generation."""
        p = params or GenerationParams()
        cancel = cancel or threading.Event()
        q: queue.Queue[tuple[str, Any]] = queue.Queue()
        holdback = max((len(s) for s in p.stop), default=0)

        def on_tokens(ids: torch.Tensor) -> None:
            q.put(("ids", ids.tolist()))

        def work() -> None:
            try:
                q.put(("done", self._run([prompt], p, cancel, on_tokens)[0]))
            except BaseException as e:  # surfaced in the consumer's thread
                q.put(("error", e))

        t = threading.Thread(target=work, daemon=True, name="tunesmith-generate")
        t.start()
        sent = 0  # characters already yielded
        try:
            while True:
                kind, val = q.get()
                if kind == "error":
                    raise val
                if kind == "done":
                    final: Completion = val
                    if len(final.text) > sent:
                        yield Chunk(final.text[sent:])
                    yield Chunk("", done=True, completion=final)
                    return
                text = self.tokenizer.decode(val, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # half a UTF-8 character: wait for the next token
                    continue
                text, _ = cut_at_stop(text, p.stop)
                safe = len(text) - holdback  # the tail could still turn into a stop string
                if safe > sent:
                    yield Chunk(text[sent:safe])
                    sent = safe
        finally:
            cancel.set() if t.is_alive() else None
            t.join(timeout=30)



def load_generator(source: str | Path, **kw: Any) -> Generator:
    """`source`: a run folder, merged model folder, adapter folder, `embedded`, a local HF folder, .gguf or hub id."""
    return Generator(load_run(source, **kw))

