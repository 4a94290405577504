"""Micro-batching for non-streamed requests: requests that arrive together share one left-padded `generate` call.

Only for generators without continuous batching (finetune/continuous.py: the llama.cpp engine, a model it cannot
run, `continuous_batching=False`): a transformers Generator that batches continuously already decodes every answer
in flight in one shared step, without a collection window or a common parameter set, so requests go straight to it.

Where it helps: several API clients asking for whole completions at once. On CPU and GPU alike one batched
forward pass per token is much cheaper than N separate ones. Streamed requests are not batched (each needs its
own token-by-token hand-off and its own cancel); they run side by side up to the concurrency limit instead.
Only requests for the same model with identical parameters are batched together, so nothing changes for a
request by being batched except its latency.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from tunesmith.finetune import Completion, GenerationParams, Generator, Prompt


@dataclass
class _Request:
    gen: Generator
    prompt: Prompt
    params: GenerationParams
    future: Future[Completion] = field(default_factory=Future)

    @property
    def key(self) -> tuple[int, str]:
        return id(self.gen), repr(self.params)


class Batcher:
    """One worker thread collects requests for `window_s` (or until `max_batch_size`), then runs them batched."""

    def __init__(self, max_batch_size: int = 8, window_s: float = 0.02) -> None:
        self.max_batch_size = max(1, max_batch_size)
        self.window_s = window_s
        self.batch_sizes: list[int] = []
        """Size of every batched call so far (tests and the benchmark read it)."""
        self._q: queue.Queue[_Request] = queue.Queue()
        threading.Thread(target=self._loop, daemon=True, name="tunesmith-batcher").start()

    def generate(self, gen: Generator, prompt: Prompt, params: GenerationParams) -> Completion:
        """Blocking: the completion for `prompt`, computed in a batch with whatever arrived at the same time."""
        if getattr(gen, "continuous_batching", False):
            return gen.generate(prompt, params)
        req = _Request(gen, prompt, params)
        self._q.put(req)
        return req.future.result()

    def _loop(self) -> None:
        while True:
            pending = [self._q.get()]
            deadline = time.monotonic() + self.window_s
            while len(pending) < self.max_batch_size:
                try:
                    pending.append(self._q.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            groups: dict[tuple[int, str], list[_Request]] = {}
            for r in pending:
                groups.setdefault(r.key, []).append(r)
            for group in groups.values():
                self._run(group)

    def _run(self, group: list[_Request]) -> None:
        try:
            outs = group[0].gen.batch([r.prompt for r in group], group[0].params, max_batch_size=self.max_batch_size)
        except BaseException as e:  # every waiting request gets the error, the worker lives on
            for r in group:
                r.future.set_exception(e)
            return
        self.batch_sizes.append(len(group))
        for r, out in zip(group, outs):
            r.future.set_result(out)
