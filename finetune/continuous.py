"""Continuous batching: concurrent answers share every decode step, each joining and leaving the batch at any token.

Why: a static batch (`generate` over left-padded prompts) runs until its longest answer ends, and nothing joins it
once it started. Measured on an idle 2-core AMD EPYC, int8 weights, compiled step, 16 prompts with the quickstart
adapter live: 392 useful tokens of 1,024 computed, the other rows had finished. And streamed requests (the chat
UI, `stream: true` API clients) did not batch at all: each ran its own `generate` beside the others. Here every
answer in flight (streamed or not) is a row of one decode step; a finished row frees its slot at once and a new
request takes it at the next step, as vLLM's and llama.cpp's slots do.

How, on the model's own forward (any causal LM whose layers cache keys/values the standard way):
- One write position `at` shared by all rows: each step writes every row's new key/value at cache position `at`.
  A row's own token positions (RoPE) are `position_ids` of its own, so rows need not line up; a 4-D mask says
  which cache positions each row reads (`masking_utils` passes a 4-D mask through as it is).
- Newcomers that arrive together are prefilled in one left-padded forward into a cache of their own, then each
  prompt is copied into its row so that it ends just before `at`. If `at` is too small for the longest, `at` jumps
  forward: the other rows get a masked gap.
- When `at` reaches the end of the cache, positions no row reads any more are dropped from the front; if there
  are none, the cache grows by `CACHE_STEP` positions. Finished rows are dropped from the batch once no request is
  waiting for their slot.
- Prompts reuse the keys/values of earlier prompts and answers they start with (finetune/prefixes.py): a chat's
  next turn, a shared system prompt.
- While rows decode, a prefill forward computes at most `prefill_chunk` prompt tokens; a longer prompt is prefilled
  over several forwards with a decode step between each (vLLM's chunked prefill), so a long prompt arriving does
  not stall the answers in flight for its whole prefill.
- Sampling, penalties, a JSON schema, stop strings and logprobs are each row's own (`Answer.processors`,
  `Answer.stopped`, `Answer.raw_logits`): requests with different parameters share a step.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from transformers import DynamicCache, LogitsProcessorList
from transformers.cache_utils import Cache, CacheLayerMixin

from tunesmith import PREFIX_CACHE_MIB

from .fastdecode import CACHE_STEP
from .loss import _causal  # the one 'causal LM under the PEFT wrapper' helper
from .prefixes import KV, PrefixCache
from .quantize import int8_reads
from .scoring import _cache_kw  # `cache` or `past_key_values`, as this transformers names it
from .sharing import cpu_share, model_thread

PREFILL_TOKENS = 8192
"""Prompt tokens one prefill forward computes at most when no row is decoding (padded width times newcomers); a
longer prompt is prefilled in chunks of this size (attention over a whole long prompt at once needs its memory)."""
PREFILL_CHUNK_CPU = 256
"""The same while rows decode (their next token waits for the prefill forward), on a CPU. SmolLM2-135M, compiled
int8 decode, 8 streams, a 2,031-token prompt arriving, on the 2-core AVX2 EPYC (benchmarks/long_prompt.py, medians
of 3 rounds): its prefill in one forward held the streams' next token for 6.3 s; in chunks of 128 / 256 / 512
tokens for 0.8 / 1.1 / 2.1 s, the prompt's own first token coming 1.43x / 1.18x / 1.11x later (one forward is the
fastest way through a prompt: alone, 4.6 s whole, 5.4 s in chunks of 256). 256 halves the wait of 512 for little
more than half its slowdown."""
PREFILL_CHUNK_GPU = 2048
"""The same on a GPU, where a forward of a few thousand tokens costs little more than a decode step (vLLM's default
budget for chunked prefill; not measured here)."""


@dataclass(eq=False)
class Answer:
    """One request in the batch; `done` resolves to it once it ended (`new` then holds its tokens)."""

    ids: list[int]
    """The prompt's token ids."""
    max_new_tokens: int
    eos: set[int]
    processors: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    """Run on this row's logits with `ids + new`; greedy (argmax) after them. Sampling is RowSampler's (one row)."""
    stopped: Callable[[list[int]], bool] | None = None
    """Whether the new tokens so far end in a stop string."""
    cancel: threading.Event = field(default_factory=threading.Event)
    on_tokens: Callable[[list[int]], None] | None = None
    """Called with all new tokens so far after each one (streaming)."""
    raw_logits: list[torch.Tensor] | None = None
    """A list to keep each step's raw logits (`[1, vocab]`, before any processor) in, for logprobs; None: not kept."""
    new: list[int] = field(default_factory=list)
    hit_stop: bool = False
    cancelled: bool = False
    done: Future[Answer] = field(default_factory=Future)

    def finished(self) -> bool:
        if self.cancel.is_set():
            self.cancelled = True
        elif self.stopped is not None and self.stopped(self.new):
            self.hit_stop = True
        return self.cancelled or self.hit_stop or len(self.new) >= self.max_new_tokens or self.new[-1] in self.eos


