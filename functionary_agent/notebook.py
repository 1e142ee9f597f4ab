"""Conversations in Jupyter: a live display fed by stream events, and a static rendering of the messages.

In a notebook a run shows up as it happens. The assistant's text appears as Markdown. Each tool call is a
collapsible block, with its arguments and result, that fills in when the call finishes. Images from the code
interpreter appear inline, and failures are marked in red. Everything a tool returned is HTML-escaped: a tool
result is data, never markup, and model text is rendered by a Markdown renderer with raw HTML switched off.

IPython is imported only when something is displayed, so plain Python never loads it or needs it.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import html
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from functionary_agent._calls import CANCELLED
from functionary_agent._interpreter import PYTHON, PythonTool, code_of
from functionary_agent.events import Event, FinalAnswer, TextDelta, ToolCallArgumentsDelta, ToolCallStarted, ToolResult

if TYPE_CHECKING:
    from functionary_agent.conversation import Content, Conversation

logger = logging.getLogger(__name__)

Bundle = dict[str, str]
"""A display's representations by MIME type (`text/html`, `text/markdown`, `text/plain`)."""
Show = Callable[[Bundle], Callable[[Bundle], None]]
"""Displays a bundle and returns the function that replaces it in place."""
ImageResolver = Callable[[str], Path | None]
"""Maps an image path as the code interpreter names it (`/mnt/data/image-1.png`) to a readable host file."""

_IMAGE_LINE = re.compile(r"^\[image saved: (.+)\]$", re.MULTILINE)
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                ".svg": "image/svg+xml"}
_MAX_IMAGE_BYTES = 20 * 1024 * 1024
_RED = "#d32f2f"
# state -> (icon, label, colour)
_STATES = {
    "running": ("⏳", "running…", "#1976d2"),
    "ok": ("✓", "done", "#2e7d32"),
    "error": ("✗", "error", _RED),
    "repeated": ("↺", "same call as before: earlier result reused", "#757575"),
    "cancelled": ("⏹", "cancelled", "#ef6c00"),
    "unanswered": ("…", "no result", "#757575"),
}
_ROLE_LABELS = {"system": "System", "user": "You", "assistant": "Assistant"}
_BOX = "margin:4px 0;padding:2px 8px;border-left:3px solid {colour};background:rgba(127,127,127,0.06)"
_PRE = "margin:2px 0 6px;padding:4px 6px;max-height:24em;overflow:auto;white-space:pre-wrap;word-break:break-word"


# -- where we are ------------------------------------------------------------------------------------------
def in_notebook() -> bool:
    """True inside a running Jupyter kernel (JupyterLab, Notebook, VS Code, Colab); False in plain Python and in
    terminal IPython, whose screen cannot show HTML. Never imports IPython: if it is not loaded, no kernel runs."""
    shell = _shell()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _shell() -> Any:
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    return get_ipython() if get_ipython is not None else None


# -- one tool call, as both renderings see it -------------------------------------------------------------
@dataclass
class _Call:
    name: str
    arguments: str = ""
    content: str | None = None
    state: str = "running"
    duration: float | None = None
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (mime type, data)


def _state_of(content: str) -> str:
    """A tool message keeps no error flag, so the static rendering recognises the shapes errors take: the
    conversation's `Error: ...` texts and the interpreter's tracebacks."""
    if content == CANCELLED:
        return "cancelled"
    if content.startswith("Error:") or "Traceback (most recent call last)" in content:
        return "error"
    return "ok"


def _call_preview(call: _Call) -> str:
    """`name(arguments)` on one line, as the terminal reporter writes it."""
    if call.name == PYTHON:
        first = next((line for line in code_of(call.arguments).splitlines() if line.strip()), "")
        return _shorten(f"{call.name}: {first}", 100)
    return _shorten(f"{call.name}({_compact_arguments(call.arguments)})", 100)


def _compact_arguments(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments or "{}"), ensure_ascii=False)
    except json.JSONDecodeError:
        return " ".join(arguments.split())  # still being written, or not JSON: shown as sent


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _pretty_arguments(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments or "{}"), ensure_ascii=False, indent=2)
    except json.JSONDecodeError:
        return arguments


