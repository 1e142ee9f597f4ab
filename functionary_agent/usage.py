"""What a run cost (`Usage`) and what it may cost (`Limits`).

Every engine reports token usage on its `AssistantMessage` (the OpenAI `usage` shape); the conversation adds it up
per run (`chat.last_usage`) and over its life (`chat.usage`), with the requests sent and the tool calls run.
`Limits` are checked per run at fixed points: before each model request (requests, tokens) and before a turn's
calls run (tool calls). Crossing one raises `UsageLimitExceeded` with every message kept, so `submit()` can go on
once the limit is raised.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from functionary_agent.errors import ConfigurationError, UsageLimitExceeded

__all__ = ["Limits", "Usage"]


@dataclass
class Usage:
    """Requests sent, tool calls run and tokens spent; `cached_tokens` are prompt tokens the engine reused.

    Attributes:
        requests: Model requests sent (one per model response, whether or not its server reported tokens).
        tool_calls: Tool calls the model made that the run answered (run, declined or repeated).
        prompt_tokens: Prompt (input) tokens, as the engines reported them.
        completion_tokens: Generated (output) tokens, as the engines reported them.
        cached_tokens: The part of `prompt_tokens` the engine reused from an earlier request instead of reading
            again; 0 when the server does not report it.
    """

    requests: int = 0
    tool_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """`prompt_tokens` plus `completion_tokens`."""
        return self.prompt_tokens + self.completion_tokens

    def add_response(self, usage: Mapping[str, Any] | None) -> None:
        """Count one model response and the tokens its server reported (servers that report none add 0)."""
        self.requests += 1
        if not usage:
            return
        self.prompt_tokens += _count(usage.get("prompt_tokens"))
        self.completion_tokens += _count(usage.get("completion_tokens"))
        details = usage.get("prompt_tokens_details")
        if isinstance(details, Mapping):
            self.cached_tokens += _count(details.get("cached_tokens"))

    def add(self, other: Usage) -> None:
        """Count `other` in this one (a sub-agent's run in its caller's)."""
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))

    def __add__(self, other: Usage) -> Usage:
        return Usage(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def to_dict(self) -> dict[str, int]:
        """The counts as a dict.

        Returns:
            Each field by name, plus `total_tokens`.
        """
        return {**asdict(self), "total_tokens": self.total_tokens}

    def summary(self) -> str:
        """One line for people: `3 requests, 2 tool calls, 1,234 tokens (1,000 in, 234 out, 800 cached)`."""
        cached = f", {self.cached_tokens:,} cached" if self.cached_tokens else ""
        return (
            f"{_plural(self.requests, 'request')}, {_plural(self.tool_calls, 'tool call')}, "
            f"{self.total_tokens:,} tokens ({self.prompt_tokens:,} in, {self.completion_tokens:,} out{cached})"
        )


@dataclass(frozen=True)
class Limits:
    """Per-run budgets; None leaves a measure unbounded. Each must be a positive integer.

    Attributes:
        max_requests: The most model requests one run may send; None: no bound.
        max_tool_calls: The most tool calls one run may answer; a turn whose calls would pass it runs none of
            them. None: no bound.
        max_total_tokens: A run sends no further request once its prompt plus completion tokens reach this;
            None: no bound. It is checked before each request, so the last one may pass it.

    Raises:
        ConfigurationError: A setting is not a positive integer or None.
    """

    max_requests: int | None = None
    max_tool_calls: int | None = None
    max_total_tokens: int | None = None

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigurationError(f"Limits({item.name}=...) must be a positive integer or None, got {value!r}")

    def check_request(self, run: Usage) -> None:
        """Before a model request: raise when this run has no request or token left."""
        if self.max_requests is not None and run.requests >= self.max_requests:
            raise UsageLimitExceeded("max_requests", self.max_requests, run.requests)
        if self.max_total_tokens is not None and run.total_tokens >= self.max_total_tokens:
            raise UsageLimitExceeded("max_total_tokens", self.max_total_tokens, run.total_tokens)

    def calls_allowed(self, run: Usage, count: int) -> bool:
        """Whether `count` more tool calls fit this run's budget."""
        return self.max_tool_calls is None or run.tool_calls + count <= self.max_tool_calls

    def tool_calls_exceeded(self, run: Usage, count: int) -> UsageLimitExceeded:
        """The error for a turn whose `count` calls do not fit `max_tool_calls` (see `calls_allowed`).

        Args:
            run: This run's usage so far.
            count: The number of calls the turn would add.

        Returns:
            The `UsageLimitExceeded` to raise (it is returned, not raised), with the count the run would reach.
        """
        assert self.max_tool_calls is not None
        return UsageLimitExceeded("max_tool_calls", self.max_tool_calls, run.tool_calls + count)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"
