"""The one thread-to-queue pump: streams read side by side, awaited on the event loop, errors and Stop passed on."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from tunesmith.finetune import aiter_chunks, merge_streams


def _slow(items: list[str], delay: float, cancel: threading.Event | None = None) -> Iterator[str]:
    for x in items:
        if cancel is not None and cancel.is_set():
            return
        time.sleep(delay)
        yield x


def test_merge_streams_interleaves_as_items_come() -> None:
    got = list(merge_streams([_slow(["a1", "a2", "a3"], 0.05), _slow(["b1", "b2", "b3"], 0.05)]))
    order = [i for i, _ in got]
    assert sorted(x for _, x in got) == ["a1", "a2", "a3", "b1", "b2", "b3"]
    assert order != sorted(order)  # not one stream after the other


def test_aiter_chunks_passes_items_and_errors() -> None:
    def broken() -> Iterator[str]:
        yield "ok"
        raise ValueError("model crashed")

    async def read() -> list[str]:
        out = []
        async for x in aiter_chunks(broken()):
            out.append(x)
        return out

    with pytest.raises(ValueError, match="model crashed"):
        asyncio.run(read())
    assert asyncio.run(_collect(aiter_chunks(iter(["x", "y"])))) == ["x", "y"]


async def _collect(it) -> list[str]:
    return [x async for x in it]


def _pumps() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "tunesmith-pump" and t.is_alive()}


def test_cancelling_the_reader_stops_the_stream() -> None:
    before = _pumps()
    cancel = threading.Event()
    produced: list[str] = []

    def endless() -> Iterator[str]:
        i = 0
        while not cancel.is_set():
            time.sleep(0.01)
            produced.append(str(i))
            yield str(i)
            i += 1

    async def go() -> None:
        async def consume() -> None:
            try:
                async for _ in aiter_chunks(endless(), cancel):
                    pass
            finally:
                cancel.set()

        task = asyncio.create_task(consume())
        while len(produced) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    n = len(produced)
    time.sleep(0.2)
    assert len(produced) <= n + 1  # the producer stopped at its next item
    assert not _pumps() - before  # and its pump thread ended
