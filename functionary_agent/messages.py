"""The vocabulary every layer may import: a model's tool calls and assistant message, tool messages, and the
convention that a failed call's result is a text starting with `Error:` (what the model reads, what front ends
show as a failure).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from functionary_agent._openai_messages import new_call_id

__all__ = [
    "CANCELLED",
    "ERROR_PREFIX",
    "AssistantMessage",
    "ToolCall",
    "ToolChoice",
    "arguments_text",
    "error_result",
    "is_error_result",
    "tool_message",
]


ToolChoice = Literal["auto", "none", "required"] | Mapping[str, Any]
"""Whether the model may, must or must not call a tool (OpenAI's `tool_choice`): "auto" (it decides), "none" (no
call), "required" (at least one call), or a mapping that names one function,
`{"type": "function", "function": {"name": "get_weather"}}`."""


@dataclass
class ToolCall:
    """One call as the model emitted it; `arguments` is its JSON text, kept even when it is not valid JSON.

    Attributes:
        id: The call's id; the tool message that answers it carries the same id as `tool_call_id`.
        name: The name of the tool the model called, as it wrote it (it may name no registered tool).
        arguments: The arguments as the JSON text the model wrote; "" when it wrote none.
    """

    id: str
    name: str
    arguments: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The call in OpenAI's chat shape.

        Returns:
            `{"id", "type": "function", "function": {"name", "arguments"}}`, arguments as JSON text.
        """
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToolCall:
        """Read a call from a mapping, tolerant of what servers and people write.

        Args:
            data: The OpenAI shape `{"id", "function": {"name", "arguments"}}` or a flat `{"name", "arguments"}`;
                arguments may be JSON text, a dict or null, and the id may be missing.

        Returns:
            The call, with arguments as JSON text ("" for null) and a new id when `data` has none.
        """
        nested = data.get("function")
        function: Mapping[str, Any] = nested if isinstance(nested, Mapping) else data
        return cls(
            id=str(data.get("id") or new_call_id()),
            name=str(function.get("name") or ""),
            arguments=arguments_text(function.get("arguments")),
        )


def arguments_text(arguments: Any) -> str:
    """Arguments as JSON text; servers sometimes send a dict or null instead of a string."""
    if arguments is None:
        return ""
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


@dataclass
class AssistantMessage:
    """One assistant turn. Whether the loop goes on is decided by `tool_calls`, never by `finish_reason`.

    Attributes:
        content: The text of the answer; None when the model wrote none (a turn of calls only).
        tool_calls: The calls the model made this turn, in order; empty for a plain answer.
        finish_reason: Why the model stopped, as the engine reports it: "stop", "tool_calls", "length" (the
            token budget ran out), "repetition" (the embedded engine cut a text, or a call's argument value, that
            began to loop; the calls still run) or a server's own value; None when unknown.
        usage: The token usage the engine reported, in OpenAI's shape (`prompt_tokens`, `completion_tokens`,
            `total_tokens`, `prompt_tokens_details.cached_tokens`); None when the server reported none.
    """

    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The message in OpenAI's chat shape, as it goes into the conversation's history.

        Returns:
            `{"role": "assistant", "content", "tool_calls"}`; `tool_calls` only when there are calls.
            `finish_reason` and `usage` are not part of it.
        """
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.to_dict() for call in self.tool_calls]
        return message

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AssistantMessage:
        """Read a message from a mapping (the inverse of `to_dict`, tolerant as `ToolCall.from_dict` is).

        Args:
            data: A mapping with any of `content`, `tool_calls` (`ToolCall`s or mappings `ToolCall.from_dict`
                reads), `finish_reason` and `usage`; missing keys give None or no calls.

        Returns:
            The message; `usage` is kept only when it is a mapping.
        """
        calls = [c if isinstance(c, ToolCall) else ToolCall.from_dict(c) for c in data.get("tool_calls") or ()]
        usage = data.get("usage")
        usage = dict(usage) if isinstance(usage, Mapping) else None
        return cls(data.get("content"), calls, data.get("finish_reason"), usage)


ERROR_PREFIX = "Error: "
"""The start of every failed call's result text (`error_result` writes it, `is_error_result` looks for it)."""
CANCELLED = "Error: the call was cancelled before it finished"
"""The result text given to a call whose run was stopped before the call finished, so that every call of the
assistant message still has its tool message."""


def error_result(reason: str) -> str:
    """The text of a failed call's result, as the model reads it: `Error: <reason>`."""
    return ERROR_PREFIX + reason


def is_error_result(content: str) -> bool:
    """Whether a tool message's text reports a failure (the convention `error_result` writes)."""
    return content.startswith(ERROR_PREFIX.rstrip())


def tool_message(call: ToolCall, content: str) -> dict[str, Any]:
    """The tool message that answers `call` (OpenAI chat shape)."""
    return {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": content}