def _call_html(call: _Call) -> str:
    icon, label, colour = _STATES[call.state]
    status = label + (f" · {_seconds(call.duration)}" if call.duration else "")
    headline = ""
    if call.state == "error" and call.content:
        first = next((line for line in call.content.splitlines() if line.strip()), "")
        headline = f' <span style="color:{_RED}">{html.escape(_shorten(first, 160))}</span>'
    summary = (
        f'<summary style="cursor:pointer">{icon} <code>{html.escape(_call_preview(call))}</code> '
        f'<span style="color:{colour};font-weight:600">{html.escape(status)}</span>{headline}</summary>'
    )
    if call.name == PYTHON:
        body = _section("code", code_of(call.arguments))
    else:
        body = _section("arguments", _pretty_arguments(call.arguments))
    if call.content is not None:
        body += _section("result", call.content)
    images = "".join(_image_html(mime, data) for mime, data in call.images)
    css_class = f"fa-tool fa-{call.state}"
    return f'<details class="{css_class}" style="{_BOX.format(colour=colour)}">{summary}{body}</details>{images}'


def _section(title: str, text: str) -> str:
    return f'<div style="opacity:0.7;font-size:90%">{title}</div><pre style="{_PRE}">{html.escape(text)}</pre>'


def _image_html(mime: str, data: bytes) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img class="fa-image" src="data:{mime};base64,{encoded}" style="max-width:100%;display:block"/>'


def _call_plain(call: _Call) -> str:
    """The text a frontend without HTML shows (a terminal console, a text export)."""
    icon, label, _ = _STATES[call.state]
    line = f"{icon} {_call_preview(call)}"
    if call.content is None:
        return f"{line}  [{label}]"
    marker = "[error] " if call.state == "error" else ""
    return f"{line}\n  -> {marker}{_shorten(call.content, 2000)}"


def _call_markdown(call: _Call) -> str:
    icon, label, _ = _STATES[call.state]
    status = label + (f" · {_seconds(call.duration)}" if call.duration else "")
    if call.name == PYTHON:
        parts = [f"{icon} **`python`** — {status}", _fence(code_of(call.arguments), "python")]
    else:
        arguments = _code_span(_compact_arguments(call.arguments))
        parts = [f"{icon} **`{call.name}`** {arguments} — {status}"]
    if call.content is not None:
        parts.append(_fence(call.content, "text"))
    return "\n\n".join(parts)


def _seconds(duration: float) -> str:
    if duration < 1:
        return f"{max(duration * 1000, 1):.0f} ms"
    return f"{duration:.2f} s" if duration < 10 else f"{duration:.1f} s"


def _fence(text: str, language: str) -> str:
    """A fenced block no content can close early: the fence is longer than any run of backticks inside."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def _code_span(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


# -- Markdown text -----------------------------------------------------------------------------------------
def _markdown_html(text: str) -> str:
    """Model and user text as HTML: Markdown rendered with raw HTML off, so a `<script>` the model repeats from
    a tool result stays text. Without markdown-it (a dependency of rich) the text is shown escaped as is."""
    renderer = _markdown_renderer()
    if renderer is None:
        return f'<div style="white-space:pre-wrap">{html.escape(text)}</div>'
    return str(renderer.render(text))


@functools.lru_cache(maxsize=1)
def _markdown_renderer() -> Any:
    try:
        from markdown_it import MarkdownIt
    except ImportError:
        return None
    return MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])


def _text_bundle(text: str) -> Bundle:
    return {"text/html": f'<div class="fa-text">{_markdown_html(text)}</div>', "text/markdown": text,
            "text/plain": text}


# -- images ------------------------------------------------------------------------------------------------
def image_resolver(chat: Conversation) -> ImageResolver:
    """Finds the host file behind an interpreter image path, inside the conversation's sandbox workdir only:
    result text can be written by the model's code, so a path that leads elsewhere is never read."""
    roots = [(tool.sandbox.data_path, tool.sandbox.workdir) for tool in chat.tools if isinstance(tool, PythonTool)]

    def resolve(visible: str) -> Path | None:
        for data_path, workdir in roots:
            try:
                relative = PurePosixPath(visible).relative_to(data_path)
            except ValueError:
                continue
            candidate = (Path(workdir) / relative).resolve()
            if candidate.is_relative_to(Path(workdir).resolve()) and candidate.is_file():
                return candidate
        return None

    return resolve


