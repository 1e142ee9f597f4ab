"""Sync tools run in daemon threads, so that a slow or stuck one never blocks the event loop.

Not a ThreadPoolExecutor: the interpreter joins its workers at exit, so one stuck tool would keep the process alive
after its answer, and 64 stuck tools would starve every later call. A stuck thread cannot be stopped; a daemon
thread can at least be left behind: it finishes unobserved, its result is dropped, and it dies with the process.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import typing
import weakref
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Sync calls running at once per event loop; a call abandoned after its timeout no longer counts.
MAX_LIVE_TOOL_THREADS = 64

_thread_numbers = itertools.count(1)
_slots_lock = threading.Lock()
_slots_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


async def in_daemon_thread(work: Callable[[], T], tool_name: str) -> T:
    """Run `work` in a new daemon thread without blocking the loop. If the caller stops waiting (a timeout, a
    cancelled run) the thread is abandoned: it frees its slot at once and its result is dropped."""
    loop = asyncio.get_running_loop()
    async with _live_thread_slots(loop):
        future: asyncio.Future[T] = loop.create_future()
        name = f"functionary-tool-{next(_thread_numbers)}"
        thread = threading.Thread(target=_work_and_report, args=(work, loop, future), name=name, daemon=True)
        thread.start()
        try:
            return await future
        except asyncio.CancelledError:
            if thread.is_alive():
                logger.warning("tool %s is abandoned, still running in thread %s (Python cannot stop a thread); "
                               "its result will be dropped", tool_name, name)
            raise


def _live_thread_slots(loop: asyncio.AbstractEventLoop) -> asyncio.Semaphore:
    """The bound on sync calls that someone still waits for, one per event loop (asyncio primitives belong
    to one loop)."""
    with _slots_lock:
        slots = _slots_by_loop.get(loop)
        if slots is None:
            slots = _slots_by_loop[loop] = asyncio.Semaphore(MAX_LIVE_TOOL_THREADS)
        return slots


def _work_and_report(work: Callable[[], T], loop: asyncio.AbstractEventLoop, future: asyncio.Future[T]) -> None:
    """The thread's body: run the tool, then hand its result or exception to the loop."""
    result: T | None = None
    error: BaseException | None = None
    try:
        result = work()
    except BaseException as exc:  # delivered to the awaiting task, which turns it into a message
        error = exc
    try:
        loop.call_soon_threadsafe(_settle, future, result, error)
    except RuntimeError:  # the loop is closed: nobody waits for this result any more
        logger.debug("a tool thread finished after its event loop closed; result dropped")


def _settle(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if future.done():  # abandoned after a timeout or a cancellation: the result is dropped
        return
    if error is None:
        future.set_result(typing.cast(T, result))
    elif isinstance(error, StopIteration):  # a future refuses StopIteration (it would end a generator)
        future.set_exception(RuntimeError(f"StopIteration: {error}"))
    else:
        future.set_exception(error)
