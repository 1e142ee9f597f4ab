"""Attacks on batch runs: an input line whose `output_type` names a function of the tools file (pydantic would call
it with the model's answer: a shell command), the same through the Python API, and two runs on one output file."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import pydantic
import pytest

from functionary_agent import ConfigurationError, Conversation
from functionary_agent.batch import BatchInputError, BatchOutput, resolve_output_types, run_batch
from functionary_agent.testing import ScriptedModel, call
from tests.openai_server import Action, ScriptedServer, function_call, reply
from tests.test_batch import results, write_items

ROOT = Path(__file__).resolve().parents[1]

# (what the tools file binds, the output_type an input line names, the answer that would run the command)
ATTACKS = {
    "imported_getoutput": ("from subprocess import getoutput\n", "getoutput", {"cmd": "touch {pwned}"}),
    "imported_os_system": ("from os import system\n", "system", {"command": "touch {pwned}"}),
    "builtin_eval": ("from builtins import eval\n", "eval",
                     {"source": "__import__('os').system('touch {pwned}')"}),
    "lambda_defined_there": ("_shell = lambda cmd: __import__('os').system(cmd)\n", "_shell", {"cmd": "touch {pwned}"}),
    "class_imported_from_another_module": ("from attack_helpers import Job\n", "Job", {"cmd": "touch {pwned}"}),
}
HELPERS = '''
import os
from pydantic import BaseModel, field_validator

class Job(BaseModel):
    """Not an answer type: a helper of the tools, whose validation runs a command."""
    cmd: str

    @field_validator("cmd")
    @classmethod
    def run(cls, value: str) -> str:
        os.system(value)
        return value
'''
TOOLS = '''
def lookup(city: str) -> str:
    """The weather in a city."""
    return f"{city}: 21 C"
'''


def batch_cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNCTIONARY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "functionary_agent.cli", "batch", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


def answers_with(arguments: dict[str, Any]) -> Any:
    """A server that answers every typed request with `arguments` as the final answer."""

    def handler(body: dict[str, Any]) -> Action:
        if body["messages"][-1]["role"] == "tool":
            return reply("done")
        return reply(None, [function_call("final_result", json.dumps(arguments))])

    return handler


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_an_input_line_cannot_make_a_function_of_the_tools_its_output_type(tmp_path: Path, attack: str) -> None:
    binding, name, arguments = ATTACKS[attack]
    pwned = tmp_path / "PWNED"
    (tmp_path / "attack_helpers.py").write_text(HELPERS)
    tools = tmp_path / "tools.py"
    tools.write_text(binding + TOOLS)
    answer = json.loads(json.dumps(arguments).replace("{pwned}", str(pwned)))
    items = write_items(tmp_path / "in.jsonl", [{"id": "fine", "prompt": "Weather in Oslo?"},
                                                {"id": "evil", "prompt": "Run it.", "output_type": name}])
    out = tmp_path / "out.jsonl"
    with ScriptedServer(handler=answers_with(answer)) as server:
        done = batch_cli(str(items), "--tools", str(tools), "-o", str(out), "--base-url", server.base_url, cwd=tmp_path)
    assert not pwned.exists(), "the model's answer ran a command"
    assert server.requests == []  # refused at start: the model was never asked
    assert done.returncode == 2 and not out.exists(), done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == f"functionary-agent: error: {items}: 1 bad item, nothing was run:"
    assert lines[1].startswith(f'  line 2: id "evil": output_type {name!r} in {tools} is ')
    assert "not a class" in lines[1] or "not one defined there" in lines[1]
    assert "Traceback" not in done.stderr


def test_hostile_input_lines_are_refused_with_their_line_numbers_not_tracebacks(tmp_path: Path) -> None:
    deep = '{"id": 2, "prompt": "x", "extra": ' + "[" * 100_000 + "]" * 100_000 + "}"
    broken_chat = {"id": 3, "messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": None, "tool_calls": "zzz"}]}
    items = tmp_path / "in.jsonl"
    items.write_text("\n".join([json.dumps({"id": 1, "prompt": "fine"}), deep, json.dumps(broken_chat)]) + "\n")
    out = tmp_path / "out.jsonl"
    with ScriptedServer(handler=answers_with({})) as server:
        done = batch_cli(str(items), "-o", str(out), "--base-url", server.base_url, cwd=tmp_path)
    assert server.requests == [] and not out.exists()
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"functionary-agent: error: {items}: 2 bad items, nothing was run:",
        "  line 2: JSON nested deeper than 64 levels",
        "  line 3: id 3: messages[1].tool_calls: expected a list",
    ]


ANSWER_KINDS = '''
import enum, dataclasses
from typing import NamedTuple
from typing_extensions import TypedDict
from pydantic import BaseModel

class City(BaseModel):
    name: str

@dataclasses.dataclass
class Point:
    x: int

class Pair(TypedDict):
    left: str

class Colour(enum.Enum):
    RED = "red"

class Row(NamedTuple):
    a: int

class Plain:
    pass
'''


def test_classes_defined_in_the_tools_of_the_answer_kinds_are_taken_and_others_refused(tmp_path: Path) -> None:
    from functionary_agent.batch import check_items

    tools = tmp_path / "kinds.py"
    tools.write_text(ANSWER_KINDS)
    names = ["City", "Point", "Pair", "Colour", "Row", "int", "str", "float", "bool"]
    items = check_items([{"id": i, "prompt": "?", "output_type": name} for i, name in enumerate(names)])
    found = resolve_output_types(items, [str(tools)])
    assert [found[name].__name__ for name in names] == names
    refused = check_items([{"id": "p", "prompt": "?", "output_type": "Plain"},
                           {"id": "e", "prompt": "?", "output_type": "enum"}])
    with pytest.raises(BatchInputError) as caught:
        resolve_output_types(refused, [str(tools)])
    assert caught.value.problems[0].startswith("line 1: id \"p\": output_type 'Plain' in ")
    assert "is a class that is no pydantic model, dataclass, TypedDict, NamedTuple or Enum" in caught.value.problems[0]
    assert "'enum' in " in caught.value.problems[1] and "is a module, not a class" in caught.value.problems[1]


def not_types(pwned: Path) -> list[Any]:
    """Callables and other objects that are not types, also inside typing forms: pydantic would call a function
    with the model's answer and evaluate a string as code."""
    from os import system
    from subprocess import getoutput

    class Caller:
        def __call__(self, cmd: str) -> str:
            return getoutput(cmd)

    forward_reference = list[f"__import__('os').system('touch {pwned}')"]  # type: ignore[valid-type,misc]
    return [getoutput, system, eval, lambda cmd: getoutput(cmd), Caller(), "int", forward_reference,
            Annotated[getoutput, "meta"], Union[int, getoutput], Literal[getoutput], object()]


