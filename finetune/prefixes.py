"""Keys and values of recent prompts and answers, reused by the next prompt that starts with the same tokens.

Why: every request re-reads tokens an earlier one already computed. A chat's next turn repeats the whole
conversation so far, and concurrent API clients send the same system prompt or few-shot examples. Prefill is
compute-bound (on a CPU ~85% of the matmul peak), so the only way to make it cheaper is to compute fewer tokens:
vLLM's automatic prefix caching and llama.cpp's prompt cache do the same.

How: an entry is a token sequence and its keys/values per layer, `[kv heads, tokens, head dim]`. The keys/values at
a position depend only on the tokens up to it, and every prompt's positions start at 0, so a prompt reuses the
longest common prefix it has with any entry (not only whole entries), all but its last token (whose logits are
needed). Entries are kept least-recently-used first within a byte budget; an entry that is a prefix of a newer one
is replaced by it (a chat's turns keep one entry, the longest).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from tunesmith import PREFIX_CACHE_MIB  # the default budget, beside the CLI's help text

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Each layer's keys and values, `[kv heads, tokens, head dim]`."""


class PrefixCache:
    """Recent token sequences with their keys/values; thread-safe (the batch loop reads, anyone may `clear`)."""

    def __init__(self, budget_mib: int = PREFIX_CACHE_MIB) -> None:
        self.budget = budget_mib << 20
        self._entries: OrderedDict[int, tuple[torch.Tensor, KV, int]] = OrderedDict()  # id -> tokens, kv, bytes
        self._next = 0
        self._lock = threading.Lock()
        self.hits = 0
        """Prompts that reused a prefix, and `reused` the tokens they did not compute (tests, benchmarks)."""
        self.reused = 0

    @property
    def on(self) -> bool:
        """Whether this cache keeps anything (a budget of 0 turns it off)."""
        return self.budget > 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(size for _, _, size in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def longest(self, ids: list[int]) -> tuple[int, KV | None]:
        """How many leading tokens of `ids` (at most all but the last) an entry holds, and that entry's
        keys/values (to slice to that many)."""
        if not self.on or len(ids) < 2:
            return 0, None
        query = torch.tensor(ids[:-1])
        best, found, key = 0, None, None
        with self._lock:
            for k, (tokens, kv, _) in self._entries.items():
                n = min(len(tokens), len(query))
                same = int(torch.cumprod(tokens[:n] == query[:n], 0).sum()) if n else 0
                if same > best:
                    best, found, key = same, kv, k
            if key is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                self.reused += best
        return best, found

    def add(self, ids: list[int], kv: KV) -> None:
        """Keep `ids`' keys/values (`kv` covers exactly `ids`); superseded and least recently used entries go."""
        if not self.on or not ids:
            return
        tokens = torch.tensor(ids)
        size = sum(k.nbytes + v.nbytes for k, v in kv)
        if size > self.budget:
            return
        with self._lock:
            for k, (old, _, _) in list(self._entries.items()):
                n = min(len(old), len(tokens))
                if not torch.equal(old[:n], tokens[:n]):
                    continue
                if len(old) >= len(tokens):  # already held: the longer entry covers these tokens
                    self._entries.move_to_end(k)
                    return
                del self._entries[k]  # a prefix of the new entry
            self._entries[self._next] = (tokens, kv, size)
            self._next += 1
            total = sum(s for _, _, s in self._entries.values())
            while total > self.budget:
                _, (_, _, s) = self._entries.popitem(last=False)
                total -= s
