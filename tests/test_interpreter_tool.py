"""The code interpreter inside the agent loop: a scripted model writes Python, a real sandboxed kernel runs it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from functionary_agent import Conversation
from functionary_agent._openai_messages import code_of
from functionary_agent.events import ToolResult
from functionary_agent.testing import ScriptedModel, call

pytest.importorskip("jupyter_client")
from sandbox import KernelSandbox
from tests.processes import process_gone


def python(code: str, id: str) -> dict[str, Any]:
    return {"tool_calls": [call("python", {"code": code}, id=id)]}


def test_model_code_runs_keeps_state_and_an_error_gets_fixed() -> None:
    model = ScriptedModel([
        python("total = sum(range(10))\nprint(totl)", id="c1"),  # a typo: NameError
        python("print(total * 2)", id="c2"),  # fixed; `total` survived the failed cell
        {"tool_calls": [call("python", "import math\nmath.sqrt(total + 55)", id="c3")]},  # raw code, no JSON
        "The answer is 10.",
    ])
    with Conversation(model, code_interpreter=True) as chat:
        events = list(chat.stream("compute things"))
        pid = chat.tools[0].sandbox.kernel_pid  # type: ignore[attr-defined]
    results = {e.id: e for e in events if isinstance(e, ToolResult)}
    assert results["c1"].is_error and "NameError" in results["c1"].content and "totl" in results["c1"].content
    assert not results["c2"].is_error and results["c2"].content == "90"
    assert results["c3"].content == "10.0"
    assert model.requests[0].tools == [{"type": "code_interpreter"}]
    assert [m["content"] for m in chat.messages if m["role"] == "tool"] == [r.content for r in results.values()]
    assert pid is not None
    assert process_gone(pid), "closing the conversation left the kernel running"


def test_tools_list_entry_enables_it_and_a_given_sandbox_stays_open(tmp_path: Any) -> None:
    with KernelSandbox(workdir=tmp_path, timeout=20) as box:
        model = ScriptedModel([python("open('note.txt', 'w').write('hi')", id="w"), "written"])
        chat = Conversation(model, tools=[{"type": "code_interpreter"}], code_interpreter=box)
        assert chat.submit("write a note") == "written"
        chat.close()
        assert not box.closed  # the caller's sandbox is the caller's to close
        assert (tmp_path / "note.txt").read_text() == "hi"
        assert box.execute("1 + 1").result == "2"


def test_empty_code_is_a_message_to_the_model() -> None:
    model = ScriptedModel([python("   ", id="e"), "ok"])
    with Conversation(model, code_interpreter={"timeout": 10}) as chat:
        chat.submit("nothing")
    tool_message = next(m for m in chat.messages if m["role"] == "tool")
    assert tool_message["content"].startswith("Error: python needs code to run")


@pytest.mark.parametrize(
    ("arguments", "code"),
    [
        ('{"code": "print(1)"}', "print(1)"),
        ({"code": "x = 2"}, "x = 2"),
        ("print('raw')", "print('raw')"),
        ('"print(2)"', "print(2)"),
        ("42", "42"),
        ('{"source": "x"}', ""),
        (None, ""),
    ],
)
def test_code_of_accepts_json_dicts_and_raw_code(arguments: Any, code: str) -> None:
    assert code_of(arguments) == code
    if isinstance(arguments, str) and arguments.startswith("{"):
        json.loads(arguments)  # the JSON cases really are JSON
