"""Consume `Generator.stream` iterators from front ends without ever blocking on a stream nobody reads.

Each stream is drained by its own thread into a queue, so a side-by-side comparison shows both models' tokens
as they come (instead of one after the other), and an async web handler can be cancelled (client gone) without
a worker thread stuck inside `next()`. Stopping is done by the stream's `cancel` event, which ends the
generate loop at the next token; the pump then sees the final chunk and exits.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from tunesmith.finetune.generate import Chunk

_END = object()


def _pump(stream: Iterator[Chunk], put: Callable[[Any], None]) -> threading.Thread:
    def work() -> None:
        try:
            for chunk in stream:
                put(chunk)
        except BaseException as e:  # re-raised in the consumer
            put(e)
        finally:
            put(_END)

    t = threading.Thread(target=work, daemon=True, name="tunesmith-pump")
    t.start()
    return t


def merge_streams(streams: Sequence[Iterator[Chunk]]) -> Iterator[tuple[int, Chunk]]:
    """Yield `(index, chunk)` from several streams as soon as any of them produces text."""
    q: queue.Queue[tuple[int, Any]] = queue.Queue()
    for i, s in enumerate(streams):
        _pump(s, lambda item, i=i: q.put((i, item)))
    open_streams = len(streams)
    while open_streams:
        i, item = q.get()
        if item is _END:
            open_streams -= 1
        elif isinstance(item, BaseException):
            raise item
        else:
            yield i, item


async def aiter_stream(stream: Iterator[Chunk]) -> AsyncIterator[Chunk]:
    """The chunks of a (blocking) stream, awaited on the event loop; cancelling the awaiting task is safe."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[Any] = asyncio.Queue()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening any more
            pass

    _pump(stream, put)
    while True:
        item = await q.get()
        if item is _END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


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
