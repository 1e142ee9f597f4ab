"""A run that waits for approval, in a real notebook kernel (nbclient): it shows as paused, not as a traceback, and
the line the pause box offers is run as it is, in the next cell, whatever holds the conversation."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = '''
from functionary_agent import Conversation
from functionary_agent.testing import ScriptedModel, call
DELETED = []
def delete_file(path: str) -> str:
    """Delete a file."""
    DELETED.append(path)
    return "deleted " + path
def list_files() -> list:
    """List the files."""
    return ["a.txt", "b.txt"]
def agent(ids="call"):
    chat = Conversation(ScriptedModel([
        {"tool_calls": [call("list_files", {}, id=ids + "_list"),
                        call("delete_file", {"path": "a.txt"}, id=ids + "_a")]},
        {"tool_calls": [call("delete_file", {"path": "b.txt"}, id=ids + "_b")]},
        "Deleted a.txt and b.txt.",
    ]), tools=[list_files])
    chat.register(delete_file, approve=True)
    return chat
'''
LIBRARY_FRAMES = ("Traceback", 'File "', "site-packages", "functionary_agent/", "\x1b[")

Run = Callable[[str], tuple[Any, dict[str, Any]]]


@contextmanager
def kernel() -> Iterator[Run]:
    """A live kernel; `run(source)` adds a cell, executes it, and returns it with the kernel's reply."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.v4.new_notebook()
    replies: list[dict[str, Any]] = []
    client = nbclient.NotebookClient(
        notebook, timeout=180, kernel_name="python3", allow_errors=True,
        resources={"metadata": {"path": str(ROOT)}},
        on_cell_executed=lambda **info: replies.append(info["execute_reply"]["content"]),
    )

    def run(source: str) -> tuple[Any, dict[str, Any]]:
        notebook.cells.append(nbformat.v4.new_code_cell(source))
        cell = client.execute_cell(notebook.cells[-1], len(notebook.cells) - 1)
        return cell, replies[-1]

    with client.setup_kernel():
        yield run


def assert_paused(cell: Any, reply: dict[str, Any]) -> str:
    """The cell ended as a pause (so "Run all" stops there) and shows only the box and the calls: no error
    output, no traceback. Returns the line the box offers."""
    assert reply["status"] == "error" and reply["ename"] == "ApprovalRequired"
    assert [out["output_type"] for out in cell.outputs if out["output_type"] not in ("display_data",)] == []
    shown = json.dumps(cell.outputs, ensure_ascii=False)
    assert not [frame for frame in LIBRARY_FRAMES if frame in shown], shown
    (box,) = [out["data"]["text/plain"] for out in cell.outputs if "⏸ Waiting for your approval" in
              out.get("data", {}).get("text/plain", "")]
    return str(box.splitlines()[-1].strip())


def test_a_paused_run_shows_as_paused_and_its_line_names_the_variable() -> None:
    with kernel() as run:
        run(SETUP + "assistant = agent()")
        cell, reply = run("assistant.submit('Delete a.txt and b.txt')")
        assert assert_paused(cell, reply) == 'assistant.resume({"call_a": True})'
        blocks = [out["data"]["text/html"] for out in cell.outputs if "fa-tool" in out["data"].get("text/html", "")]
        assert ['class="fa-tool fa-paused"' in blocks[0], 'class="fa-tool fa-waiting"' in blocks[1]] == [True, True]
        assert "running…" not in json.dumps(cell.outputs, ensure_ascii=False)
        assert "waiting for your approval" in blocks[1] and "runs when the run resumes" in blocks[0]

        again, reply = run("assistant.submit('Delete a.txt and b.txt')")  # calls still wait: the same box
        assert assert_paused(again, reply) == 'assistant.resume({"call_a": True})'

        resumed, reply = run('assistant.resume({"call_a": True})')  # the line as offered; it pauses again
        line = assert_paused(resumed, reply)
        assert line == 'assistant.resume({"call_b": True})'
        done, reply = run(line)
        assert reply["status"] == "ok" and done.outputs[-1]["data"]["text/plain"] == "'Deleted a.txt and b.txt.'"
        deleted, _ = run("DELETED, len(assistant.messages)")
        assert deleted.outputs[0]["data"]["text/plain"] == "(['a.txt', 'b.txt'], 7)"


def test_without_a_global_name_the_offered_line_finds_the_conversation() -> None:
    fallback = "from functionary_agent.notebook import resume; resume({})"
    with kernel() as run:
        run(SETUP + "typed = agent('typed')\nagents = {'cleaner': agent()}")
        cell, reply = run("typed.submit('Delete a.txt', output_type=str)")  # not shown live: the kernel's hook
        assert assert_paused(cell, reply) == 'typed.resume({"typed_a": True})'

        cell, reply = run("agents['cleaner'].submit('Delete a.txt and b.txt')")
        line = assert_paused(cell, reply)
        assert line == fallback.format('{"call_a": True}')
        run("twin = agents['cleaner'].fork()  # a copy made while paused waits on the same call")
        _, reply = run(line)
        assert reply["ename"] == "ConfigurationError" and "2 conversations wait on call_a" in reply["evalue"]
        run("del twin")
        cell, reply = run(line)
        assert assert_paused(cell, reply) == fallback.format('{"call_b": True}')
        done, reply = run(fallback.format('{"call_b": True}'))
        assert reply["status"] == "ok" and done.outputs[-1]["data"]["text/plain"] == "'Deleted a.txt and b.txt.'"
        _, reply = run(fallback.format('{"call_zz": True}'))
        assert reply["ename"] == "ConfigurationError" and "no paused conversation" in reply["evalue"]
