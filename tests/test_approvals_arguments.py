"""Approvals give a call's arguments one meaning: a dict, wherever a person's code reads them (the `on_approval`
callback, an `approve=` predicate, `ApprovalRequired.calls`, `ApprovalRequested.calls`, `pending_approvals`), with
the text the model wrote beside it as `raw_arguments`. The model is a real OpenAI-compatible server on 127.0.0.1,
so the arguments arrive as JSON text, as they do from every server."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from functionary_agent import ApprovalRequired, Conversation
from functionary_agent._run.approvals import PendingCall
from functionary_agent.events import ApprovalRequested
from tests.openai_server import ScriptedServer, function_call, reply
from tests.terminal import spawn_chat

ROOT = Path(__file__).resolve().parents[1]
LOG = '{"path":  "tmp/old.log",\n "note": "café"}'  # spaced and non-ASCII, as a server may send it
DATABASE = '{"path": "db.sqlite"}'
DELETED: list[str] = []


def delete_file(path: str, note: str = "") -> str:
    """Delete a file."""
    DELETED.append(path)
    return f"deleted {path}"


@pytest.fixture(autouse=True)
def _clean() -> None:
    DELETED.clear()


def two_deletions(body: dict[str, Any]) -> dict[str, Any]:
    """First turn: delete the log and the database; once the tool messages are back: answer with them."""
    if body["messages"][-1]["role"] == "tool":
        return reply(" | ".join(m["content"] for m in body["messages"] if m["role"] == "tool"))
    return reply(None, [function_call("delete_file", LOG, id="call_log"),
                        function_call("delete_file", DATABASE, id="call_db")])


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer(handler=two_deletions) as running:
        yield running


def chat_on(server: ScriptedServer, **options: Any) -> Conversation:
    return Conversation(base_url=server.base_url, **options)


def test_the_callback_and_the_predicate_both_index_the_arguments(server: ScriptedServer) -> None:
    by_predicate: list[dict[str, Any]] = []
    by_callback: list[PendingCall] = []

    def needs_a_yes(arguments: dict[str, Any]) -> bool:
        by_predicate.append(arguments)
        return arguments["path"] != "README.md"

    def ask(call: PendingCall) -> bool:
        by_callback.append(call)
        return call.arguments["path"].startswith("tmp/")

    chat = chat_on(server, on_approval=ask)
    chat.register(delete_file, approve=needs_a_yes)
    assert chat.submit("Clean up") == "deleted tmp/old.log | Error: the user declined this call"
    assert DELETED == ["tmp/old.log"]
    assert [call.arguments for call in by_callback] == by_predicate == [
        {"path": "tmp/old.log", "note": "café"}, {"path": "db.sqlite"}]
    assert [call.raw_arguments for call in by_callback] == [LOG, DATABASE]  # the text as the server sent it
    assert chat.messages[1]["tool_calls"][0]["function"]["arguments"] == LOG  # the messages keep the JSON text


def test_an_async_callback_indexes_them_too(server: ScriptedServer) -> None:
    async def ask(call: PendingCall) -> bool | str:
        await asyncio.sleep(0)
        return True if call.arguments["path"].startswith("tmp/") else f"keep {call.arguments['path']}"

    chat = chat_on(server, on_approval=ask)
    chat.register(delete_file, approve=True)
    assert chat.submit("Clean up") == "deleted tmp/old.log | Error: the user declined this call: keep db.sqlite"
    assert DELETED == ["tmp/old.log"]


def test_a_paused_run_is_answered_from_the_arguments_and_resumed(server: ScriptedServer) -> None:
    chat = chat_on(server)
    chat.register(delete_file, approve=True)
    with pytest.raises(ApprovalRequired) as caught:
        chat.submit("Clean up")
    paused = caught.value.calls
    assert paused == chat.pending_approvals
    assert "chat.resume" not in str(caught.value) and "resume({call_id: True/False/reason})" in str(caught.value)
    decisions = {call.id: call.arguments["path"].startswith("tmp/") or "not the database" for call in paused}
    assert chat.resume(decisions) == "deleted tmp/old.log | Error: the user declined this call: not the database"
    assert DELETED == ["tmp/old.log"] and chat.pending_approvals == []


def test_a_stream_pause_and_a_loaded_conversation_give_the_same_calls(server: ScriptedServer, tmp_path: Path) -> None:
    chat = chat_on(server)
    chat.register(delete_file, approve=True)
    (event,) = [e for e in chat.stream("Clean up") if isinstance(e, ApprovalRequested)]
    assert [call.arguments["path"] for call in event.calls] == ["tmp/old.log", "db.sqlite"]
    chat.save(tmp_path / "paused.json")
    restored = Conversation.load(tmp_path / "paused.json", base_url=server.base_url)
    restored.register(delete_file, approve=True)
    assert restored.pending_approvals == event.calls
    assert restored.resume({"call_log": True, "call_db": False}).startswith("deleted tmp/old.log")


@pytest.mark.parametrize("raw", ['{"path": "a.txt"', "[1, 2]", ""])
def test_arguments_that_are_no_json_object_are_an_empty_dict_beside_the_raw_text(raw: str) -> None:
    def script(body: dict[str, Any]) -> dict[str, Any]:
        if body["messages"][-1]["role"] == "tool":
            return reply(body["messages"][-1]["content"])
        return reply(None, [function_call("delete_file", raw, id="call_bad")])

    by_predicate: list[dict[str, Any]] = []
    seen: list[PendingCall] = []

    def ask(call: PendingCall) -> bool:
        seen.append(call)
        return call.arguments["path"] == "a.txt"  # KeyError: a failing check declines, never runs

    with ScriptedServer(handler=script) as server:
        chat = chat_on(server, on_approval=ask)
        chat.register(delete_file, approve=lambda arguments: by_predicate.append(arguments) or True)
        answer = chat.submit("Delete a.txt")
    assert [(call.arguments, call.raw_arguments) for call in seen] == [({}, raw)]
    assert by_predicate == ([] if raw else [{}])  # unreadable: asked without the predicate; no text reads as {}
    assert DELETED == []
    assert answer == "Error: the user declined this call: the approval check failed (KeyError: 'path')"


def test_the_terminal_question_shows_the_arguments_as_sent(tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    tools = tmp_path / "files.py"
    tools.write_text(textwrap.dedent("""
        from functionary_agent import tool

        @tool(approve=lambda arguments: arguments["path"] != "README.md")
        def delete_file(path: str, note: str = "") -> str:
            \"\"\"Delete a file.\"\"\"
            return "deleted " + path
    """))
    with ScriptedServer(handler=two_deletions) as server:
        child = spawn_chat(server.base_url, "--tools", str(tools), columns=160)
        child.sendline("clean up")
        child.expect_exact('delete_file({"path": "tmp/old.log", "note": "café"}) needs your approval')
        child.expect(r"run it\? \[y/N\] ")
        child.sendline("y")
        child.expect_exact('delete_file({"path": "db.sqlite"}) needs your approval')
        child.expect(r"run it\? \[y/N\] ")
        child.sendline("n")
        child.expect_exact("deleted tmp/old.log | Error: the user declined this call")
        child.expect("you> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
