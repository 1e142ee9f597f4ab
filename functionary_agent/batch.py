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
(`submit(output_type=...)`) and `answer` is that value as JSON. Any bad item refuses the whole run
(`BatchInputError`, listing the problems with their line numbers) before anything is written or sent.

Output, one JSON object a line per item, in the order items finish:

    {"id", "answer", "error", "usage", "seconds", "messages"}

`error` is null for an answer; for a failed item (the server failed, the run hit `max_turns`, ...) it is
`{"type", "message"}` and `answer` is null. A failed item never stops the batch; faults the model can fix (a tool
that raised, bad arguments) are not failures, the model reads them as tool messages as usual.

Resume: with an output file that exists, ids answered there are skipped and new lines are appended; ids that
*failed* there are tried again (their old lines are removed first), so a finished file holds each id once. One
writer appends each line with one write; a last line cut short by a killed run is cut away by the next run. One run
at a time writes an output: a run holds a lock on `OUTPUT.lock` beside it (an empty file, left in place), and a
second run on the same output is refused at once.

    from functionary_agent.batch import BatchSettings, read_items, run_batch

    summary = run_batch(read_items("questions.jsonl"), "answers.jsonl", conversation=BatchSettings(
        tools=("examples/weather.py",), base_url="http://127.0.0.1:8000/v1"), concurrency=16)

`functionary_agent.integrations.ray_batch` runs the same items on a Ray cluster. Not imported by
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
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from functionary_agent import _sync
from functionary_agent._answers import TypedAnswer
from functionary_agent._saved import schema_problem, structure_problem
from functionary_agent._tool_files import find_answer_type, load_tools
from functionary_agent.conversation import Conversation
from functionary_agent.errors import ConfigurationError, ToolDefinitionError
from functionary_agent.models import embedded_model
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
    """The batch input has bad items; `problems` lists every one (`line N: ...`), the message the first 20."""

    def __init__(self, source: str, problems: list[str]) -> None:
        shown = "\n".join(f"  {problem}" for problem in problems[:MAX_PROBLEMS_SHOWN])
        more = len(problems) - MAX_PROBLEMS_SHOWN
        super().__init__(
            f"{source}: {len(problems)} bad item{'s' if len(problems) != 1 else ''}, nothing was run:\n{shown}"
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
def read_items(path: str | os.PathLike[str]) -> list[BatchItem]:
    """The items of a JSONL file; `BatchInputError` lists every bad line (not JSON or nested too deep, no id,
    duplicate id, neither or both of prompt and messages, messages not in OpenAI chat shape, a bad tool_choice),
    `ConfigurationError` when the file cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot read batch input {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"batch input {path} is not UTF-8 text: {exc}") from None
    rows: list[tuple[int, object]] = []
    problems: list[str] = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        too_big = structure_problem(line)  # before json.loads can recurse
        if too_big is not None:
            problems.append(f"line {number}: {too_big}")
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not JSON ({exc.msg} at column {exc.colno})")
    return _checked(rows, problems, str(path), "line")


def check_items(items: Iterable[BatchItem | Mapping[str, Any]]) -> list[BatchItem]:
    """Items given in Python (dicts as in the input file, or `BatchItem`s), checked as `read_items` checks lines;
    problems name the item's position (`item 3`)."""
    return _checked(list(enumerate(items, 1)), [], "batch items", "item")


def _checked(rows: list[tuple[int, object]], problems: list[str], source: str, where: str) -> list[BatchItem]:
    items: list[BatchItem] = []
    first_seen: dict[str, int] = {}
    for number, data in rows:
        item = data if isinstance(data, BatchItem) else _item(data, number)
        if isinstance(item, str):
            problems.append(f"{where} {number}: {item}")
            continue
        if item.key in first_seen:
            problems.append(f"{where} {number}: duplicate id {item.key} (first at {where} {first_seen[item.key]})")
            continue
        first_seen[item.key] = number
        items.append(item)
    if problems:
        problems.sort(key=lambda problem: int(problem.split(":")[0].split()[-1]))
        raise BatchInputError(source, problems)
    return items


def _item(data: object, line: int) -> BatchItem | str:
    """The item `data` describes, or what is wrong with it."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    if "id" not in data:
        return 'no "id"'
    item_id = data["id"]
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
        return f'"id" must be a string or an integer, got {json.dumps(item_id)}'
    if ("prompt" in data) == ("messages" in data):
        both = "prompt" in data
        return f'id {json.dumps(item_id)}: ' + ('has both "prompt" and "messages"; give one' if both
                                                else 'needs "prompt" (text) or "messages" (a list)')
    problem = (_content_problem(data) or _tool_choice_problem(data.get("tool_choice"))
               or _output_type_problem(data.get("output_type")))
    if problem:
        return f"id {json.dumps(item_id)}: {problem}"
    messages = [dict(message) for message in data["messages"]] if "messages" in data else None
    return BatchItem(item_id, data.get("prompt"), messages, data.get("tool_choice"), line, data.get("output_type"))


def _content_problem(data: dict[str, Any]) -> str | None:
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
    that names the first item asking for it."""
    tools = tuple(tools)
    found: dict[str, Any] = {}
    problems: list[str] = []
    for item in items:
        name = item.output_type
        try:
            if isinstance(name, str) and name not in found:
                found[name] = None  # one problem per name, at the first item asking for it
                found[name] = _output_type(name, tools)
            elif name is not None and not isinstance(name, str):
                TypedAnswer(name)  # a type given from Python: a function or an instance is refused now
        except ConfigurationError as exc:
            at = f"{where} {item.line}: " if item.line is not None else ""
            problems.append(f"{at}id {item.key}: {exc}")
    if problems:
        raise BatchInputError(source, problems)
    return found


def check_batch(
    items: Iterable[BatchItem], conversation: BatchSettings | ConversationFactory, *, source: str = "batch items",
    where: str = "item",
) -> None:
    """Refuse a run before anything is sent or written: settings that cannot work (`BatchSettings.check`) and
    output types that name nothing (`resolve_output_types`; with a factory, only str, int, float, bool)."""
    tools: tuple[str, ...] = ()
    if isinstance(conversation, BatchSettings):
        conversation.check()
        tools = conversation.tools
    resolve_output_types(items, tools, source=source, where=where)


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
        """The tools of every file or module named; `ConfigurationError` / `ToolDefinitionError` as `--tools`."""
        return [tool for spec in self.tools for tool in load_tools(spec)]

    def check(self) -> None:
        """Refuse settings that cannot work before any item runs: tools that do not load or share a name, a
        format for a server, max_turns below 1."""
        if self.max_turns < 1:
            raise ConfigurationError(f"max_turns must be at least 1, got {self.max_turns}")
        if self.format and self._base_url():
            raise ConfigurationError("format applies to a GGUF model run in-process, not to a server (base_url)")
        names = [tool.name for tool in self.load_tools()]
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
        base_url = self._base_url()
        if base_url:
            from functionary_agent.models.openai_compatible import OpenAICompatibleModel

            return OpenAICompatibleModel(self.model, base_url=base_url, api_key=self.api_key), True
        if self.model is not None and not (self.model.endswith(".gguf") or os.path.isfile(self.model)):
            raise ConfigurationError(
                f"model {self.model!r} is not a GGUF file; to use a model on a server pass base_url (--base-url) "
                "or set FUNCTIONARY_BASE_URL"
            )
        return embedded_model(self.model, self.format), False


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
    checked = check_items(items)
    check_batch(checked, conversation)
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
