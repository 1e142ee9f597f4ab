"""A turn's first step: ask the model (within the run's limits and the context window), record its message, and
judge it: calls to run, a note to send back, or the answer.

In stream mode the model's deltas become events as they arrive, except those of the answer's own hidden tool.
Engines hand over clean deltas (every tool-call delta has its `index`: the `ChatModel` seam sees to it).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from functionary_agent._run.state import TRUNCATING_FINISH_REASONS, RunDeps, RunState
from functionary_agent._sync import closing
from functionary_agent.errors import ModelError
from functionary_agent.events import Event, FinalAnswer, TextDelta, ToolCallArgumentsDelta, ToolCallStarted
from functionary_agent.messages import AssistantMessage

logger = logging.getLogger("functionary_agent")


async def model_step(deps: RunDeps, state: RunState) -> AsyncIterator[Event]:
    """One model turn: its events; then the state holds either the calls to run or the answer."""
    deps.config.limits.check_request(state.usage)
    message = None
    async with closing(_ask(deps, state)) as asking:
        async for item in asking:
            if isinstance(item, AssistantMessage):
                message = item
            else:
                yield item
    message = _record(deps, state, message)
    verdict = state.answer.judge(message)
    deps.messages += verdict.notes
    if verdict.final is not None:
        state.answered(_with_ending(verdict.final, message))
    else:
        state.calls = verdict.calls


def _record(deps: RunDeps, state: RunState, message: AssistantMessage | None) -> AssistantMessage:
    """The model's message joins the chat and its usage the run's."""
    if message is None:
        raise ModelError(f"{type(deps.model).__name__} ended its stream without an assistant message")
    state.usage.add_response(message.usage)
    deps.messages.append(message.to_dict())
    return message


def _with_ending(final: FinalAnswer, message: AssistantMessage) -> FinalAnswer:
    """The answer with how the model stopped; a cut answer is logged as one."""
    truncated = message.finish_reason in TRUNCATING_FINISH_REASONS
    if truncated:
        logger.warning("the answer was cut short (finish_reason=%s): it may be incomplete", message.finish_reason,
                       extra={"run_ending": True})  # front ends that report the run's end themselves skip it
    return dataclasses.replace(final, finish_reason=message.finish_reason, truncated=truncated)


async def _ask(deps: RunDeps, state: RunState) -> AsyncIterator[Event | AssistantMessage]:
    """The request for this turn; in stream mode its deltas as events, the message last."""
    tools = [tool.to_openai() for tool in deps.tools.values()] + state.answer.tool_specs()
    request: dict[str, Any] = {**deps.config.request, "tools": tools, "tool_choice": state.tool_choice}
    if not deps.config.parallel_tool_calls:
        request["parallel_tool_calls"] = False
    messages = await deps.budget.fit(deps.messages, tools, request)
    with deps.tracer.request_span(messages, state.tool_choice) as span:
        if not deps.stream:
            message = await deps.model.acomplete(messages, **request)
            span.finish(message)
            yield message
            return
        async with closing(_streamed(deps, messages, request, state.answer.hidden_tools)) as items:
            async for item in items:
                if isinstance(item, AssistantMessage):
                    span.finish(item)
                yield item


async def _streamed(
    deps: RunDeps, messages: list[dict[str, Any]], request: dict[str, Any], hidden_tools: frozenset[str]
) -> AsyncIterator[Event | AssistantMessage]:
    """The model's deltas as events, the message last; calls of `hidden_tools` make no events."""
    call_ids: dict[int, str] = {}
    hidden: set[int] = set()
    async with closing(deps.model.astream(messages, **request)) as deltas:
        async for item in deltas:
            if isinstance(item, AssistantMessage):
                yield item
                continue
            for event in _delta_events(item, call_ids):
                if isinstance(event, ToolCallStarted) and event.name in hidden_tools:
                    hidden.add(event.index)
                if not (isinstance(event, (ToolCallStarted, ToolCallArgumentsDelta)) and event.index in hidden):
                    yield event


def _delta_events(delta: Mapping[str, Any], call_ids: dict[int, str]) -> Iterator[Event]:
    """A clean delta -> events; `call_ids` maps each call index seen so far to its id."""
    if delta.get("content"):
        yield TextDelta(delta["content"])
    for part in delta.get("tool_calls") or ():
        index = part["index"]
        function = part.get("function") or {}
        if index not in call_ids:
            call_ids[index] = part.get("id") or ""
            yield ToolCallStarted(index, call_ids[index], function.get("name", ""))
        if function.get("arguments"):
            yield ToolCallArgumentsDelta(index, call_ids[index], function["arguments"])
