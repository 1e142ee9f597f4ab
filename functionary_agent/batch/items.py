"""The batch's input, checked before anything runs: JSONL lines or Python items become `BatchItem`s, or one
`BatchInputError` lists every problem of every line (its shape, a duplicate id, an `output_type` that names no
type); `resolve_output_types` finds the types the items name in the settings' tools."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from functionary_agent._run.answers import TypedAnswer
from functionary_agent._saved import schema_problem, structure_problem
from functionary_agent.batch.settings import BatchSettings, ConversationFactory
from functionary_agent.errors import ConfigurationError
from functionary_agent.integrations.tool_files import find_answer_type
from functionary_agent.messages import ToolChoice

MAX_PROBLEMS_SHOWN = 20
_ROLES = frozenset({"system", "user", "assistant", "tool"})
_NAMED_CHOICES = frozenset({"auto", "none", "required"})
_BUILTIN_TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}


class BatchInputError(ConfigurationError):
    """The batch input has bad items; `problems` lists every problem (`line N: ...`, a line may have several),
    the message the first 20. The message counts the bad items: the constructor's `bad_items` (by default, one
    per problem); no attribute keeps that count."""

    def __init__(self, source: str, problems: list[str], *, bad_items: int | None = None) -> None:
        shown = "\n".join(f"  {problem}" for problem in problems[:MAX_PROBLEMS_SHOWN])
        more = len(problems) - MAX_PROBLEMS_SHOWN
        bad = len(problems) if bad_items is None else bad_items
        super().__init__(
            f"{source}: {bad} bad item{'s' if bad != 1 else ''}, nothing was run:\n{shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
        self.problems = problems


@dataclass(frozen=True)
class BatchItem:
    """One conversation to run: a prompt, or messages to continue; `line` is where the input had it."""

    id: str | int
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice | None = None
    line: int | None = None
    output_type: Any = None  # a type's name (looked up in the tools) or, from Python, the type itself

    @property
    def key(self) -> str:
        """The id as JSON text: `1` and `"1"` are different ids."""
        return json.dumps(self.id)


# -- reading and checking the items -------------------------------------------------------------------------------
Problem = tuple[int | None, str]  # (line or item number, what is wrong there)
Named = tuple[int | None, str | None, Any]  # (line or item number, the id as JSON text, the output_type it names)


def read_items(
    path: str | os.PathLike[str], *, conversation: BatchSettings | ConversationFactory | None = None
) -> list[BatchItem]:
    """The items of a JSONL file; `BatchInputError` lists every problem of every line at once (not JSON or nested
    too deep, no id, duplicate id, neither or both of prompt and messages, messages not in OpenAI chat shape, a bad
    tool_choice, and with `conversation` an output_type that names no type), `ConfigurationError` when the file
    cannot be read or the settings cannot work (`BatchSettings.check`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot read batch input {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"batch input {path} is not UTF-8 text: {exc}") from None
    rows: list[tuple[int, object]] = []
    problems: list[Problem] = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        too_big = structure_problem(line)  # before json.loads can recurse
        if too_big is not None:
            problems.append((number, too_big))
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            problems.append((number, f"not JSON ({exc.msg} at column {exc.colno})"))
    return _checked(rows, problems, str(path), "line", conversation)


def check_items(
    items: Iterable[BatchItem | Mapping[str, Any]], *, conversation: BatchSettings | ConversationFactory | None = None
) -> list[BatchItem]:
    """Items given in Python (dicts as in the input file, or `BatchItem`s), checked as `read_items` checks lines;
    problems name the item's position (`item 3`)."""
    return _checked(list(enumerate(items, 1)), [], "batch items", "item", conversation)


def _checked(
    rows: list[tuple[int, object]], problems: list[Problem], source: str, where: str,
    conversation: BatchSettings | ConversationFactory | None,
) -> list[BatchItem]:
    """The rows' items, or one `BatchInputError` with every problem of every row: its shape, a duplicate id and,
    with `conversation`, the output_type it names (bad rows' names too)."""
    items: list[BatchItem] = []
    named: list[Named] = []
    first_seen: dict[str, int] = {}
    for number, data in rows:
        item, found = (data, []) if isinstance(data, BatchItem) else _item(data, number)
        key = _id_key(data)
        if key is not None and key in first_seen:
            found.insert(0, f"duplicate id {key} (first at {where} {first_seen[key]})")
        elif key is not None:
            first_seen[key] = number
        problems += [(number, problem) for problem in found]
        output_type = _named_output_type(data)
        if output_type is not None:
            named.append((number, key, output_type))
        if item is not None and not found:
            items.append(item)
    if conversation is not None:
        problems += _output_type_problems(named, _checked_tools(conversation, named), where)[1]
    if problems:
        raise BatchInputError(source, _numbered(problems, where), bad_items=_bad_items(problems))
    return items


def _numbered(problems: list[Problem], where: str) -> list[str]:
    """`line N: ...` for each problem, in line order (a line's own problems in the order found)."""
    ordered = sorted(problems, key=lambda problem: -1 if problem[0] is None else problem[0])
    return [text if number is None else f"{where} {number}: {text}" for number, text in ordered]


def _bad_items(problems: list[Problem]) -> int:
    return len({number for number, _ in problems if number is not None}) + sum(n is None for n, _ in problems)


def _id_key(data: object) -> str | None:
    if isinstance(data, BatchItem):
        return data.key
    if not isinstance(data, dict) or _id_problem(data) is not None:
        return None
    return json.dumps(data["id"])


def _named_output_type(data: object) -> Any:
    """The output_type a row asks for, when it has the shape of one (its shape is a problem of its own)."""
    output_type = data.output_type if isinstance(data, BatchItem) else (
        data.get("output_type") if isinstance(data, dict) else None)
    return output_type if _output_type_problem(output_type) is None else None


def _item(data: object, line: int) -> tuple[BatchItem | None, list[str]]:
    """The item `data` describes, or every problem it has."""
    if not isinstance(data, dict):
        return None, [f"expected a JSON object, got {type(data).__name__}"]
    id_problem = _id_problem(data)
    label = "" if id_problem else f"id {json.dumps(data['id'])}: "
    checks = (_content_problem(data), _tool_choice_problem(data.get("tool_choice")),
              _output_type_problem(data.get("output_type")))
    problems = ([id_problem] if id_problem else []) + [label + problem for problem in checks if problem]
    if problems:
        return None, problems
    messages = [dict(message) for message in data["messages"]] if "messages" in data else None
    return BatchItem(data["id"], data.get("prompt"), messages, data.get("tool_choice"), line,
                     data.get("output_type")), []


def _id_problem(data: dict[str, Any]) -> str | None:
    if "id" not in data:
        return 'no "id"'
    item_id = data["id"]
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
        return f'"id" must be a string or an integer, got {json.dumps(item_id)}'
    return None


def _content_problem(data: dict[str, Any]) -> str | None:
    if ("prompt" in data) == ("messages" in data):
        both = "prompt" in data
        return 'has both "prompt" and "messages"; give one' if both else 'needs "prompt" (text) or "messages" (a list)'
    if "prompt" in data:
        prompt = data["prompt"]
        return None if isinstance(prompt, str) and prompt.strip() else '"prompt" must be non-empty text'
    messages = data["messages"]
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list of messages'
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            return f'"messages"[{index}] must be an object with "role" one of {", ".join(sorted(_ROLES))}'
    return schema_problem({"messages": messages})  # a saved conversation's shape: "messages[2].tool_calls: ..."


def _output_type_problem(output_type: object) -> str | None:
    if output_type is None or (isinstance(output_type, str) and output_type.strip()):
        return None
    if not isinstance(output_type, (str, int, float, bool, list, dict)):
        return None  # given from Python: a type itself, checked when it is resolved
    return '"output_type" must be the name of a type (defined in the tools, or str, int, float, bool)'


def _tool_choice_problem(choice: object) -> str | None:
    if choice is None or choice in _NAMED_CHOICES:
        return None
    if isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        return None
    return '"tool_choice" must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}'


# -- the types items answer in ------------------------------------------------------------------------------------
def resolve_output_types(
    items: Iterable[BatchItem], tools: Iterable[str], *, source: str = "batch input", where: str = "line"
) -> dict[str, Any]:
    """The types the items name as `output_type`: classes defined (not imported) in the tools files or modules,
    then str, int, float and bool. A name found nowhere, bound to anything else (a function, an imported class, a
    value) or to a type with no JSON schema, and a Python `output_type` that is no type, is a `BatchInputError`
    that names the first item asking for it (and the others)."""
    named = [(item.line, item.key, item.output_type) for item in items if item.output_type is not None]
    found, problems = _output_type_problems(named, tuple(tools), where)
    if problems:
        raise BatchInputError(source, _numbered(problems, where), bad_items=_bad_items(problems))
    return found


def check_batch(
    items: Iterable[BatchItem], conversation: BatchSettings | ConversationFactory, *, source: str = "batch items",
    where: str = "item",
) -> None:
    """Refuse a run before anything is sent or written: settings that cannot work (`BatchSettings.check`) and
    output types that name nothing (`resolve_output_types`; with a factory, only str, int, float, bool)."""
    items = list(items)
    named = [(item.line, item.key, item.output_type) for item in items if item.output_type is not None]
    resolve_output_types(items, _checked_tools(conversation, named), source=source, where=where)


def _checked_tools(conversation: BatchSettings | ConversationFactory, named: Iterable[Named]) -> tuple[str, ...]:
    """The tools files or modules to look output types up in, once the settings are checked (a file of types
    only is taken when an item names one of its types); a factory has none."""
    if not isinstance(conversation, BatchSettings):
        return ()
    conversation.check(output_types={output_type for _, _, output_type in named if isinstance(output_type, str)})
    return conversation.tools


def _output_type_problems(
    named: Iterable[Named], tools: tuple[str, ...], where: str
) -> tuple[dict[str, Any], list[Problem]]:
    """The types found by name, and the problems: a name that resolves to no type is one problem, at the first
    row naming it (listing the others), a Python output_type that is no type one problem per row."""
    found: dict[str, Any] = {}
    refused: dict[str, tuple[str, list[tuple[int | None, str | None]]]] = {}  # name -> (why, rows naming it)
    problems: list[Problem] = []
    for number, key, output_type in named:
        label = f"id {key}: " if key is not None else ""
        try:
            if not isinstance(output_type, str):
                TypedAnswer(output_type)  # a type given from Python: a function or an instance is refused now
            elif output_type in refused:
                refused[output_type][1].append((number, key))
            elif output_type not in found:
                found[output_type] = _output_type(output_type, tools)
        except ConfigurationError as exc:
            if not isinstance(output_type, str):
                problems.append((number, f"{label}{exc}"))
            else:
                refused[output_type] = (str(exc), [(number, key)])
    for why, rows in refused.values():
        (number, key), others = rows[0], [row for row, _ in rows[1:] if row is not None]
        problems.append((number, f"{'' if key is None else f'id {key}: '}{why}{_also_named(others, where)}"))
    return found, problems


def _also_named(numbers: list[int], where: str, shown: int = 5) -> str:
    """` (lines 4, 9 name it too)`: the other rows naming a type that is refused; empty without any."""
    if not numbers:
        return ""
    listed = ", ".join(str(number) for number in numbers[:shown])
    listed += f" and {len(numbers) - shown} more" if len(numbers) > shown else ""
    return f" ({where} {listed} names it too)" if len(numbers) == 1 else f" ({where}s {listed} name it too)"


def _output_type(name: str, tools: tuple[str, ...]) -> Any:
    """The class a tools file or module defines by that name, else the builtin scalar; an input line must never
    reach a function (pydantic would call it with the model's answer) or a class imported into the tools."""
    try:
        output_type: Any = find_answer_type(tools, name)
    except LookupError:
        if name not in _BUILTIN_TYPES:
            raise ConfigurationError(
                f"output_type {name!r} is defined in none of the tools ({', '.join(tools) or 'none given'}) and is "
                "not str, int, float or bool"
            ) from None
        output_type = _BUILTIN_TYPES[name]
    TypedAnswer(output_type)  # something with no JSON schema is refused before anything runs
    return output_type
