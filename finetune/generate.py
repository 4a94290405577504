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
    json_schema: dict | None = None
    """A JSON schema the answer must follow: decoding only allows tokens that keep the text valid JSON of this
    schema (lm-format-enforcer), so even a 135M model's answer parses. It can still be cut by `max_new_tokens`
    (finish_reason "length"), and lm-format-enforcer's number grammar lets an integer have an exponent (`3e2`) and
    any number of digits: validate the parsed answer. The OpenAI API's `response_format` and the extract chain
    both set this."""

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
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise ValueError(f"json_schema must be a JSON schema dict, got {type(self.json_schema).__name__}")


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
        self._json_vocab: Any = None  # lm-format-enforcer's view of the vocabulary, built on first json_schema use
        self._json_vocab_lock = threading.Lock()

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

    def _json_constraint(self, schema: dict) -> Any:
        """`prefix_allowed_tokens_fn` for model.generate: at each step, only tokens that keep the answer a valid
        prefix of JSON matching `schema` (plus end-of-turn once the object is complete).

        Built on lm-format-enforcer's core `TokenEnforcer`, its documented extension point: the package's own
        transformers integration fails to import on transformers 5 (noamgat/lm-format-enforcer PR #177)."""
        from lmformatenforcer import (
            CharacterLevelParserConfig,
            JsonSchemaParser,
            TokenEnforcer,
            TokenEnforcerTokenizerData,
        )

        try:
            parser = JsonSchemaParser(schema)
        except Exception as e:  # pydantic's error for a malformed schema, or lm-format-enforcer's for an unsupported one
            raise ValueError(f"json_schema is not a usable JSON schema ({type(e).__name__}: {str(e)[:300]}). Give an "
                             "object schema such as a Pydantic model's model_json_schema().") from None
        with self._json_vocab_lock:
            if self._json_vocab is None:
                vocab = len(self.tokenizer)
                self._json_vocab = TokenEnforcerTokenizerData(
                    _token_strings(self.tokenizer, vocab), self._decode_json_prefix,
                    self._eos_ids(),  # the end of a chat turn (ChatML's <|im_end|>) too, not only the tokenizer's EOS
                    use_bitmask=False, vocab_size=vocab)
        enforcer = TokenEnforcer(self._json_vocab, parser)
        # TokenEnforcer lets strings hold every single-character token, raw newlines and tabs included, which
        # strict JSON parsers reject (a random model writes them): narrow its alphabet after it has set it
        alphabet = "".join(c for c in self._json_vocab.tokenizer_alphabet if c >= " ")
        parser.config = CharacterLevelParserConfig(alphabet=alphabet)
        return lambda _row, ids: enforcer.get_allowed_tokens(ids.tolist()).allowed_tokens

    def _decode_json_prefix(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids).rstrip("\ufffd")  # half a UTF-8 character is not text yet

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
        constraint = {"prefix_allowed_tokens_fn": self._json_constraint(p.json_schema)} if p.json_schema else {}
        base_mode = not p.use_adapter and self.has_adapter
        self._lock.acquire(exclusive=base_mode)
        try:
            if p.seed is not None:
                torch.manual_seed(p.seed)
            with torch.inference_mode(), (self.model.disable_adapter() if base_mode else contextlib.nullcontext()):
                out = self.model.generate(**enc, **self._gen_kwargs(p), **constraint,
                                          stopping_criteria=StoppingCriteriaList([watch]))
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

    def score(self, prompts: Sequence[Prompt], candidates: Sequence[str], use_adapter: bool = True,
              max_rows: int = 64) -> list[list[float]]:
        """Summed log-probability of each candidate answer (its tokens through the end-of-turn token, exactly the
        tokens training puts loss on) after each prompt: scores[i][j] for prompts[i], candidates[j].

        Picking the argmax always yields one of the candidates, which is what a small model needs for labels: it
        may put the right label first and still ramble when generating freely. Each prompt runs once; its KV cache
        is shared by all candidates."""
        base_mode = not use_adapter and self.has_adapter
        self._lock.acquire(exclusive=base_mode)
        try:
            with torch.inference_mode(), (self.model.disable_adapter() if base_mode else contextlib.nullcontext()):
                return score_candidates(self.model, self.tokenizer, prompts, candidates, max_rows=max_rows).tolist()
        finally:
            self._lock.release(exclusive=base_mode)

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


def candidate_ids(tokenizer: Any, prompt: Prompt, candidates: Sequence[str]) -> tuple[list[int], list[list[int]],
                                                                                   list[list[bool]]]:
    """(shared prompt ids, per candidate: continuation ids, which of them are scored).

    A chat prompt is tokenized with each candidate as the assistant reply by the same function training uses, so
    the scored tokens are exactly the trained ones (reply + end-of-turn). The shared prefix is what all candidates'
    token sequences have in common before their first scored token; a token straddling the boundary is fed but
    not scored. A plain-text prompt scores the candidate text plus EOS."""
    from .data import tokenize_messages

    seqs: list[tuple[list[int], list[bool]]] = []
    for cand in candidates:
        if isinstance(prompt, str):
            text = prompt + cand + (tokenizer.eos_token or "")
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            seqs.append((list(enc["input_ids"]), [e > len(prompt) for _, e in enc["offset_mapping"]]))
        else:
            if not tokenizer.chat_template:
                raise ValueError("the tokenizer has no chat template; pass plain string prompts to score labels")
            msgs = list(prompt) + [{"role": "assistant", "content": cand}]
            ids, train = tokenize_messages(msgs, tokenizer, tokenizer.chat_template, train_on_prompt=False)
            # only the candidate (the last reply) is scored; few-shot example replies in the prompt are context
            start = len(train)
            while start > 0 and not train[start - 1]:
                start -= 1
            while start > 0 and train[start - 1]:
                start -= 1
            seqs.append((ids, [t and j >= start for j, t in enumerate(train)]))
    firsts = [tr.index(True) if True in tr else len(tr) for _, tr in seqs]
    n = min(firsts)
    while n > 0 and any(ids[:n] != seqs[0][0][:n] for ids, _ in seqs):
        n -= 1
    if n == 0:
        raise ValueError("cannot score candidates: they share no prompt tokens (an empty prompt?)")
    return seqs[0][0][:n], [ids[n:] for ids, _ in seqs], [tr[n:] for _, tr in seqs]


