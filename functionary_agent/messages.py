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


@dataclass
class ToolCall:
    """One call as the model emitted it; `arguments` is its JSON text, kept even when it is not valid JSON."""

    id: str
    name: str
    arguments: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToolCall:
        """Tolerant of what servers and people write: the OpenAI shape or a flat {"name", "arguments"},
        arguments as a dict or null, a missing id."""
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
    """One assistant turn. Whether the loop goes on is decided by `tool_calls`, never by `finish_reason`."""

    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.to_dict() for call in self.tool_calls]
        return message

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AssistantMessage:
        calls = [c if isinstance(c, ToolCall) else ToolCall.from_dict(c) for c in data.get("tool_calls") or ()]
        usage = data.get("usage")
        usage = dict(usage) if isinstance(usage, Mapping) else None
        return cls(data.get("content"), calls, data.get("finish_reason"), usage)


ERROR_PREFIX = "Error: "
CANCELLED = "Error: the call was cancelled before it finished"


def error_result(reason: str) -> str:
    """The text of a failed call's result, as the model reads it: `Error: <reason>`."""
    return ERROR_PREFIX + reason


def is_error_result(content: str) -> bool:
    """Whether a tool message's text reports a failure (the convention `error_result` writes)."""
    return content.startswith(ERROR_PREFIX.rstrip())


def tool_message(call: ToolCall, content: str) -> dict[str, Any]:
    """The tool message that answers `call` (OpenAI chat shape)."""
    return {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": content}
