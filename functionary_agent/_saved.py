"""Saved conversations: the file `Conversation.save` writes and `Conversation.load` reads, checked against one schema.

A saved file is `{"format": "functionary-agent/conversation", "version": 1, "messages": [...]}` (a bare list of
messages is read too). Messages are the OpenAI chat dicts the loop keeps: `role` one of system, user, assistant,
tool; `content` text, null or a list of parts (objects with a string `type`; a text part has a string `text`, an
image part an `image_url` with a string `url`); an assistant's `tool_calls` a list of
`{"id", "type": "function", "function": {"name", "arguments"}}`, all strings; a tool message's `tool_call_id`; an
optional `name`. Keys we do not know are kept as they are (the loop never reads them; a server may): they are
plain JSON, within the limits below.

A file is untrusted input: it is read only when it is a regular file of at most `MAX_SAVED_BYTES`, its structure
is measured before JSON parsing can recurse (at most `MAX_DEPTH` levels, `MAX_BRACKETS` brackets), and every
problem is a `ConfigurationError` naming the JSON path of the first one (`messages[3].tool_calls: expected a
list`), so a hostile file can neither crash a chat nor load and break it later. `save` checks the messages the
same way (a file it writes always loads) and writes atomically: a temporary file beside the target, synced, then
renamed over it and the folder synced, so a process killed at any point (or a power cut) leaves the old file or
the new one, whole. A save killed mid-write leaves its temporary file (`.NAME.<hex>.saving.tmp`); the next save
to NAME removes it (each save holds a lock on its own temporary file, which the kernel drops when it dies).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic_core import PydanticCustomError

from functionary_agent.errors import ConfigurationError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so a killed save's temporary file stays until removed by hand
    fcntl = None  # type: ignore[assignment]

SAVE_FORMAT: Literal["functionary-agent/conversation"] = "functionary-agent/conversation"
SAVE_VERSION: Literal[1] = 1
MAX_SAVED_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 64  # our own messages nest 6 levels deep (file, messages, message, tool_calls, call, function)
MAX_BRACKETS = 2_000_000  # outside strings: a few per message, so hundreds of thousands of messages
_ROLES = ("system", "user", "assistant", "tool")
_TAG = "#"  # union branches are tagged "#..." so that error paths can leave them out
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)  # to the end if unclosed: linear
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")


# -- the schema ------------------------------------------------------------------------------------------------
class _Open(pydantic.BaseModel):
    """Strict types (no "5" for 5, no 5 for "5"), unknown keys kept."""

    model_config = pydantic.ConfigDict(strict=True, extra="allow")


class _Function(_Open):
    name: str
    arguments: str


class _ToolCall(_Open):
    id: str
    type: Literal["function"]
    function: _Function


class _ImageURL(_Open):
    url: str


class _TextPart(_Open):
    type: Literal["text"]
    text: str


class _ImagePart(_Open):
    type: Literal["image_url"]
    image_url: _ImageURL


class _OtherPart(_Open):
    """A part of another type (audio, a file, ...): servers differ in what they take, so only its type is read."""

    type: str


def _part_kind(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else None
    if not isinstance(kind, str):
        return None
    return f"{_TAG}{kind}" if kind in ("text", "image_url") else f"{_TAG}other"


_Part = Annotated[
    Annotated[_TextPart, pydantic.Tag(f"{_TAG}text")] | Annotated[_ImagePart, pydantic.Tag(f"{_TAG}image_url")]
    | Annotated[_OtherPart, pydantic.Tag(f"{_TAG}other")],
    pydantic.Discriminator(
        _part_kind, custom_error_type="saved_part", custom_error_message='expected an object with a string "type"'
    ),
]


def _content_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return f"{_TAG}text"
    return f"{_TAG}parts" if isinstance(value, list) else None


_Content = Annotated[
    Annotated[str, pydantic.Tag(f"{_TAG}text")] | Annotated[list[_Part], pydantic.Tag(f"{_TAG}parts")],
    pydantic.Discriminator(
        _content_kind, custom_error_type="saved_content", custom_error_message="expected text, null or a list of parts"
    ),
]


class _Message(_Open):
    role: Literal["system", "user", "assistant", "tool"]
    content: _Content | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @pydantic.model_validator(mode="after")
    def _fits_its_role(self) -> _Message:
        if self.tool_calls is not None and self.role != "assistant":
            raise PydanticCustomError("saved_message", "only an assistant message has \"tool_calls\"")
        if self.role == "tool" and self.tool_call_id is None:
            raise PydanticCustomError("saved_message", "a tool message needs its \"tool_call_id\" (a string)")
        return self


class _SavedFile(_Open):
    format: Literal["functionary-agent/conversation"] = SAVE_FORMAT
    version: Literal[1] = SAVE_VERSION
    messages: list[_Message]


# -- reading ---------------------------------------------------------------------------------------------------
def read_saved_messages(path: Path) -> list[dict[str, Any]]:
    """The messages of the saved conversation at `path`, checked; `ConfigurationError` saying what is wrong."""
    text = _read_text(path)
    problem = structure_problem(text)
    if problem is not None:
        raise ConfigurationError(f"{path} is not a saved conversation: {problem}")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ConfigurationError(f"{path} is not a saved conversation (not JSON: {exc})") from None
    saved = data if isinstance(data, dict) else {"messages": data}  # a bare list of messages is read too
    problem = schema_problem(saved)
    if problem is not None:
        raise ConfigurationError(f"{path} is not a saved conversation (a list of messages): {problem}")
    return list(saved["messages"])


def _read_text(path: Path) -> str:
    """The file's text, read only from a regular file (never a FIFO or a device) of at most MAX_SAVED_BYTES."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block the open
    except OSError as exc:
        raise ConfigurationError(f"cannot read conversation file {path}: {exc.strerror or exc}") from None
    too_big = f"{path} is over {MAX_SAVED_BYTES // (1024 * 1024)} MiB, more than a saved conversation may be"
    with os.fdopen(descriptor, "rb") as file:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise ConfigurationError(f"cannot read conversation file {path}: not a regular file")
        if status.st_size > MAX_SAVED_BYTES:
            raise ConfigurationError(too_big)
        try:
            data = file.read(MAX_SAVED_BYTES + 1)  # bounded: the file may grow while it is read
        except OSError as exc:
            raise ConfigurationError(f"cannot read conversation file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_SAVED_BYTES:
        raise ConfigurationError(too_big)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{path} is not a saved conversation (not UTF-8 text: {exc})") from None


def structure_problem(text: str) -> str | None:
    """What makes JSON `text` too big a structure to parse (None when nothing does): more than
    `MAX_BRACKETS` brackets outside strings, or nesting deeper than `MAX_DEPTH`. Checked before parsing, without
    recursion, in time linear in the text."""
    outside_strings = _JSON_STRING.sub("", text)
    if sum(outside_strings.count(bracket) for bracket in "[]{}") > MAX_BRACKETS:
        return f"more than {MAX_BRACKETS:,} JSON brackets outside strings"
    depth = 0
    for bracket in _NOT_A_BRACKET.sub("", outside_strings):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_DEPTH:
            return f"JSON nested deeper than {MAX_DEPTH} levels"
    return None


def schema_problem(data: Any) -> str | None:
    """The first way `data` (a saved file's JSON) misses the schema, as "JSON path: what", or None."""
    try:
        _SavedFile.model_validate(data)
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        return f"{_json_path(first['loc'])}: {_said(first)}"
    return None


def _json_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not part.startswith(_TAG):
            path += f".{part}" if path else part
    return path or "(the file)"


_SAID = {
    "missing": "missing", "string_type": "expected a string", "list_type": "expected a list",
    "model_type": "expected an object", "model_attributes_type": "expected an object",
    "dict_type": "expected an object",
}


def _said(error: Any) -> str:
    if error["type"] in _SAID:
        return str(_SAID[error["type"]])
    if error["type"] == "literal_error" and error["loc"][-1:] == ("role",):
        return f"expected one of {', '.join(_ROLES)}"
    return str(error["msg"]).replace("Input should be", "expected", 1)


# -- writing ---------------------------------------------------------------------------------------------------
_TEMPORARY_SUFFIX = ".saving.tmp"  # a save in progress: `.NAME.<16 hex>.saving.tmp`, beside NAME


def write_saved(path: Path, messages: list[dict[str, Any]]) -> None:
    """Save `messages` at `path` (through a link, to its target) atomically; `ConfigurationError` for messages a
    load would refuse, `OSError` when the file cannot be written (an existing file is then left as it was)."""
    data = {"format": SAVE_FORMAT, "version": SAVE_VERSION, "messages": messages}
    problem = schema_problem(data)
    if problem is not None:
        raise ConfigurationError(f"cannot save these messages, a load would refuse them: {problem}")
    encoded = json.dumps(data, ensure_ascii=False, indent=2).encode("utf-8")
    target = Path(os.path.realpath(path))
    _remove_abandoned_temporaries(target)
    descriptor, temporary = _claim_temporary(target)
    try:
        with os.fdopen(descriptor, "wb") as file:  # open (so locked) until renamed: a live save is never removed
            file.write(encoded)
            file.flush()
            os.fsync(file.fileno())
            with contextlib.suppress(FileNotFoundError):
                os.chmod(temporary, stat.S_IMODE(os.stat(target).st_mode))  # a file saved over keeps its mode
            os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_folder(target.parent)  # the rename itself survives a power cut


def _claim_temporary(target: Path) -> tuple[int, Path]:
    """A new, empty temporary file beside `target` (its descriptor and path), locked by this process for as long
    as the descriptor is open: the kernel drops the lock when the process dies, which is how a later save tells a
    killed save's file (removed) from a live one (left alone)."""
    while True:
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(8)}{_TEMPORARY_SUFFIX}")
        descriptor = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if _lock_while_named(descriptor, temporary):
                return descriptor, temporary
        except BaseException:
            os.close(descriptor)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        os.close(descriptor)  # removed as abandoned in the instant before the lock: take another name


