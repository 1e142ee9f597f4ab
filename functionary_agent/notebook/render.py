"""How a conversation looks: each tool call as a block, model text and errors as display bundles, and the static
rendering of a whole message list (`render_markdown`, `render_html`).

A tool call's block shows its name, arguments, result and state; the live display (`display.py`) fills the same
block in as the run goes. Everything a tool returned is HTML-escaped: a tool result is data, never markup. The rest
of what the model or a saved file supplies (tool names, roles, arguments, results, error text) is never markup
either: in HTML it is escaped, in Markdown it is inline code (`markdown_literal`) or a fenced block. Every display
of model text, the answer shown after approval buttons included, goes through `text_bundle`, and every error
through `error_bundle`.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from functionary_agent._openai_messages import code_of, message_text
from functionary_agent._run.interpreter import PYTHON
from functionary_agent._text import compact_json, shorten
from functionary_agent.messages import CANCELLED, is_error_result
from functionary_agent.notebook.markdown import fence, inert_markdown, markdown_html, markdown_literal
from functionary_agent.notebook.sandbox_files import ImageResolver, load_images

Bundle = dict[str, str]
"""A display's representations by MIME type (`text/html`, `text/markdown`, `text/plain`)."""

_NOT_A_NAME = re.compile(r"[^A-Za-z0-9_]")
_RED = "#d32f2f"
# state -> (icon, label, colour)
_STATES = {
    "running": ("⏳", "running…", "#1976d2"),
    "ok": ("✓", "done", "#2e7d32"),
    "error": ("✗", "error", _RED),
    "repeated": ("↺", "same call as before: earlier result reused", "#757575"),
    "cancelled": ("⏹", "cancelled", "#ef6c00"),
    "unanswered": ("…", "no result", "#757575"),
    "waiting": ("⏸", "waiting for your approval", "#b26a00"),
    "paused": ("⏸", "not run yet: runs when the run resumes", "#757575"),
}
_ROLE_LABELS = {"system": "System", "user": "You", "assistant": "Assistant"}
_BOX = "margin:4px 0;padding:2px 8px;border-left:3px solid {colour};background:rgba(127,127,127,0.06)"
_PRE = "margin:2px 0 6px;padding:4px 6px;max-height:24em;overflow:auto;white-space:pre-wrap;word-break:break-word"


# -- one tool call, as both renderings see it -------------------------------------------------------------
@dataclass
class ShownCall:
    """One tool call as a block shows it: filled in from the stream by the live display, or from the messages."""

    name: str
    arguments: str = ""
    content: str | None = None
    state: str = "running"
    duration: float | None = None
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (mime type, data)


def _state_of(content: str) -> str:
    """A tool message keeps no error flag, so the static rendering recognises the shapes errors take: the
    conversation's error results (`messages.is_error_result`) and the interpreter's tracebacks."""
    if content == CANCELLED:
        return "cancelled"
    if is_error_result(content) or "Traceback (most recent call last)" in content:
        return "error"
    return "ok"


def _call_preview(call: ShownCall) -> str:
    """`name(arguments)` on one line, as the terminal reporter writes it."""
    if call.name == PYTHON:
        first = next((line for line in code_of(call.arguments).splitlines() if line.strip()), "")
        return shorten(f"{call.name}: {first}", 100)
    return shorten(f"{call.name}({compact_json(call.arguments)})", 100)


def _pretty_arguments(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments or "{}"), ensure_ascii=False, indent=2)
    except json.JSONDecodeError:
        return arguments


def _call_html(call: ShownCall) -> str:
    icon, label, colour = _STATES[call.state]
    status = label + (f" · {_seconds(call.duration)}" if call.duration else "")
    headline = ""
    if call.state == "error" and call.content:
        first = next((line for line in call.content.splitlines() if line.strip()), "")
        headline = f' <span style="color:{_RED}">{html.escape(shorten(first, 160))}</span>'
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


def _call_plain(call: ShownCall) -> str:
    """The text a frontend without HTML shows (a terminal console, a text export)."""
    icon, label, _ = _STATES[call.state]
    line = f"{icon} {_call_preview(call)}"
    if call.content is None:
        return f"{line}  [{label}]"
    marker = "[error] " if call.state == "error" else ""
    return f"{line}\n  -> {marker}{shorten(call.content, 2000)}"


def _call_markdown(call: ShownCall) -> str:
    """The call's name and arguments as inline code, its code and result as fenced blocks: each a literal that
    no Markdown it holds can leave (`markdown_literal`, `fence`)."""
    icon, label, _ = _STATES[call.state]
    status = label + (f" · {_seconds(call.duration)}" if call.duration else "")
    if call.name == PYTHON:
        parts = [f"{icon} **`python`** — {status}", fence(code_of(call.arguments), "python")]
    else:
        arguments = markdown_literal(compact_json(call.arguments))
        parts = [f"{icon} **{markdown_literal(call.name)}** {arguments} — {status}"]
    if call.content is not None:
        parts.append(fence(call.content, "text"))
    return "\n\n".join(parts)


def _seconds(duration: float) -> str:
    if duration < 1:
        return f"{max(duration * 1000, 1):.0f} ms"
    return f"{duration:.2f} s" if duration < 10 else f"{duration:.1f} s"


