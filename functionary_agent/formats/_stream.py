"""One incremental parser for every Functionary protocol; `parse` is this parser fed the whole text at once.

Each protocol is a handful of markers (">>>", "<function=", "<|from|>", ...) that switch between free text, a
recipient name, JSON arguments and raw python code. The parser keeps only the text it cannot decide yet: a tail that
could be the start of a marker, or a recipient name still being written. Marker searches resume where they stopped,
so the work is linear in the output, whatever the size of the deltas.

Tidy-ups every caller relies on, identical for streaming and `parse`: free text loses the whitespace around it (a
model's "\\n" between two calls is not content); JSON arguments lose surrounding whitespace and empty ones become
"{}"; python code is passed on raw, wrapped as `{"code": ...}`; nothing after a stop token counts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from functionary_agent._openai_messages import new_call_id
from functionary_agent.tools import TOOL_NAME_PATTERN

TEXT, NAME, ARGS, CODE, SKIP, DONE = "text", "name", "args", "code", "skip", "done"
_END = "end"  # pseudo-target: the recipient name is complete
# A recipient is read as a call only when it is a tool name our clients, OpenAI and the vLLM server's request check
# all accept (TOOL_NAME_PATTERN): a call the grammar lets through is always read back, and no other.
_MAX_NAME_SPAN = 100
_MAX_SKIP_SPAN = 64
_CODE_OPEN = '{"code": "'


@dataclass(frozen=True)
class Protocol:
    """The markers of one format. Each marker table maps a marker to the mode it switches to."""

    text_markers: tuple[tuple[str, str], ...]
    args_markers: tuple[tuple[str, str], ...]
    code_markers: tuple[tuple[str, str], ...]
    name_end: str
    stops: tuple[str, ...]
    skip_end: str = ""
    text_recipient: str | None = None
    code_tag_name: str = "python"  # the call a CODE marker in free text opens (v3.1's <|python_tag|>)


@dataclass(frozen=True)
class Start:
    """Where the output begins, given the prompt's tool_choice prefix: in text, in a name, or inside a call."""

    mode: str
    name: str | None = None
    marker: str = ""  # text already in the prompt that opened a NAME; given back as text if no name follows


