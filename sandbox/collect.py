"""Turns the iopub messages of one execution into an `ExecutionResult`, trusting none of them.

Only messages whose parent is our execute request reach `add` (the caller routes with `answers`). The kernel runs
the model's code, which can publish any message through the kernel's own session, so every field the host reads is
checked for its type first; a message that does not fit becomes a note ("the kernel sent a malformed stream
message: ..."), never an exception. What is kept stays bounded: streams go through a head+tail buffer again (the
kernel already bounds them; this is the safety net for output that bypasses the kernel-side limiter), display texts
up to the output budget, the collector's own notes up to `MAX_NOTES`.
"""

from __future__ import annotations

import binascii
import logging
from collections.abc import Callable
from typing import Any

from .output import HeadTail, strip_ansi, truncate
from .result import CellError, ExecutionResult
from .workdir import IMAGE_TYPES, ImageSaver

logger = logging.getLogger(__name__)

_SLACK = 256  # room for the kernel's own omission marker, so one cut never becomes two
MAX_IMAGES_PER_CELL = 20  # checked here, on the host: a hostile kernel can publish as many as it likes
MAX_NOTES = 10  # notes of the collector's own (malformed messages, unsaved images) per execution; the rest counted
_SHORT = 40


class _Malformed(Exception):
    """A field of a message has the wrong type; the text says which, for the note."""


def answers(msg: dict[str, Any], msg_id: str, collector: OutputCollector | None) -> bool:
    """True when `msg` answers the request `msg_id`; a parent header that is not an object is noted."""
    parent = msg.get("parent_header")
    if isinstance(parent, dict):
        return bool(parent.get("msg_id") == msg_id)
    if collector is not None:
        collector.malformed(msg, f"its parent_header is {_kind(parent)}, not an object")
    return False


def is_idle(msg: dict[str, Any]) -> bool:
    """A status message that reports the kernel idle."""
    content = msg.get("content")
    return msg.get("msg_type") == "status" and isinstance(content, dict) and content.get("execution_state") == "idle"


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), f"a {type(value).__name__}")


def _short(value: object) -> str:
    text = repr(value) if isinstance(value, str) else _kind(value)
    return text if len(text) <= _SHORT else text[: _SHORT - 1] + "…"


def _text(content: dict[str, Any], key: str, default: str = "") -> str:
    value = content.get(key, default)
    if not isinstance(value, str):
        raise _Malformed(f"its {key!r} is {_kind(value)}, not a string")
    return value


def _mapping(content: dict[str, Any], key: str) -> dict[str, Any]:
    value = content.get(key, {})
    if not isinstance(value, dict):
        raise _Malformed(f"its {key!r} is {_kind(value)}, not an object")
    return value


def _lines(content: dict[str, Any], key: str) -> list[str]:
    value = content.get(key, [])
    if not isinstance(value, list) or not all(isinstance(line, str) for line in value):
        raise _Malformed(f"its {key!r} is not a list of strings")
    return value


def _bundle(content: dict[str, Any]) -> dict[str, Any]:
    """A display bundle whose keys are strings and whose images and plain text, the parts we read, are strings."""
    data = _mapping(content, "data")
    for mime, value in data.items():
        if not isinstance(mime, str):
            raise _Malformed(f"its data has a key that is {_kind(mime)}, not a string")
        if (mime in IMAGE_TYPES or mime == "text/plain") and not isinstance(value, str):
            raise _Malformed(f"its {_short(mime)} output is {_kind(value)}, not a string")
    return data