def call_bundle(call: ShownCall) -> Bundle:
    """The call's block, for a display that shows HTML or text."""
    return {"text/html": _call_html(call), "text/plain": _call_plain(call)}


# -- text and errors -----------------------------------------------------------------------------------------
def text_bundle(text: str, resolve: ImageResolver | None = None) -> Bundle:
    """Model or user text, displayed: the one way such text reaches the frontend (HTML from the guarded
    renderer, Markdown made inert, the text itself)."""
    return {"text/html": f'<div class="fa-text">{markdown_html(text, resolve)}</div>',
            "text/markdown": inert_markdown(text), "text/plain": text}


def error_bundle(text: str, css_class: str = "fa-error fa-failure") -> Bundle:
    """A red box with `text` as text: an error message can quote the model or a tool, so it is escaped, and
    there is no Markdown to render it as."""
    box = f'<div class="{css_class}" style="{_BOX.format(colour=_RED)};color:{_RED}">{html.escape(text)}</div>'
    return {"text/html": box, "text/plain": text}


def failure_text(error: BaseException) -> str:
    """`✗ ErrorType: message`, the line a failed run ends with."""
    return f"✗ {type(error).__name__}{f': {error}' if str(error) else ''}"


# -- the static rendering ----------------------------------------------------------------------------------
def render_markdown(messages: Sequence[Mapping[str, Any]]) -> str:
    """The whole conversation as Markdown: who said what, each call with its arguments and result in fenced
    blocks (never raw HTML, so nothing a tool returned can become markup). Images stay as their paths, and
    images and tags in the messages' text are escaped: a Markdown viewer would fetch them as it shows them."""
    parts = []
    for kind, value in _transcript(messages, None):
        if isinstance(value, ShownCall):
            parts.append(_call_markdown(value))
        else:
            label = _ROLE_LABELS.get(kind) or markdown_literal(kind)  # a saved file can name any role
            parts.append(f"**{label}**\n\n{inert_markdown(value)}")
    return "\n\n".join(parts)


def render_html(messages: Sequence[Mapping[str, Any]], *, resolve_image: ImageResolver | None = None) -> str:
    """The whole conversation as one HTML block: text as Markdown, calls as collapsible blocks, the system
    prompt folded away. Interpreter images, and images the text names by sandbox path, are embedded when
    `resolve_image` finds their files; no other image is fetched (see `markdown.py`)."""
    parts = []
    for kind, value in _transcript(messages, resolve_image):
        if isinstance(value, ShownCall):
            parts.append(_call_html(value))
        elif kind == "system":
            parts.append(f'<details class="fa-system" style="{_BOX.format(colour="#757575")}">'
                         f"<summary>System</summary>{markdown_html(value, resolve_image)}</details>")
        else:
            label = html.escape(_ROLE_LABELS.get(kind, kind))
            css_class = f"fa-{kind}" if kind in _ROLE_LABELS else "fa-other-role"
            parts.append(f'<div class="{css_class}" style="margin:6px 0">'
                         f'<div style="font-weight:600;opacity:0.7">{label}</div>'
                         f"{markdown_html(value, resolve_image)}</div>")
    return f'<div class="fa-conversation">{"".join(parts)}</div>'


def _transcript(
    messages: Sequence[Mapping[str, Any]], resolve: ImageResolver | None
) -> Iterator[tuple[str, Any]]:
    """(role, text) and ("call", ShownCall) in reading order, each call paired with its tool message. Messages set by
    hand can hold anything: ids that are not strings pair with nothing, calls that are not objects are left out."""
    answers = {_id_of(m.get("tool_call_id")): m for m in messages if m.get("role") == "tool"}
    answers.pop(None, None)
    shown: set[str] = set()
    for message in messages:
        role = str(message.get("role"))
        if role == "tool":
            if _id_of(message.get("tool_call_id")) not in shown:  # no call in the list has its id
                yield "call", _static_call(str(message.get("name") or "tool"), "", message, resolve)
            continue
        text = _shown_text(message.get("content"))
        if text.strip():
            yield role, text
        for tool_call in message.get("tool_calls") or ():
            function = tool_call.get("function") if isinstance(tool_call, Mapping) else None
            if not isinstance(function, Mapping):
                continue
            call_id = _id_of(tool_call.get("id"))
            if call_id is not None:
                shown.add(call_id)
            name, arguments = str(function.get("name", "")), function.get("arguments") or ""
            yield "call", _static_call(name, arguments, answers.get(call_id), resolve)


def _id_of(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _static_call(
    name: str, arguments: Any, answer: Mapping[str, Any] | None, resolve: ImageResolver | None
) -> ShownCall:
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    if answer is None:
        return ShownCall(name, arguments, state="unanswered")
    content = _shown_text(answer.get("content"))
    images = load_images(content, resolve) if name == PYTHON else []
    return ShownCall(name, arguments, content, _state_of(content), images=images)


def _shown_text(content: Any) -> str:
    """A message's content as the text to render: its text parts, and any other part as `[its type]`. The
    type comes from the file as well, so only its letters, digits and `_` are kept: `[image_url]` stays,
    `![p](https://...)` in its place cannot become Markdown."""
    if isinstance(content, list):
        content = [{**part, "type": _NOT_A_NAME.sub("", str(part.get("type", "text"))) or "part"}
                   if isinstance(part, Mapping) else part for part in content]
    return message_text(content, "\n", name_other_parts=True)
