"""Running one assistant turn's tool calls: concurrently, bounded, never losing a sibling to one failure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from functionary_agent._run.repeats import RepeatGuard
from functionary_agent._run.tracing import RunTracer
from functionary_agent._text import head_and_tail
from functionary_agent.events import ToolResult
from functionary_agent.messages import ToolCall, error_result
from functionary_agent.run_context import RunContext
from functionary_agent.tools import Tool


@dataclass
class CallRunner:
    """Runs a turn's calls with the run's repeat guard; each result is cut to its tool's `max_result_chars`
    (else `max_result_chars`), head and tail kept."""

    tools: Mapping[str, Tool]
    guard: RepeatGuard
    tracer: RunTracer
    max_concurrency: int | None = None
    max_result_chars: int | None = None
    context: Callable[[ToolCall], RunContext[Any]] | None = None  # what a `RunContext` parameter receives

    async def run(
        self, calls: Sequence[ToolCall], results: dict[int, ToolResult], positions: Sequence[int] | None = None
    ) -> AsyncIterator[ToolResult]:
        """Run `calls` at once (at most `max_concurrency` at a time), yielding each result as it finishes and
        recording it in `results` by call position (`positions[i]` for `calls[i]`, else `i`). On cancellation the
        unfinished calls are cancelled; the caller fills their gaps."""
        limit = asyncio.Semaphore(self.max_concurrency or len(calls) or 1)
        where = positions if positions is not None else range(len(calls))
        tasks = {asyncio.ensure_future(self._one(call, limit)): where[i] for i, call in enumerate(calls)}
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

    async def _one(self, call: ToolCall, limit: asyncio.Semaphore) -> ToolResult:
        earlier = self.guard.earlier(call)
        if earlier is not None:
            return earlier
        with self.tracer.tool_span(call) as span:
            tool = self.tools.get(call.name)
            if tool is None:
                available = ", ".join(sorted(self.tools)) or "none"
                content = error_result(f"unknown tool {call.name!r}. Available tools: {available}")
                result, transient = ToolResult(call.id, call.name, call.arguments, content, is_error=True), False
            else:
                async with limit:
                    outcome = await tool.run(call.arguments, self.context(call) if self.context else None)
                bound = tool.max_result_chars or self.max_result_chars
                content = head_and_tail(outcome.content, bound) if bound else outcome.content
                result = ToolResult(call.id, call.name, call.arguments, content, outcome.is_error, outcome.duration)
                transient = outcome.transient
            span.finish(result)
        self.guard.record(call, result, transient=transient)
        return result