def _load_images(content: str, resolve: ImageResolver | None) -> list[tuple[str, bytes]]:
    """The images an interpreter result names in its `[image saved: ...]` lines, read through `resolve`."""
    found = (resolve(visible) for visible in _IMAGE_LINE.findall(content)) if resolve else ()
    images = []
    for path in (path for path in found if path is not None):
        mime = _IMAGE_TYPES.get(path.suffix.lower())
        try:
            if mime and path.stat().st_size <= _MAX_IMAGE_BYTES:
                images.append((mime, path.read_bytes()))
        except OSError as exc:
            logger.debug("image %s not shown: %s", path, exc)
    return images


# -- the static rendering ----------------------------------------------------------------------------------
def render_markdown(messages: Sequence[Mapping[str, Any]]) -> str:
    """The whole conversation as Markdown: who said what, each call with its arguments and result in fenced
    blocks (never raw HTML, so nothing a tool returned can become markup). Images stay as their paths."""
    parts = []
    for kind, value in _transcript(messages, None):
        if isinstance(value, _Call):
            parts.append(_call_markdown(value))
        else:
            parts.append(f"**{_ROLE_LABELS.get(kind, kind)}**\n\n{value}")
    return "\n\n".join(parts)


def render_html(messages: Sequence[Mapping[str, Any]], *, resolve_image: ImageResolver | None = None) -> str:
    """The whole conversation as one HTML block: text as Markdown, calls as collapsible blocks, the system
    prompt folded away. Interpreter images are embedded when `resolve_image` finds their files."""
    parts = []
    for kind, value in _transcript(messages, resolve_image):
        if isinstance(value, _Call):
            parts.append(_call_html(value))
        elif kind == "system":
            parts.append(f'<details class="fa-system" style="{_BOX.format(colour="#757575")}">'
                         f"<summary>System</summary>{_markdown_html(value)}</details>")
        else:
            label = html.escape(_ROLE_LABELS.get(kind, kind))
            parts.append(f'<div class="fa-{html.escape(kind)}" style="margin:6px 0">'
                         f'<div style="font-weight:600;opacity:0.7">{label}</div>{_markdown_html(value)}</div>')
    return f'<div class="fa-conversation">{"".join(parts)}</div>'


def _transcript(
    messages: Sequence[Mapping[str, Any]], resolve: ImageResolver | None
) -> Iterator[tuple[str, Any]]:
    """(role, text) and ("call", _Call) in reading order, each call paired with its tool message."""
    answers = {m.get("tool_call_id"): m for m in messages if m.get("role") == "tool" and m.get("tool_call_id")}
    shown: set[str] = set()
    for message in messages:
        role = str(message.get("role"))
        if role == "tool":
            if message.get("tool_call_id") not in shown:  # a result whose call is not in the list
                yield "call", _static_call(str(message.get("name") or "tool"), "", message, resolve)
            continue
        text = _text_of(message.get("content"))
        if text.strip():
            yield role, text
        for tool_call in message.get("tool_calls") or ():
            function = tool_call.get("function") or {}
            call_id = tool_call.get("id")
            shown.add(call_id)
            name, arguments = str(function.get("name", "")), function.get("arguments") or ""
            yield "call", _static_call(name, arguments, answers.get(call_id), resolve)


def _static_call(name: str, arguments: Any, answer: Mapping[str, Any] | None, resolve: ImageResolver | None) -> _Call:
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    if answer is None:
        return _Call(name, arguments, state="unanswered")
    content = _text_of(answer.get("content"))
    images = _load_images(content, resolve) if name == PYTHON else []
    return _Call(name, arguments, content, _state_of(content), images=images)


