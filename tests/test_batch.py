"""`functionary-agent batch` as users run it: real processes, the test OpenAI server on loopback, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from functionary_agent.batch import BatchInputError, BatchOutput, BatchSettings, check_items, run_batch
from tests.openai_server import Action, ScriptedServer, function_call, reply
from tests.terminal import run_in_terminal

ROOT = Path(__file__).resolve().parents[1]
TOOLS = '''
def lookup(city: str) -> str:
    """The weather in a city."""
    return f"{city}: 21 C"
'''


class SlowServer(ScriptedServer):
    """The test server with a model latency per request (outside the server's lock, so requests overlap) and a
    count of the requests in flight at once."""

    def __init__(self, handler: Any, latency: float = 0.0) -> None:
        super().__init__(handler=handler)
        self.latency = latency
        self.in_flight = self.most_in_flight = 0
        self._count_lock = threading.Lock()

    def next_action(self, body: dict[str, Any], headers: dict[str, str]) -> Action:
        with self._count_lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(self.latency)
            return super().next_action(body, headers)
        finally:
            with self._count_lock:
                self.in_flight -= 1


def weather(body: dict[str, Any]) -> Action:
    """First turn: look the city (the prompt's last word) up; second turn: answer with the result. A prompt with
    FAIL gets a 400, as a server refuses a prompt it cannot take."""
    last = body["messages"][-1]
    if last["role"] == "tool":
        return reply(f"Answer: {last['content']}")
    if "FAIL" in last["content"]:
        return {"status": 400, "body": {"error": {"message": "prompt rejected"}}}
    city = last["content"].split()[-1].rstrip("?")
    return reply(None, [function_call("lookup", json.dumps({"city": city}))])


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNCTIONARY_")}
    return subprocess.run([sys.executable, "-m", "functionary_agent.cli", "batch", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def write_items(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def results(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert text.endswith("\n"), "the output ends with a whole line"
    return [json.loads(line) for line in text.splitlines()]


def city_items(count: int) -> list[dict[str, Any]]:
    return [{"id": f"q{i}", "prompt": f"Weather in city{i}?"} for i in range(count)]


@pytest.fixture
def tools(tmp_path: Path) -> str:
    path = tmp_path / "weather_tools.py"
    path.write_text(TOOLS)
    return str(path)


def test_every_item_gets_a_line_and_a_failed_item_does_not_stop_the_batch(tmp_path: Path, tools: str) -> None:
    items = write_items(tmp_path / "in.jsonl", [*city_items(12), {"id": 99, "prompt": "FAIL this one"}])
    out = tmp_path / "out.jsonl"
    with ScriptedServer(handler=weather) as server:
        done = cli(str(items), "--tools", tools, "--output", str(out), "--base-url", server.base_url)
    assert done.returncode == 1, done.stderr  # finished, with a failure to report
    by_id = {record["id"]: record for record in results(out)}
    assert len(by_id) == 13 == len(results(out))
    for i in range(12):
        record = by_id[f"q{i}"]
        assert record["answer"] == f"Answer: city{i}: 21 C" and record["error"] is None
        assert [m["role"] for m in record["messages"]] == ["user", "assistant", "tool", "assistant"]
        assert record["usage"]["requests"] == 2 and record["usage"]["tool_calls"] == 1
        assert record["seconds"] >= 0
    failed = by_id[99]
    assert failed["answer"] is None and failed["error"]["type"] == "ModelError"
    assert "400: prompt rejected" in failed["error"]["message"]
    assert done.stdout == ""
    assert "\x1b" not in done.stderr and "\r" not in done.stderr  # no progress bar in a pipe: one plain line
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("batch done in ") and "12 answered, 1 failed" in done.stderr


def test_messages_items_a_system_message_and_tool_choice(tmp_path: Path, tools: str) -> None:
    items = write_items(tmp_path / "in.jsonl", [
        {"id": "chat", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                    {"role": "user", "content": "Weather in Oslo?"}]},
        {"id": "plain", "prompt": "Weather in Lima?", "tool_choice": "required"},
    ])
    out = tmp_path / "out.jsonl"
    with ScriptedServer(handler=weather) as server:
        done = cli(str(items), "--tools", tools, "-o", str(out), "--base-url", server.base_url, "--system", "Be brief.")
    assert done.returncode == 0, done.stderr
    by_id = {record["id"]: record for record in results(out)}
    assert by_id["chat"]["answer"] == "Answer: Oslo: 21 C" and by_id["plain"]["answer"] == "Answer: Lima: 21 C"
    assert [m["role"] for m in by_id["chat"]["messages"][:4]] == ["system", "user", "assistant", "user"]
    first_turns = {request["messages"][-1]["content"]: request for request in server.requests
                   if request["messages"][-1]["role"] == "user"}
    assert first_turns["Weather in Lima?"]["tool_choice"] == "required"
    assert first_turns["Weather in Oslo?"]["tool_choice"] == "auto"
    assert all(request["messages"][0] == {"role": "system", "content": "Be brief."} for request in server.requests)


def test_a_rerun_resumes_cuts_a_half_written_line_and_retries_failures(tmp_path: Path, tools: str) -> None:
    refused: set[str] = set()

    def fails_once(body: dict[str, Any]) -> Action:
        text = body["messages"][-1].get("content") or ""
        if "FAIL" in text and text not in refused:
            refused.add(text)
            return {"status": 400, "body": {"error": {"message": "not now"}}}
        return weather({"messages": [{"role": "user", "content": text.replace("FAIL", "in")}]}
                       if "FAIL" in text else body)

    items = write_items(tmp_path / "in.jsonl", [*city_items(10), {"id": "flaky", "prompt": "FAIL Rome?"}])
    out = tmp_path / "out.jsonl"
    with ScriptedServer(handler=fails_once) as server:
        first = cli(str(items), "--tools", tools, "-o", str(out), "--base-url", server.base_url)
        assert first.returncode == 1 and len(results(out)) == 11
        lines = out.read_text().splitlines(keepends=True)
        kept = [line for line in lines if '"flaky"' in line] + [line for line in lines if '"flaky"' not in line][:6]
        out.write_text("".join(kept) + lines[-1][:40])  # 4 ids gone, and a last line cut short by a kill
        asked_before = len(server.requests)
        second = cli(str(items), "--tools", tools, "-o", str(out), "--base-url", server.base_url)
        asked = server.requests[asked_before:]
    assert second.returncode == 0, second.stderr
    records = results(out)
    assert sorted(r["id"] for r in records) == sorted([f"q{i}" for i in range(10)] + ["flaky"])  # each once
    assert all(r["error"] is None for r in records)
    assert {r["id"]: r["answer"] for r in records}["flaky"] == "Answer: Rome: 21 C"  # the failure was retried
    assert len(asked) == 2 * 5  # the 4 missing items and the failed one, two requests each: nothing else re-run
    assert "5 answered, 0 failed, 6 skipped (answered before)" in second.stderr


def test_bad_input_lines_refuse_the_run_with_their_line_numbers(tmp_path: Path, tools: str) -> None:
    lines = [
        json.dumps({"id": 1, "prompt": "fine"}), "{not json", json.dumps({"id": 1, "prompt": "again"}), "",
        json.dumps({"prompt": "no id"}), json.dumps({"id": 2}), json.dumps({"id": 3, "prompt": "a", "messages": []}),
    ]
    items = tmp_path / "in.jsonl"
    items.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    with ScriptedServer(handler=weather) as server:
        done = cli(str(items), "--tools", tools, "-o", str(out), "--base-url", server.base_url)
    assert done.returncode == 2 and not out.exists() and server.requests == []
    assert done.stderr.splitlines() == [
        f"functionary-agent: error: {items}: 5 bad items, nothing was run:",
        "  line 2: not JSON (Expecting property name enclosed in double quotes at column 2)",
        "  line 3: duplicate id 1 (first at line 1)",
        '  line 5: no "id"',
        '  line 6: id 2: needs "prompt" (text) or "messages" (a list)',
        '  line 7: id 3: has both "prompt" and "messages"; give one',
    ]


TYPED_TOOLS = TOOLS + '''
from pydantic import BaseModel

class City(BaseModel):
    name: str
    population: int

NOT_A_TYPE = object()
'''


def city_record(body: dict[str, Any]) -> Action:
    """Answers through the reserved final_result tool: a record for a City request, the number 7 for an int."""
    if body["messages"][-1]["role"] == "tool":  # the final call's tool message came back: nothing more to say
        return reply("done")
    schema = next(t["function"]["parameters"] for t in body["tools"] if t["function"]["name"] == "final_result")
    arguments = {"name": "Lyon", "population": 520000} if "population" in json.dumps(schema) else {"value": 7}
    return reply(None, [function_call("final_result", json.dumps(arguments))])


def test_items_answered_in_a_type_named_in_the_tools(tmp_path: Path) -> None:
    tools = tmp_path / "typed_tools.py"
    tools.write_text(TYPED_TOOLS)
    items = write_items(tmp_path / "in.jsonl", [
        {"id": "city", "prompt": "Lyon has 520,000 people.", "output_type": "City"},
        {"id": "count", "prompt": "How many?", "output_type": "int"},
    ])
    out = tmp_path / "out.jsonl"
    with ScriptedServer(handler=city_record) as server:
        done = cli(str(items), "--tools", str(tools), "-o", str(out), "--base-url", server.base_url)
    assert done.returncode == 0, done.stderr
    by_id = {record["id"]: record for record in results(out)}
    assert by_id["city"]["answer"] == {"name": "Lyon", "population": 520000}
    assert by_id["count"]["answer"] == 7
    assert all(request["tool_choice"] == "required" for request in server.requests)


def test_an_output_type_found_nowhere_refuses_the_run(tmp_path: Path) -> None:
    tools = tmp_path / "typed_tools.py"
    tools.write_text(TYPED_TOOLS)
    items = write_items(tmp_path / "in.jsonl", [
        {"id": 1, "prompt": "a", "output_type": "City"}, {"id": 2, "prompt": "b", "output_type": "Town"},
        {"id": 3, "prompt": "c", "output_type": "NOT_A_TYPE"}, {"id": 4, "prompt": "d", "output_type": 5},
    ])
    out = tmp_path / "out.jsonl"
    done = cli(str(items), "--tools", str(tools), "-o", str(out), "--base-url", "http://127.0.0.1:9/v1")
    assert done.returncode == 2 and not out.exists(), done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == f"functionary-agent: error: {items}: 3 bad items, nothing was run:"  # all in one pass
    assert lines[1].startswith("  line 2: id 2: output_type 'Town' is defined in none of the tools")
    assert lines[2].startswith("  line 3: id 3: output_type 'NOT_A_TYPE' in ") and "not a class" in lines[2]
    assert "line 4: id 4:" in lines[3] and "name of a type" in lines[3]
    names_only = write_items(tmp_path / "names.jsonl", [
        {"id": 1, "prompt": "a", "output_type": "City"}, {"id": 2, "prompt": "b", "output_type": "Town"},
        {"id": 3, "prompt": "c", "output_type": "NOT_A_TYPE"},
    ])
    done = cli(str(names_only), "--tools", str(tools), "-o", str(out), "--base-url", "http://127.0.0.1:9/v1")
    assert done.returncode == 2 and not out.exists(), done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].endswith("2 bad items, nothing was run:")
    assert lines[1].startswith("  line 2: id 2: output_type 'Town' is defined in none of the tools")
    assert lines[2].startswith("  line 3: id 3: output_type 'NOT_A_TYPE' in ") and "not a class" in lines[2]


def test_a_tools_file_that_cannot_load_is_a_usage_error(tmp_path: Path) -> None:
    items = write_items(tmp_path / "in.jsonl", city_items(2))
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('import-time failure')\n")
    out = tmp_path / "out.jsonl"
    for spec, message in [(str(tmp_path / "missing.py"), "tools file not found"), (str(broken), "import-time failure")]:
        done = cli(str(items), "--tools", spec, "-o", str(out), "--base-url", "http://127.0.0.1:9/v1")
        assert done.returncode == 2 and message in done.stderr
        assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
    assert not out.exists()


def test_ctrl_c_stops_cleanly_keeps_whole_lines_and_a_rerun_finishes(tmp_path: Path, tools: str) -> None:
    items = write_items(tmp_path / "in.jsonl", city_items(60))
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNCTIONARY_")}
    with SlowServer(weather, latency=0.25) as server:
        command = [sys.executable, "-m", "functionary_agent.cli", "batch", str(items), "--tools", tools, "-o",
                   str(out), "--base-url", server.base_url, "--concurrency", "4"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                   cwd=ROOT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
        assert process.returncode == 130, stderr
        written = results(out)  # whole lines only
        assert 3 <= len(written) < 60 and len({r["id"] for r in written}) == len(written)
        assert stderr.splitlines()[-1].startswith(f"interrupted: {len(written)} answered, 0 failed written to")
        assert "run the same command again to resume" in stderr and "Traceback" not in stderr
        server.latency = 0
        rerun = cli(str(items), "--tools", tools, "-o", str(out), "--base-url", server.base_url)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(r["id"] for r in results(out)) == sorted(f"q{i}" for i in range(60))


def test_progress_shows_on_a_terminal(tmp_path: Path, tools: str) -> None:
    items = write_items(tmp_path / "in.jsonl", city_items(8))
    out = tmp_path / "out.jsonl"
    with SlowServer(weather, latency=0.1) as server:
        screen = run_in_terminal([sys.executable, "-m", "functionary_agent.cli", "batch", str(items), "--tools",
                                   tools, "-o", str(out), "--base-url", server.base_url, "--concurrency", "2"])
    assert "8/8" in screen and "0 failed" in screen and "items/s" in screen
    assert "batch done in" in screen and len(results(out)) == 8


def test_concurrency_bounds_the_requests_in_flight(tmp_path: Path, tools: str) -> None:
    seen: list[str] = []
    with SlowServer(weather, latency=0.1) as server:
        settings = BatchSettings(tools=(tools,), base_url=server.base_url)
        summary = run_batch(city_items(12), tmp_path / "out.jsonl", conversation=settings, concurrency=3,
                            on_result=lambda record: seen.append(record["id"]))
        assert server.most_in_flight == 3
    assert (summary.total, summary.skipped, summary.answered, summary.failed) == (12, 0, 12, 0)
    assert sorted(seen) == sorted(f"q{i}" for i in range(12))


def test_the_python_api_checks_items_and_never_writes_an_answered_id_twice(tmp_path: Path) -> None:
    with pytest.raises(BatchInputError) as refused:
        check_items([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}, {"id": "b", "prompt": ""}])
    assert refused.value.problems == ["item 2: duplicate id \"a\" (first at item 1)",
                                      'item 3: id "b": "prompt" must be non-empty text']
    path = tmp_path / "out.jsonl"
    record = {"id": 1, "answer": "yes", "error": None}
    with BatchOutput(path) as output:
        assert output.write(record) and not output.write(record)
        assert not output.write({**record, "id": 1, "answer": "again"})
        assert output.write({"id": "1", "answer": None, "error": {"type": "X", "message": "m"}})  # "1" is not 1
    with BatchOutput(path), pytest.raises(Exception, match="another batch run"), BatchOutput(path):
        pass
    path.write_text('{"id": 1}\nnot a result\n')
    with pytest.raises(Exception, match="line 2 is not a batch result"), BatchOutput(path):
        pass
