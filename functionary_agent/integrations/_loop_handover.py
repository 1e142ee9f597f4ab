"""What the MCP and OpenAPI integrations share: the hand-over of work to the event loop that owns a connection.

An MCP session's streams and an HTTP client's connections belong to the event loop that made them. A call from
another loop (a notebook cell's loop while the connection lives on the sync wrappers' loop) must run there.
Tool names are shared too, through `functionary_agent.tools.unique_tool_name`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def has_stopped(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether `loop` can run nothing more: closed, or not running (its `asyncio.run` has returned)."""
    return loop.is_closed() or not loop.is_running()


async def on_loop(loop: asyncio.AbstractEventLoop, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """`await make()` on `loop`: here when it is the running loop, else handed over to it and awaited from here.
    From another loop, `loop` must still run (check `has_stopped` first: a stopped loop would never answer)."""
    if asyncio.get_running_loop() is loop:
        return await make()
    if has_stopped(loop):
        raise RuntimeError("the event loop that owns this connection has stopped")
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(make(), loop))
