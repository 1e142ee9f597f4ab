"""Sync wrappers over the async core, safe inside Jupyter and other running event loops.

Every sync call runs on one long-lived background loop rather than a fresh `asyncio.run` each time: async HTTP
clients keep connection pools bound to the loop that made them, and a notebook's own loop is already running in
the calling thread (so `asyncio.run` would refuse).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _background_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="functionary-agent-loop", daemon=True)
            thread.start()
            _loop = loop
        return _loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion from sync code; Ctrl-C cancels it instead of leaving it running."""
    loop = _background_loop()
    if _running_loop() is loop:
        coro.close()
        raise RuntimeError("a sync call was made from inside functionary-agent's own event loop; await the async twin")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


def iterate(agen: AsyncIterator[T]) -> Iterator[T]:
    """Iterate an async generator from sync code; leaving the loop early closes the generator."""
    try:
        while True:
            try:
                yield run(_next(agen))
            except StopAsyncIteration:
                return
    finally:
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(concurrent.futures.CancelledError, RuntimeError):
                run(aclose())


async def _next(agen: AsyncIterator[T]) -> T:
    return await agen.__anext__()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


@contextlib.asynccontextmanager
async def closing(iterator: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Close an async generator when the block ends: leaving a run early must cancel what it started now, not
    whenever the garbage collector gets to it."""
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
