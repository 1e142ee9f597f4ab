"""One exception hierarchy, so callers can catch everything of ours with one class.

Faults the model can fix inside a run (bad arguments, tool exceptions, timeouts) never become exceptions: the
conversation turns them into tool messages. These classes are for the caller's mistakes and for failures the run
cannot recover from.
"""

from __future__ import annotations


class FunctionaryAgentError(Exception):
    """Root of every error this package raises on purpose."""


class ToolDefinitionError(FunctionaryAgentError, TypeError):
    """A function cannot become a tool (bad name, duplicate, `*args`, a type with no JSON schema)."""


class ConfigurationError(FunctionaryAgentError, ValueError):
    """Settings that cannot work together, or a missing setting such as the server URL."""


class ModelError(FunctionaryAgentError):
    """The model or its server failed in a way retries did not fix."""


class MaxTurnsExceeded(FunctionaryAgentError):
    """The model kept calling tools past `max_turns`; the messages so far are kept on the conversation."""

    def __init__(self, max_turns: int) -> None:
        super().__init__(
            f"the model was still calling tools after max_turns={max_turns} turns; "
            "raise max_turns or inspect conversation.messages"
        )
        self.max_turns = max_turns


class FormatError(FunctionaryAgentError, ValueError):
    """An unknown prompt format name, or a chat template no format matches."""
