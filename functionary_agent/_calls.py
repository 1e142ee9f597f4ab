"""Running one assistant turn's tool calls: concurrently, bounded, never losing a sibling to one failure."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from functionary_agent.events import ToolResult
from functionary_agent.models.base import ToolCall
from functionary_agent.tools import Tool

CANCELLED = "Error: the call was cancelled before it finished"


def call_key(call: ToolCall) -> tuple[str, str]:
    """Identity of a call for the repeat guard: the name and the arguments with key order ignored."""
    try:
        arguments = json.dumps(json.loads(call.arguments or "{}"), sort_keys=True)
    except json.JSONDecodeError:
        arguments = call.arguments
    return call.name, arguments


def tool_message(call: ToolCall, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": content}


async def run_calls(
    calls: Sequence[ToolCall],
    tools: Mapping[str, Tool],
    answered: Mapping[tuple[str, str], str],
    results: dict[int, ToolResult],
    max_concurrency: int | None,
) -> AsyncIterator[ToolResult]:
    """Run `calls` at once (at most `max_concurrency` at a time), yielding each result as it finishes and
    recording it in `results` by call position. Calls in `answered` are not run again: they get the earlier
    result. On cancellation the unfinished calls are cancelled; the caller fills their gaps."""
    limit = asyncio.Semaphore(max_concurrency or len(calls) or 1)
    tasks = {asyncio.ensure_future(_run_one(call, tools, answered, limit)): i for i, call in enumerate(calls)}
    pending = set(tasks)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=tasks.__getitem__):
                results[tasks[task]] = task.result()
                yield results[tasks[task]]
    finally:
        for task in pending:
            task.cancel()


async def _run_one(
    call: ToolCall, tools: Mapping[str, Tool], answered: Mapping[tuple[str, str], str], limit: asyncio.Semaphore
) -> ToolResult:
    earlier = answered.get(call_key(call))
    if earlier is not None:
        return ToolResult(call.id, call.name, call.arguments, earlier, repeated=True)
    tool = tools.get(call.name)
    if tool is None:
        available = ", ".join(sorted(tools)) or "none"
        content = f"Error: unknown tool {call.name!r}. Available tools: {available}"
        return ToolResult(call.id, call.name, call.arguments, content, is_error=True)
    async with limit:
        outcome = await tool.run(call.arguments)
    return ToolResult(call.id, call.name, call.arguments, outcome.content, outcome.is_error, outcome.duration)