_Newcomer = tuple[Answer, int, KV | None]
"""A prompt waiting for its slot: the answer, how many of its leading tokens are computed, and their keys/values."""


class _Slots(CacheLayerMixin):
    """One layer's keys and values, `[rows, kv heads, positions, head dim]`, each step written at `at`."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, at: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.at = keys, values, at
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("continuous batching allocates its cache itself")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None  # set in __init__
        self.keys.index_copy_(2, self.at, key_states)
        self.values.index_copy_(2, self.at, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        assert self.keys is not None
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return int(self.at)

    def get_max_length(self) -> int:
        assert self.keys is not None
        return self.keys.shape[2]


def _kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's prefilled keys and values (`why_not` lets in only models whose layers all cache both)."""
    out = []
    for layer in cache.layers:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        assert isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
        out.append((k, v))
    return out


def why_not(model: Any) -> str | None:
    """Why `model` cannot batch continuously (it then answers through `generate`), or None."""
    base = _causal(model)
    config = base.config
    if config._attn_implementation not in ("sdpa", "tunesmith_sdpa"):
        return f"attention {config._attn_implementation!r} (continuous batching needs SDPA's boolean masks)"
    if not getattr(base, "_can_compile_fullgraph", False):
        return f"{type(base).__name__} does not cache keys/values in a static cache"
    types = set(getattr(config, "layer_types", None) or [])
    if types - {"full_attention"} or (getattr(config, "sliding_window", None) and
                                      getattr(config, "use_sliding_window", True) and not types):
        return f"{type(base).__name__} has sliding-window or non-attention layers"
    return None


