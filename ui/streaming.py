"""Callback-style work (a LangChain chain calling `on_token`) consumed by a front end that streams by yielding.

Reading `Generator.stream` iterators from threads or the event loop is `tunesmith.finetune`'s `merge_streams` and
`aiter_chunks` (one pump for the UI, the API and LangChain's `astream`); this is the other direction: a worker
that pushes tokens through a callback, and Stop that must reach it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any


class Cancelled(Exception):
    """Raised inside a token callback once Stop was pressed: it unwinds the work and ends its generation."""


def run_with_tokens(work: Callable[[Callable[[str], None]], Any],
                    cancel: threading.Event) -> Iterator[tuple[str, Any]]:
    """Run `work(on_token)` in a thread; yield `("token", text)` for each `on_token` call, then `("done", result)`.

    For callback-style work (a LangChain chain) in a front end that streams by yielding. Once `cancel` is set,
    the next `on_token` raises `Cancelled` in the worker, which unwinds and stops its generation; the iterator
    then ends with `("cancelled", None)`."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue()

    def on_token(text: str) -> None:
        if cancel.is_set():
            raise Cancelled()
        q.put(("token", text))

    def run() -> None:
        try:
            q.put(("done", work(on_token)))
        except Cancelled:
            q.put(("cancelled", None))
        except BaseException as e:  # re-raised in the consumer
            q.put(("error", e))

    threading.Thread(target=run, daemon=True, name="tunesmith-work").start()
    while True:
        kind, val = q.get()
        if kind == "error":
            raise val
        yield kind, val
        if kind != "token":
            return
