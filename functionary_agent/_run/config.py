"""A conversation's settings as one frozen value: checked once when made, shared by forks, changed by replacing.

`Conversation` keeps its settings here and shows each as an attribute (`chat.limits = Limits(...)` makes a new
`RunConfig`, checked again), so a fork is `dataclasses.replace` of this object plus its own messages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

from functionary_agent._run.approvals import ApprovalCallback
from functionary_agent._run.context_budget import HistoryHook
from functionary_agent.errors import ConfigurationError
from functionary_agent.messages import ToolChoice
from functionary_agent.tools import check_result_limit
from functionary_agent.usage import Limits

DEFAULT_MAX_RESULT_CHARS = 20_000
DEFAULT_MAX_IDENTICAL_CALLS = 3


@dataclass(frozen=True)
class RunConfig:
    """How a conversation runs; see `Conversation` for each setting. `request` holds the sampling settings sent
    with every model request (temperature, max_tokens, ...)."""

    tool_choice: ToolChoice = "auto"
    max_turns: int = 10
    parallel_tool_calls: bool = True
    max_concurrency: int | None = None
    max_identical_calls: int = DEFAULT_MAX_IDENTICAL_CALLS
    on_approval: ApprovalCallback | None = None
    limits: Limits = field(default_factory=Limits)
    max_result_chars: int | None = DEFAULT_MAX_RESULT_CHARS
    context_window: int | None = None
    history: HistoryHook | None = None
    trace_content: bool = False
    deps: Any = None
    output_retries: int = 2
    request: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.limits is None:  # `chat.limits = None` means no limits, as `Conversation(limits=None)` does
            object.__setattr__(self, "limits", Limits())
        _check_counts(self)
        _check_callables(self)
        check_result_limit(self.max_result_chars, "max_result_chars")

    @property
    def concurrency(self) -> int | None:
        """How many calls of one turn run at once (None: all)."""
        return 1 if not self.parallel_tool_calls else self.max_concurrency

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def _check_counts(config: RunConfig) -> None:
    if not isinstance(config.max_turns, int) or config.max_turns < 1:
        raise ConfigurationError(f"max_turns must be at least 1, got {config.max_turns!r}")
    if config.max_concurrency is not None and config.max_concurrency < 1:
        raise ConfigurationError(f"max_concurrency must be at least 1 or None, got {config.max_concurrency}")
    if not isinstance(config.max_identical_calls, int) or config.max_identical_calls < 1:
        raise ConfigurationError(f"max_identical_calls must be at least 1, got {config.max_identical_calls!r}")
    window = config.context_window
    if window is not None and (not isinstance(window, int) or window < 256):
        raise ConfigurationError(f"context_window must be at least 256 tokens (or None), got {window!r}")
    if not isinstance(config.output_retries, int) or config.output_retries < 0:
        raise ConfigurationError(f"output_retries must be 0 or more, got {config.output_retries!r}")


def _check_callables(config: RunConfig) -> None:
    if not isinstance(config.limits, Limits):
        raise ConfigurationError(f"limits must be a Limits(...), got {type(config.limits).__name__}")
    if config.history is not None and not callable(config.history):
        raise ConfigurationError(f"history must be a function of the messages, got {type(config.history).__name__}")
    if config.on_approval is not None and not callable(config.on_approval):
        raise ConfigurationError(
            f"on_approval must be a function of the call, got {type(config.on_approval).__name__}"
        )


T = TypeVar("T")


class Setting(Generic[T]):
    """One `RunConfig` field shown as an attribute of the object holding the config in `.config`: reading gives
    the field, assigning replaces the config (checked again)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, holder: None, owner: type) -> Setting[T]: ...
    @overload
    def __get__(self, holder: object, owner: type) -> T: ...
    def __get__(self, holder: object | None, owner: type) -> Setting[T] | T:
        if holder is None:
            return self
        return getattr(holder.config, self.name)  # type: ignore[attr-defined]

    def __set__(self, holder: object, value: T) -> None:
        holder.config = holder.config.replace(**{self.name: value})  # type: ignore[attr-defined]
