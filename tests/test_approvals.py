"""People in the loop: calls that need a yes, through a callback, a pause and `resume`, or the terminal."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from functionary_agent import ApprovalRequired, ConfigurationError, Conversation, Tool
from functionary_agent.events import ApprovalRequested, FinalAnswer, ToolResult
from functionary_agent.testing import ScriptedModel, call
from tests.openai_server import ScriptedServer, function_call, reply
from tests.terminal import spawn_chat

ROOT = Path(__file__).resolve().parents[1]
DELETED: list[str] = []


def delete_file(path: str) -> str:
    """Delete a file."""
    DELETED.append(path)
    return f"deleted {path}"


def list_files() -> list[str]:
    """List the files."""
    return ["a.txt", "b.txt"]


@pytest.fixture(autouse=True)
def _clean() -> None:
    DELETED.clear()


def two_calls_then_answer() -> ScriptedModel:
    return ScriptedModel([
        {"tool_calls": [call("list_files", {}, id="call_list"), call("delete_file", {"path": "a.txt"}, id="call_del")]},
        "Done.",
    ])


def conversation(model: ScriptedModel, **options: Any) -> Conversation:
    chat = Conversation(model, **options)
    chat.register(list_files)
    chat.register(delete_file, approve=True)
    return chat


@pytest.mark.parametrize(("decision", "result"), [
    (True, "deleted a.txt"),
    (False, "Error: the user declined this call"),
    ("keep it for the audit", "Error: the user declined this call: keep it for the audit"),
])
def test_a_callback_decides_and_the_model_reads_the_outcome(decision: Any, result: str) -> None:
    asked: list[str] = []

    def ask(tool_call: Any) -> Any:
        asked.append(tool_call.name)
        return decision

    chat = conversation(two_calls_then_answer(), on_approval=ask)
    assert chat.submit("Delete a.txt") == "Done."
    assert asked == ["delete_file"]  # list_files needs no yes
    assert [m["content"] for m in chat.messages if m["role"] == "tool"] == ['["a.txt","b.txt"]', result]
    expected = ["a.txt"] if decision is True else []
    assert expected == DELETED


def test_an_async_callback_and_a_predicate_on_the_arguments() -> None:
    async def ask(tool_call: Any) -> bool:
        await asyncio.sleep(0)
        return False

    calls = [call("delete_file", {"path": "tmp/x"}), call("delete_file", {"path": "db"})]
    model = ScriptedModel([{"tool_calls": calls}, "ok"])
    chat = Conversation(model, on_approval=ask)
    chat.register(delete_file, approve=lambda arguments: not arguments["path"].startswith("tmp/"))
    chat.submit("Clean up")
    assert DELETED == ["tmp/x"]  # the predicate let the temporary file through; the callback declined "db"


def test_calls_needing_no_yes_run_while_the_callback_waits() -> None:
    started: list[float] = []

    async def slow_list() -> str:
        started.append(time.perf_counter())
        await asyncio.sleep(0.3)
        return "listed"

    async def ask(tool_call: Any) -> bool:
        return True

    model = ScriptedModel([{"tool_calls": [call("slow_list", {}), call("slow_list", {"x": 1}),
                                           call("delete_file", {"path": "a"})]}, "ok"])
    chat = Conversation(model, tools=[slow_list], on_approval=ask)
    chat.register(delete_file, approve=True)
    begun = time.perf_counter()
    chat.submit("go")
    assert time.perf_counter() - begun < 0.55  # the two slow calls ran at once


def test_a_broken_callback_declines_rather_than_runs() -> None:
    def ask(tool_call: Any) -> bool:
        raise RuntimeError("approval service down")

    chat = conversation(two_calls_then_answer(), on_approval=ask)
    chat.submit("Delete a.txt")
    assert DELETED == []
    assert "approval check failed (RuntimeError: approval service down)" in chat.messages[-2]["content"]


def test_without_a_callback_the_run_pauses_and_resume_goes_on() -> None:
    model = two_calls_then_answer()
    chat = conversation(model)
    with pytest.raises(ApprovalRequired) as caught:
        chat.submit("Delete a.txt")
    assert [c.id for c in caught.value.calls] == ["call_del"]
    assert [c.id for c in chat.pending_approvals] == ["call_del"]
    assert chat.messages[-1]["role"] == "assistant" and DELETED == []  # nothing ran yet
    assert chat.resume({"call_del": True}) == "Done."
    assert DELETED == ["a.txt"] and chat.pending_approvals == []
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "tool", "assistant"]
    assert chat.last_usage.requests == 2  # the resumed run counts on from the paused one


def test_stream_yields_approval_requested_and_ends() -> None:
    chat = conversation(two_calls_then_answer())
    events = list(chat.stream("Delete a.txt"))
    assert isinstance(events[-1], ApprovalRequested) and [c.name for c in events[-1].calls] == ["delete_file"]
    assert not any(isinstance(e, (ToolResult, FinalAnswer)) for e in events)
    assert chat.resume({"call_del": "no"}) == "Done."


@pytest.mark.parametrize(("decisions", "message"), [
    ({"call_other": True}, "unknown call ids call_other"),
    ({}, "no decision for call_del"),
    ({"call_del": 1}, "decisions are True, False or a reason string"),
])
def test_bad_resumes_are_clear_errors_and_change_nothing(decisions: dict[str, Any], message: str) -> None:
    chat = conversation(two_calls_then_answer())
    with pytest.raises(ApprovalRequired):
        chat.submit("Delete a.txt")
    before = [dict(m) for m in chat.messages]
    with pytest.raises(ConfigurationError, match=message):
        chat.resume(decisions)
    assert chat.messages == before
    with pytest.raises(ApprovalRequired):  # a new question while calls wait is refused too
        chat.submit("something else")
    assert chat.messages == before


def test_resume_with_nothing_pending_is_an_error() -> None:
    chat = conversation(ScriptedModel(["hi"]))
    chat.submit("hello")
    with pytest.raises(ConfigurationError, match="nothing is waiting for approval"):
        chat.resume({"call_x": True})


def test_a_paused_conversation_is_saved_and_resumed_in_another_process(tmp_path: Path) -> None:
    saved = tmp_path / "paused.json"
    chat = conversation(two_calls_then_answer())
    with pytest.raises(ApprovalRequired):
        chat.submit("Delete a.txt")
    chat.save(saved)
    child = textwrap.dedent(f"""
        from functionary_agent import Conversation
        from functionary_agent.testing import ScriptedModel
        from tests.test_approvals import delete_file, list_files, DELETED
        chat = Conversation.load({str(saved)!r}, ScriptedModel(["Deleted it."]))
        chat.register(list_files)
        chat.register(delete_file, approve=True)
        print([c.id for c in chat.pending_approvals], chat.resume({{"call_del": True}}), DELETED)
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stdout.strip() == "['call_del'] Deleted it. ['a.txt']", done.stderr


