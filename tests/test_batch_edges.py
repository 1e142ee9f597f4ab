"""Batch edges a new user runs into (issue 24, items 5 and 9), through the real command line and the loopback test
server: the output given as the input file (by its name, a link, another path), a tools file that defines only the
types items answer in, every problem of every input line in one pass, and a request cut short by a killed client."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from functionary_agent import ConfigurationError
from functionary_agent.batch import BatchInputError, BatchSettings, read_items, run_batch
from tests.openai_server import Action, ScriptedServer
from tests.test_batch import TOOLS, city_items, city_record, cli, results, weather, write_items

TYPES_ONLY = '''
from pydantic import BaseModel


class City(BaseModel):
    """A city and its population."""

    name: str
    population: int
'''


# -- the output is the input -----------------------------------------------------------------------------------
def same_file_names(tmp_path: Path, items: Path) -> dict[str, Path]:
    """The input file under other names: itself, a symbolic link, a hard link, a path through `..`."""
    (tmp_path / "linked").symlink_to(items)
    os.link(items, tmp_path / "hard.jsonl")
    (tmp_path / "sub").mkdir()
    return {"itself": items, "symlink": tmp_path / "linked", "hard link": tmp_path / "hard.jsonl",
            "other path": tmp_path / "sub" / ".." / items.name}


def test_the_input_file_given_as_the_output_is_refused_by_any_name(tmp_path: Path) -> None:
    (tmp_path / "tools.py").write_text(TOOLS)
    items = write_items(tmp_path / "in.jsonl", city_items(20))
    before = items.read_bytes()
    with ScriptedServer(handler=weather) as server:
        for name, output in same_file_names(tmp_path, items).items():
            done = cli(str(items), "--tools", str(tmp_path / "tools.py"), "-o", str(output),
                       "--base-url", server.base_url)
            assert done.returncode == 2, (name, done.stderr)
            alias = "" if output == items else f" (the same file as {items})"
            assert done.stderr == (
                f"functionary-agent: error: --output {output} is the batch input{alias}; give the results a file of "
                f"their own, e.g. --output {tmp_path / 'in.answers.jsonl'}\n"
            ), name
        assert server.requests == []
    assert items.read_bytes() == before  # nothing appended, nothing cut
    assert not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob("linked*.lock"))


def test_the_python_api_refuses_an_output_whose_lines_are_input_items(tmp_path: Path) -> None:
    (tmp_path / "tools.py").write_text(TOOLS)
    items = write_items(tmp_path / "in.jsonl", city_items(5))
    before = items.read_bytes()
    with ScriptedServer(handler=weather) as server:
        settings = BatchSettings(tools=(str(tmp_path / "tools.py"),), base_url=server.base_url)
        with pytest.raises(ConfigurationError) as refused:
            run_batch(read_items(items), items, conversation=settings)
        assert server.requests == []
    assert str(refused.value) == (
        f"{items} line 1 is a batch input item, not a result (is it the input file?); give the results a file of "
        "their own"
    )
    assert items.read_bytes() == before


# -- a tools file of types only ---------------------------------------------------------------------------------
def test_a_tools_file_of_types_only_answers_the_items_that_name_them(tmp_path: Path) -> None:
    types = tmp_path / "types.py"
    types.write_text(TYPES_ONLY)
    items = write_items(tmp_path / "in.jsonl", [
        {"id": "lyon", "prompt": "Lyon has 520,000 people.", "output_type": "City"},
        {"id": "count", "prompt": "How many?", "output_type": "int"},
    ])
    out = tmp_path / "out.jsonl"
    with ScriptedServer(handler=city_record) as server:
        done = cli(str(items), "--tools", str(types), "-o", str(out), "--base-url", server.base_url)
    assert done.returncode == 0, done.stderr
    assert {r["id"]: r["answer"] for r in results(out)} == {"lyon": {"name": "Lyon", "population": 520000},
                                                           "count": 7}
    offered = {tool["function"]["name"] for request in server.requests for tool in request.get("tools", [])}
    assert offered == {"final_result"}  # the file gave types, no tools


def test_a_tools_file_of_types_no_item_names_is_still_refused(tmp_path: Path) -> None:
    types = tmp_path / "types.py"
    types.write_text(TYPES_ONLY)
    empty = tmp_path / "empty.py"
    empty.write_text("LIMIT = 3\n")
    items = write_items(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a", "output_type": "int"}])
    out = tmp_path / "out.jsonl"
    for spec, problem in [
        (types, 'defines no public functions and no @tool functions, only types (City) that no item names as its '
                '"output_type"'),
        (empty, "defines no public functions and no @tool functions"),
    ]:
        done = cli(str(items), "--tools", str(spec), "-o", str(out), "--base-url", "http://127.0.0.1:9/v1")
        assert done.returncode == 2, done.stderr
        assert done.stderr == f"functionary-agent: error: cannot load tools: {spec} {problem}\n"
    assert not out.exists()


# -- every problem of every line --------------------------------------------------------------------------------
def test_every_problem_of_every_line_is_reported_in_one_pass(tmp_path: Path) -> None:
    (tmp_path / "types.py").write_text(TYPES_ONLY)
    lines = [
        json.dumps({"id": 1, "prompt": "fine", "output_type": "City"}),
        json.dumps({"id": 2, "prompt": "", "tool_choice": "always", "output_type": "Town"}),
        "{not json",
        json.dumps({"id": 1, "prompt": "again", "output_type": "Town"}),
        json.dumps({"prompt": "no id", "output_type": "Town"}),
        json.dumps({"id": 6, "prompt": "x", "output_type": "BaseModel"}),
        json.dumps({"id": 7, "prompt": "y", "output_type": 5}),
    ]
    items = tmp_path / "in.jsonl"
    items.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    with ScriptedServer(handler=city_record) as server:
        done = cli(str(items), "--tools", str(tmp_path / "types.py"), "-o", str(out), "--base-url", server.base_url)
        assert server.requests == []
    assert done.returncode == 2 and not out.exists(), done.stderr
    tools = tmp_path / "types.py"
    assert done.stderr.splitlines() == [
        f"functionary-agent: error: {items}: 6 bad items, nothing was run:",
        '  line 2: id 2: "prompt" must be non-empty text',
        '  line 2: id 2: "tool_choice" must be "auto", "none", "required" or {"type": "function", "function": '
        '{"name": ...}}',
        f"  line 2: id 2: output_type 'Town' is defined in none of the tools ({tools}) and is not str, int, float "
        "or bool (lines 4, 5 name it too)",
        "  line 3: not JSON (Expecting property name enclosed in double quotes at column 2)",
        "  line 4: duplicate id 1 (first at line 1)",
        '  line 5: no "id"',
        f"  line 6: id 6: output_type 'BaseModel' in {tools} is a class imported from pydantic.main, not one "
        "defined there; it must name a pydantic model, dataclass, TypedDict, NamedTuple or Enum defined in the "
        "tools, or be str, int, float or bool",
        '  line 7: id 7: "output_type" must be the name of a type (defined in the tools, or str, int, float, bool)',
    ]


def test_the_python_api_reports_every_problem_in_one_pass(tmp_path: Path) -> None:
    (tmp_path / "types.py").write_text(TYPES_ONLY)
    settings = BatchSettings(tools=(str(tmp_path / "types.py"),), base_url="http://127.0.0.1:9/v1")
    with pytest.raises(BatchInputError) as refused:
        run_batch([{"id": "a", "prompt": "?", "output_type": "City"}, {"id": "b", "prompt": "", "output_type": "Town"},
                   {"id": "c", "prompt": "?", "output_type": "Town"}], tmp_path / "out.jsonl", conversation=settings)
    assert [problem.split(": ", 2)[:2] for problem in refused.value.problems] == [["item 2", 'id "b"']] * 2
    assert refused.value.problems[0].endswith('"prompt" must be non-empty text')
    assert "'Town' is defined in none of the tools" in refused.value.problems[1]
    assert refused.value.problems[1].endswith("(item 3 names it too)")
    assert not (tmp_path / "out.jsonl").exists()


# -- item 9: a request cut short by a killed client ---------------------------------------------------------------
def post_cut_short(base_url: str, body: bytes, announced: int) -> bytes:
    """What a client killed mid-request leaves: headers announcing `announced` bytes, then only `body`, then the
    connection closed. Returns what the server answered (nothing, when it drops the request)."""
    host, port = base_url.removeprefix("http://").split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\ncontent-type: application/json\r\n"
                           + f"content-length: {announced}\r\n\r\n".encode() + body)
        connection.shutdown(socket.SHUT_WR)  # the process died: nothing more will come
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


def test_a_request_cut_after_its_headers_reaches_neither_the_handler_nor_the_log() -> None:
    """The flaky Ray test's request: a worker SIGKILLed between writing one request's headers and its body. The
    test server used to read the missing body as `{}`, log it and hand it to the handler (KeyError: 'messages')."""
    handled: list[dict[str, Any]] = []

    def handler(body: dict[str, Any]) -> Action:
        handled.append(body)
        return weather(body)

    whole = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Weather in Oslo?"}]}).encode()
    with ScriptedServer(handler=handler) as server:
        assert post_cut_short(server.base_url, b"", len(whole)) == b""
        assert post_cut_short(server.base_url, whole[:10], len(whole)) == b""
        assert server.requests == [] and handled == []
        assert server.cut_requests == [("/v1/chat/completions", len(whole), 0),
                                       ("/v1/chat/completions", len(whole), 10)]
        answered = post_cut_short(server.base_url, whole, len(whole))  # a whole request is still answered
    assert answered.startswith(b"HTTP/1.1 200") and b'"lookup"' in answered
    assert [body["messages"][-1]["content"] for body in server.requests] == ["Weather in Oslo?"]