class OutputCollector:
    def __init__(self, images: ImageSaver, max_chars: int) -> None:
        half = max_chars // 2 + _SLACK
        self.result = ExecutionResult(max_chars=max_chars)
        self._streams = {"stdout": HeadTail(half, half), "stderr": HeadTail(half, half)}
        self._images = images
        self._max_chars = max_chars
        self._skipped_images = 0
        self._display_chars = 0
        self._dropped_displays = 0
        self._notes = 0
        self._dropped_notes = 0
        self._handlers: dict[str, Callable[[dict[str, Any]], bool]] = {
            "stream": self._add_stream,
            "execute_input": self._add_input,
            "execute_result": self._add_result,
            "display_data": self._add_display,
            "update_display_data": self._add_display,
            "error": self._add_error,
            "status": self._add_status,
        }

    def add(self, msg: dict[str, Any]) -> bool:
        """Take one message; True once the kernel reports idle (the execution is over). Never raises: a message
        that is not what the protocol says (whatever its type, despite the annotation) becomes a note."""
        if not isinstance(msg, dict):
            self.malformed(msg, f"it is {_kind(msg)}, not an object")
            return False
        kind = msg.get("msg_type")
        if not isinstance(kind, str):
            self.malformed(msg, f"its msg_type is {_kind(kind)}, not a string")
            return False
        handler = self._handlers.get(kind)
        if handler is None:
            return False
        content = msg.get("content")
        try:
            if not isinstance(content, dict):
                raise _Malformed(f"its content is {_kind(content)}, not an object")
            return handler(content)
        except _Malformed as exc:
            self.malformed(msg, str(exc))
            return False

    def malformed(self, msg: Any, reason: str) -> None:
        """Note a message the host could not use, and why."""
        kind = msg.get("msg_type") if isinstance(msg, dict) else None
        name = kind if isinstance(kind, str) and kind.isidentifier() and len(kind) <= _SHORT else "Jupyter"
        logger.debug("malformed %s message from the kernel: %s", name, reason)
        self.note(f"the kernel sent a malformed {name} message: {reason}")

    def note(self, text: str) -> None:
        """A note of the collector's own; past `MAX_NOTES` they are only counted."""
        if self._notes < MAX_NOTES:
            self._notes += 1
            self.result.notes.append(text)
        else:
            self._dropped_notes += 1

    def _add_stream(self, content: dict[str, Any]) -> bool:
        name, text = _text(content, "name", "stdout"), _text(content, "text")
        self._streams.get(name, self._streams["stdout"]).write(text)
        return False

    def _add_input(self, content: dict[str, Any]) -> bool:
        count = content.get("execution_count")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool)):
            raise _Malformed(f"its 'execution_count' is {_kind(count)}, not a number")
        self.result.execution_count = count
        return False

    def _add_status(self, content: dict[str, Any]) -> bool:
        return _text(content, "execution_state") == "idle"

    def _save_images(self, data: dict[str, Any]) -> bool:
        saved = False
        for mime in IMAGE_TYPES:
            payload = data.get(mime)
            if payload is None:
                continue
            if len(self.result.images) >= MAX_IMAGES_PER_CELL:
                self._skipped_images += 1
                continue
            try:
                self.result.images.append(self._images.save(mime, payload))
                saved = True
            except (OSError, binascii.Error, ValueError) as exc:
                logger.warning("could not save %s output: %s", mime, exc)
                self.note(f"an {mime} output was not saved: {exc}")
        return saved

    def _add_result(self, content: dict[str, Any]) -> bool:
        data = _bundle(content)
        self._save_images(data)
        self.result.data = {mime: value for mime, value in data.items() if mime not in IMAGE_TYPES}
        if "text/plain" in data:
            self.result.result = truncate(data["text/plain"], self._max_chars + _SLACK)
        return False

    def _add_display(self, content: dict[str, Any]) -> bool:
        data = _bundle(content)
        if self._save_images(data) or "text/plain" not in data:
            return False
        if self._display_chars >= self._max_chars:
            self._dropped_displays += 1
            return False
        text = truncate(data["text/plain"], self._max_chars + _SLACK)
        self.result.displays.append(text)
        self._display_chars += len(text)
        return False

    def _add_error(self, content: dict[str, Any]) -> bool:
        ename, evalue = _text(content, "ename"), _text(content, "evalue")
        traceback = strip_ansi("\n".join(_lines(content, "traceback")))
        self.result.error = CellError(
            ename=truncate(ename, self._max_chars + _SLACK),
            evalue=truncate(strip_ansi(evalue), self._max_chars + _SLACK),
            traceback=truncate(traceback, self._max_chars + _SLACK),
        )
        return False

    def finish(self) -> ExecutionResult:
        self.result.stdout = self._streams["stdout"].getvalue()
        self.result.stderr = self._streams["stderr"].getvalue()
        if self._skipped_images:
            self.result.notes.append(
                f"{self._skipped_images} more images were not saved (at most {MAX_IMAGES_PER_CELL} per execution)"
            )
        if self._dropped_displays:
            self.result.notes.append(
                f"{self._dropped_displays} more displayed outputs were not kept (at most {self._max_chars} characters"
                " of them per execution)"
            )
        if self._dropped_notes:
            self.result.notes.append(f"{self._dropped_notes} more notes like these were left out")
        return self.result
