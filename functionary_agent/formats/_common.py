"""What every format needs before it writes a byte: the tool list, the tool_choice and the messages, normalised.

Callers hand us OpenAI dicts in all their variety (legacy `functions` entries, content as a list of parts, tool
messages without a `name`, arguments as a dict); the renderers only ever see the tidy shapes defined here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from functionary_agent._openai_messages import code_of, message_text
from functionary_agent._schema import inline_refs
from functionary_agent.errors import ConfigurationError

PYTHON = "python"
CODE_INTERPRETER_TEXT = (
    "When you send a message containing Python code to python, it will be executed in a stateful Jupyter notebook "
    "environment. python will respond with the output of the execution or time out after 60.0 seconds. The drive "
    "at '/mnt/data' can be used to save and persist user files."
)

ChoiceMode = Literal["auto", "none", "required", "function"]


@dataclass(frozen=True)
class ToolChoice:
    mode: ChoiceMode
    name: str | None = None


@dataclass(frozen=True)
class ToolSet:
    """The tools a prompt shows: function dicts (`$ref`s inlined) and whether python (the code interpreter) is on."""

    functions: tuple[Mapping[str, Any], ...] = ()
    code_interpreter: bool = False


class Call(NamedTuple):
    name: str
    arguments: str  # JSON text, or the raw code of a python call
    is_code: bool


@dataclass(frozen=True)
class Turn:
    """One message ready to render: plain text, its calls, the tool name for results."""

    role: str
    text: str
    calls: tuple[Call, ...] = field(default=())
    tool_name: str = ""


def parse_tool_choice(tool_choice: Any) -> ToolChoice:
    """Accept OpenAI's spellings: "auto" | "none" | "required" | {"type": "function", "function": {"name": ...}}."""
    if tool_choice is None or tool_choice == "auto":
        return ToolChoice("auto")
    if tool_choice in ("none", "required"):
        return ToolChoice(tool_choice)
    if isinstance(tool_choice, Mapping):
        if tool_choice.get("type") == "code_interpreter":
            return ToolChoice("function", PYTHON)
        function = tool_choice.get("function", tool_choice)
        name = function.get("name") if isinstance(function, Mapping) else None
        if isinstance(name, str) and name:
            return ToolChoice("function", name)
    raise ConfigurationError(
        f"tool_choice must be 'auto', 'none', 'required' or {{'type': 'function', 'function': {{'name': ...}}}}, "
        f"not {tool_choice!r}"
    )


def function_of(tool: Any) -> Mapping[str, Any] | None:
    """The function dict of an OpenAI tool (or of a legacy bare function entry); None for other tool types."""
    if not isinstance(tool, Mapping):
        return None
    if tool.get("type", "function") == "function" and isinstance(tool.get("function"), Mapping):
        return tool["function"]
    if "type" not in tool and isinstance(tool.get("name"), str):
        return tool
    return None


def has_code_interpreter(tools: Iterable[Any]) -> bool:
    return any(isinstance(tool, Mapping) and tool.get("type") == "code_interpreter" for tool in tools)


def function_names(tools: Iterable[Any]) -> list[str]:
    names = []
    for tool in tools:
        function = function_of(tool)
        if function is not None and isinstance(function.get("name"), str):
            names.append(function["name"])
    return names


def code_names(tools: Iterable[Any]) -> frozenset[str]:
    """Call names whose argument is raw code: `python`, unless the caller declared a JSON function of that name."""
    return frozenset() if PYTHON in function_names(tools) else frozenset({PYTHON})


def select_tools(tools: Sequence[Any], choice: ToolChoice) -> ToolSet:
    """The tools the prompt shows for this tool_choice: none hides them all, a named choice keeps only that one."""
    if choice.mode == "none":
        return ToolSet()
    functions = [
        _with_inlined_refs(f) for f in (function_of(tool) for tool in tools) if f is not None and f.get("name")
    ]
    code = has_code_interpreter(tools)
    if choice.mode != "function":
        return ToolSet(tuple(functions), code)
    chosen = [function for function in functions if function["name"] == choice.name]
    if chosen:
        return ToolSet(tuple(chosen[:1]), False)
    if choice.name == PYTHON and code:
        return ToolSet((), True)
    available = ", ".join(function_names(tools) + ([PYTHON] if code else [])) or "none"
    raise ConfigurationError(f"tool_choice names {choice.name!r}, which is not among the tools ({available})")


def _with_inlined_refs(function: Mapping[str, Any]) -> Mapping[str, Any]:
    parameters = function.get("parameters")
    if isinstance(parameters, dict) and '"$ref"' in json.dumps(parameters):
        return {**function, "parameters": inline_refs(parameters)}
    return function


def effective_tool_choice(tools: Sequence[Any], tool_choice: Any) -> ToolChoice:
    """The request's tool_choice, except that a request without tools is a "none" request (as upstream does):
    the prompt then opens a text answer instead of asking for a recipient that does not exist."""
    choice = parse_tool_choice(tool_choice)
    if not function_names(tools) and not has_code_interpreter(tools):
        return ToolChoice("none")
    return choice


def in_call_order(messages: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The tool results that follow an assistant turn, in the order of that turn's calls (matched by
    `tool_call_id`), as upstream reorders them before rendering. Results without an id, or with an id of no call
    of that turn, keep their relative order after the matched ones. Nothing is dropped or repeated."""
    ordered = list(messages)
    for start, message in enumerate(ordered):
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        if not calls:
            continue
        end = start + 1
        while end < len(ordered) and ordered[end].get("role") in ("tool", "function"):
            end += 1
        position = {str(call.get("id")): n for n, call in enumerate(calls) if isinstance(call, Mapping)}
        ordered[start + 1 : end] = sorted(  # stable: unmatched results keep their order, after the matched ones
            ordered[start + 1 : end], key=lambda result: position.get(str(result.get("tool_call_id")), len(position))
        )
    return ordered


def prepare_turns(messages: Iterable[Mapping[str, Any]], code: frozenset[str]) -> list[Turn]:
    """Normalise messages (tool results in call order); results get their function's name from their call."""
    names_by_id: dict[str, str] = {}
    turns = []
    for message in in_call_order(messages):
        role = str(message.get("role", "user"))
        text = message_text(message.get("content"))
        if role == "assistant":
            calls = tuple(_call(call, code, names_by_id) for call in message.get("tool_calls") or ())
            turns.append(Turn("assistant", text, calls))
        elif role in ("tool", "function"):
            name = message.get("name") or names_by_id.get(str(message.get("tool_call_id")), "tool")
            turns.append(Turn("tool", text, tool_name=str(name)))
        else:
            turns.append(Turn("system" if role == "developer" else role, text))
    return turns


def _call(call: Mapping[str, Any], code: frozenset[str], names_by_id: dict[str, str]) -> Call:
    function = call.get("function") or {}
    name = str(function.get("name", ""))
    if call.get("id") is not None:
        names_by_id[str(call["id"])] = name
    arguments = function.get("arguments", "")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    if name in code:
        return Call(name, code_of(arguments), True)
    return Call(name, arguments, False)
