"""How a run ends: the rule that reads each assistant message and says whether it is the answer.

A plain run ends at the first message without calls. A typed run (`output_type=`) ends when the model calls the
reserved `final_result` tool, whose parameters are the output type's JSON schema: every engine that does tool calls
can do it, and where decoding is constrained (the embedded engine's grammar, the vLLM plugin) the arguments are
schema-valid by construction. The call gets its tool message, so `chat.messages` stays valid OpenAI chat; it never
runs user code and never shows as a call in events (it becomes the `FinalAnswer`). A value that fails validation,
or a text answer that is not the value, goes back to the model a bounded number of times, then raises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pydantic

from functionary_agent._calls import tool_message
from functionary_agent._schema import clean_schema
from functionary_agent.errors import ConfigurationError, OutputValidationError
from functionary_agent.events import FinalAnswer
from functionary_agent.models.base import AssistantMessage, ToolCall, ToolChoice

FINAL_RESULT = "final_result"
_ACCEPTED = "The final answer was accepted."
_NOT_RUN = "Error: not run: the final answer was given in the same turn"


@dataclass
class Verdict:
    """What to do with one assistant message: messages to add, calls to run, or the answer."""

    notes: list[dict[str, Any]] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    final: FinalAnswer | None = None


class PlainAnswer:
    """A run that ends with the first message that calls nothing."""

    hidden_tools: frozenset[str] = frozenset()

    def tool_specs(self) -> list[dict[str, Any]]:
        return []

    def first_choice(self, chosen: ToolChoice) -> ToolChoice:
        return chosen

    def next_choice(self, repeats_only: bool) -> ToolChoice:
        return "none" if repeats_only else "auto"

    def judge(self, message: AssistantMessage) -> Verdict:
        if message.tool_calls:
            return Verdict(calls=list(message.tool_calls))
        return Verdict(final=FinalAnswer(message.content or ""))


class TypedAnswer:
    """A run that ends with a valid call of `final_result`; `retries` invalid answers are sent back first."""

    hidden_tools = frozenset({FINAL_RESULT})

    def __init__(self, output_type: Any, retries: int = 2) -> None:
        if retries < 0:
            raise ConfigurationError(f"output_retries must be 0 or more, got {retries}")
        self.output_type, self.retries = output_type, retries
        self._adapter, self._schema, self._wrapped = _output_schema(output_type)

    def tool_specs(self) -> list[dict[str, Any]]:
        description = "Give your final answer: call this once you have everything, with the answer as the arguments."
        function = {"name": FINAL_RESULT, "description": description, "parameters": self._schema}
        return [{"type": "function", "function": function}]

    def first_choice(self, chosen: ToolChoice) -> ToolChoice:
        return chosen if isinstance(chosen, dict) else "required"

    def next_choice(self, repeats_only: bool) -> ToolChoice:
        """Calls only (the answer is a call); a turn of repeats gets the answer asked for by name."""
        return {"type": "function", "function": {"name": FINAL_RESULT}} if repeats_only else "required"

    def judge(self, message: AssistantMessage) -> Verdict:
        finals = [call for call in message.tool_calls if call.name == FINAL_RESULT]
        if finals:
            return self._judge_call(message, finals[0])
        if message.tool_calls:
            return Verdict(calls=list(message.tool_calls))
        return self._judge_text(message.content or "")

    def _judge_call(self, message: AssistantMessage, final: ToolCall) -> Verdict:
        """The answer's call gets the verdict, the calls beside it are not run; tool messages in call order."""
        try:
            value = self._validate(final.arguments)
        except pydantic.ValidationError as exc:
            self._spend_retry(final.arguments, exc)
            note = f"Error: the final answer does not match its type:\n{_errors(exc)}\nCall {FINAL_RESULT} again."
            answer = None
        else:
            note, answer = _ACCEPTED, self._final(value)
        notes = [tool_message(call, note if call is final else _NOT_RUN) for call in message.tool_calls]
        return Verdict(notes=notes, final=answer)

    def _judge_text(self, text: str) -> Verdict:
        """A text answer: accepted when it is the value as JSON (some servers ignore tool_choice), else sent back."""
        try:
            return Verdict(final=self._final(self._validate(text)))
        except pydantic.ValidationError as exc:
            self._spend_retry(text, exc)
        note = f"Answer by calling the {FINAL_RESULT} tool with the answer as its arguments, not with text."
        return Verdict(notes=[{"role": "user", "content": note}])

    def _validate(self, arguments: str) -> Any:
        raw = arguments.strip() or "{}"
        if self._wrapped:
            return self._adapter.validate_python(_unwrap(raw))
        return self._adapter.validate_json(raw)

    def _spend_retry(self, raw: str, exc: pydantic.ValidationError) -> None:
        if self.retries <= 0:
            raise OutputValidationError(self.output_type, raw, _errors(exc))
        self.retries -= 1

    def _final(self, value: Any) -> FinalAnswer:
        text = self._adapter.dump_json(value).decode()
        return FinalAnswer(text, output=value)


def _output_schema(output_type: Any) -> tuple[pydantic.TypeAdapter[Any], dict[str, Any], bool]:
    """The adapter, the tool's parameter schema, and whether the value is wrapped as {"value": ...} (a tool's
    arguments are an object; an int, a list or a Literal is not)."""
    try:
        adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(output_type)
        schema = clean_schema(adapter.json_schema())
    except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError, TypeError) as exc:
        raise ConfigurationError(f"output_type {output_type!r} has no JSON schema: {exc}") from None
    if schema.get("type") == "object" and "properties" in schema:
        return adapter, schema, False
    return adapter, {"type": "object", "properties": {"value": schema}, "required": ["value"]}, True


def _unwrap(raw: str) -> Any:
    """The value of a wrapped answer; bare JSON (a text answer) is taken as the value itself."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    return data["value"] if isinstance(data, dict) and set(data) == {"value"} else data


def _errors(exc: pydantic.ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "(the value)"
        lines.append(f"- {where}: {error['msg']}")
    return "\n".join(lines)
