"""A sync tool that never returns: it must neither starve later calls nor keep the process alive at exit."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from functionary_agent import Conversation, Tool
from functionary_agent.events import ToolResult
from functionary_agent.testing import ScriptedModel, call
from tests.openai_server import ScriptedServer, function_call, reply

ROOT = Path(__file__).resolve().parents[1]
STUCK_CALLS = 70  # more than the 64 threads the old shared pool had


@pytest.fixture
def never_set() -> Iterator[threading.Event]:
    """An event stuck tools wait on; set after the test so their threads end instead of piling up."""
    event = threading.Event()
    yield event
    event.set()


def test_seventy_stuck_sync_tools_do_not_starve_a_later_call(never_set: threading.Event) -> None:
    def stuck(n: int) -> str:  # each call distinct: identical calls in one turn would run once
        never_set.wait()
        return "never"

    def quick(text: str) -> str:
        return text.upper()

    model = ScriptedModel([
        {"content": None, "tool_calls": [call("stuck", {"n": i}, id=f"s{i}") for i in range(STUCK_CALLS)]},
        {"content": None, "tool_calls": [call("quick", {"text": "still served"}, id="q")]},
        "done",
    ])
    chat = Conversation(model, tools=[Tool.from_function(stuck, timeout=0.3), Tool.from_function(quick, timeout=3)])
    results = [event for event in chat.stream("go") if isinstance(event, ToolResult)]
    assert [r.content for r in results[:STUCK_CALLS]] == ["Error: stuck timed out after 0.3 s"] * STUCK_CALLS
    quick_result = results[STUCK_CALLS]
    assert (quick_result.id, quick_result.content, quick_result.is_error) == ("q", "STILL SERVED", False)
    assert quick_result.duration < 1.0, f"the call waited {quick_result.duration:.2f} s behind stuck threads"
    assert chat.messages[-1] == {"role": "assistant", "content": "done"}


def test_an_abandoned_thread_is_a_daemon_and_its_late_result_is_dropped(never_set: threading.Event) -> None:
    finished = threading.Event()

    def stuck() -> str:
        never_set.wait()
        finished.set()
        return "too late"

    loop_errors: list[dict[str, Any]] = []

    async def scenario() -> tuple[str, list[threading.Thread]]:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: loop_errors.append(context))
        outcome = await Tool.from_function(stuck, timeout=0.2).run({})
        left = [t for t in threading.enumerate() if t.name.startswith("functionary-tool") and t.is_alive()]
        never_set.set()  # the tool returns now; nobody waits for it any more
        assert await asyncio.to_thread(finished.wait, 5)
        await asyncio.sleep(0.1)  # let the late result reach the loop, where it must be dropped quietly
        return outcome.content, left

    content, left_running = asyncio.run(scenario())
    assert content == "Error: stuck timed out after 0.2 s"
    assert left_running and all(thread.daemon for thread in left_running)
    assert loop_errors == []


STUCK_TOOLS_FILE = """\
import threading

from functionary_agent import tool


@tool(timeout=0.5)
def wait_forever() -> str:
    \"\"\"Never returns.\"\"\"
    threading.Event().wait()
    return "never"
"""


def test_the_cli_exits_right_after_its_answer_despite_a_stuck_tool(tmp_path: Path) -> None:
    tools = tmp_path / "stuck.py"
    tools.write_text(STUCK_TOOLS_FILE)

    def script(body: dict[str, Any]) -> dict[str, Any]:
        if body["messages"][-1]["role"] == "tool":
            return reply("The tool never answered.")
        return reply(None, [function_call("wait_forever", "{}")])

    with ScriptedServer(handler=script) as server:
        command = [sys.executable, "-m", "functionary_agent.cli", "run", "go", "--tools", str(tools),
                   "--base-url", server.base_url]
        lines, exit_delay = _answer_then_exit_delay(command, "The tool never answered.")
    assert lines[1] == "  -> Error: wait_forever timed out after 0.5 s"
    assert exit_delay < 3.0, f"the process lived {exit_delay:.1f} s after its answer"


LIBRARY_SCRIPT = """\
import asyncio
import threading

from functionary_agent import Conversation, Tool
from functionary_agent.testing import ScriptedModel, call


def wait_forever() -> str:
    threading.Event().wait()
    return "never"


model = ScriptedModel([{"content": None, "tool_calls": [call("wait_forever", {})]}, "The tool never answered."])
chat = Conversation(model, tools=[Tool.from_function(wait_forever, timeout=0.5)])
print(asyncio.run(chat.asubmit("go")))
"""


def test_a_script_exits_right_after_its_answer_despite_a_stuck_tool(tmp_path: Path) -> None:
    script = tmp_path / "stuck_script.py"
    script.write_text(LIBRARY_SCRIPT)
    lines, exit_delay = _answer_then_exit_delay([sys.executable, str(script)], "The tool never answered.")
    assert lines == ["The tool never answered."]
    assert exit_delay < 3.0, f"the process lived {exit_delay:.1f} s after its answer"


def _answer_then_exit_delay(command: list[str], answer: str) -> tuple[list[str], float]:
    """Run `command` until it prints `answer`; its stdout lines, and how long it lived after that line.
    A process still alive 10 s after its answer fails the test (and is killed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNCTIONARY_")}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
    try:
        lines = _read_until(process, answer, within=60)
        answered = time.monotonic()
        status = process.wait(timeout=10)
        exited = time.monotonic()
    except subprocess.TimeoutExpired:
        raise AssertionError("the process was still alive 10 s after its answer") from None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert status == 0, process.stderr.read() if process.stderr else ""
    return lines, exited - answered


def _read_until(process: subprocess.Popen[str], last_line: str, within: float) -> list[str]:
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if lines[-1] == last_line:
            return lines
    raise AssertionError(f"no answer line; got {lines!r}")
