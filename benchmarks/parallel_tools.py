"""One assistant turn with 8 tool calls, each sleeping 0.3 s (4 sync, 4 async): concurrent vs one by one.

Target: the concurrent turn takes <= 1.3 x 0.3 s. Both runs go through the same Conversation loop with the same
ScriptedModel, in one process, so the ratio compares like with like.

    python benchmarks/parallel_tools.py
"""

from __future__ import annotations

import asyncio
import time

from functionary_agent import Conversation
from functionary_agent.testing import ScriptedModel, call

SLEEP = 0.3
CALLS = 8


def sync_tool(n: int) -> int:
    time.sleep(SLEEP)
    return n


async def async_tool(n: int) -> int:
    await asyncio.sleep(SLEEP)
    return n


def one_turn(max_concurrency: int | None) -> float:
    turn = {"tool_calls": [call("sync_tool" if i % 2 else "async_tool", {"n": i}) for i in range(CALLS)]}
    chat = Conversation(ScriptedModel([turn, "done"]), tools=[sync_tool, async_tool], max_concurrency=max_concurrency)
    started = time.perf_counter()
    chat.submit("go")
    return time.perf_counter() - started


def main() -> None:
    one_turn(None)  # warm up threads and imports
    concurrent = min(one_turn(None) for _ in range(3))
    sequential = one_turn(1)
    ratio = concurrent / SLEEP
    print(f"parallel_turn_8_calls: {concurrent:.3f} s ({ratio:.2f}x one call of {SLEEP} s; target <= 1.3x)")
    print(f"sequential_turn_8_calls: {sequential:.3f} s ({sequential / concurrent:.2f}x the parallel turn)")


if __name__ == "__main__":
    main()