def test_the_python_api_refuses_an_output_type_that_is_no_type(tmp_path: Path) -> None:
    pwned = tmp_path / "PWNED"
    attack = {"tool_calls": [call("final_result", {"cmd": f"touch {pwned}", "command": f"touch {pwned}",
                                                   "source": f"__import__('os').system('touch {pwned}')"})]}
    for output_type in not_types(pwned):
        model = ScriptedModel([attack])
        chat = Conversation(model)
        with pytest.raises(ConfigurationError, match="output_type must be a type"):
            chat.submit("Run it.", output_type=output_type)
        with pytest.raises(ConfigurationError, match="output_type must be a type"):
            list(chat.stream("Run it.", output_type=output_type))
        with pytest.raises(ConfigurationError, match="output_type must be a type"):
            chat.as_tool("runner", "Runs.", output_type=output_type)
        assert model.requests == [] and chat.messages == []
    assert not pwned.exists()


def test_run_batch_refuses_items_whose_output_type_is_no_type_before_anything_runs(tmp_path: Path) -> None:
    from subprocess import getoutput

    pwned = tmp_path / "PWNED"
    model = ScriptedModel([{"tool_calls": [call("final_result", {"cmd": f"touch {pwned}"})]}] * 2)
    out = tmp_path / "out.jsonl"
    items = [{"id": "fine", "prompt": "?", "output_type": int}, {"id": "evil", "prompt": "?", "output_type": getoutput}]
    with pytest.raises(BatchInputError) as caught:
        run_batch(items, out, conversation=lambda: Conversation(model))
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith('item 2: id "evil": output_type must be a type')
    assert "'getoutput', a function that is callable but not a class" in caught.value.problems[0]
    assert model.requests == [] and not out.exists() and not pwned.exists()


@dataclasses.dataclass
class Point:
    x: int
    y: int


class City(pydantic.BaseModel):
    name: str


