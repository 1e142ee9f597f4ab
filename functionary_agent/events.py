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
    """A piece of the assistant's text.

    Attributes:
        text: The new text, to append to what came before.
    """

    text: str


@dataclass(frozen=True)
class ToolCallStarted:
    """The model began a call; `index` is its position in the assistant turn.

    Attributes:
        index: The call's position in the assistant turn (0 for the first call).
        id: The call's id, the one its `ToolResult` and tool message carry.
        name: The name of the tool called.
    """

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgumentsDelta:
    """A piece of a call's JSON arguments as the model writes them.

    Attributes:
        index: The call's position in the assistant turn, as in its `ToolCallStarted`.
        id: The call's id.
        delta: The new piece of the arguments' JSON text, to append to what came before.
    """

    index: int
    id: str
    delta: str


@dataclass(frozen=True)
class ToolResult:
    """A finished call: what was asked and what the model will read back.

    Attributes:
        id: The call's id.
        name: The name of the tool called.
        arguments: The arguments as the JSON text the model wrote.
        content: The result text the model reads back (cut to the `max_result_chars` bound, head and tail kept);
            a fault reads `Error: ...`.
        is_error: Whether `content` reports a fault (bad arguments, an exception, a timeout, an unknown tool, a
            declined call).
        duration: Seconds the tool ran; 0.0 for a call that did not run (repeated, declined, unknown tool).
        repeated: True when the call was not run because it repeats an identical call: an earlier one in this
            run (it gets that call's result), or one of more than `max_identical_calls` copies in this turn.
    """

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
    where it began to repeat itself); `finish_reason` is the model's own word for how it stopped.

    Attributes:
        content: The answer's text; with an `output_type`, the validated value as JSON.
        output: The validated value of the `output_type`; None without one.
        finish_reason: How the model stopped ("stop", "length", "repetition", ...); None when it did not say.
        truncated: Whether the answer was cut short ("length", "max_tokens", "repetition" or "content_filter").
    """

    content: str
    output: Any = None
    finish_reason: str | None = None
    truncated: bool = False


@dataclass(frozen=True)
class ApprovalRequested:
    """The run paused: these calls need a person's yes (`Conversation.resume`); the stream ends here.

    Attributes:
        calls: The calls that wait for a decision, in the order the model made them.
    """

    calls: list[PendingCall]


Event = TextDelta | ToolCallStarted | ToolCallArgumentsDelta | ToolResult | FinalAnswer | ApprovalRequested
"""Any event `Conversation.stream` yields; match on its class."""
