"""People in the loop: calls of tools registered with `approve=` wait for a person's yes before they run.

One mechanism, three ways to answer: a callback (`Conversation(on_approval=...)`, sync or async, returning True,
False, or a reason string to decline with); no callback, so the run pauses (`ApprovalRequired` from `submit`, an
`ApprovalRequested` event from `stream`) and `chat.resume({call_id: decision})` goes on; or the CLI's y/n prompt,
which is such a callback. A paused run leaves the assistant message with its calls as the last message, without
tool messages, so a saved conversation can be loaded and resumed in another process. A declined call gives the
model `Error: the user declined this call` (and the reason); calls that need no approval run as usual.

Every way of answering sees a waiting call the same way: an `approve=` predicate gets its arguments as a dict, and
the callback, `ApprovalRequired.calls`, `ApprovalRequested.calls` and `pending_approvals` get a `PendingCall` whose
`arguments` is that same dict and whose `raw_arguments` is the text the model wrote (what runs if it is approved).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from functionary_agent.errors import ConfigurationError
from functionary_agent.messages import ToolCall, error_result
from functionary_agent.tools import Tool, parse_arguments

logger = logging.getLogger(__name__)

Decision = bool | str  # True: run it; False or a reason: decline
DECLINED = error_result("the user declined this call")


@dataclass(frozen=True)
class PendingCall:
    """A call that waits for a person's yes. `arguments` is the model's JSON object parsed, the same dict an
    `approve=` predicate receives, so `call.arguments["path"]` works everywhere; it is empty when the model wrote
    no JSON object, and `raw_arguments` holds the text exactly as written either way. The call runs with
    `raw_arguments`: changing `arguments` changes nothing that runs. The messages keep OpenAI's JSON text.

    Attributes:
        id: The call's id: the key for its decision in `resume({id: decision})`.
        name: The name of the tool called.
        arguments: The arguments parsed from the model's JSON object; empty when they are not one.
        raw_arguments: The arguments as the JSON text the model wrote (what runs if the call is approved).
    """

    id: str
    name: str
    arguments: dict[str, Any]
    raw_arguments: str

    @classmethod
    def of(cls, call: ToolCall) -> PendingCall:
        """The waiting form of a model's call.

        Args:
            call: The call as the model made it.

        Returns:
            The same call with its arguments parsed into a dict (empty when they are not one JSON object).
        """
        return cls(call.id, call.name, readable_arguments(call.arguments) or {}, call.arguments)


ApprovalCallback = Callable[[PendingCall], "Decision | Awaitable[Decision | None] | None"]


def readable_arguments(text: str) -> dict[str, Any] | None:
    """The arguments as the dict a predicate and a callback see; None when they are not one JSON object."""
    try:
        return parse_arguments(text)
    except Exception:  # not JSON, not an object, nested too deep: the tool itself will say so to the model
        return None


@dataclass
class TurnApprovals:
    """A turn's calls after review: which run, which were declined (by call position, with their tool message),
    and which still wait for a person."""

    run: list[int] = field(default_factory=list)
    declined: dict[int, str] = field(default_factory=dict)
    waiting: list[PendingCall] = field(default_factory=list)


class ApprovalGate:
    """Asks for a yes on each call that needs one, through the callback or the decisions given to `resume`."""

    def __init__(self, tools: Mapping[str, Tool], callback: ApprovalCallback | None) -> None:
        self.tools, self.callback = tools, callback

    def needs_approval(self, call: ToolCall) -> bool:
        """Whether `call` needs a yes; a predicate that fails or gets unreadable arguments says yes (ask)."""
        approve = getattr(self.tools.get(call.name), "approve", False)
        if not callable(approve):
            return bool(approve)
        arguments = readable_arguments(call.arguments)
        if arguments is None:  # unreadable arguments: ask rather than run unchecked
            return True
        try:
            return bool(approve(arguments))
        except Exception:  # a failing predicate: ask rather than run unchecked
            logger.debug("approval predicate of %s failed; asking", call.name, exc_info=True)
            return True

    async def review(
        self, calls: Sequence[ToolCall], decisions: Mapping[str, Decision] | None = None, skip: Collection[int] = ()
    ) -> TurnApprovals:
        """Sort a turn's calls (those at positions in `skip` are answered otherwise and left out)."""
        review = TurnApprovals()
        for index, call in enumerate(calls):
            if index in skip:
                continue
            if not self.needs_approval(call):
                review.run.append(index)
                continue
            pending = PendingCall.of(call)
            decision = await self._decide(pending, decisions)
            if decision is None:
                review.waiting.append(pending)
            elif decision is True:
                review.run.append(index)
            else:
                reason = decision if isinstance(decision, str) and decision.strip() else ""
                review.declined[index] = f"{DECLINED}: {reason}" if reason else DECLINED
        return review

    async def _decide(self, call: PendingCall, decisions: Mapping[str, Decision] | None) -> Decision | None:
        if decisions is not None and call.id in decisions:
            return decisions[call.id]
        if self.callback is None:
            return None
        try:
            answer = self.callback(call)
            if inspect.isawaitable(answer):
                answer = await answer
        except Exception as exc:  # a broken approval check must not let the call through
            logger.warning("the approval callback failed for %s: %s", call.name, exc)
            return f"the approval check failed ({type(exc).__name__}: {exc})"
        if answer is None:  # no decision here: the call waits, as with no callback
            return None
        return answer if isinstance(answer, (bool, str)) else bool(answer)


def pending_calls(messages: Sequence[Mapping[str, Any]]) -> list[ToolCall]:
    """The calls of the last assistant message that have no tool message yet (a paused run)."""
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message.get("role") == "assistant":
            answered = {m.get("tool_call_id") for m in messages[index + 1 :] if m.get("role") == "tool"}
            calls = [ToolCall.from_dict(raw) for raw in message.get("tool_calls") or ()]
            return [call for call in calls if call.id not in answered]
        if message.get("role") != "tool":
            return []
    return []


def check_decisions(gate: ApprovalGate, pending: Sequence[ToolCall], decisions: Mapping[str, Decision]) -> None:
    """Refuse decisions for calls that are not waiting, and waiting calls left without a decision."""
    if not pending:
        raise ConfigurationError("nothing is waiting for approval: resume() continues a run paused by ApprovalRequired")
    waiting = {call.id for call in pending if gate.needs_approval(call)}
    unknown = sorted(set(decisions) - {call.id for call in pending})
    missing = sorted(waiting - set(decisions))
    if unknown or missing:
        parts = [f"unknown call ids {', '.join(unknown)}" if unknown else "",
                 f"no decision for {', '.join(missing)}" if missing else ""]
        problems = "; ".join(part for part in parts if part)
        raise ConfigurationError(f"resume(): {problems} (waiting: {', '.join(sorted(waiting))})")
    bad = [key for key, value in decisions.items() if not isinstance(value, (bool, str))]
    if bad:
        raise ConfigurationError(f"resume(): decisions are True, False or a reason string; not for {', '.join(bad)}")


def off_the_loop(callback: ApprovalCallback) -> ApprovalCallback:
    """A sync callback (an input() prompt, say) must not block the event loop: it runs in a thread."""
    if inspect.iscoroutinefunction(callback):
        return callback

    async def threaded(call: PendingCall) -> Decision | None:
        answer = await asyncio.to_thread(callback, call)
        return await answer if inspect.isawaitable(answer) else answer

    return threaded
