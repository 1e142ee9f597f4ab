"""Batch runs: many independent conversations, one per input item, answered concurrently and written as JSONL.

Input, one JSON object a line (blank lines are ignored):

    {"id": "q1", "prompt": "What is the weather in Istanbul?"}
    {"id": 2, "messages": [{"role": "user", "content": "..."}], "tool_choice": "required"}

`id` is a string or an integer, unique in the input; an item has `prompt` (the user's message) or `messages` (a
chat to continue: OpenAI message dicts; the settings' system message goes first unless they start with one), never
both; `tool_choice` is optional (for the item's first model turn, as `Conversation` applies it); `output_type`
(optional) names a class defined (not imported) in one of the tools files or modules (a pydantic model, a
dataclass, a TypedDict, a NamedTuple or an Enum) or one of `str`, `int`, `float`, `bool`, and nothing else (never
a function: pydantic would call it with the model's answer): the item is answered as a typed answer
(`submit(output_type=...)`) and `answer` is that value as JSON; a tools file may define only such types (no
tools) when items name them. Any bad item refuses the whole run before anything is written or sent, with one
`BatchInputError` that lists every problem of every line (its shape, a duplicate id, an output_type that names no
type) with its line number.

Output, one JSON object a line per item, in the order items finish:

    {"id", "answer", "error", "usage", "seconds", "messages"}

`error` is null for an answer; for a failed item (the server failed, the run hit `max_turns`, ...) it is
`{"type", "message"}` and `answer` is null. A failed item never stops the batch; faults the model can fix (a tool
that raised, bad arguments) are not failures, the model reads them as tool messages as usual.

The output is never the input file (`refuse_output_as_input` compares the files, not their names; an output
whose lines are input items is refused too).

Resume: with an output file that exists, ids answered there are skipped and new lines are appended; ids that
*failed* there are tried again (their old lines are removed first), so a finished file holds each id once. One
writer appends each line with one write; a last line cut short by a killed run is cut away by the next run. One run
at a time writes an output: a run holds a lock on `OUTPUT.lock` beside it (an empty file, left in place), and a
second run on the same output is refused at once.

    from functionary_agent.batch import BatchSettings, read_items, run_batch

    summary = run_batch(read_items("questions.jsonl"), "answers.jsonl", conversation=BatchSettings(
        tools=("examples/weather.py",), base_url="http://127.0.0.1:8000/v1"), concurrency=16)

`functionary_agent.batch.ray` runs the same items on a Ray cluster. Not imported by
`import functionary_agent`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from functionary_agent import _sync
from functionary_agent._run.answers import TypedAnswer
from functionary_agent._saved import schema_problem, structure_problem
from functionary_agent.conversation import Conversation
from functionary_agent.errors import ConfigurationError, ToolDefinitionError
from functionary_agent.integrations.tool_files import answer_type_names, find_answer_type, load_tools
from functionary_agent.models import check_model_choice, resolve_model
from functionary_agent.models.base import ChatModel, ToolChoice
from functionary_agent.tools import Tool

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, one run per output file is then up to the user
    fcntl = None  # type: ignore[assignment]

Record = dict[str, Any]
ConversationFactory = Callable[[], Conversation]
MAX_PROBLEMS_SHOWN = 20
_ROLES = frozenset({"system", "user", "assistant", "tool"})
_NAMED_CHOICES = frozenset({"auto", "none", "required"})
_BUILTIN_TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}


class BatchInputError(ConfigurationError):
    """The batch input has bad items; `problems` lists every problem (`line N: ...`, a line may have several),
    the message the first 20; `bad_items` counts the items they are on (by default one each)."""

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


@dataclass
class BatchSummary:
    """What a batch run did: `total` items given, `skipped` (answered in the output already), and this run's
    `answered` and `failed` items."""

    total: int
    skipped: int
    answered: int
    failed: int
    seconds: float


# -- input ---------------------------------------------------------------------------------------------------
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


def refuse_output_as_input(input_path: str | os.PathLike[str], output_path: str | os.PathLike[str]) -> None:
    """`ConfigurationError` when the output names the input file, by any name (a link, another path): the run
    would read its own items as answered results. Compared by file identity, not by name."""
    try:
        same = os.path.samefile(input_path, output_path)
    except OSError:  # one of them does not exist (yet): not the same file
        return
    if same:
        suggestion = Path(input_path).with_name(Path(input_path).stem + ".answers.jsonl")
        alias = "" if str(output_path) == str(input_path) else f" (the same file as {input_path})"
        raise ConfigurationError(
            f"--output {output_path} is the batch input{alias}; give the results a file of their own, e.g. "
            f"--output {suggestion}"
        )


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


# -- how each conversation is made ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchSettings:
    """How each item's conversation is made, as plain data (so Ray workers can make the same ones): tools files or
    modules as `--tools` takes them, the server (`base_url`, else `FUNCTIONARY_BASE_URL`, else the embedded
    engine), `model` (a name on the server, or a GGUF file), `format` (of a GGUF), `system`, `max_turns`.
    Every conversation of a run shares one model object (one connection pool; the embedded engine serialises
    its turns by itself)."""

    tools: tuple[str, ...] = ()
    base_url: str | None = None
    model: str | None = None
    format: str | None = None
    system: str | None = None
    max_turns: int = 10
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        tools = (self.tools,) if isinstance(self.tools, str) else tuple(self.tools)
        object.__setattr__(self, "tools", tools)  # a list or one name given: still a tuple of names

    def resolved(self) -> BatchSettings:
        """These settings with the server, model name and key filled in from `FUNCTIONARY_BASE_URL`,
        `FUNCTIONARY_MODEL` and `FUNCTIONARY_API_KEY` here, for workers whose environment may lack them."""
        base_url = self._base_url()
        if not base_url:
            return self
        return dataclasses.replace(
            self, base_url=base_url, model=self.model or os.environ.get("FUNCTIONARY_MODEL") or None,
            api_key=self.api_key or os.environ.get("FUNCTIONARY_API_KEY") or None,
        )

    def load_tools(self) -> list[Tool]:
        """The tools of every file or module named (a file that defines only types to answer in gives none);
        `ConfigurationError` / `ToolDefinitionError` as `--tools`."""
        return [tool for spec in self.tools for tool in load_tools(spec, types_file_ok=True)]

    def check(self, output_types: Collection[str] = ()) -> None:
        """Refuse settings that cannot work before any item runs: tools that do not load or share a name, a tools
        file that defines neither tools nor one of the `output_types` (the type names items answer in), an
        engine choice that cannot work (`check_model_choice`: a model name with no server, a format for a server),
        max_turns below 1."""
        if self.max_turns < 1:
            raise ConfigurationError(f"max_turns must be at least 1, got {self.max_turns}")
        check_model_choice(self.model, base_url=self._base_url(), format=self.format)  # as Conversation and the CLI
        names = [tool.name for spec in self.tools for tool in _tools_or_types(spec, output_types)]
        clashes = sorted({name for name in names if names.count(name) > 1})
        if clashes:
            raise ToolDefinitionError(f"more than one tool is named {', '.join(clashes)}; rename all but one")

    @contextlib.asynccontextmanager
    async def conversations(self) -> AsyncIterator[ConversationFactory]:
        """A factory of fresh conversations over one shared model, closed when the block ends."""
        tools = self.load_tools()
        model, owned = self._model()
        try:
            yield lambda: Conversation(model, tools=tools, system=self.system, max_turns=self.max_turns)
        finally:
            if owned:
                await model.aclose()

    def _base_url(self) -> str | None:
        return self.base_url or os.environ.get("FUNCTIONARY_BASE_URL") or None

    def _model(self) -> tuple[ChatModel, bool]:
        return resolve_model(self.model, base_url=self._base_url(), api_key=self.api_key, format=self.format)


def _tools_or_types(spec: str, output_types: Collection[str]) -> list[Tool]:
    """The tools of `spec`; none for a file of types only that the items use (one they do not use is refused)."""
    tools = load_tools(spec, types_file_ok=True)
    defined = answer_type_names(spec) if not tools else []
    if not tools and not set(defined) & set(output_types):
        raise ToolDefinitionError(
            f"{spec} defines no public functions and no @tool functions, only types ({', '.join(defined)}) that no "
            'item names as its "output_type"'
        )
    return tools


# -- output --------------------------------------------------------------------------------------------------
class BatchOutput:
    """The batch's output JSONL: read when opened (a half-written last line is cut away), then appended to a whole
    line at a time by `write`. Use as a context manager.

    One run at a time: opening takes an exclusive lock on `lock_path` (the output's name + ".lock", beside it) and
    holds it until the block ends, the rewrite that drops retried failures included. The lock file is never
    replaced or removed (the output is, by that rewrite), so every run contends for the same file; it is empty and
    stays after the run. `answered` and `failed` count this run's lines; `cut_bytes` is what opening cut off a
    killed run's last line."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.answered = self.failed = self.cut_bytes = 0
        self._file: Any = None
        self._lock: int | None = None  # the lock file's descriptor while this run holds it
        self._lines: list[tuple[str, bool, bytes]] = []  # (id key, answered?, the line) as read on open
        self._answered_keys: set[str] = set()

    def __enter__(self) -> BatchOutput:
        self._lock = _hold_lock(self.lock_path, self.path)
        try:
            try:
                self._file = open(self.path, "a+b", buffering=0)  # closed in __exit__
            except OSError as exc:
                raise ConfigurationError(f"cannot open batch output {self.path}: {exc.strerror or exc}") from None
            self._read_existing()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._close()

    def _close(self) -> None:
        """The output first, then the lock: another run may open the file only once this one is done with it."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def pending(self, items: Iterable[BatchItem]) -> list[BatchItem]:
        """The items still to run: not answered in the file. Lines of earlier failures of these items are removed
        now (atomically), so their new lines do not duplicate them."""
        todo = [item for item in items if item.key not in self._answered_keys]
        retried = {item.key for item in todo}
        kept = [(key, answered, line) for key, answered, line in self._lines if answered or key not in retried]
        if len(kept) < len(self._lines):
            self._rewrite(b"".join(line for _, _, line in kept))
            self._lines = kept
        return todo

    def write(self, record: Record) -> bool:
        """Append one result as one whole line; False (nothing written) when its id is answered in the file
        already, as when a retried Ray shard sends an item again."""
        key = json.dumps(record["id"])
        if key in self._answered_keys:
            return False
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        view = memoryview(line)
        while view:  # one write() in practice; a short write of a huge line is finished, never interleaved
            view = view[os.write(self._file.fileno(), view) :]
        if record.get("error") is None:
            self._answered_keys.add(key)
            self.answered += 1
        else:
            self.failed += 1
        return True

    def _read_existing(self) -> None:
        self._file.seek(0)
        data = self._file.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a run killed mid-write: the partial line goes
            self._file.truncate(end)
            self.cut_bytes, data = len(data) - end, data[:end]
        for number, line in enumerate(data.splitlines(keepends=True), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key, answered = json.dumps(record["id"]), record.get("error") is None
            except (ValueError, TypeError, KeyError):
                raise ConfigurationError(
                    f"{self.path} line {number} is not a batch result; give another output file or remove the line"
                ) from None
            if "answer" not in record and ("prompt" in record or "messages" in record):
                raise ConfigurationError(
                    f"{self.path} line {number} is a batch input item, not a result (is it the input file?); give "
                    "the results a file of their own"
                )
            self._lines.append((key, answered, line))
            if answered:
                self._answered_keys.add(key)

    def _rewrite(self, content: bytes) -> None:
        """Replace the file's content: written beside it, synced, then renamed over it (the lock file stays)."""
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        replacement = os.fdopen(handle, "a+b", buffering=0)
        try:
            replacement.write(content)
            os.fsync(replacement.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            replacement.close()
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        self._file.close()
        self._file = replacement


def _hold_lock(lock_path: Path, output: Path) -> int | None:
    """The descriptor of `lock_path`, created if need be and locked for this process (None without `fcntl`);
    `ConfigurationError` when another run holds it or it cannot be opened."""
    if fcntl is None:
        return None
    try:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigurationError(f"cannot open batch output {output}: {lock_path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise ConfigurationError(
            f"{output} is being written by another batch run (it holds {lock_path}); wait for it to finish or "
            "stop it, or give another output file"
        ) from None
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


# -- running -------------------------------------------------------------------------------------------------
async def answer_item(
    item: BatchItem, make_conversation: ConversationFactory, output_types: Mapping[str, Any] | None = None
) -> Record:
    """Run one item on a fresh conversation: its output record, with `error` set when it failed. `output_types`
    maps the items' `output_type` names to types (`resolve_output_types`)."""
    started = time.perf_counter()
    chat: Conversation | None = None
    answer: Any = None
    error: dict[str, str] | None = None
    try:
        output_type = _type_of(item, output_types or {})
        chat = make_conversation()
        if item.tool_choice is not None:
            chat.tool_choice = item.tool_choice
        if item.messages is not None:
            given = [dict(message) for message in item.messages]
            chat.messages = given if given[0]["role"] == "system" else [*chat.messages, *given]
        if output_type is None:
            answer = await chat.asubmit(item.prompt)
        else:
            answer = _as_json(output_type, await chat.asubmit(item.prompt, output_type=output_type))
    except Exception as exc:  # a failed item is a line in the output, never the end of the batch
        error = {"type": type(exc).__name__, "message": str(exc)}
    finally:
        if chat is not None:
            with contextlib.suppress(Exception):
                await chat.aclose()
    usage = getattr(chat, "last_usage", None)
    return {
        "id": item.id, "answer": answer, "error": error, "usage": usage.to_dict() if usage is not None else None,
        "seconds": round(time.perf_counter() - started, 3), "messages": _messages(item, chat),
    }


def _type_of(item: BatchItem, output_types: Mapping[str, Any]) -> Any:
    if not isinstance(item.output_type, str):
        return item.output_type
    if item.output_type not in output_types:
        raise ConfigurationError(f"output_type {item.output_type!r} was not resolved (resolve_output_types)")
    return output_types[item.output_type]


def _as_json(output_type: Any, value: Any) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(output_type).dump_python(value, mode="json")


def failure_record(item: BatchItem, kind: str, message: str) -> Record:
    """The record of an item that never ran to an end (its worker died, say)."""
    return {"id": item.id, "answer": None, "error": {"type": kind, "message": message}, "usage": None,
            "seconds": 0.0, "messages": _messages(item, None)}


def _messages(item: BatchItem, chat: Conversation | None) -> list[dict[str, Any]]:
    if chat is not None:
        return chat.messages
    return item.messages if item.messages is not None else [{"role": "user", "content": item.prompt}]


async def answer_items(
    items: Iterable[BatchItem], make_conversation: ConversationFactory, concurrency: int,
    deliver: Callable[[Record], object], output_types: Mapping[str, Any] | None = None,
) -> None:
    """Answer every item, at most `concurrency` at once, handing each record to `deliver` as it is done. A fixed
    pool of `concurrency` workers takes the next item as one frees up: a million items cost `concurrency` tasks.
    Cancelling this cancels the items under way; delivered ones stay delivered."""
    if concurrency < 1:
        raise ConfigurationError(f"concurrency must be at least 1, got {concurrency}")
    next_items: Iterator[BatchItem] = iter(items)  # shared: each worker takes the next (one thread, no race)

    async def work() -> None:
        for item in next_items:
            deliver(await answer_item(item, make_conversation, output_types))

    workers = [asyncio.ensure_future(work()) for _ in range(concurrency)]
    try:
        await asyncio.gather(*workers)
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


async def arun_batch(
    items: Iterable[BatchItem | Mapping[str, Any]],
    output: str | os.PathLike[str],
    *,
    conversation: BatchSettings | ConversationFactory,
    concurrency: int = 16,
    on_result: Callable[[Record], object] | None = None,
) -> BatchSummary:
    """Run every item not answered in `output` yet, `concurrency` at a time, appending a line per item (see the
    module's docstring for the formats and the resume rule). `conversation` makes each item's conversation:
    `BatchSettings`, or any function returning a fresh `Conversation` (its model is yours to close).
    `on_result(record)` is called after each line is written. Bad items raise `BatchInputError` before anything
    runs; failed items are counted in the summary, never raised."""
    checked = check_items(items, conversation=conversation)
    started = time.perf_counter()
    with BatchOutput(output) as out:
        todo = out.pending(checked)

        def deliver(record: Record) -> None:
            if out.write(record) and on_result is not None:
                on_result(record)

        await answer_all(todo, conversation, concurrency, deliver)
    return BatchSummary(len(checked), len(checked) - len(todo), out.answered, out.failed,
                        time.perf_counter() - started)


def run_batch(
    items: Iterable[BatchItem | Mapping[str, Any]],
    output: str | os.PathLike[str],
    *,
    conversation: BatchSettings | ConversationFactory,
    concurrency: int = 16,
    on_result: Callable[[Record], object] | None = None,
) -> BatchSummary:
    """`arun_batch` from sync code (Jupyter included)."""
    return _sync.run(
        arun_batch(items, output, conversation=conversation, concurrency=concurrency, on_result=on_result)
    )


async def answer_all(
    items: Iterable[BatchItem], conversation: BatchSettings | ConversationFactory, concurrency: int,
    deliver: Callable[[Record], object],
) -> None:
    """`answer_items` with conversations from `BatchSettings` (their model closed at the end) or a factory; the
    items' output types are looked up in the settings' tools (a factory: str, int, float, bool only)."""
    items = list(items)
    tools = conversation.tools if isinstance(conversation, BatchSettings) else ()
    output_types = resolve_output_types(items, tools)
    if isinstance(conversation, BatchSettings):
        async with conversation.conversations() as make:
            await answer_items(items, make, concurrency, deliver, output_types)
    else:
        await answer_items(items, conversation, concurrency, deliver, output_types)


# -- the command line's progress line ---------------------------------------------------------------------------
class TerminalProgress:
    """Done / failed / rate / time left for the command line, drawn by rich on a terminal; with `live` False it
    shows nothing. Call it with each record as it is written."""

    def __init__(self, total: int, *, live: bool, out: TextIO) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self._started = time.perf_counter()
        self._bar: Any = None
        self._task: Any = None
        if live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[failed]} failed"),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=Console(file=out),
            )
            self._task = self._bar.add_task("batch", total=total, failed=0, rate="")

    def __enter__(self) -> TerminalProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, record: Record) -> None:
        self.done += 1
        self.failed += record.get("error") is not None
        if self._bar is not None:
            rate = self.done / max(time.perf_counter() - self._started, 1e-9)
            self._bar.update(self._task, advance=1, failed=self.failed, rate=f"{rate:,.1f} items/s")
