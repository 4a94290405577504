"""Consume blocking `Generator.stream` iterators without ever blocking on a stream nobody reads.

The one thread-to-queue pump of tunesmith: the web UI, the OpenAI API and LangChain's `astream` all read streams
through it. Each stream is drained by its own thread, so a side-by-side comparison shows both models' tokens as
they come (instead of one after the other), and an async handler can be cancelled (client gone) without a worker
thread stuck inside `next()`. Stopping is done by the stream's `cancel` event, which ends the generate loop at the
next token; the pump then sees the final chunk and exits.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from typing import Any, TypeVar

from .sharing import model_thread

T = TypeVar("T")
_END = object()


def _pump(stream: Iterator[Any], put: Callable[[Any], None], cancel: threading.Event | None = None) -> None:
    def work() -> None:
        try:
            # close: a generator stopped early runs its own cleanup (Generator.stream joins its model thread)
            close = getattr(stream, "close", None)
            try:
                for item in stream:
                    put(item)
                    if cancel is not None and cancel.is_set():
                        break
            finally:
                if close is not None:
                    close()
        except BaseException as e:  # re-raised in the consumer
            put(e)
        finally:
            put(_END)

    threading.Thread(target=work, daemon=True, name="tunesmith-pump").start()


def merge_streams(streams: Sequence[Iterator[T]]) -> Iterator[tuple[int, T]]:
    """Yield `(index, chunk)` from several streams as soon as any of them produces one."""
    q: queue.Queue[tuple[int, Any]] = queue.Queue()

    def put_to(i: int) -> Callable[[Any], None]:
        return lambda item: q.put((i, item))

    for i, s in enumerate(streams):
        _pump(s, put_to(i))
    open_streams = len(streams)
    while open_streams:
        i, item = q.get()
        if item is _END:
            open_streams -= 1
        elif isinstance(item, BaseException):
            raise item
        else:
            yield i, item


async def aiter_chunks(stream: Iterator[T], cancel: threading.Event | None = None) -> AsyncIterator[T]:
    """The items of a blocking stream, awaited on the event loop; cancelling the awaiting task is safe.

    Give the stream's `cancel` event and set it when you stop reading (in a `finally`): the pump then stops at the
    next item, and it sets `cancel` itself when the event loop is gone (server shutting down)."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[Any] = asyncio.Queue()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            if cancel is not None:
                cancel.set()

    _pump(stream, put, cancel)
    while True:
        item = await q.get()
        if item is _END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def thread_stream(work: Callable[[Callable[[Any], None]], Any], cancel: threading.Event,
                  name: str) -> Generator[tuple[str, Any], None, None]:
    """Run `work(put)` in a thread and yield ("item", x) for each `put(x)`, then ("done", its result); its exception
    is raised here, in the consumer's thread. Closing the iterator sets `cancel` and waits for the thread, so an
    abandoned stream really stops generating. The producing side of both engines' `stream` (`Generator`,
    `LlamaCppGenerator`); the functions above are the consuming side."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue()

    def run() -> None:
        try:
            q.put(("done", work(lambda x: q.put(("item", x)))))
        except BaseException as e:  # surfaced in the consumer's thread
            q.put(("error", e))

    t = model_thread(run, name)
    try:
        while True:
            kind, val = q.get()
            if kind == "error":
                raise val
            yield kind, val
            if kind == "done":
                return
    finally:
        cancel.set() if t.is_alive() else None
        t.join(timeout=30)
