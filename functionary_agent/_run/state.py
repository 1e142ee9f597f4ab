"""One run as named objects: what it works with (`RunDeps`, fixed for the run), where it stands (`RunState`,
changed by each step) and how it ended (`RunEnd`). The steps read and write these; nothing travels sideways
through the event stream."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from functionary_agent._run.answers import PlainAnswer, TypedAnswer
from functionary_agent._run.approvals import ApprovalGate, Decision
from functionary_agent._run.calls import CallRunner
from functionary_agent._run.config import RunConfig
from functionary_agent._run.context_budget import ContextBudget
from functionary_agent._run.tracing import RunTracer
from functionary_agent.events import FinalAnswer, ToolResult
from functionary_agent.messages import ToolCall, ToolChoice
from functionary_agent.models.base import ChatModel
from functionary_agent.tools import Tool
from functionary_agent.usage import Usage

AnswerRule = PlainAnswer | TypedAnswer
EndReason = Literal["answer", "paused", "limit", "error", "cancelled"]
TRUNCATING_FINISH_REASONS = frozenset({"length", "max_tokens", "repetition", "content_filter"})


@dataclass
class RunDeps:
    """What one run works with. `messages` is the conversation's own list: the run appends to it."""

    model: ChatModel
    config: RunConfig
    tools: Mapping[str, Tool]
    messages: list[dict[str, Any]]
    gate: ApprovalGate
    budget: ContextBudget
    runner: CallRunner
    tracer: RunTracer
    stream: bool


@dataclass(frozen=True)
class RunEnd:
    """Why a run ended. `reason`: "answer"; "paused" (calls wait for approval); "limit" (`max_turns` or a
    `Limits` setting); "error" (the model or its server failed); "cancelled" (the caller stopped the run). For an
    answer, the model's `finish_reason` and whether the answer was cut short (`truncated`: the model hit
    `max_tokens`, or its text was cut where it began to repeat itself).

    Attributes:
        reason: How the run ended: "answer", "paused", "limit", "error" or "cancelled".
        finish_reason: For an answer, how the model said it stopped ("stop", "length", ...); None otherwise.
        truncated: For an answer, whether it was cut short; False otherwise.
        detail: For "limit" and "error", the exception's message ("error" adds its class name); "" otherwise.
    """

    reason: EndReason
    finish_reason: str | None = None
    truncated: bool = False
    detail: str = ""


@dataclass
class RunState:
    """Where a run stands: the answer rule, the usage so far, the choice for the next request, the calls waiting
    to run (with `decisions` from `resume`), the last turn's results, and the answer or end once there is one."""

    answer: AnswerRule
    usage: Usage
    tool_choice: ToolChoice
    calls: list[ToolCall] | None = None
    decisions: Mapping[str, Decision] | None = None
    results: dict[int, ToolResult] = field(default_factory=dict)
    final: FinalAnswer | None = None
    end: RunEnd | None = None

    def next_turn(self) -> None:
        """The calls are answered: the next request goes to the model (a turn of repeats only may not call)."""
        repeats_only = bool(self.results) and all(result.repeated for result in self.results.values())
        self.tool_choice = self.answer.next_choice(repeats_only)
        self.calls, self.decisions, self.results = None, None, {}

    def answered(self, final: FinalAnswer) -> None:
        self.final = final
        self.end = RunEnd("answer", final.finish_reason, final.truncated)