class ContinuousBatcher:
    """Runs the answers submitted to it as rows of shared decode steps, on a thread that lives while there is work.

    `step` is the forward that decodes (the model, or its compiled call: finetune/fastdecode.py); prompts are
    prefilled by the model itself. `slots`: rows decoded at once; more requests wait for a free slot.
    `prefix_cache_mib`: the budget of the prefix cache (`prefixes`, finetune/prefixes.py), 0 for none; `hold`: see
    `self.hold`; `prefill_chunk`: prompt tokens a prefill forward computes at most while rows decode (None:
    PREFILL_CHUNK_CPU or PREFILL_CHUNK_GPU)."""

    def __init__(self, model: Any, step: Callable[..., Any] | None = None, slots: int = 16,
                 prefix_cache_mib: int = PREFIX_CACHE_MIB,
                 hold: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
                 prefill_chunk: int | None = None) -> None:
        self.model = model
        self.prefill_chunk = max(1, prefill_chunk or (PREFILL_CHUNK_CPU if self._device().type == "cpu" else
                                                      PREFILL_CHUNK_GPU))
        self.hold = hold or contextlib.nullcontext
        """Entered around each step (prefill, decode): the adapter switch's shared side (`sharing.AdapterSwitch`),
        so that a base-model answer that switches the adapter off for everyone waits between steps."""
        self.prefixes = PrefixCache(prefix_cache_mib)
        self.step = step or model
        self._cache_kw = _cache_kw(model)
        self.slots = max(1, slots)
        self.steps = 0
        """Decode steps run so far, and `rows_decoded` the rows they computed (tests, benchmarks)."""
        self.rows_decoded = 0
        self.grown = 0
        """Times the cache grew, and `dropped` times it dropped positions no row read any more (tests)."""
        self.dropped = 0
        self._waiting: queue.Queue[Answer] = queue.Queue()
        self._next: _Newcomer | None = None
        """First in line for a slot: taken from `_waiting` but not prefilled yet, or prefilled in part (chunks)."""
        self._cut: Answer | None = None  # the prompt `_next` holds in part, until `_make_room` made room for it
        self.chunks = 0
        """Prefill forwards that computed part of a prompt (tests, benchmarks)."""
        self._lock = threading.Lock()
        self._running = False
        self._reset()

    def _reset(self) -> None:
        self.rows: list[Answer | None] = []
        self.layers: list[_Slots] = []
        self.pos: list[int] = []  # each row's next token position
        self.valid = torch.zeros(0, 0, dtype=torch.bool)  # [rows, cache positions]: what each row reads
        self.at = 0

    def submit(self, answer: Answer) -> Future[Answer]:
        self._waiting.put(answer)
        with self._lock:
            if not self._running:
                self._running = True
                model_thread(self._loop, "tunesmith-batch")
        return answer.done

    def warm_up(self, prompt: list[int]) -> None:
        """Compile a compiled `step`'s graphs now, not in a user's answer: one row at a first and a second cache
        size (the size turns symbolic), then two rows (the row count turns symbolic; dynamo keeps one row apart)."""
        long = Answer(list(prompt), CACHE_STEP + 2, set())  # no EOS: it runs past the first cache size
        self.submit(long).result()
        pair = [Answer(list(prompt), 3, set()), Answer(list(prompt) * 2, 3, set())]
        for f in [self.submit(a) for a in pair]:
            f.result()
        self.prefixes.clear()

    # -- the loop ------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with cpu_share(whole=True), torch.inference_mode(), int8_reads():
                while True:
                    with self.hold():
                        self._admit()
                    with self._lock:
                        if not any(self.rows) and self._waiting.empty() and self._next is None:
                            self._running = False
                            self._reset()
                            return
                    if any(self.rows):
                        with self.hold():
                            self._decode()
        except BaseException as e:  # every waiting caller gets the error, not a hang
            with self._lock:
                pending = [r for r in self.rows if r is not None]
                if self._next is not None:
                    pending.append(self._next[0])
                    self._next = None
                while not self._waiting.empty():
                    pending.append(self._waiting.get())
                self._reset()
                self._running = False
            for r in pending:
                if not r.done.done():
                    r.done.set_exception(e)

    def _admit(self) -> None:
        """Newcomers into free slots (prefilled together, within the prefill budget), then finished rows dropped when
        nobody waits for them."""
        live = sum(r is not None for r in self.rows)
        budget = self.prefill_chunk if live else PREFILL_TOKENS
        group: list[_Newcomer] = []
        while len(group) < self.slots - live:
            item = self._take()
            if item is None:
                break
            width = max(len(a.ids) - n for a, n, _ in [*group, item])
            if group and (len(group) + 1) * width > budget:  # the next forward's first
                self._next = item
                break
            group.append(item)
            if len(group) * width >= budget or item[0] is self._cut:  # full; a prompt longer than the budget (cut,
                break  # `_next` holds the rest); or the rest of such a prompt, alone (`_make_room`)
        if live and len(group) == 1 and self._make_room(group[0][0], group[0][1], budget):
            self._next = group[0]  # its last chunk after the next decode step
        elif group:
            for answer, first in self._prefill(group, budget):
                answer.new.append(first)
                self._emit(self.rows.index(answer), answer)
        if None in self.rows and self._waiting.empty() and self._next is None:
            self._drop([i for i, r in enumerate(self.rows) if r is None])

    def _make_room(self, a: Answer, n: int, budget: int) -> bool:
        """Before the last chunk of a prompt prefilled in chunks: move `at` to its end and add its row now, if that
        changes the cache's layout. That copy of the cache (~0.8 s here for 8 rows grown to 2,048 positions, most of
        it the first touch of new memory) and the last chunk's forward then hold the rows in flight in two waits, a
        decode step between, not in one of both. Whether it did."""
        if a is not self._cut or len(a.ids) - n > budget:
            return False
        rows = 0 if None in self.rows else 1
        if self.at >= len(a.ids) and not rows:
            return False
        self._fit(len(a.ids), rows=rows)
        self._cut = None
        return True

    def _take(self) -> _Newcomer | None:
        """The next newcomer with the tokens already computed for it: its own chunks, else the prefix cache's."""
        while True:
            if self._next is not None:
                item, self._next = self._next, None
            elif not self._waiting.empty():
                a = self._waiting.get()
                item = (a, *self.prefixes.longest(a.ids))
            else:
                return None
            if not item[0].cancel.is_set():
                return item
            item[0].cancelled = True  # never prefilled (or not whole): ends with no tokens
            item[0].done.set_result(item[0])

    def _prefill(self, group: list[_Newcomer], budget: int) -> list[tuple[Answer, int]]:
        """The prompts' keys/values into free rows, each ending just before `at`; returns the answers with their
        first tokens. A group of one prompt longer than `budget` gets its next `budget` tokens computed and waits as
        `_next` for a later forward (no row, no token yet).

        One left-padded forward for the group, as `generate` prefills a batch: 16 prompts of ~45 tokens one by one
        took 2.0 s here, twice the time of one padded batch (small matmuls, and per-op overhead 16 times). Each
        prompt computes only what the prefix cache (finetune/prefixes.py) or its own earlier chunks do not hold:
        that is the forward's past, right-aligned before the suffixes, so a row's past and suffix meet only through
        its mask."""
        past = max(n for _, n, _ in group)
        upto = [min(len(a.ids), n + budget) for a, n, _ in group]  # `_admit` cuts only a group of one
        width = max(u - n for u, (_, n, _) in zip(upto, group))
        device = self._device()
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), past + width, dtype=torch.long)
        positions = torch.zeros(len(group), width, dtype=torch.long)
        for i, (u, (a, n, _)) in enumerate(zip(upto, group)):
            s = u - n
            ids[i, width - s:] = torch.tensor(a.ids[n:u])
            mask[i, past - n: past] = 1
            mask[i, past + width - s:] = 1
            positions[i, width - s:] = torch.arange(n, u)
        cache = DynamicCache(ddp_cache_data=self._past([(n, kv) for _, n, kv in group], past)) if past else \
            DynamicCache()
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                         use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        whole = [a for u, (a, _, _) in zip(upto, group) if u == len(a.ids)]
        if whole:
            if not self.layers:
                self._new_layers(cache)
            # `at` moves on if a prompt is longer (rows in flight see a gap); rows for those no free row takes
            self._fit(max(len(a.ids) for a in whole), rows=len(whole) - self.rows.count(None))
        kv = _kv(cache)
        firsts = []
        for i, (u, (a, n, _)) in enumerate(zip(upto, group)):
            s = u - n
            mine = [(torch.cat([k[i, :, past - n: past], k[i, :, past + width - s:]], 1),
                     torch.cat([v[i, :, past - n: past], v[i, :, past + width - s:]], 1)) for k, v in kv]
            if u < len(a.ids):
                assert self._next is None  # `_admit` took nobody after a prompt it cuts
                self._next, self._cut = (a, u, mine), a
                self.chunks += 1
                continue
            row = self.rows.index(None)  # a free row reads nothing: cleared when it ended, never set by `_decode`
            self.rows[row] = a
            self.valid[row, self.at - len(a.ids): self.at] = True
            for layer, (k, v) in zip(self.layers, mine):
                assert layer.keys is not None and layer.values is not None
                layer.keys[row, :, self.at - len(a.ids): self.at] = k
                layer.values[row, :, self.at - len(a.ids): self.at] = v
            self.pos[row] = len(a.ids)
            self.prefixes.add(a.ids, mine)
            firsts.append((a, self._pick(a, out.logits[i: i + 1, -1])))
        return firsts

    def _past(self, reuse: list[tuple[int, KV | None]], past: int) -> KV:
        """Each layer's cached prefixes for a group, `[group, kv heads, past, head dim]`, each right-aligned."""
        layers = next(kv for _, kv in reuse if kv is not None)
        out = []
        for j, (k0, v0) in enumerate(layers):
            k = k0.new_zeros(len(reuse), k0.shape[0], past, k0.shape[2])
            v = v0.new_zeros(len(reuse), v0.shape[0], past, v0.shape[2])
            for i, (n, kv) in enumerate(reuse):
                if kv is not None and n:
                    k[i, :, past - n:], v[i, :, past - n:] = kv[j][0][:, :n], kv[j][1][:, :n]
            out.append((k, v))
        return out

    def _keep(self, row: int, answer: Answer) -> None:
        """An ended answer's prompt and tokens into the prefix cache: a chat's next turn starts with them."""
        if not self.prefixes.on:  # no copy of the row's keys/values for a cache that keeps nothing
            return
        fed = answer.ids + answer.new[:-1]  # the last token was never fed back
        where = self.valid[row].nonzero()[:, 0]
        if len(where) != len(fed):  # not one row's tokens (cannot happen; never store a wrong entry)
            return
        where = where.to(self._device())
        self.prefixes.add(fed, [(layer.keys[row].index_select(1, where), layer.values[row].index_select(1, where))
                                for layer in self.layers if layer.keys is not None and layer.values is not None])

    def _new_layers(self, cache: DynamicCache) -> None:
        """Empty per-layer slots shaped after a prefilled cache (kv heads, head dims, dtypes of each layer)."""
        at = torch.zeros(1, dtype=torch.long, device=self._device())
        positions = self.valid.shape[1]
        self.layers = []
        for k, v in _kv(cache):
            self.layers.append(_Slots(k.new_zeros(0, k.shape[1], positions, k.shape[3]),
                                      v.new_zeros(0, v.shape[1], positions, v.shape[3]), at))

    def _fit(self, need: int, rows: int = 0) -> None:
        """Move `at` to at least `need`, with position `at` in the cache (drop the front no row reads any more, else
        grow by whole `CACHE_STEP`s), and add `rows` free rows: all in one copy of the cache.

        One copy, not one per change: when a long prompt lands (`at` moves far on), the copy is a wait of every row
        in flight. SmolLM2-135M, 8 rows grown to 2,048 positions, here: 0.75-1.1 s, most of it the first touch of
        the new memory; a second copy for the newcomer's row added 0.22 s."""
        size = self.valid.shape[1]
        front = 0
        if max(self.at, need) >= size:
            read = self.valid.any(dim=0).nonzero()
            front = min(int(read[0]) if len(read) else self.at, self.at)
        self.at = max(self.at - front, need)
        grow = -(-max(0, self.at + 1 - size) // CACHE_STEP) * CACHE_STEP
        rows = max(0, rows)
        self.dropped += front > 0
        self.grown += grow > 0
        if front or grow or rows:
            self.rows += [None] * rows
            self.pos += [0] * rows
            self._relayout(front, size + grow, rows)

    def _relayout(self, front: int, size: int, rows: int) -> None:
        """The mask and every layer's keys and values without their first `front` positions, `size` positions
        long, with `rows` more rows: each a new tensor with the kept part copied in and the rest zero (a free row or
        position reads nothing, and a masked value must still be finite: attention weighs it by 0)."""

        def change(t: torch.Tensor, dim: int) -> torch.Tensor:
            kept = t.shape[dim] - front
            out = t.new_empty(t.shape[0] + rows, *t.shape[1:dim], size, *t.shape[dim + 1:])
            out[: t.shape[0]].narrow(dim, 0, kept).copy_(t.narrow(dim, front, kept))
            out[: t.shape[0]].narrow(dim, kept, size - kept).zero_()
            out[t.shape[0]:].zero_()
            return out

        self._resize(change)

    def _resize(self, change: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        """The same change to the mask and every layer's keys and values, given each tensor and its positions'
        dimension (their rows are dimension 0 of all three)."""
        self.valid = change(self.valid, 1)
        for layer in self.layers:
            assert layer.keys is not None and layer.values is not None
            layer.keys, layer.values = change(layer.keys, 2), change(layer.values, 2)

    def _drop(self, rows: list[int]) -> None:
        keep = [i for i in range(len(self.rows)) if i not in rows]
        if not keep:
            self._reset()
            return
        self.rows = [self.rows[i] for i in keep]
        self.pos = [self.pos[i] for i in keep]
        self._resize(lambda t, dim: t.index_select(0, torch.tensor(keep, device=t.device)))

    def _decode(self) -> None:
        """One token for every row."""
        self._fit(0)
        device = self._device()
        self.layers[0].at.fill_(self.at)
        self.valid[:, self.at] = torch.tensor([r is not None for r in self.rows])  # free rows read nothing
        last = [r.new[-1] if r is not None else 0 for r in self.rows]
        ids = torch.tensor(last, device=device)[:, None]
        positions = torch.tensor(self.pos, device=device)[:, None]
        mask = self.valid.to(device)[:, None, None, :]
        cache = Cache(layers=list(self.layers))
        logits = self.step(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True,
                           **{self._cache_kw: cache}).logits[:, -1]
        self.at += 1
        self.steps += 1
        self.rows_decoded += len(self.rows)
        greedy = logits.argmax(dim=-1).tolist()
        for i, answer in enumerate(self.rows):
            if answer is None:
                continue
            self.pos[i] += 1
            answer.new.append(greedy[i] if not answer.processors and answer.raw_logits is None else
                              self._pick(answer, logits[i: i + 1]))
            self._emit(i, answer)

    def _emit(self, row: int, answer: Answer) -> None:
        """Hand row `row`'s new token on; free the row if its answer ended."""
        if answer.on_tokens is not None:
            answer.on_tokens(list(answer.new))
        if answer.finished():
            self._keep(row, answer)
            self.rows[row] = None
            self.valid[row] = False
            answer.done.set_result(answer)

    def _pick(self, answer: Answer, logits: torch.Tensor) -> int:
        if answer.raw_logits is not None:
            answer.raw_logits.append(logits.float().clone())
        if not answer.processors:
            return int(logits.argmax(dim=-1))
        ids = torch.tensor([answer.ids + answer.new], device=logits.device)
        return int(answer.processors(cast(torch.LongTensor, ids), logits.float()).argmax(dim=-1))

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device