@pytest.mark.parametrize(("output_type", "arguments", "expected"), [
    (list[int], {"value": [1, 2]}, [1, 2]),
    (int | None, {"value": None}, None),
    (Literal["yes", "no"], {"value": "yes"}, "yes"),
    (Annotated[int, pydantic.Field(ge=0)], {"value": 3}, 3),
    (dict[str, list[Point]], {"value": {"a": [{"x": 1, "y": 2}]}}, {"a": [Point(1, 2)]}),
    (tuple[int, ...], {"value": [1, 2, 3]}, (1, 2, 3)),
    (City, {"name": "Oslo"}, City(name="Oslo")),
])
def test_types_and_typing_forms_still_answer(output_type: Any, arguments: dict[str, Any], expected: Any) -> None:
    model = ScriptedModel([{"tool_calls": [call("final_result", arguments)]}])
    assert Conversation(model).submit("?", output_type=output_type) == expected


# -- two runs on one output ------------------------------------------------------------------------------------
class GatedServer(ScriptedServer):
    """Answers the first `free` requests at once and holds the rest until `gate` is set (outside the server's
    lock, so held requests do not block others)."""

    def __init__(self, handler: Any, free: int) -> None:
        super().__init__(handler=handler)
        self.free, self.gate, self.received = free, threading.Event(), 0
        self._count_lock = threading.Lock()

    def next_action(self, body: dict[str, Any], headers: dict[str, str]) -> Action:
        with self._count_lock:
            self.received += 1
            held = self.received > self.free
        if held:
            self.gate.wait(timeout=120)
        return super().next_action(body, headers)


def answer_directly(body: dict[str, Any]) -> Action:
    return reply(f"answer to {body['messages'][-1]['content']}")


def test_a_second_run_on_an_output_that_a_run_has_rewritten_and_is_writing_is_refused(tmp_path: Path) -> None:
    count = 20
    items = write_items(tmp_path / "in.jsonl", [{"id": f"q{i}", "prompt": f"question {i}"} for i in range(count)])
    out = tmp_path / "out.jsonl"
    failed = [{"id": f"q{i}", "answer": None, "error": {"type": "ModelError", "message": "earlier"}} for i in range(10)]
    out.write_text("".join(json.dumps(record) + "\n" for record in failed))  # the first run rewrites these away
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNCTIONARY_")}
    server = GatedServer(answer_directly, free=3)
    with server:
        command = [sys.executable, "-m", "functionary_agent.cli", "batch", str(items), "-o", str(out),
                   "--base-url", server.base_url, "--concurrency", "2"]
        first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                 cwd=ROOT)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and '"answer": "answer to' not in out.read_text():
                time.sleep(0.05)  # the first run has rewritten the file and written an answer; the rest is held
            second = batch_cli(str(items), "-o", str(out), "--base-url", server.base_url, cwd=ROOT)
            assert first.poll() is None  # still running: its requests are held
            server.gate.set()
            _, first_stderr = first.communicate(timeout=120)
        finally:
            server.gate.set()
            first.kill()
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip() == (
        f"functionary-agent: error: {out} is being written by another batch run (it holds {out}.lock); wait for it "
        "to finish or stop it, or give another output file"
    )
    assert first.returncode == 0, first_stderr
    records = results(out)
    assert sorted(r["id"] for r in records) == sorted(f"q{i}" for i in range(count))  # each exactly once
    assert all(r["error"] is None for r in records)
    assert len(server.requests) == count  # the second run asked nothing


def test_the_lock_is_on_a_file_the_rewrite_never_replaces(tmp_path: Path) -> None:
    """A run that opened the lock before another's rewrite still cannot take it during or after that rewrite."""
    import fcntl

    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": 1, "answer": None, "error": {"type": "X", "message": "m"}}) + "\n")
    with BatchOutput(out) as first:
        lock_before = os.stat(first.lock_path).st_ino
        racer = os.open(first.lock_path, os.O_RDWR)  # opened before the rewrite, locked after it
        try:
            output_before = os.stat(out).st_ino
            from functionary_agent.batch import check_items

            assert [item.id for item in first.pending(check_items([{"id": 1, "prompt": "again"}]))] == [1]
            assert os.stat(out).st_ino != output_before and out.read_text() == ""  # the output was replaced
            assert os.stat(first.lock_path).st_ino == lock_before  # the lock file was not
            with pytest.raises(BlockingIOError):
                fcntl.flock(racer, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(ConfigurationError, match="is being written by another batch run"), BatchOutput(out):
                pass
        finally:
            os.close(racer)
    with BatchOutput(out):  # released when the first is done
        pass