class _Markers:
    """The markers active in one mode, with what is needed to find how much of a tail to hold back."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.pairs = tuple((marker, target) for marker, target in pairs if marker)
        markers = [marker for marker, _ in self.pairs]
        self.prefixes = frozenset(m[:i] for m in markers for i in range(1, len(m)))
        self.longest = max((len(m) for m in markers), default=1)
        firsts = "".join(sorted({m[0] for m in markers}))
        self.first = re.compile("[" + re.escape(firsts) + "]") if firsts else None


class _Out:
    """Collects deltas, merging neighbours; pieces are joined once at the end so long outputs stay linear."""

    def __init__(self) -> None:
        self._items: list[tuple[str, int, list[str], dict[str, Any] | None]] = []

    def text(self, piece: str) -> None:
        if not piece:
            return
        if self._items and self._items[-1][0] == "content":
            self._items[-1][2].append(piece)
        else:
            self._items.append(("content", -1, [piece], None))

    def start(self, index: int, call_id: str, name: str) -> None:
        head = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        self._items.append(("start", index, [], head))

    def args(self, index: int, piece: str) -> None:
        if not piece:
            return
        if self._items and self._items[-1][0] == "args" and self._items[-1][1] == index:
            self._items[-1][2].append(piece)
        else:
            self._items.append(("args", index, [piece], None))

    def deltas(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = []
        for kind, index, pieces, head in self._items:
            if kind == "content":
                result.append({"content": "".join(pieces)})
            elif kind == "start":
                result.append({"tool_calls": [head]})
            else:
                result.append({"tool_calls": [{"index": index, "function": {"arguments": "".join(pieces)}}]})
        return result


class _Trim:
    """Passes text on without the whitespace at its start and end. Whether whitespace is at the end is only known
    once more text comes, so it waits, in pieces: a model looping on blanks costs linear time, not quadratic."""

    def __init__(self) -> None:
        self.started = False
        self._pending: list[str] = []

    def push(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
        head = piece.rstrip()
        if not head:
            if piece:
                self._pending.append(piece)
            return ""
        text = "".join(self._pending) + head if self._pending else head
        self._pending = [piece[len(head) :]] if len(head) < len(piece) else []
        self.started = True
        return text


def _viable(candidate: str) -> bool:
    """Could `candidate` still become a recipient name (whitespace around one tool name, or nothing yet)?"""
    name = candidate.strip()
    return len(candidate) <= _MAX_NAME_SPAN and (not name or _is_tool_name(name))


def _is_tool_name(name: str) -> bool:
    return TOOL_NAME_PATTERN.fullmatch(name) is not None


class StreamParser:
    """Turns generated text, delta by delta, into OpenAI chat-completion chunk deltas.

    `feed(delta)` returns the deltas that are certain so far; `finish()` flushes the rest and returns
    `(deltas, finish_reason)`, "tool_calls" when the message has calls, else "stop". Never raises on model output.
    """

    def __init__(self, protocol: Protocol, start: Start, code_names: frozenset[str], known_names: frozenset[str]):
        self._protocol = protocol
        self._code_names = code_names
        self._known = known_names | code_names
        self._tables = {
            TEXT: _Markers((*protocol.text_markers, *((s, DONE) for s in protocol.stops))),
            ARGS: _Markers((*protocol.args_markers, *((s, DONE) for s in protocol.stops))),
            CODE: _Markers((*protocol.code_markers, *((s, DONE) for s in protocol.stops))),
            NAME: _Markers(((protocol.name_end, _END), *((s, DONE) for s in protocol.stops))),
            SKIP: _Markers(((protocol.skip_end, NAME), *((s, DONE) for s in protocol.stops))),
        }
        self._steps = {NAME: self._step_name, SKIP: self._step_skip}
        self._buf = ""
        self._pos = 0
        self._found: dict[str, int] = {}
        self._mode = start.mode
        self._marker = start.marker
        self._calls = 0
        self._text = _Trim()
        self._index = -1
        self._args = _Trim()
        self._code_open = False
        self._early = _Out()
        if start.mode in (ARGS, CODE) and start.name is not None:
            self._start_call(self._early, start.name)

    def feed(self, delta: str) -> list[dict[str, Any]]:
        out, self._early = self._early, _Out()
        if delta and self._mode != DONE:
            self._buf += delta
            self._run(out, final=False)
        return out.deltas()

    def finish(self) -> tuple[list[dict[str, Any]], str]:
        out, self._early = self._early, _Out()
        self._run(out, final=True)
        self._close_call(out)
        self._mode = DONE
        return out.deltas(), "tool_calls" if self._calls else "stop"

    # -- the scanning loop -------------------------------------------------------------------------------------

    def _run(self, out: _Out, final: bool) -> None:
        while self._mode != DONE and self._steps.get(self._mode, self._step_body)(out, final):
            pass
        if self._mode == DONE:
            self._buf, self._pos = "", 0
        elif self._pos:
            self._buf, self._pos = self._buf[self._pos :], 0
        self._found.clear()

    def _step_body(self, out: _Out, final: bool) -> bool:
        """TEXT, ARGS or CODE: pass content on up to the next marker; False when more input is needed."""
        index, marker, target = self._earliest(self._tables[self._mode])
        if index >= 0:
            self._consume(out, self._buf[self._pos : index])
            self._pos = index + len(marker)
            self._switch(out, target, marker)
            return True
        end = len(self._buf) if final else len(self._buf) - self._held(self._tables[self._mode])
        self._consume(out, self._buf[self._pos : end])
        self._pos = end
        return False

    def _step_name(self, out: _Out, final: bool) -> bool:
        """A recipient name: wait until its end marker, or give it back as text once it cannot be a name."""
        index, marker, target = self._earliest(self._tables[NAME])
        if index < 0 and not final:
            candidate = self._buf[self._pos :]
            undecided = candidate[: len(candidate) - self._held(self._tables[NAME])]
            return False if _viable(undecided) else self._not_a_name(out)
        end = len(self._buf) if index < 0 else index
        candidate = self._buf[self._pos : end]
        name = candidate.strip()
        if not _viable(candidate):
            return self._not_a_name(out)
        if index >= 0 and target == _END:
            if not _is_tool_name(name):
                return self._not_a_name(out)
            self._pos = index + len(marker)
            self._accept_name(out, name)
            return True
        # Cut off by a stop token or by the end of the output: a known tool is still a call, anything else text.
        if name and name != self._protocol.text_recipient:
            if name not in self._known:
                return self._not_a_name(out)
            self._accept_name(out, name)
        self._pos = end + len(marker)
        if index >= 0:
            self._close_call(out)
            self._mode = DONE
        return False

    def _not_a_name(self, out: _Out) -> bool:
        self._consume_text(out, self._marker)
        self._mode = TEXT  # re-read the would-be name as text, from where it began
        return True

    def _step_skip(self, out: _Out, final: bool) -> bool:
        """v2's "<|from|>assistant\\n<|recipient|>" between segments; another speaker ends the message."""
        index, marker, target = self._earliest(self._tables[SKIP])
        if index < 0:
            undecided = len(self._buf) - self._pos - self._held(self._tables[SKIP])
            if final or undecided > _MAX_SKIP_SPAN:
                self._mode = DONE
            return False
        speaker = self._buf[self._pos : index]
        self._pos = index + len(marker)
        expected = len(speaker) <= _MAX_SKIP_SPAN and speaker.strip() in ("assistant", "")
        self._mode = NAME if target == NAME and expected else DONE
        self._marker = ""
        return True

    def _switch(self, out: _Out, target: str, marker: str) -> None:
        if self._mode in (ARGS, CODE):
            self._close_call(out)
        if target == CODE:
            self._start_call(out, self._protocol.code_tag_name)
            return
        self._mode = target
        self._marker = marker

    # -- emitting ----------------------------------------------------------------------------------------------

    def _consume(self, out: _Out, piece: str) -> None:
        if self._mode == TEXT:
            self._consume_text(out, piece)
        elif self._mode == ARGS:
            self._consume_args(out, piece)
        elif self._mode == CODE and piece:
            escaped = json.dumps(piece, ensure_ascii=False)[1:-1]
            out.args(self._index, escaped if self._code_open else _CODE_OPEN + escaped)
            self._code_open = True

    def _consume_text(self, out: _Out, piece: str) -> None:
        out.text(self._text.push(piece))

    def _consume_args(self, out: _Out, piece: str) -> None:
        out.args(self._index, self._args.push(piece))

    def _accept_name(self, out: _Out, name: str) -> None:
        if name == self._protocol.text_recipient:
            self._mode = TEXT
        else:
            self._start_call(out, name)

    def _start_call(self, out: _Out, name: str) -> None:
        self._reset_call()
        self._index = self._calls
        self._calls += 1
        out.start(self._index, new_call_id(), name)
        self._mode = CODE if name in self._code_names else ARGS

    def _close_call(self, out: _Out) -> None:
        if self._mode == CODE:
            out.args(self._index, '"}' if self._code_open else _CODE_OPEN + '"}')
        elif self._mode == ARGS and not self._args.started:
            out.args(self._index, "{}")
        self._reset_call()

    def _reset_call(self) -> None:
        self._index = -1
        self._args = _Trim()
        self._code_open = False

    # -- searching ---------------------------------------------------------------------------------------------

    def _earliest(self, table: _Markers) -> tuple[int, str, str]:
        best = (-1, "", "")
        for marker, target in table.pairs:
            index = self._find(marker)
            if index >= 0 and (best[0] < 0 or index < best[0]):
                best = (index, marker, target)
        return best

    def _find(self, marker: str) -> int:
        """`buf.find(marker, pos)`, remembering results: within one feed the buffer is fixed and `pos` only moves
        forward, so an earlier answer stands until `pos` passes it and no stretch of text is scanned twice."""
        cached = self._found.get(marker)
        if cached is not None and (cached < 0 or cached >= self._pos):
            return cached
        index = self._buf.find(marker, self._pos)
        self._found[marker] = index
        return index

    def _held(self, table: _Markers) -> int:
        """Length of the buffer's tail that could still grow into one of the table's markers."""
        if table.first is None:
            return 0
        size = len(self._buf)
        match = table.first.search(self._buf, max(self._pos, size - table.longest + 1))
        while match is not None:
            if self._buf[match.start() :] in table.prefixes:
                return size - match.start()
            match = table.first.search(self._buf, match.start() + 1)
        return 0


def message_from_deltas(deltas: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Accumulate chunk deltas into one assistant message; `tool_calls` is left out when there are none."""
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    arguments: dict[int, list[str]] = {}
    for delta in deltas:
        if delta.get("content"):
            content.append(delta["content"])
        for part in delta.get("tool_calls") or ():
            index = part["index"]
            call = calls.setdefault(index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            if part.get("id"):
                call["id"] = part["id"]
            function = part.get("function") or {}
            if function.get("name"):
                call["function"]["name"] += function["name"]
            arguments.setdefault(index, []).append(function.get("arguments") or "")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None}
    if calls:
        for index, call in calls.items():
            call["function"]["arguments"] = "".join(arguments[index])
        message["tool_calls"] = [calls[index] for index in sorted(calls)]
    return message
