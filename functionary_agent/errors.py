"""One exception hierarchy, so callers can catch everything of ours with one class.

Faults the model can fix inside a run (bad arguments, tool exceptions, timeouts) never become exceptions: the
conversation turns them into tool messages. These classes are for the caller's mistakes and for failures the run
cannot recover from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from functionary_agent._run.approvals import PendingCall


__all__ = [
    "ApprovalRequired",
    "CloseError",
    "ConfigurationError",
    "ConversationBusyError",
    "FormatError",
    "FunctionaryAgentError",
    "LimitExceeded",
    "MaxTurnsExceeded",
    "ModelError",
    "OutputValidationError",
    "ToolDefinitionError",
    "UsageLimitExceeded",
]


class FunctionaryAgentError(Exception):
    """Root of every error this package raises on purpose."""


class ToolDefinitionError(FunctionaryAgentError, TypeError):
    """A function cannot become a tool (bad name, duplicate, `*args`, a type with no JSON schema)."""


class ConfigurationError(FunctionaryAgentError, ValueError):
    """Settings that cannot work together, or a missing setting such as the server URL."""


class ModelError(FunctionaryAgentError):
    """The model or its server failed in a way retries did not fix."""


class OutputValidationError(ModelError):
    """The model's typed answer still did not match `output_type` after the retries; `raw` is its last output
    (the arguments of its final call, or its text) and `errors` says what was wrong.

    Attributes:
        output_type: The type the answer had to match.
        raw: The model's last output: the arguments of its final call, or its text.
        errors: What was wrong with it: the validation errors, as text.
    """

    def __init__(self, output_type: object, raw: str, errors: str) -> None:
        name = getattr(output_type, "__name__", None) or repr(output_type)
        super().__init__(f"the model's answer does not match {name} after its retries:\n{errors}\nlast: {raw[:500]}")
        self.output_type, self.raw, self.errors = output_type, raw, errors


class ApprovalRequired(FunctionaryAgentError):
    """The run paused: `calls` (`PendingCall`s: `.arguments` is a dict) need a person's yes. Every message is kept
    (the assistant message with its calls is the last one); `chat.resume({call.id: True, other.id: "reason to
    decline"})` goes on, in this process or after `save`/`load` in another.

    Attributes:
        calls: The `PendingCall`s that wait for a decision, in the order the model made them.
    """

    def __init__(self, calls: Sequence[PendingCall]) -> None:
        names = ", ".join(f"{call.name} ({call.id})" for call in calls)
        super().__init__(
            f"waiting for approval of {names}; answer with the conversation's resume({{call_id: True/False/reason}})"
        )
        self.calls = list(calls)


class LimitExceeded(FunctionaryAgentError):
    """A run reached one of its limits; `limit` names it, `value` is its setting and `reached` what the run got
    to. Every message so far is kept on the conversation: raise the limit and `submit()` again to go on.

    Attributes:
        limit: The name of the setting reached ("max_turns", "max_requests", "max_tool_calls",
            "max_total_tokens").
        value: The setting's value.
        reached: What the run got to (for `max_tool_calls`, the count it would have reached with the turn's calls).
    """

    def __init__(self, limit: str, value: int, reached: int, message: str) -> None:
        super().__init__(message)
        self.limit, self.value, self.reached = limit, value, reached


class MaxTurnsExceeded(LimitExceeded):
    """The model kept calling tools past `max_turns`; the messages so far are kept on the conversation.

    Attributes:
        max_turns: The conversation's `max_turns` setting that was reached.
    """

    def __init__(self, max_turns: int) -> None:
        super().__init__(
            "max_turns",
            max_turns,
            max_turns,
            f"the model was still calling tools after max_turns={max_turns} turns; "
            "raise max_turns or inspect conversation.messages",
        )
        self.max_turns = max_turns


class UsageLimitExceeded(LimitExceeded):
    """A run reached one of its `Limits` (max_requests, max_tool_calls, max_total_tokens)."""

    def __init__(self, limit: str, value: int, reached: int) -> None:
        super().__init__(
            limit,
            value,
            reached,
            f"this run reached its limit {limit}={value} ({reached} so far); every message is kept: raise the limit "
            "(chat.limits = Limits(...)) and call submit() again to go on",
        )


class FormatError(FunctionaryAgentError, ValueError):
    """An unknown prompt format name, or a chat template no format matches."""


class ConversationBusyError(FunctionaryAgentError, RuntimeError):
    """A submit or stream was started while another run of the same conversation was still under way; two
    runs would interleave their messages. Wait for the first, or give each concurrent task its own conversation."""


class CloseError(FunctionaryAgentError):
    """Several resources failed to close; every one was still attempted. `errors` holds each failure in order
    (a single failure is raised as it is).

    Attributes:
        errors: The exceptions, in the order the resources were closed.
    """

    def __init__(self, errors: Sequence[Exception]) -> None:
        details = "; ".join(f"{type(error).__name__}: {error}" for error in errors)
        super().__init__(f"{len(errors)} resources failed to close (all were attempted): {details}")
        self.errors = list(errors)
