"""A run never ends quietly: how it ended is recorded (`last_end`), a cut answer is flagged on the event, in the log
and by the CLI (exit 4), a pause for approval is reported by the CLI with what waits (exit 3); a turn that repeats
one call dozens of times runs it once; settings are one checked, frozen config that forks share."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from functionary_agent import Conversation, Limits, MaxTurnsExceeded, ModelError, RunEnd, UsageLimitExceeded
from functionary_agent.errors import ApprovalRequired, ConfigurationError
from functionary_agent.events import FinalAnswer, ToolResult
from functionary_agent.messages import AssistantMessage
from functionary_agent.models.base import ChatModel
from functionary_agent.testing import ScriptedModel, call
from tests.openai_server import ScriptedServer, function_call, reply

ROOT = Path(__file__).resolve().parents[1]


def test_an_answer_ends_the_run_and_says_how_the_model_stopped() -> None:
    chat = Conversation(ScriptedModel([AssistantMessage("all done", finish_reason="stop")]))
    assert chat.submit("hi") == "all done"
    assert chat.last_end == RunEnd("answer", "stop", truncated=False)


def test_a_cut_answer_is_flagged_on_the_event_the_end_and_the_log(caplog: pytest.LogCaptureFixture) -> None:
    chat = Conversation(ScriptedModel([AssistantMessage("The capital of France is", finish_reason="length")]))
    with caplog.at_level(logging.WARNING, logger="functionary_agent"):
        events = list(chat.stream("capital?"))
    final = events[-1]
    assert isinstance(final, FinalAnswer) and final.truncated and final.finish_reason == "length"
    assert chat.last_end is not None and chat.last_end.truncated and chat.last_end.reason == "answer"
    assert any("cut short" in record.getMessage() for record in caplog.records)


def test_a_pause_a_limit_and_an_error_are_recorded() -> None:
    def delete(path: str) -> str:
        return "deleted"

    chat = Conversation(ScriptedModel([{"tool_calls": [call("delete", {"path": "/tmp/x"})]}]))
    chat.register(delete, approve=True)
    with pytest.raises(ApprovalRequired):
        chat.submit("delete /tmp/x")
    assert chat.last_end == RunEnd("paused")

    looping = Conversation(ScriptedModel(lambda request: {"tool_calls": [call("_echo", {"text": "again"})]}),
                           tools=[_echo], max_turns=2)
    with pytest.raises(MaxTurnsExceeded):
        looping.submit("go")
    assert looping.last_end is not None and looping.last_end.reason == "limit"

    two = {"tool_calls": [call("_echo", {"text": "a"}, id="a"), call("_echo", {"text": "b"}, id="b")]}
    limited = Conversation(ScriptedModel([two]), tools=[_echo], limits=Limits(max_tool_calls=1))
    with pytest.raises(UsageLimitExceeded):
        limited.submit("go")
    assert limited.last_end is not None and limited.last_end.reason == "limit"

    class Broken(ChatModel):
        async def acomplete(self, messages: Any, **settings: Any) -> AssistantMessage:
            raise ModelError("the server is down")

    broken = Conversation(Broken())
    with pytest.raises(ModelError):
        broken.submit("go")
    assert broken.last_end is not None and broken.last_end.reason == "error" and "down" in broken.last_end.detail


def test_leaving_a_stream_early_records_a_cancelled_run() -> None:
    chat = Conversation(ScriptedModel([{"tool_calls": [call("_echo", {"text": "a"})]}, "done"]), tools=[_echo])
    for event in chat.stream("go"):
        if isinstance(event, ToolResult):
            break
    assert chat.last_end == RunEnd("cancelled")


def _echo(text: str) -> str:
    """Echo the text."""
    return text


def test_dozens_of_identical_calls_in_one_turn_run_once() -> None:
    runs: list[str] = []

    def get_price(item: str) -> str:
        """The price of an item."""
        runs.append(item)
        return "2.50"

    copies = [call("get_price", {"item": "bread"}, id=f"c{i}") for i in range(64)]
    model = ScriptedModel([{"tool_calls": copies}, "Bread costs 2.50."])
    chat = Conversation(model, tools=[get_price])
    assert chat.submit("price of bread?") == "Bread costs 2.50."
    assert runs == ["bread"]
    results = [m for m in chat.messages if m["role"] == "tool"]
    assert len(results) == 64 and results[0]["content"] == "2.50"  # every call answered, in the model's order
    assert all("Not run" in m["content"] and "c0" in m["content"] for m in results[1:])
    assert "64 identical get_price calls" in results[1]["content"]


def test_a_few_identical_calls_still_all_run_and_the_bound_is_a_setting() -> None:
    runs: list[str] = []

    def roll(sides: int) -> str:
        """Roll a die."""
        runs.append(str(sides))
        return "4"

    three = [call("roll", {"sides": 6}, id=f"r{i}") for i in range(3)]
    chat = Conversation(ScriptedModel([{"tool_calls": three}, "ok"]), tools=[roll])
    chat.submit("roll three dice")
    assert len(runs) == 3  # three dice are three calls: at the default bound, all run
    runs.clear()
    chat = Conversation(ScriptedModel([{"tool_calls": three}, "ok"]), tools=[roll], max_identical_calls=1)
    chat.submit("roll three dice")
    assert len(runs) == 1


def test_settings_are_one_checked_frozen_config_shared_by_forks() -> None:
    chat = Conversation(ScriptedModel(["a"]), max_turns=4, temperature=0.2)
    with pytest.raises(ConfigurationError, match="max_turns"):
        chat.max_turns = 0
    with pytest.raises(ConfigurationError, match="max_identical_calls"):
        Conversation(ScriptedModel(["a"]), max_identical_calls=0)
    chat.limits = Limits(max_requests=3)
    fork = chat.fork()
    assert fork.config == chat.config and fork.max_turns == 4 and fork.settings == {"temperature": 0.2}
    fork.max_turns = 7  # a fork's settings are its own from then on
    assert (chat.max_turns, fork.max_turns) == (4, 7)


def test_a_delta_without_index_is_placed_once_at_the_model_seam() -> None:
    class NoIndex(ChatModel):
        async def astream(self, messages: Any, **settings: Any) -> Any:
            if messages[-1]["role"] == "tool":
                yield {"content": "done"}
                yield AssistantMessage("done")
                return
            yield {"tool_calls": [{"id": "a", "function": {"name": "_echo", "arguments": ""}}]}
            yield {"tool_calls": [{"function": {"arguments": '{"text": "x"}'}}]}
            yield {"tool_calls": [{"id": "b", "function": {"name": "_echo", "arguments": '{"text": "y"}'}}]}
            yield AssistantMessage(None, [call("_echo", {"text": "x"}, id="a"), call("_echo", {"text": "y"}, id="b")])

    chat = Conversation(NoIndex(), tools=[_echo])
    started = [(e.index, e.id) for e in chat.stream("go") if type(e).__name__ == "ToolCallStarted"]
    assert started == [(0, "a"), (1, "b")]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FUNCTIONARY_")}
    return subprocess.run([sys.executable, "-m", "functionary_agent.cli", *args], capture_output=True, text=True,
                          timeout=60, env=clean, cwd=ROOT, stdin=subprocess.DEVNULL)


def test_the_cli_says_a_cut_answer_was_cut_and_exits_4() -> None:
    with ScriptedServer(handler=lambda body: reply("The capital of Fra", finish_reason="length")) as server:
        done = _cli("run", "capital?", "--base-url", server.base_url)
        as_json = _cli("run", "capital?", "--base-url", server.base_url, "--json")
    assert done.returncode == 4, done.stderr
    assert done.stdout.strip() == "The capital of Fra"
    assert "cut short (finish_reason=length)" in done.stderr
    assert done.stderr.count("cut short") == 1, done.stderr  # said once, by the CLI (not again by the log)
    assert as_json.returncode == 4 and json.loads(as_json.stdout)["end"]["truncated"] is True


@pytest.fixture()
def delete_tools(tmp_path: Path) -> str:
    path = tmp_path / "files.py"
    path.write_text(
        "from functionary_agent import tool\n\n"
        "@tool(approve=True)\n"
        "def delete_file(path: str) -> str:\n"
        "    \"\"\"Delete a file.\"\"\"\n"
        "    open(path + '.deleted', 'w').close()\n"
        "    return 'deleted'\n"
    )
    return str(path)


def test_the_cli_reports_a_pause_without_a_terminal_and_exits_3(tmp_path: Path, delete_tools: str) -> None:
    target = str(tmp_path / "old.log")

    def script(body: dict[str, Any]) -> Any:
        if body["messages"][-1]["role"] == "tool":
            return reply("Deleted.")
        return reply(None, [function_call("delete_file", json.dumps({"path": target}))])

    with ScriptedServer(handler=script) as server:
        paused = _cli("run", f"delete {target}", "--tools", delete_tools, "--base-url", server.base_url)
        approved = _cli("run", f"delete {target}", "--tools", delete_tools, "--base-url", server.base_url,
                        "--approve", "delete_file")
    assert paused.returncode == 3, paused.stderr
    assert "wait for approval" in paused.stderr and "delete_file" in paused.stderr and target in paused.stderr
    assert "--approve delete_file" in paused.stderr
    assert approved.returncode == 0, approved.stderr
    assert approved.stdout.strip().endswith("Deleted.") and Path(target + ".deleted").exists()


def test_the_bundled_model_cut_by_max_tokens_is_flagged() -> None:
    """The real embedded engine: an answer stopped by `max_tokens` is an answer marked cut, never a whole one."""
    chat = Conversation(max_tokens=6)
    events = list(chat.stream("Write a long story about a lighthouse keeper and the sea."))
    final = events[-1]
    assert isinstance(final, FinalAnswer) and final.content
    assert final.truncated and final.finish_reason == "length"
    assert chat.last_end is not None and chat.last_end.truncated