def _text_of(content: Any) -> str:
    """Message content as text: a string, or OpenAI content parts (text kept, other parts named)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = [str(p.get("text", "")) if p.get("type") == "text" else f"[{p.get('type', 'part')}]"
                  for p in content if isinstance(p, Mapping)]
        return "\n".join(pieces)
    return str(content)


# -- the live display --------------------------------------------------------------------------------------
class _Output:
    """One display in the cell, replaced in place. Updates closer together than `interval` are merged, so a
    fast stream does not flood the frontend with a message per token."""

    def __init__(self, show: Show, bundle: Bundle, clock: Callable[[], float], interval: float) -> None:
        self._update = show(bundle)
        self._clock = clock
        self._interval = interval
        self._shown_at = clock()
        self._pending: Bundle | None = None

    def set(self, bundle: Bundle, *, now: bool = False) -> None:
        self._pending = bundle
        if now or self._clock() - self._shown_at >= self._interval:
            self.flush()

    def flush(self) -> None:
        if self._pending is not None:
            self._update(self._pending)
            self._pending = None
            self._shown_at = self._clock()


@dataclass
class _LiveCall:
    id: str
    call: _Call
    output: _Output

    def refresh(self, *, now: bool = False) -> None:
        self.output.set(_call_bundle(self.call), now=now)


def _call_bundle(call: _Call) -> Bundle:
    return {"text/html": _call_html(call), "text/plain": _call_plain(call)}


class LiveDisplay:
    """Shows one run in the notebook as `Conversation.stream` events arrive: `handle` each event, then `finish`
    (or `fail` with the exception that ended the run).

    Text goes into a Markdown display that grows as it streams; each call gets its own display, created when
    the model starts it and completed when its result arrives (results come in completion order and are matched
    by call id). `show` displays a bundle and returns its updater; the default uses IPython display handles.
    """

    def __init__(self, *, resolve_image: ImageResolver | None = None, show: Show | None = None,
                 min_interval: float = 0.1, clock: Callable[[], float] = time.monotonic) -> None:
        self._show = show or _ipython_show
        self._resolve = resolve_image
        self._interval = min_interval
        self._clock = clock
        self._outputs: list[_Output] = []
        self._text: _Output | None = None
        self._text_value = ""
        self._turn_text = ""  # all text streamed in the current model turn
        self._calls: list[_LiveCall] = []  # the current turn's calls
        self._by_index: dict[int, _LiveCall] = {}
        self._results_seen = False
        self.answer = ""

    def handle(self, event: Event) -> None:
        if isinstance(event, ToolResult):
            self._on_result(event)
            return
        if self._results_seen:  # the first event after a turn's results opens the next turn
            self._results_seen = False
            self._calls, self._by_index, self._turn_text = [], {}, ""
            self._close_text()
        if isinstance(event, TextDelta):
            self._on_text(event.text)
        elif isinstance(event, ToolCallStarted):
            self._on_call_started(event)
        elif isinstance(event, ToolCallArgumentsDelta):
            live = self._by_index.get(event.index)
            if live is not None:
                live.call.arguments += event.delta
                live.refresh()
        elif isinstance(event, FinalAnswer):
            self.answer = event.content
            if not self._turn_text.strip() and event.content.strip():  # a model that did not stream its text
                self._on_text(event.content)
            self.finish()

    def finish(self) -> None:
        """Bring every display up to date (merged updates may be pending)."""
        for output in self._outputs:
            output.flush()

    def fail(self, error: BaseException) -> None:
        """Mark the run as stopped: calls still running are cancelled, and a red box says what ended it."""
        for live in self._calls:
            if live.call.state == "running":
                live.call.state = "cancelled"
                live.refresh(now=True)
        if isinstance(error, (KeyboardInterrupt, asyncio.CancelledError)):
            text, css = "⏹ Interrupted: the run was stopped.", "fa-interrupted"
        else:
            text, css = f"✗ {type(error).__name__}{f': {error}' if str(error) else ''}", "fa-error fa-failure"
        box = f'<div class="{css}" style="{_BOX.format(colour=_RED)};color:{_RED}">{html.escape(text)}</div>'
        self._new_output({"text/html": box, "text/plain": text})
        self.finish()

    def _on_text(self, text: str) -> None:
        self._turn_text += text
        self._text_value += text
        if self._text is None:
            if self._text_value.strip():  # no empty display for the whitespace before a call
                self._text = self._new_output(_text_bundle(self._text_value))
        else:
            self._text.set(_text_bundle(self._text_value))

    def _on_call_started(self, event: ToolCallStarted) -> None:
        self._close_text()
        call = _Call(event.name)
        live = _LiveCall(event.id, call, self._new_output(_call_bundle(call)))
        self._calls.append(live)
        self._by_index[event.index] = live

    def _on_result(self, event: ToolResult) -> None:
        self._results_seen = True
        live = self._match(event)
        call = live.call
        call.name, call.arguments, call.content = event.name, event.arguments, event.content
        call.state = "error" if event.is_error else "repeated" if event.repeated else "ok"
        call.duration = event.duration or None
        if event.name == PYTHON:
            call.images = _load_images(event.content, self._resolve)
        live.refresh(now=True)

    def _match(self, event: ToolResult) -> _LiveCall:
        """The block this result completes: by id, else (ids missing from the stream) the first unanswered
        call of that name; a result with no started call gets a new block."""
        waiting = [live for live in self._calls if live.call.content is None]
        for live in waiting:
            if live.id and live.id == event.id:
                return live
        for live in waiting:
            if live.call.name == event.name:
                return live
        call = _Call(event.name, event.arguments)
        live = _LiveCall(event.id, call, self._new_output(_call_bundle(call)))
        self._calls.append(live)
        return live

    def _close_text(self) -> None:
        if self._text is not None:
            self._text.flush()
        self._text, self._text_value = None, ""

    def _new_output(self, bundle: Bundle) -> _Output:
        self.finish()  # a new display goes below the others: bring those up to date first
        output = _Output(self._show, bundle, self._clock, self._interval)
        self._outputs.append(output)
        return output


def _ipython_show(bundle: Bundle) -> Callable[[Bundle], None]:
    from IPython.display import display

    handle = display(bundle, raw=True, display_id=True)

    def update(new: Bundle) -> None:
        handle.update(new, raw=True)

    return update


def _no_show(bundle: Bundle) -> Callable[[Bundle], None]:
    return lambda new: None


# -- what Conversation.submit calls in a notebook ----------------------------------------------------------
class _ShownAnswer(str):
    """The answer of a run the live display has already shown. It is a plain `str`, except that the cell that
    produced it does not echo it a second time as the cell's result; shown from a later cell, it displays."""

    cell: object = None

    def _ipython_display_(self) -> None:
        shell = _shell()
        if shell is not None and self.cell is not None and getattr(shell, "execution_count", None) == self.cell:
            return
        from IPython.display import display

        display(str(self))


def _live_display(chat: Conversation) -> LiveDisplay:
    if _shell() is None:
        logger.warning("no IPython shell is running: the run is not displayed")
        return LiveDisplay(show=_no_show)
    return LiveDisplay(resolve_image=image_resolver(chat))


def _shown(answer: str) -> str:
    shown = _ShownAnswer(answer)
    shown.cell = getattr(_shell(), "execution_count", None)
    return shown


def submit_with_display(chat: Conversation, content: Content = None) -> str:
    """`chat.submit(content)`, shown live in the notebook; returns the final answer."""
    live = _live_display(chat)
    try:
        for event in chat.stream(content):
            live.handle(event)
    except BaseException as exc:
        live.fail(exc)
        raise
    live.finish()
    return _shown(live.answer)


async def asubmit_with_display(chat: Conversation, content: Content = None) -> str:
    """`await chat.asubmit(content)`, shown live in the notebook; returns the final answer."""
    live = _live_display(chat)
    try:
        async for event in chat.astream(content):
            live.handle(event)
    except BaseException as exc:
        live.fail(exc)
        raise
    live.finish()
    return _shown(live.answer)
