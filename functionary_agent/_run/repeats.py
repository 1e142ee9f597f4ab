"""The repeat guard: within one run, a call identical to an earlier one is not run again.

Small models loop: they send the same call after it succeeded (they missed the answer) or after it failed (they
did not change anything). An identical call (same name, same arguments, key order ignored) that already succeeded
gets the earlier result; one that already failed gets the earlier error and a note saying so, and is not run. A
fault that may pass (a timeout, a lost connection: `ToolOutcome.transient`) is not remembered, so it may be
retried. A turn made only of repeats ends the tool use: the conversation asks for an answer next.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from functionary_agent.events import ToolResult
from functionary_agent.messages import ToolCall

FAILED_BEFORE = (
    "[Not run again: this identical call already failed in this run with the error above. Change the arguments, "
    "use another tool, or answer with what you know.]"
)


def call_key(call: ToolCall) -> tuple[str, str]:
    """Identity of a call: the name and the arguments with key order ignored."""
    try:
        arguments = json.dumps(json.loads(call.arguments or "{}"), sort_keys=True)
    except json.JSONDecodeError:
        arguments = call.arguments
    return call.name, arguments


class RepeatGuard:
    """What this run's calls produced, by call identity."""

    def __init__(self) -> None:
        self._answered: dict[tuple[str, str], str] = {}
        self._failed: dict[tuple[str, str], str] = {}

    def earlier(self, call: ToolCall) -> ToolResult | None:
        """The result an identical earlier call gives this one, or None when it must run."""
        key = call_key(call)
        if key in self._answered:
            return ToolResult(call.id, call.name, call.arguments, self._answered[key], repeated=True)
        if key in self._failed:
            content = f"{self._failed[key]}\n{FAILED_BEFORE}"
            return ToolResult(call.id, call.name, call.arguments, content, is_error=True, repeated=True)
        return None

    def record(self, call: ToolCall, result: ToolResult, *, transient: bool) -> None:
        if result.repeated or transient:
            return
        (self._failed if result.is_error else self._answered)[call_key(call)] = result.content


def identical_in_turn(calls: Sequence[ToolCall], max_identical: int) -> dict[int, int]:
    """Calls of one turn not to run: where more than `max_identical` calls are identical (a small model that
    loops may send dozens), each copy after the first, mapped to the position of the first (which runs)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for index, call in enumerate(calls):
        groups.setdefault(call_key(call), []).append(index)
    return {copy: where[0] for where in groups.values() if len(where) > max_identical for copy in where[1:]}


def identical_note(first: ToolCall, copies: int, max_identical: int) -> str:
    """What the model reads for each copy that was not run."""
    return (
        f"[Not run: this turn had {copies} identical {first.name} calls (more than max_identical_calls="
        f"{max_identical}); only the first, call {first.id}, was handled. Its result is the answer to this one.]"
    )
