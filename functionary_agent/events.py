"""What `Conversation.stream` yields, as typed events a UI can match on.

Text and argument deltas arrive while the model writes; a `ToolResult` arrives as each call finishes (calls run
concurrently, so in completion order; the messages keep the model's order); `FinalAnswer` ends the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from functionary_agent._run.approvals import PendingCall


__all__ = [
    "ApprovalRequested",
    "Event",
    "FinalAnswer",
    "TextDelta",
    "ToolCallArgumentsDelta",
    "ToolCallStarted",
    "ToolResult",
]


@dataclass(frozen=True)
class TextDelta:
    """A piece of the assistant's text."""

    text: str


@dataclass(frozen=True)
class ToolCallStarted:
    """The model began a call; `index` is its position in the assistant turn."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgumentsDelta:
    """A piece of a call's JSON arguments as the model writes them."""

    index: int
    id: str
    delta: str


@dataclass(frozen=True)
class ToolResult:
    """A finished call: what was asked and what the model will read back."""

    id: str
    name: str
    arguments: str
    content: str
    is_error: bool = False
    duration: float = 0.0
    repeated: bool = False  # answered from an identical earlier call in this run, not executed again


@dataclass(frozen=True)
class FinalAnswer:
    """The run is over: the assistant answered. With an `output_type`, `output` is the validated value and
    `content` its JSON. `truncated` says the answer was cut short (the model hit `max_tokens`, or its text was cut
    where it began to repeat itself); `finish_reason` is the model's own word for how it stopped."""

    content: str
    output: Any = None
    finish_reason: str | None = None
    truncated: bool = False


@dataclass(frozen=True)
class ApprovalRequested:
    """The run paused: these calls need a person's yes (`Conversation.resume`); the stream ends here."""

    calls: list[PendingCall]


Event = TextDelta | ToolCallStarted | ToolCallArgumentsDelta | ToolResult | FinalAnswer | ApprovalRequested