def score_candidates(model: Any, tokenizer: Any, prompts: Sequence[Prompt], candidates: Sequence[str],
                     max_rows: int = 64) -> torch.Tensor:
    """(len(prompts), len(candidates)) summed log-probs; see `Generator.score`. Also used by the trainer's eval.

    Prompts are left-padded and run once per batch; their KV cache is repeated for the candidates, which run
    right-padded with explicit positions (so padding never shifts a position)."""
    k = len(candidates)
    if k == 0:
        raise ValueError("no candidates to score")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = torch.empty(len(prompts), k, dtype=torch.float64)
    per = max(1, max_rows // k)
    for start in range(0, len(prompts), per):
        chunk = [candidate_ids(tokenizer, p, candidates) for p in prompts[start: start + per]]
        r = len(chunk)
        plen = max(len(c[0]) for c in chunk)
        p_ids = torch.full((r, plen), pad, dtype=torch.long)
        p_mask = torch.zeros((r, plen), dtype=torch.long)
        for i, (ids, _, _) in enumerate(chunk):
            p_ids[i, plen - len(ids):] = torch.tensor(ids)
            p_mask[i, plen - len(ids):] = 1
        p_pos = (p_mask.cumsum(1) - 1).clamp(min=0)
        res = model(input_ids=p_ids.to(device), attention_mask=p_mask.to(device), position_ids=p_pos.to(device),
                    use_cache=True)
        last = torch.log_softmax(res.logits[:, -1].float(), -1).repeat_interleave(k, 0)  # (r*k, V)
        cache = res.cache if hasattr(res, "cache") else res.past_key_values  # renamed in transformers 5.x
        cache.batch_repeat_interleave(k)
        clen = max(len(c) for _, conts, _ in chunk for c in conts)
        c_ids = torch.full((r * k, clen), pad, dtype=torch.long)
        c_mask = torch.zeros((r * k, clen), dtype=torch.long)
        scored = torch.zeros((r * k, clen), dtype=torch.bool)
        for i, (_, conts, marks) in enumerate(chunk):
            for j, (ids, mk) in enumerate(zip(conts, marks)):
                c_ids[i * k + j, : len(ids)] = torch.tensor(ids)
                c_mask[i * k + j, : len(ids)] = 1
                scored[i * k + j, : len(mk)] = torch.tensor(mk)
        c_pos = p_mask.sum(1).repeat_interleave(k)[:, None] + torch.arange(clen)[None]
        mask = torch.cat([p_mask.repeat_interleave(k, 0), c_mask], 1)
        logits = model(input_ids=c_ids.to(device), attention_mask=mask.to(device), position_ids=c_pos.to(device),
                       use_cache=True, **{_cache_kw(model): cache}).logits.float()
        # token t of the continuation is predicted by the prompt's last position (t = 0) or continuation t - 1
        logp = torch.cat([last[:, None], torch.log_softmax(logits[:, :-1], -1)], 1)
        tok_lp = logp.gather(-1, c_ids.to(device)[..., None])[..., 0].cpu().double()
        out[start: start + r] = (tok_lp * scored).sum(1).view(r, k)
    return out


def _token_strings(tokenizer: Any, vocab_size: int) -> list[tuple[int, str, bool]]:
    """(id, text, starts a word) for the tokens JSON may be written with, as lm-format-enforcer's TokenEnforcer
    needs them.

    A token's text is decoded after a "0" token and the "0" cut off: decoding it alone drops the leading space of
    SentencePiece pieces; a token whose text is longer that way starts a new word. Left out: special tokens,
    pieces of a UTF-8 character (they decode to U+FFFD alone and to something else next to their neighbour, so the
    enforcer would check other text than the one written) and control characters and tabs, which JSON strings may
    not hold raw and lm-format-enforcer lets into strings (spaces and newlines still lay the JSON out)."""
    zero = tokenizer.encode("0", add_special_tokens=False)[-1]
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(vocab_size) if i not in special]
    after_zero = tokenizer.batch_decode([[zero, i] for i in ids])
    alone = tokenizer.batch_decode([[i] for i in ids])
    out = []
    for i, a, b in zip(ids, after_zero, alone):
        text = a[1:]
        if text and "\ufffd" not in text and all(c >= " " and c != "\x7f" or c in "\n\r" for c in text):
            out.append((i, text, len(text) > len(b)))
    return out


def _cache_kw(model: Any) -> str:
    """`cache` in transformers >= 5.2x, `past_key_values` before (and deprecated after)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
