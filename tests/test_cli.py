"""`functionary-agent run` as a user runs it: a real process, a real server on loopback, a real terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from functionary_agent.cli import app as cli_module
from functionary_agent.conversation import Conversation
from functionary_agent.errors import ConfigurationError, ToolDefinitionError
from functionary_agent.integrations.tool_files import load_tools
from functionary_agent.testing import ScriptedModel, ScriptedRequest
from tests.openai_server import ScriptedServer, function_call, reply
from tests.terminal import run_in_terminal

ROOT = Path(__file__).resolve().parents[1]
WEATHER = str(ROOT / "examples" / "weather.py")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FUNCTIONARY_")}
    return subprocess.run(
        [sys.executable, "-m", "functionary_agent.cli", *args],
        capture_output=True, text=True, timeout=60, env={**clean, **(env or {})}, cwd=ROOT,
    )


def weather_script(body: dict[str, Any]) -> dict[str, Any]:
    if body["messages"][-1]["role"] == "tool":
        result = json.loads(body["messages"][-1]["content"])
        return reply(f"It is {result['temperature']} degrees and {result['condition']} in Istanbul.")
    return reply(None, [function_call("get_weather", '{"location": "Istanbul"}')])


def test_run_prints_call_result_and_answer() -> None:
    with ScriptedServer(handler=weather_script) as server:
        done = cli("run", "What is the weather in Istanbul?", "--tools", WEATHER, "--base-url", server.base_url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == 'get_weather({"location": "Istanbul"})'
    result = json.loads(lines[1].removeprefix("  -> "))
    assert result["location"] == "Istanbul"
    assert lines[2] == f"It is {result['temperature']} degrees and {result['condition']} in Istanbul."
    assert server.requests[0]["tools"][0]["function"]["name"] == "get_weather"


def test_run_json_prints_the_messages() -> None:
    with ScriptedServer(handler=weather_script) as server:
        done = cli("run", "weather?", "--tools", WEATHER, "--json", env={"FUNCTIONARY_BASE_URL": server.base_url})
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert [m["role"] for m in printed["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert printed["answer"] == printed["messages"][-1]["content"] and "in Istanbul." in printed["answer"]
    assert printed["usage"] == {"requests": 2, "tool_calls": 1, "prompt_tokens": 2, "completion_tokens": 2,
                                "cached_tokens": 0, "total_tokens": 4}


def test_a_missing_gguf_file_or_a_misplaced_format_are_clear_errors() -> None:
    done = cli("run", "hello", "--model", "no/such/model.gguf")
    assert done.returncode == 2  # a --model that names no file is a usage error (issue 24)
    assert done.stderr == (
        f"functionary-agent: error: no GGUF model file at {ROOT / 'no/such/model.gguf'}; check the path\n"
    )
    done = cli("run", "hello", "--base-url", "http://127.0.0.1:9/v1", "--format", "v3.2")
    assert done.returncode == 2 and "--format applies to a GGUF model" in done.stderr


def test_server_errors_exit_1_with_one_line() -> None:
    with ScriptedServer([{"status": 400, "body": {"error": {"message": "model not loaded"}}}]) as server:
        done = cli("run", "hello", "--base-url", server.base_url, "--model", "m")
    assert done.returncode == 1
    assert done.stderr == f"functionary-agent: error: {server.base_url} answered 400: model not loaded\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "hi", "--tools", "no/such/file.py"], "tools file not found"),
        (["run", "hi", "--tools", "no_such_module_xyz"], "cannot import tools module"),
        (["run"], "the following arguments are required: prompt"),
        (["fly"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    done = cli(*args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_broken_tools_file_is_a_usage_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('import-time failure')\n")
    done = cli("run", "hi", "--tools", str(broken))
    assert done.returncode == 2 and "import-time failure" in done.stderr and "Traceback" not in done.stderr
    bad_tool = tmp_path / "bad_tool.py"
    bad_tool.write_text("def f(*items):\n    return items\n")
    done = cli("run", "hi", "--tools", str(bad_tool))
    assert done.returncode == 2 and "parameter *items" in done.stderr


def test_loading_prefers_marked_tools_and_skips_imports(tmp_path: Path) -> None:
    plain = tmp_path / "plain.py"
    plain.write_text(
        "from json import dumps\n\ndef public(x: int) -> int:\n    return x\n\ndef _private():\n    pass\n"
    )
    assert [t.name for t in load_tools(str(plain))] == ["public"]
    marked = tmp_path / "marked.py"
    marked.write_text(
        "from functionary_agent import tool\n\n@tool\ndef chosen(x: int) -> int:\n    return x\n\n"
        "def helper() -> None:\n    pass\n"
    )
    assert [t.name for t in load_tools(str(marked))] == ["chosen"]
    assert [t.name for t in load_tools("examples.weather")] == ["get_weather"]
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    with pytest.raises(ToolDefinitionError, match="no public functions"):
        load_tools(str(empty))
    with pytest.raises(ConfigurationError, match="not found"):
        load_tools(str(tmp_path / "missing.py"))


def test_a_tools_file_imports_its_neighbours_once_and_again_when_changed(tmp_path: Path) -> None:
    (tmp_path / "unit_names_xq.py").write_text('UNIT = "C"\n')
    tools = tmp_path / "neighbour_tools.py"
    tools.write_text("from unit_names_xq import UNIT\n\ndef temperature(city: str) -> str:\n    return '21 ' + UNIT\n")
    (first,) = load_tools(str(tools))
    assert first("Oslo") == "21 C"
    assert load_tools(str(tools))[0].handler is first.handler  # unchanged: not imported again
    tools.write_text("def temperature(city: str) -> str:\n    return '70 F'\n")
    assert load_tools(str(tools))[0]("Oslo") == "70 F"  # changed: imported again


def test_on_a_terminal_the_answer_streams_with_styles() -> None:
    with ScriptedServer(handler=weather_script) as server:
        output = run_in_terminal(
            [sys.executable, "-m", "functionary_agent.cli", "run", "weather?", "--tools", WEATHER,
             "--base-url", server.base_url]
        )
    assert "\x1b[" in output  # rich styled it
    plain = _strip_ansi(output)
    assert 'get_weather({"location": "Istanbul"})' in plain
    assert "degrees and" in plain and "in Istanbul." in plain
    assert plain.rstrip().endswith("2 requests, 1 tool call, 4 tokens (2 in, 2 out)")  # the usage line


def test_the_usage_line_is_for_terminals_only() -> None:
    with ScriptedServer(handler=weather_script) as server:
        done = cli("run", "weather?", "--tools", WEATHER, "--base-url", server.base_url)
    assert "tokens" not in done.stdout and done.returncode == 0


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "")


def test_a_slow_tool_shows_a_spinner_on_a_terminal_and_nothing_in_a_pipe(tmp_path: Path) -> None:
    tools = tmp_path / "slow.py"
    tools.write_text("import time\n\ndef slow_lookup(key: str) -> str:\n    time.sleep(1.5)\n    return key.upper()\n")

    def script(body: dict[str, Any]) -> dict[str, Any]:
        if body["messages"][-1]["role"] == "tool":
            return reply("Found it.")
        return reply(None, [function_call("slow_lookup", '{"key": "abc"}')])

    command = [sys.executable, "-m", "functionary_agent.cli", "run", "look up abc", "--tools", str(tools)]
    with ScriptedServer(handler=script) as server:
        screen = _strip_ansi(run_in_terminal([*command, "--base-url", server.base_url]))
        piped = cli("run", "look up abc", "--tools", str(tools), "--base-url", server.base_url)
    assert "slow_lookup…" in screen  # "calling slow_lookup…" or "waiting for slow_lookup…" while it sleeps
    assert "Found it." in screen
    assert piped.returncode == 0 and piped.stdout == 'slow_lookup({"key": "abc"})\n  -> ABC\nFound it.\n'


def test_an_unexpected_error_is_one_line_and_debug_adds_the_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def explode(request: ScriptedRequest) -> str:
        raise RuntimeError("the model exploded")

    monkeypatch.setattr(cli_module, "_conversation", lambda args: Conversation(ScriptedModel(explode)))
    assert cli_module.main(["run", "hi"]) == 1
    assert capsys.readouterr().err == (
        "functionary-agent: error: RuntimeError: the model exploded (run with --debug for the traceback)\n"
    )
    assert cli_module.main(["run", "hi", "--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert 'raise RuntimeError("the model exploded")' in err
    assert err.endswith("\nfunctionary-agent: error: RuntimeError: the model exploded\n")


def test_a_tools_module_failing_with_a_foreign_error_prints_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "exploding_tools.py").write_text("raise LookupError('no such table')\n")
    done = cli("run", "hi", "--tools", "exploding_tools", env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith("functionary-agent: error: LookupError: no such table")
    assert "Traceback" not in done.stderr
    debug = cli("run", "hi", "--tools", "exploding_tools", "--debug", env={"PYTHONPATH": str(tmp_path)})
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.endswith("functionary-agent: error: LookupError: no such table\n")


def test_serve_without_a_model_is_a_usage_error() -> None:
    """A setting that cannot work exits 2 (usage), with one line and no traceback, like a bad flag."""
    done = cli("serve")
    assert done.returncode == 2, done.stderr
    assert "serve needs --model" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
