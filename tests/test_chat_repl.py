"""`functionary-agent chat` driven as a person drives it: in a pseudo-terminal, reading the screen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.openai_server import ScriptedServer, function_call, reply
from tests.terminal import spawn_chat

pexpect = pytest.importorskip("pexpect")

ROOT = Path(__file__).resolve().parents[1]
WEATHER = str(ROOT / "examples" / "weather.py")


def script(body: dict[str, Any]) -> dict[str, Any]:
    last = body["messages"][-1]
    if last["role"] == "tool":
        result = json.loads(last["content"])
        return reply(f"It is {result['condition']} in {result['location']}.")
    if "slow" in str(last["content"]):
        time.sleep(3)
        return reply("too late")
    if "weather" in str(last["content"]):
        return reply(None, [function_call("get_weather", '{"location": "Istanbul"}')])
    return reply(f"You said: {last['content']}")


def spawn(server: ScriptedServer) -> Any:
    child = spawn_chat(server.base_url, "--tools", WEATHER)
    assert "Ctrl-D to leave" in child.before
    return child


def test_chat_session_in_a_terminal(tmp_path: Path) -> None:
    saved = tmp_path / "chat.json"
    with ScriptedServer(handler=script) as server:
        child = spawn(server)
        child.sendline("what is the weather in Istanbul?")
        child.expect(r'get_weather(?:\x1b\[[0-9;]*m)*\(\{"location": "Istanbul"\}\)')  # styles between
        child.expect(r"It is [a-z ]+ in Istanbul\.")
        child.expect("you> ")
        child.sendline("/tools")
        child.expect("get_weather: Get the current weather in a city.")
        child.expect("you> ")
        child.sendline(f"/save {saved}")
        child.expect("saved 4 messages")
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.sendline(f"/load {saved}")
        child.expect("loaded 4 messages")
        child.sendline("/fly")
        child.expect("unknown command /fly")
        child.sendline("/load /no/such/file.json")
        child.expect("cannot read conversation file")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
    assert child.exitstatus == 0
    assert [m["role"] for m in json.loads(saved.read_text())["messages"]] == ["user", "assistant", "tool", "assistant"]


def test_ctrl_c_stops_the_answer_but_not_the_chat() -> None:
    with ScriptedServer(handler=script) as server:
        child = spawn(server)
        child.sendline("be slow please")
        time.sleep(1.0)
        child.sendintr()
        child.expect(r"\[interrupted\]")
        child.expect("you> ")
        child.sendline("hello again")
        child.expect("You said: hello again")
        child.expect("you> ")  # as a person would: Ctrl-D once the prompt is back
        child.sendeof()
        child.expect(pexpect.EOF)
        child.close()
    assert child.exitstatus == 0


def test_chat_reads_a_pipe_too() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNCTIONARY_")}
    with ScriptedServer(handler=script) as server:
        done = subprocess.run(
            [sys.executable, "-m", "functionary_agent.cli", "chat", "--base-url", server.base_url],
            input="hi there\n/exit\n", capture_output=True, text=True, timeout=60, env=env, cwd=ROOT,
        )
    assert done.returncode == 0, done.stderr
    assert "You said: hi there" in done.stdout
