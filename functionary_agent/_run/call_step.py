"""A turn's second step: run the calls the model asked for, within the run's tool-call budget, once approved.

Every call gets its tool message, in the model's order, even one cut short by cancellation, so the message list
stays valid. A call that waits for a person pauses the run before any call runs, with no tool message yet. Where a
turn repeats one call more than `max_identical_calls` times, only the first is handled; each copy is told so.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from functionary_agent._run.repeats import identical_in_turn, identical_note
from functionary_agent._run.state import RunDeps, RunEnd, RunState
from functionary_agent._sync import closing
from functionary_agent.events import ApprovalRequested, ToolResult
from functionary_agent.messages import CANCELLED, ToolCall, error_result, is_error_result, tool_message


async def call_step(deps: RunDeps, state: RunState) -> AsyncIterator[ToolResult | ApprovalRequested]:
    """Run `state.calls`; their results land in `state.results` and their tool messages in the chat. A pause
    for approval ends the run (`state.end`)."""
    calls = state.calls or []
    if not calls:
        return
    _check_call_budget(deps, state, calls)
    copies = identical_in_turn(calls, deps.config.max_identical_calls)
    review = await deps.gate.review(calls, state.decisions, skip=copies.keys())
    if review.waiting:
        state.end = RunEnd("paused")
        yield ApprovalRequested(review.waiting)
        return
    state.usage.tool_calls += len(calls)
    for index, note in review.declined.items():
        yield _settled(state, calls, index, note)
    for copy, first in copies.items():
        group = 1 + sum(1 for other in copies.values() if other == first)
        note = identical_note(calls[first], group, deps.config.max_identical_calls)
        yield _settled(state, calls, copy, note, repeated=True)
    running = deps.runner.run([calls[i] for i in review.run], state.results, positions=review.run)
    try:
        async with closing(running):
            async for result in running:
                yield result
    finally:
        deps.messages += [
            tool_message(call, state.results[index].content if index in state.results else CANCELLED)
            for index, call in enumerate(calls)
        ]


def _settled(state: RunState, calls: Sequence[ToolCall], index: int, note: str, repeated: bool = False) -> ToolResult:
    """A call answered without running: declined by a person, or a copy of an identical call."""
    call = calls[index]
    state.results[index] = ToolResult(
        call.id, call.name, call.arguments, note, is_error=is_error_result(note), repeated=repeated
    )
    return state.results[index]


def _check_call_budget(deps: RunDeps, state: RunState, calls: Sequence[ToolCall]) -> None:
    limits = deps.config.limits
    if not limits.calls_allowed(state.usage, len(calls)):
        exceeded = limits.tool_calls_exceeded(state.usage, len(calls))
        note = error_result(f"not run: this run reached its tool-call limit ({exceeded.limit}={exceeded.value})")
        deps.messages += [tool_message(call, note) for call in calls]
        raise exceeded