def _lock_while_named(descriptor: int, temporary: Path) -> bool:
    """Lock the just-created `temporary`; False when another save removed it as abandoned first. Where files
    cannot be locked (no `fcntl`, a file system without locks), no save removes them either: True, unlocked."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # waits while another save checks whether it is abandoned
    except OSError:
        return True
    return _still_named(descriptor, temporary)


def _remove_abandoned_temporaries(target: Path) -> None:
    """Remove the temporary files that saves to `target` killed mid-write (SIGKILL, a power cut) left beside it;
    without `fcntl` (Windows) they stay, named `.NAME.<hex>.saving.tmp`."""
    if fcntl is None:
        return
    prefix = f".{target.name}."
    with contextlib.suppress(OSError), os.scandir(target.parent) as entries:
        for entry in entries:
            rest = entry.name[len(prefix) :]
            if entry.name.startswith(prefix) and _is_temporary_tail(rest):
                _remove_if_abandoned(Path(entry.path))


def _is_temporary_tail(rest: str) -> bool:
    """Whether `rest` is what `_claim_temporary` puts after `.NAME.`: 16 hex digits, then the suffix."""
    token = rest[: -len(_TEMPORARY_SUFFIX)]
    return rest.endswith(_TEMPORARY_SUFFIX) and len(token) == 16 and all(c in "0123456789abcdef" for c in token)


def _remove_if_abandoned(candidate: Path) -> None:
    """Unlink `candidate` when it is our own regular file and no live process holds its lock."""
    assert fcntl is not None
    try:
        descriptor = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        status = os.fstat(descriptor)
        if stat.S_ISREG(status.st_mode) and status.st_uid == os.geteuid():
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a save is writing it
            if _still_named(descriptor, candidate):
                os.unlink(candidate)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _still_named(descriptor: int, path: Path) -> bool:
    """Whether `path` still names the file open as `descriptor`."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _sync_folder(folder: Path) -> None:
    """fsync `folder`, so that a rename in it is on disk; skipped where a folder cannot be opened (Windows) or
    synced (some file systems say EINVAL)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(descriptor)