def test_the_tool_decorator_and_bad_approve_values() -> None:
    from functionary_agent import ToolDefinitionError, tool

    @tool(approve=True)
    def wipe() -> str:
        return "wiped"

    assert wipe.approve is True and Tool.from_function(list_files).approve is False
    with pytest.raises(ToolDefinitionError, match="approve must be"):
        Tool.from_function(list_files, approve="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="on_approval must be a function"):
        Conversation(ScriptedModel([]), on_approval="ask")  # type: ignore[arg-type]


def test_the_cli_chat_asks_yes_or_no_in_a_terminal(tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    tools = tmp_path / "files.py"
    marker = tmp_path / "deleted.txt"
    tools.write_text(textwrap.dedent(f"""
        from functionary_agent import tool

        @tool(approve=True)
        def delete_file(path: str) -> str:
            \"\"\"Delete a file.\"\"\"
            with open({str(marker)!r}, "a") as out:
                out.write(path + "\\n")
            return "deleted " + path
    """))

    def script(body: dict[str, Any]) -> dict[str, Any]:
        last = body["messages"][-1]
        if last["role"] == "tool":
            return reply(f"Result: {last['content']}")
        path = str(last["content"]).split()[-1]
        return reply(None, [function_call("delete_file", json.dumps({"path": path}))])

    with ScriptedServer(handler=script) as server:
        child = spawn_chat(server.base_url, "--tools", str(tools))
        child.sendline("delete keep.txt")
        child.expect("needs your approval")
        child.expect(r"run it\? \[y/N\] ")
        child.sendline("n")
        child.expect("Result: Error: the user declined this call")
        child.expect("you> ")
        child.sendline("delete old.txt")
        child.expect(r"run it\? \[y/N\] ")
        child.sendline("y")
        child.expect("Result: deleted old.txt")
        child.expect("you> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    assert marker.read_text() == "old.txt\n"
