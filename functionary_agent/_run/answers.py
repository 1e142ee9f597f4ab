"""How a run ends: the rule that reads each assistant message and says whether it is the answer.

A plain run ends at the first message without calls. A typed run (`output_type=`) ends when the model calls the
reserved `final_result` tool, whose parameters are the output type's JSON schema: every engine that does tool calls
can do it, and where decoding is constrained (the embedded engine's grammar, the vLLM plugin) the arguments are
schema-valid by construction. The call gets its tool message, so `chat.messages` stays valid OpenAI chat; it never
runs user code and never shows as a call in events (it becomes the `FinalAnswer`). A value that fails validation,
or a text answer that is not the value, goes back to the model a bounded number of times, then raises.

`output_type` must be a type: a class (a pydantic model, a dataclass, a TypedDict, an Enum, `int`, ...) or a typing
form of types (`list[int]`, `int | None`, `Literal["a", "b"]`, `Annotated[...]`). Pydantic would take a function as
a "type" and call it with the model's answer, and evaluate a string as a forward reference, so both are refused.
"""

from __future__ import annotations

import enum
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import pydantic

from functionary_agent._schema import clean_schema
from functionary_agent.errors import ConfigurationError, OutputValidationError
from functionary_agent.events import FinalAnswer
from functionary_agent.messages import AssistantMessage, ToolCall, ToolChoice, error_result, tool_message

FINAL_RESULT = "final_result"
_ACCEPTED = "The final answer was accepted."
_NOT_RUN = error_result("not run: the final answer was given in the same turn")


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
        check_output_type(output_type)
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
            reason = f"the final answer does not match its type:\n{_errors(exc)}\nCall {FINAL_RESULT} again."
            note = error_result(reason)
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


def check_output_type(output_type: object) -> None:
    """Refuse what is not a type (a function, a lambda, a string, an instance), also inside a typing form, with a
    `ConfigurationError`: pydantic would call a function with the model's answer to "validate" it."""
    problem = _not_a_type(output_type)
    if problem is not None:
        raise ConfigurationError(
            f"output_type must be a type (a class such as a pydantic model, dataclass, TypedDict, Enum or int, or a "
            f"form such as list[int], int | None, Literal[...]): {problem}"
        )


_LITERAL_VALUES = (str, int, bytes, bool, enum.Enum, type(None))
_TYPE_ALIAS = getattr(typing, "TypeAliasType", None)  # `type X = ...` (Python 3.12)


def _not_a_type(value: object) -> str | None:
    """What makes `value` no type (None when it is one): its first part that is not a class or a typing form."""
    origin = typing.get_origin(value)
    if origin is typing.Literal:
        bad = [arg for arg in typing.get_args(value) if not isinstance(arg, _LITERAL_VALUES)]
        return f"Literal holds {bad[0]!r}" if bad else None
    if origin is typing.Annotated:
        return _not_a_type(typing.get_args(value)[0])  # the metadata after the type is pydantic's to read
    if origin is not None or isinstance(value, types.UnionType):
        return next(filter(None, (_not_an_argument(arg) for arg in typing.get_args(value))), None)
    if isinstance(value, type) or value is typing.Any:
        return None
    if isinstance(value, typing.NewType):
        return _not_a_type(value.__supertype__)
    if _TYPE_ALIAS is not None and isinstance(value, _TYPE_ALIAS):
        return _not_a_type(value.__value__)
    return _described(value)


def _not_an_argument(arg: object) -> str | None:
    """An argument of a generic form: a type, or None and `...` as in `int | None` and `tuple[int, ...]`."""
    return None if arg is None or arg is Ellipsis else _not_a_type(arg)


def _described(value: object) -> str:
    if isinstance(value, (str, typing.ForwardRef)):
        return f"got the string {str(value)[:80]!r} (a forward reference, which pydantic would evaluate as code)"
    if callable(value):
        name = getattr(value, "__qualname__", None) or type(value).__name__
        return f"got {name!r}, a {type(value).__name__} that is callable but not a class"
    return f"got {type(value).__name__} {repr(value)[:80]}"


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
