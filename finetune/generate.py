"""The one generation API: `chains/`, `ui/`, `tunesmith chat` and `tunesmith eval` all call this.

It owns the things every front end otherwise gets subtly wrong: the chat template the run was trained with,
multi-token stop strings (cut from the returned text), incremental UTF-8-safe streaming, cancellation that
really stops the generate loop, left-padded batching, and usage counts.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import abc
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import torch
from transformers import GenerationMixin, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from tunesmith import PREFIX_CACHE_MIB

from . import compiling
from .constrained import JsonVocab
from .continuous import Answer, ContinuousBatcher
from .continuous import why_not as why_not_batched
from .fastdecode import CompiledDecode
from .fastdecode import why_not as why_not_compiled
from .logits import RowSampler, _token_text, completion_logprobs, generate_kwargs, row_processors, token_key
from .model import LoadedRun, load_run
from .params import GREEDY_BELOW, Chunk, Completion, ContextError, GenerationParams, Prompt, TokenLogprobs
from .quantize import int8_reads, resolve_decode_weights, use_int8_decode
from .scoring import score_candidates
from .sharing import AdapterSwitch, CpuShare, cpu_share, on_own_thread
from .streams import thread_stream


def context_length(gen: Generator) -> int | None:
    """Tokens the model reads at most (prompt + answer): its config's `max_position_embeddings`, if it has one."""
    n = getattr(gen, "n_ctx", None) or getattr(getattr(gen.model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def fit_context(gen: Generator, messages: Prompt, max_new_tokens: int | None, default: int) -> tuple[int, int]:
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


class _Watch(StoppingCriteria):
    """Per-row stop: cancel event, stop strings in the decoded new text, and streaming hand-off of new tokens."""

    def __init__(self, gen: Generator, prompt_len: int, stop: Sequence[str], cancel: threading.Event | None,
                 on_tokens: Any = None) -> None:
        self.gen, self.prompt_len, self.stop, self.cancel, self.on_tokens = gen, prompt_len, list(stop), cancel, on_tokens
        self.hit_stop: set[int] = set()
        self.cancelled = False
        self.share: CpuShare | None = None
        """The CPU threads of this call, resized at every token to the number of calls running beside it."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kw: Any) -> torch.BoolTensor:
        if self.share is not None:
            self.share.update()
        new = input_ids[:, self.prompt_len:]
        if self.on_tokens is not None:
            self.on_tokens(new[0])
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.cancel is not None and self.cancel.is_set():
            self.cancelled = True
            return cast(torch.BoolTensor, done | True)
        if self.stop:
            for i in range(new.shape[0]):
                if ends_in_stop(self.gen.tokenizer, new[i].tolist(), self.stop):
                    self.hit_stop.add(i)
                    done[i] = True
        return cast(torch.BoolTensor, done)


def ends_in_stop(tokenizer: Any, new: Sequence[int], stop: Sequence[str]) -> bool:
    """Whether the last tokens of `new` complete a stop string: only they can, so only they are decoded."""
    tail = tokenizer.decode(new[-(max(len(s) for s in stop) + 16):], skip_special_tokens=True)
    return any(s in tail for s in stop)


class TextStream:
    """The streamed text of a growing answer, decoded a few tokens at a time.

    Decoding the whole answer at every token (what this replaced) made streaming quadratic: 0.3 ms a token at
    1,000 tokens, per stream, under the GIL, i.e. ~5 ms of every decode step with 16 long answers streaming. As
    vLLM and TGI do, each update decodes only the tokens since the last text plus those of the text before, for
    context (a SentencePiece piece's leading space depends on what precedes it), and appends the difference.

    Text is final once decoded, except that an answer ending in half a UTF-8 character waits for the next bytes: a
    character has at most 4 bytes, so the text before the last 3 tokens is final; bytes that never make a character
    (a model writing garbage) do not hold the whole answer back until the end."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        self._start = 0  # tokens before this are context only
        self._read = 0  # tokens before this are in `text`

    def update(self, ids: Sequence[int]) -> str:
        """`ids`: the answer's tokens so far (the previous call's, extended). Returns all the final text."""
        end = len(ids)
        window = self._decode(ids[self._start:end])
        if window.endswith("\ufffd"):  # half a character, or garbage: wait for at most 3 more tokens
            end = max(self._read, end - 3)
            window = self._decode(ids[self._start:end])
        if end <= self._read:
            return self.text
        head = self._decode(ids[self._start:self._read])
        if len(window) > len(head):  # only text moves the window: a piece that shows nothing yet (a lone
            if window.startswith(head):  # SentencePiece space) keeps its context
                self.text += window[len(head):]
            else:  # a tokenizer whose pieces change their neighbours' text: decode it all (correct, slower)
                self.text = self._decode(ids[:end])
            self._start, self._read = self._read, end
        return self.text

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True)) if ids else ""


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class Generator:
    """Generation over a loaded run. Thread-safe; create one per model and share it."""

    def __init__(self, loaded: LoadedRun, decode_weights: str = "exact", own_threads: bool = True,
                 compile_decode: bool = False, continuous_batching: bool = True,
                 prefix_cache_mib: int = PREFIX_CACHE_MIB, batch_slots: int = 16,
                 prefill_chunk: int | None = None) -> None:
        """`decode_weights="int8"` (or `"auto"`: int8 on a CPU) decodes from int8 copies of the linear weights,
        ~1.6x faster on a CPU at a small cost in exactness (finetune/quantize.py); long prompts and scoring stay exact.

        `compile_decode`: answers decode through a compiled step (finetune/fastdecode.py; ~2x the tokens/s of int8
        eager decoding on a CPU for one prompt, ~1.2x for 16 at once); compiled here, before the first answer
        (~30 s with a warm kernel cache, ~2.5 min the first time).
        `compiled_decode` then says whether it is on, `why_no_compile` why not (a model transformers cannot compile,
        no C++ compiler).

        `own_threads`: each model call runs on a thread of its own that ends with it (`sharing.on_own_thread`:
        a long-lived thread's OpenMP team slows every other thread's generation). False runs calls on the
        caller's thread: for a caller that already does torch work on its thread, as a training loop does.

        `continuous_batching` (with `own_threads`): every answer in flight, streamed or not, is a row of one shared
        decode step that it joins and leaves at any token (finetune/continuous.py); `why_no_batching` says why
        not (a model without a standard key/value cache, own_threads=False). Base-model answers
        (`use_adapter=False`) still run one `generate` call each. Its prompts reuse the keys/values of earlier
        prompts and answers they start with, kept within `prefix_cache_mib` (finetune/prefixes.py; 0: none).
        `batch_slots`: answers decoded at once (rows of the step); more wait for a free row. On a CPU 16 rows are
        already compute-bound; a GPU serving many users wants more (`serve --concurrency` sets it).
        `prefill_chunk`: while answers decode, a newcomer's prompt is prefilled at most this many tokens a forward,
        a decode step between each, so a long prompt does not stall the answers in flight (None: 256 on a CPU,
        2,048 on a GPU; finetune/continuous.py)."""
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self._adapter = AdapterSwitch(self.model)
        self.has_adapter = self._adapter.has_adapter
        self._json = JsonVocab(self.tokenizer, self._eos_ids())
        self.own_threads = own_threads
        self.decode_weights = resolve_decode_weights(decode_weights, self.device)
        if self.decode_weights == "int8":
            use_int8_decode(self.model)
        self._compiled: CompiledDecode | None = None
        self.why_no_compile = why_not_compiled(self.model) if compile_decode else "not asked (compile_decode=False)"
        self._batcher: ContinuousBatcher | None = None
        self.why_no_batching = (why_not_batched(self.model) if own_threads else "own_threads=False") if \
            continuous_batching else "not asked (continuous_batching=False)"
        if self.why_no_compile is None:
            self._compiled = CompiledDecode(self.model)
        if self.why_no_batching is None:
            self._batcher = ContinuousBatcher(self.model, self._compiled.step() if self._compiled else None,
                                              slots=batch_slots, prefix_cache_mib=prefix_cache_mib,
                                              prefill_chunk=prefill_chunk,
                                              hold=lambda: self._adapter.use(True))
            if self._compiled is not None:
                self._batcher.warm_up(self.tokenizer("Hello", add_special_tokens=False)["input_ids"] or [0])
        elif self._compiled is not None:
            warm = GenerationParams(max_new_tokens=3, temperature=0)
            prompts = ["Hello", "Hi, how are you?"]  # two lengths: a batch is left-padded
            self._compiled.warm_up(lambda n: self._run(prompts[-n:], warm, None), context_length(self))

    @property
    def compiled_decode(self) -> bool:
        return self._compiled is not None

    @property
    def continuous_batching(self) -> bool:
        return self._batcher is not None

    def clear_prefix_cache(self) -> None:
        """Forget the keys/values kept for reuse (a benchmark's cold prompts; memory back)."""
        if self._batcher is not None:
            self._batcher.prefixes.clear()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def system_prompt(self) -> str | None:
        """The system prompt the run was trained with (`data.system_prompt` of its config): front ends pre-fill it,
        because a tuned model answers worse without the prompt it learned under."""
        return (self.loaded.config.get("data") or {}).get("system_prompt") or None

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
        text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert isinstance(text, str)  # tokenize=False renders one conversation to text
        return text

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        """The token ids the model reads for `prompt` (its chat template applied, no special tokens added twice)."""
        ids = self.tokenizer(self.render(prompt), add_special_tokens=False)["input_ids"]
        return list(ids)

    def _encode(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        """Left-padded ids and mask (left padding keeps every row's last prompt token next to its answer).

        Padded here, not by the tokenizer: asking a fast tokenizer to pad reconfigures its Rust object, and that
        raced with other threads' encoding ("Already borrowed") when requests came together."""
        rows = [self._prompt_ids(p) for p in prompts]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r):] = torch.tensor(r)
                mask[i, width - len(r):] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _gen_kwargs(self, p: GenerationParams) -> dict[str, Any]:
        # always greedy inside `generate`: sampling is RowSampler's, the last logits processor (see `_run`)
        return {
            "max_new_tokens": p.max_new_tokens,
            "repetition_penalty": p.repetition_penalty,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self._eos_ids(),
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None,
        }

    def _decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert isinstance(text, str)  # one sequence of ids decodes to one string
        return text

    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        gc = getattr(self.model, "generation_config", None)
        g = getattr(gc, "eos_token_id", None)
        ids |= set(g) if isinstance(g, list) else {g}
        return sorted(i for i in ids if i is not None)

    # -- core ------------------------------------------------------------------------------------------------
    def _run(self, prompts: Sequence[Prompt], p: GenerationParams, cancel: threading.Event | None,
             on_tokens: Any = None) -> list[Completion]:
        if self._batched(p):
            return self._run_batched(prompts, p, cancel, on_tokens)
        enc = self._encode(prompts)
        plen = enc["input_ids"].shape[1]
        limit = context_length(self)
        if limit is not None:  # a prompt is never cut silently; the answer stops at the context's end ("length")
            longest = int(enc["attention_mask"].sum(dim=1).max())
            self._check_prompt(longest, limit)
            p = replace(p, max_new_tokens=min(p.max_new_tokens, limit - longest))
        watch = _Watch(self, plen, p.stop, cancel, on_tokens)
        constraint = {"prefix_allowed_tokens_fn": self._json.constraint(p.json_schema)} if p.json_schema else {}
        extra = generate_kwargs(p, plen)
        if self._compiled is not None and self._batcher is None and (p.use_adapter or not self.has_adapter):
            extra.update(self._compiled.kwargs(plen + p.max_new_tokens, limit))
        if p.temperature >= GREEDY_BELOW:
            processors = extra.setdefault("logits_processor", LogitsProcessorList())
            processors.append(RowSampler(len(prompts), p.temperature, p.top_p, p.top_k, p.seed, self.device))
        with self._adapter.use(p.use_adapter), cpu_share() as watch.share, torch.inference_mode(), int8_reads():
            # a causal LM (or its peft wrapper) generates; PreTrainedModel alone does not declare `generate`
            out = cast(GenerationMixin, self.model).generate(**enc, **self._gen_kwargs(p), **constraint, **extra,
                                                             stopping_criteria=StoppingCriteriaList([watch]))
        out, raw_logits = (out.sequences, out.logits) if p.logprobs else (out, None)
        results = []
        for i in range(out.shape[0]):
            n_prompt = int(enc["attention_mask"][i].sum())
            prompt_ids = enc["input_ids"][i, plen - n_prompt:].tolist()  # left-padded: the last n_prompt ids
            results.append(self._completion(prompt_ids, out[i, plen:].tolist(), p, i in watch.hit_stop,
                                            watch.cancelled, raw_logits, i))
        return results

    def _batched(self, p: GenerationParams) -> bool:
        """Whether answers with `p` decode in the continuous batch (else one `generate` call each)."""
        return self._batcher is not None and (p.use_adapter or not self.has_adapter)

    def _check_prompt(self, n: int, limit: int) -> None:
        if n >= limit:
            raise ContextError(f"The prompt is {n} tokens but {self.name} reads at most {limit} (its context, "
                               "prompt and answer together). Shorten the prompt.", "messages")

    def _run_batched(self, prompts: Sequence[Prompt], p: GenerationParams, cancel: threading.Event | None,
                     on_tokens: Any = None) -> list[Completion]:
        """`_run` as rows of the continuous batch: each prompt unpadded, with its own sampler and penalties."""
        assert self._batcher is not None
        rows = [self._prompt_ids(q) for q in prompts]
        limit = context_length(self)
        cancel = cancel or threading.Event()
        eos = set(self._eos_ids())
        stopped = (lambda new: ends_in_stop(self.tokenizer, new, p.stop)) if p.stop else None
        streamed = (lambda new: on_tokens(torch.tensor(new))) if on_tokens is not None else None
        answers = []
        for ids in rows:
            if limit is not None:
                self._check_prompt(len(ids), limit)
            allowed = self._json.constraint(p.json_schema) if p.json_schema else None  # an enforcer of the row's own
            answers.append(Answer(list(ids) or [self.tokenizer.bos_token_id or 0],
                                  min(p.max_new_tokens, limit - len(ids)) if limit is not None else p.max_new_tokens,
                                  eos, row_processors(p, len(ids), self.device, allowed), stopped, cancel, streamed,
                                  [] if p.logprobs else None))
        done = [self._batcher.submit(a) for a in answers]
        for f in done:
            f.result()
        return [self._completion(ids, a.new, p, a.hit_stop, a.cancelled, a.raw_logits) for ids, a in zip(rows, answers)]

    def _completion(self, prompt_ids: list[int], new: list[int], p: GenerationParams, hit_stop: bool,
                    cancelled: bool, raw_logits: Any = None, row: int = 0) -> Completion:
        """One answer's Completion from its generated ids: cut at EOS, padding and stop strings."""
        eos = set(self._eos_ids())
        ended = next((j for j, t in enumerate(new) if t in eos), None)
        if ended is not None:
            new = new[: ended + 1]
        while new and new[-1] == self.tokenizer.pad_token_id and new[-1] not in eos:
            new.pop()
        text, stopped = cut_at_stop(self._decode(new), p.stop)
        if cancelled:
            reason = "cancelled"
        elif ended is not None or stopped or hit_stop:
            reason = "stop"
        else:
            reason = "length"
        lps = None if raw_logits is None else completion_logprobs(self.tokenizer, raw_logits, row, new, text,
                                                                  p.top_logprobs)
        return Completion(text, len(prompt_ids), len(new), reason, lps, prompt_ids, new)

    def generate(self, prompt: Prompt, params: GenerationParams | None = None,
                 cancel: threading.Event | None = None) -> Completion:
        cancel = cancel or threading.Event()
        return self._call(lambda: self._run([prompt], params or GenerationParams(), cancel)[0], cancel)

    def batch(self, prompts: Sequence[Prompt], params: GenerationParams | None = None,
              cancel: threading.Event | None = None, max_batch_size: int = 16) -> list[Completion]:
        """All prompts as rows of the continuous batch (its slots bound how many decode at once, and a finished row
        takes the next prompt at once), or, where that does not apply, one left-padded `generate` call per
        `max_batch_size` prompts; never a thread per prompt."""
        p = params or GenerationParams()
        cancel = cancel or threading.Event()

        def run() -> list[Completion]:
            if self._batched(p):
                return self._run(prompts, p, cancel)
            out: list[Completion] = []
            for i in range(0, len(prompts), max_batch_size):
                out += self._run(prompts[i: i + max_batch_size], p, cancel)
            return out

        return self._call(run, cancel)

    def _call(self, fn: abc.Callable[[], Any], cancel: threading.Event | None = None) -> Any:
        return on_own_thread(fn, cancel) if self.own_threads else fn()

    def score(self, prompts: Sequence[Prompt], candidates: Sequence[str], use_adapter: bool = True,
              max_rows: int = 64) -> list[list[float]]:
        """Summed log-probability of each candidate answer (its tokens through the end-of-turn token, exactly the
        tokens training puts loss on) after each prompt: scores[i][j] for prompts[i], candidates[j].

        Picking the argmax always yields one of the candidates, which is what a small model needs for labels: it
        may put the right label first and still ramble when generating freely. Each prompt runs once; its KV cache
        is shared by all candidates."""
        def run() -> list[list[float]]:
            with self._adapter.use(use_adapter), cpu_share(), torch.inference_mode():
                return score_candidates(self.model, self.tokenizer, prompts, candidates, max_rows=max_rows).tolist()

        return cast(list[list[float]], self._call(run))

    def prompt_logprobs(self, text: str | Sequence[int], top_n: int = 0, use_adapter: bool = True) -> TokenLogprobs:
        """Logprob of every token of `text` (raw text, no chat template, or token ids) from one forward pass, plus
        the greedy next token: echoed prompts of the completions API, and log-likelihood scoring (lm-eval) without
        generating at all."""
        return cast(TokenLogprobs, self._call(lambda: self._prompt_logprobs(text, top_n, use_adapter)))

    def _prompt_logprobs(self, text: str | Sequence[int], top_n: int, use_adapter: bool) -> TokenLogprobs:
        if isinstance(text, str):
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, tokens, offsets = list(enc["input_ids"]), [], []
            at = 0
            for _, end in enc["offset_mapping"]:  # bytes of one character share its span: the first token takes it
                offsets.append(at)
                tokens.append(text[at:max(at, end)])
                at = max(at, end)
            if tokens:
                tokens[-1] += text[at:]
        else:
            ids = [int(i) for i in text]
            tokens = [self._decode([i], skip_special_tokens=False) for i in ids]
            offsets = [0, *itertools.accumulate(len(t) for t in tokens)][:-1]
        if not ids:
            raise ValueError("the text is empty: there is no token to score")
        limit = context_length(self)
        if limit is not None and len(ids) > limit:
            raise ContextError(f"The text is {len(ids)} tokens but {self.name} reads at most {limit}. Shorten it.",
                               "prompt")
        with self._adapter.use(use_adapter), cpu_share(), torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0]
        target = torch.tensor(ids[1:] + [0], device=logits.device)
        picked: list[float] = []
        tops: list[dict[str, float]] = []
        best_id, best_lp = 0, 0.0
        for s in range(0, len(ids), 512):  # log_softmax over the vocabulary in slices: (tokens, vocab) floats add up
            lp = torch.log_softmax(logits[s: s + 512].float(), -1)
            picked += lp.gather(-1, target[s: s + 512, None])[:, 0].tolist()
            if top_n:
                v, i = lp.topk(min(top_n, lp.shape[-1]), -1)
                tops += [self._top(row_i, row_v) for row_i, row_v in zip(i.tolist(), v.tolist())]
            if s + 512 >= len(ids):
                v, i = lp[-1].max(-1)
                best_id, best_lp = int(i), float(v)
        top: list[dict[str, float] | None] = [None, *(tops[:-1] if top_n else [{} for _ in ids[1:]])]
        return TokenLogprobs(ids, tokens, offsets, [None, *picked[:-1]], top, best_id, best_lp,
                             tops[-1] if top_n else {}, best_id in self._eos_ids(),
                             token_key(*_token_text(self.tokenizer, best_id)))

    def _top(self, ids: list[int], logprobs: list[float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, v in zip(ids, logprobs):
            out.setdefault(token_key(*_token_text(self.tokenizer, i)), v)  # two ids may read the same: the likelier
        return out

    def stream(self, prompt: Prompt, params: GenerationParams | None = None,
               cancel: threading.Event | None = None) -> abc.Generator[Chunk, None, None]:
        """Yield text as it is generated. Closing the iterator early (or setting `cancel`) stops generation."""
        p = params or GenerationParams()
        cancel = cancel or threading.Event()
        holdback = max((len(s) for s in p.stop), default=0)
        sent = 0  # characters already yielded
        decoded = TextStream(self.tokenizer)

        def work(put: Any) -> Completion:
            return self._run([prompt], p, cancel, lambda ids: put(ids.tolist()))[0]

        with contextlib.closing(thread_stream(work, cancel, "tunesmith-generate")) as events:
            for kind, val in events:
                if kind == "done":
                    final: Completion = val
                    if len(final.text) > sent:
                        yield Chunk(final.text[sent:], logprobs=final.logprobs)
                    yield Chunk("", done=True, completion=final,
                                logprobs=final.logprobs if len(final.text) <= sent else None)
                    return
                text = decoded.update(val)
                text, _ = cut_at_stop(text, p.stop)
                safe = len(text) - holdback  # the tail could still turn into a stop string
                if safe > sent:
                    yield Chunk(text[sent:safe])
                    sent = safe


ENGINES = ("transformers", "llama.cpp")


def load_generator(source: str | Path, engine: str = "transformers", decode_weights: str = "exact",
                   compile_decode: bool = False, continuous_batching: bool = True,
                   prefix_cache_mib: int = PREFIX_CACHE_MIB, batch_slots: int = 16, prefill_chunk: int | None = None,
                   **kw: Any) -> Generator:
    """`source`: a run folder, merged model folder, adapter folder, `embedded`, a local HF folder, .gguf or hub id.

    `engine="llama.cpp"` serves a run through its exported GGUF (exported on first use, finetune/llamacpp.py): the
    same methods and results, llama.cpp's speed; scoring and logprobs stay with transformers.
    `decode_weights`: "exact", "int8" or "auto" (int8 on a CPU); `compile_decode`, `continuous_batching`,
    `prefix_cache_mib`, `batch_slots`, `prefill_chunk`: see `Generator`."""
    if engine == "llama.cpp":
        from .llamacpp import load_llamacpp

        return load_llamacpp(source, **kw)  # type: ignore[return-value]  # Generator's serving surface
    if engine != "transformers":
        raise ValueError(f"engine={engine!r}: pick one of {', '.join(ENGINES)}.")
    if compile_decode:
        compiling.start_cpu_probe()  # while the model loads
    return on_own_thread(lambda: Generator(load_run(source, **kw), decode_weights, compile_decode=compile_decode,
                                           continuous_batching=continuous_batching,
                                           prefix_cache_mib=prefix_cache_mib, batch_slots=batch_slots,
                                           prefill_chunk=prefill_chunk))  # see Generator's own_threads
