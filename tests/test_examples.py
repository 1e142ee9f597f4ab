"""The scripts in examples/ run as written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.openai_server import ScriptedServer, function_call, reply

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FUNCTIONARY_")}
    return subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=120,
                          env={**clean, **(env or {})})


def test_testing_your_agent_example() -> None:
    done = run_example("testing_your_agent.py")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "We have 3 apples; kiwis are not something we sell.\n"


def test_remote_weather_example_against_a_server() -> None:
    def script(body: dict[str, Any]) -> dict[str, Any]:
        results = [json.loads(m["content"]) for m in body["messages"] if m["role"] == "tool"]
        if results:
            return reply(" and ".join(f"{r['location']} is {r['condition']}" for r in results) + ".")
        return reply(None, [function_call("get_weather", json.dumps({"location": city}), id=f"call_{city}")
                            for city in ("Istanbul", "Hanoi")])

    with ScriptedServer(handler=script) as server:
        done = run_example("remote_weather.py", {"FUNCTIONARY_BASE_URL": server.base_url})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3
    assert sorted(line.split("(")[0] for line in lines[:2]) == ["get_weather", "get_weather"]
    assert lines[2].startswith("Istanbul is ") and " and Hanoi is " in lines[2]


def test_research_team_example_offline() -> None:
    done = run_example("research_team.py")
    assert done.returncode == 0, done.stderr
    answer, usage = done.stdout.splitlines()
    assert answer.startswith("In short: Tea was first drunk in China") and "Venice in 1645." in answer
    assert json.loads(usage)["requests"] == 8 and json.loads(usage)["tool_calls"] == 5


def test_research_team_example_against_a_server() -> None:
    def script(body: dict[str, Any]) -> dict[str, Any]:
        system, last = str(body["messages"][0]["content"]), body["messages"][-1]
        if system.startswith("You research"):
            if last["role"] == "tool":
                return reply(last["content"])
            topic = "tea" if "tea" in last["content"] else "coffee"
            return reply(None, [function_call("search_notes", json.dumps({"topic": topic}), id=f"call_{topic}")])
        if system.startswith("You write"):
            return reply("Tea reached Europe around 1610. Coffee houses followed by 1645.")
        done = [m for m in body["messages"] if m["role"] == "tool"]
        if not done:
            return reply(None, [function_call("researcher", json.dumps({"task": f"When did {t} reach Europe?"}),
                                              id=f"call_{t}") for t in ("tea", "coffee")])
        if len(done) == 2:
            return reply(None, [function_call("writer", json.dumps({"task": "Facts: " + " ".join(
                m["content"] for m in done)}), id="call_writer")])
        return reply(done[-1]["content"])

    with ScriptedServer(handler=script) as server:
        done = run_example("research_team.py", {"FUNCTIONARY_BASE_URL": server.base_url})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "Tea reached Europe around 1610. Coffee houses followed by 1645."
    researched = [m for body in server.requests for m in body["messages"] if m.get("name") == "search_notes"]
    assert {m["content"][:3] for m in researched} == {"Tea", "Cof"}
