"""A deterministic model for tests: yours and ours.

`ScriptedModel` plays back a list of replies (or asks a function of the messages) and records every request, so
a test can drive the whole agent loop, tools included, without a server and assert on what the model was sent.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from functionary_agent.errors import ModelError
from functionary_agent.messages import AssistantMessage, ToolCall, ToolChoice
from functionary_agent.models.base import ChatModel, StreamItem, message_deltas

__all__ = ["Reply", "ReplyFunction", "ScriptedModel", "ScriptedRequest", "call", "to_message"]


Reply = str | Mapping[str, Any] | AssistantMessage
"""One scripted model turn: a text answer (str), an assistant message in OpenAI's shape (a mapping; its calls may
be written flat as `{"name": ..., "arguments": {...}}`, see `call`), or an `AssistantMessage`."""
ReplyFunction = Callable[["ScriptedRequest"], Reply]
"""A function that writes each reply from the request the conversation sent (called once per model turn)."""


@dataclass
class ScriptedRequest:
    """What the conversation sent for one model turn (a deep copy, safe to inspect later).

    Attributes:
        messages: The chat messages sent, in OpenAI's shape.
        tools: The tool specs sent (OpenAI tool dicts); empty when none were.
        tool_choice: The `tool_choice` of the request.
        settings: Every other keyword argument of the request (sampling settings such as `temperature`).
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    tool_choice: ToolChoice
    settings: dict[str, Any] = field(default_factory=dict)


class ScriptedModel(ChatModel):
    """Replies are strings (text), assistant dicts (OpenAI shape; calls may be written flat as
    `{"name": ..., "arguments": {...}}`), or `AssistantMessage`s; or pass one function of the request.

    Streaming cuts text and arguments into `chunk_size` pieces, like a real server. `delay` (seconds) makes
    each reply take time, for tests of concurrency.

    Attributes:
        chunk_size: The length, in characters, of the text and argument pieces a streamed reply is cut into.
        delay: Seconds each request waits before its reply.
        requests: Every request received so far, in order (streamed or not).

    A request after the last reply of a list raises `ModelError`.
    """

    def __init__(self, replies: Iterable[Reply] | ReplyFunction, *, chunk_size: int = 3, delay: float = 0.0) -> None:
        self._function: ReplyFunction | None = replies if callable(replies) else None
        self._replies: list[Reply] = [] if callable(replies) else list(replies)
        self.chunk_size = chunk_size
        self.delay = delay
        self.requests: list[ScriptedRequest] = []

    async def acomplete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] = (),
        tool_choice: ToolChoice = "auto",
        **settings: Any,
    ) -> AssistantMessage:
        request = ScriptedRequest(
            [dict(m) for m in copy.deepcopy(messages)], [dict(t) for t in copy.deepcopy(tools)], tool_choice, settings
        )
        self.requests.append(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self._function is not None:
            return to_message(self._function(request))
        turn = len(self.requests)
        if turn > len(self._replies):
            raise ModelError(f"ScriptedModel has {len(self._replies)} replies and was asked for reply {turn}")
        return to_message(self._replies[turn - 1])

    async def astream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] = (),
        tool_choice: ToolChoice = "auto",
        **settings: Any,
    ) -> AsyncIterator[StreamItem]:
        message = await self.acomplete(messages, tools=tools, tool_choice=tool_choice, **settings)
        for delta in message_deltas(message, self.chunk_size):
            yield delta
            await asyncio.sleep(0)  # let other tasks run between chunks, as a network stream would
        yield message


def to_message(reply: Reply) -> AssistantMessage:
    """A reply in any accepted shape -> `AssistantMessage`."""
    if isinstance(reply, AssistantMessage):
        return reply
    if isinstance(reply, str):
        return AssistantMessage(content=reply)
    if isinstance(reply, Mapping):
        return AssistantMessage.from_dict(reply)
    raise TypeError(f"a scripted reply is a str, a dict or an AssistantMessage, got {type(reply).__name__}")


def call(name: str, arguments: Mapping[str, Any] | str | None = None, *, id: str | None = None) -> ToolCall:
    """Shorthand for a scripted call: `{"tool_calls": [call("get_weather", {"location": "Hanoi"})]}`."""
    return ToolCall.from_dict({"id": id, "name": name, "arguments": arguments or {}})
