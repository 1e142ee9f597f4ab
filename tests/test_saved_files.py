"""Hostile save files: `Conversation.load` refuses deep nesting, huge files, devices and malformed messages with a
`ConfigurationError` naming the JSON path, never a RecursionError or a file that loads and breaks later; every file
`save` writes loads again, and a save that fails leaves the old file whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pydantic
import pytest

from functionary_agent import ConfigurationError, Conversation
from functionary_agent._saved import MAX_SAVED_BYTES
from functionary_agent.testing import ScriptedModel, call
from tests.openai_server import ScriptedServer, reply
from tests.terminal import spawn_chat

ROOT = Path(__file__).resolve().parents[1]


def saved(tmp_path: Path, data: Any, name: str = "chat.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def load(path: Path, replies: list[Any] | None = None) -> Conversation:
    return Conversation.load(path, ScriptedModel(replies or []))


@pytest.mark.parametrize("depth", [65, 1_000, 100_000])
def test_deeply_nested_json_is_refused_before_it_is_parsed(tmp_path: Path, depth: int) -> None:
    path = saved(tmp_path, '{"messages": [{"role": "user", "content": "hi", "x": ' + "[" * depth + "]" * depth + "}]}")
    with pytest.raises(ConfigurationError, match="JSON nested deeper than 64 levels"):
        load(path)


def test_deep_nesting_is_refused_even_where_python_recursion_is_raised(tmp_path: Path) -> None:
    """With the recursion limit raised (as some programs do), parsing 200k levels would overflow the C stack."""
    path = saved(tmp_path, "[" * 200_000 + "]" * 200_000)
    child = textwrap.dedent(f"""
        import sys
        sys.setrecursionlimit(1_000_000)
        from functionary_agent import ConfigurationError, Conversation
        from functionary_agent.testing import ScriptedModel
        try:
            Conversation.load({str(path)!r}, ScriptedModel([]))
        except ConfigurationError as exc:
            print("refused:", exc)
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0 and "nested deeper than 64 levels" in done.stdout, (done.returncode, done.stderr)


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path: Path) -> None:
    text = "[" * 500 + '"quoted \\" [[[' + "}" * 500
    path = saved(tmp_path, {"messages": [{"role": "user", "content": text}]})
    assert load(path).messages[0]["content"] == text


ASSISTANT_CALL = {"role": "assistant", "content": None,
                  "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


@pytest.mark.parametrize(("messages", "problem"), [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": "zzz"}],
     "messages[1].tool_calls: expected a list"),
    ([{"role": "assistant", "content": None, "tool_calls": ["zzz"]}], "messages[0].tool_calls[0]: expected an object"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": "f"}]}],
     "messages[0].tool_calls[0].function: expected an object"),
    ([{**ASSISTANT_CALL, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {}}}]}],
     "messages[0].tool_calls[0].function.arguments: expected a string"),
    ([{**ASSISTANT_CALL, "tool_calls": [{"id": 7, "type": "function", "function": {"name": "f", "arguments": ""}}]}],
     "messages[0].tool_calls[0].id: expected a string"),
    ([ASSISTANT_CALL, {"role": "tool", "content": "done"}],
     'messages[1]: a tool message needs its "tool_call_id" (a string)'),
    ([{"role": "user", "content": "x", "tool_calls": []}], 'messages[0]: only an assistant message has "tool_calls"'),
    ([{"role": "user", "content": {"text": "hi"}}], "messages[0].content: expected text, null or a list of parts"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text: expected a string"),
    ([{"role": "user", "content": ["hi"]}], 'messages[0].content[0]: expected an object with a string "type"'),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
     "messages[0].content[0].image_url: expected an object"),
    ([{"role": "wizard", "content": "hi"}], "messages[0].role: expected one of system, user, assistant, tool"),
    ([{"no_role": 1}], "messages[0].role: missing"),
    ([{"role": "user", "content": "hi", "name": ["x"]}], "messages[0].name: expected a string"),
    ("zzz", "messages: expected a list"),
])
def test_malformed_messages_are_refused_naming_the_json_path(tmp_path: Path, messages: Any, problem: str) -> None:
    path = saved(tmp_path, {"format": "functionary-agent/conversation", "version": 1, "messages": messages})
    with pytest.raises(ConfigurationError) as refused:
        load(path)
    assert str(refused.value) == f"{path} is not a saved conversation (a list of messages): {problem}"


def test_a_file_of_another_format_or_a_newer_version_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="format: expected 'functionary-agent/conversation'"):
        load(saved(tmp_path, {"format": "other-tool/chat", "messages": []}))
    with pytest.raises(ConfigurationError, match="version: expected 1"):
        load(saved(tmp_path, {"format": "functionary-agent/conversation", "version": 2, "messages": []}))


def test_a_huge_file_a_fifo_and_a_device_are_refused_without_reading_them(tmp_path: Path) -> None:
    huge = tmp_path / "huge.json"
    with huge.open("wb") as file:
        file.truncate(MAX_SAVED_BYTES + 1)  # sparse: nothing to write
    with pytest.raises(ConfigurationError, match="is over 64 MiB"):
        load(huge)
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    child = f"from tests.test_saved_files import load_error; print(load_error({str(fifo)!r}))"
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stdout.strip() == f"cannot read conversation file {fifo}: not a regular file", done.stderr
    with pytest.raises(ConfigurationError, match="not a regular file"):
        load(Path("/dev/zero"))
    with pytest.raises(ConfigurationError, match="not UTF-8 text"):
        load(_bytes_file(tmp_path, b'{"messages": ["\xff"]}'))


def _bytes_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "bytes.json"
    path.write_bytes(data)
    return path


def load_error(path: str) -> str:
    try:
        load(Path(path))
    except ConfigurationError as exc:
        return str(exc)
    return "loaded"


def test_a_hostile_file_is_a_note_in_the_chat_and_the_chat_goes_on(tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    deep = saved(tmp_path, "[" * 100_000 + "]" * 100_000, "deep.json")
    broken = saved(tmp_path, {"messages": [{"role": "assistant", "content": None, "tool_calls": "zzz"}]}, "zzz.json")
    with ScriptedServer(handler=lambda body: reply(f"You said: {body['messages'][-1]['content']}")) as server:
        child = spawn_chat(server.base_url, columns=200)
        child.sendline(f"/load {deep}")
        child.expect("nested deeper than 64 levels")
        child.expect("you> ")
        child.sendline(f"/load {broken}")
        child.expect(r"messages\[0\]\.tool_calls: expected a list")
        child.expect("you> ")
        child.sendline("still here?")
        child.expect("You said: still here")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
    assert child.exitstatus == 0
    assert [m["content"] for m in server.requests[0]["messages"]] == ["still here?"]  # nothing of the files


# -- every file we save loads again ------------------------------------------------------------------------------
def lookup(city: str) -> str:
    """The population of a city."""
    if city == "Atlantis":
        raise LookupError("no such city")
    return {"Oslo": "709000"}[city]


def wipe(path: str) -> str:
    """Remove a file."""
    return f"removed {path}"


class City(pydantic.BaseModel):
    city: str
    population: int


def round_trip(chat: Conversation, tmp_path: Path, next_reply: str = "again") -> Conversation:
    """Save, load, compare; the loaded chat renders and takes another turn."""
    path = tmp_path / "round.json"
    chat.save(path)
    restored = Conversation.load(path, ScriptedModel([next_reply]), tools=chat.tools)
    assert restored.messages == chat.messages
    restored._repr_markdown_()
    restored._repr_html_()
    assert restored.submit("and now?") == next_reply
    return restored


def test_tool_calls_errors_declined_approvals_and_typed_answers_round_trip(tmp_path: Path) -> None:
    model = ScriptedModel([
        {"content": "Looking.", "tool_calls": [call("lookup", {"city": "Oslo"}, id="a"),
                                               call("lookup", {"city": "Atlantis"}, id="b"),
                                               call("lookup", '{"city": ', id="c"), call("nope", {}, id="d")]},
        "Oslo has 709,000 people; Atlantis has none.",
        {"tool_calls": [call("wipe", {"path": "/etc"}, id="e")]},
        "I will not.",
        "about 700k",  # a typed answer given as text: sent back
        {"tool_calls": [call("final_result", {"city": "Oslo", "population": 709000})]},
    ])
    chat = Conversation(model, system="Be brief.", on_approval=lambda call: "not today")
    chat.register(lookup)
    chat.register(wipe, approve=True)
    chat.submit("How many live in Oslo and Atlantis?")
    assert chat.submit("Wipe /etc") == "I will not."
    assert chat.submit("Oslo as a record", output_type=City) == City(city="Oslo", population=709000)
    tool_texts = [m["content"] for m in chat.messages if m["role"] == "tool"]
    assert any(text.startswith("Error") for text in tool_texts) and len(tool_texts) >= 6
    round_trip(chat, tmp_path)


def test_images_content_parts_and_unknown_keys_round_trip(tmp_path: Path) -> None:
    chat = Conversation(ScriptedModel(["A red square."]))
    chat.submit([{"type": "text", "text": "What is this?"},
                 {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
                 {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}])
    chat.messages[-1]["refusal"] = None  # a key some servers add; the loop never reads it
    restored = round_trip(chat, tmp_path)
    assert restored.messages[0]["content"][1]["image_url"]["detail"] == "low"


def test_a_paused_run_round_trips_and_resumes(tmp_path: Path) -> None:
    model = ScriptedModel([{"tool_calls": [call("wipe", {"path": "a.txt"}, id="w")]}])
    chat = Conversation(model, tools=[])
    chat.register(wipe, approve=True)
    with pytest.raises(Exception, match="waiting for approval"):
        chat.submit("wipe a.txt")
    path = tmp_path / "paused.json"
    chat.save(path)
    restored = Conversation.load(path, ScriptedModel(["Removed."]))
    restored.register(wipe, approve=True)
    assert [c.id for c in restored.pending_approvals] == ["w"]
    assert restored.resume({"w": True}) == "Removed."


def test_a_code_interpreter_session_with_an_image_round_trips(tmp_path: Path) -> None:
    pytest.importorskip("jupyter_client")
    pytest.importorskip("matplotlib")
    code = ("import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
            "plt.plot([1, 2, 3])\nplt.show()\nprint('plotted')")
    model = ScriptedModel([{"tool_calls": [call("python", {"code": code}, id="p")]}, "Here is the plot."])
    with Conversation(model, code_interpreter={"timeout": 60}) as chat:
        assert chat.submit("Plot 1, 2, 3") == "Here is the plot."
        result = next(m["content"] for m in chat.messages if m["role"] == "tool")
        assert "plotted" in result
        path = tmp_path / "plot.json"
        chat.save(path)
    restored = Conversation.load(path, ScriptedModel([]))
    assert restored.messages == chat.messages
    restored._repr_markdown_()


def test_a_bare_list_of_messages_loads(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "hi", "x-note": {"kept": [1, 2]}}, {"role": "assistant", "content": "yo"}]
    assert load(saved(tmp_path, messages)).messages == messages


# -- save --------------------------------------------------------------------------------------------------------
def test_a_save_that_fails_midway_leaves_the_old_file_whole(tmp_path: Path) -> None:
    """The file-size limit stops the write half way (EFBIG), as a full disk would."""
    path = tmp_path / "chat.json"
    child = textwrap.dedent(f"""
        import resource, signal
        from functionary_agent import Conversation
        from functionary_agent.testing import ScriptedModel
        chat = Conversation(ScriptedModel(["short"]))
        chat.submit("hello")
        chat.save({str(path)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        chat.messages.append({{"role": "user", "content": "x" * 200_000}})
        try:
            chat.save({str(path)!r})
        except OSError as exc:
            print("failed:", exc.strerror)
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stdout.strip() == "failed: File too large", done.stderr
    assert [m["content"] for m in load(path).messages] == ["hello", "short"]  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json"]  # no temporary file left behind


def test_save_refuses_messages_a_load_would_refuse_and_writes_nothing(tmp_path: Path) -> None:
    chat = Conversation(ScriptedModel([]))
    chat.messages = [{"role": "assistant", "content": None, "tool_calls": "zzz"}]
    path = tmp_path / "chat.json"
    with pytest.raises(ConfigurationError, match=r"a load would refuse them: messages\[0\]\.tool_calls: expected"):
        chat.save(path)
    assert list(tmp_path.iterdir()) == []


def test_save_writes_through_a_link_and_keeps_the_mode_of_the_file_it_replaces(tmp_path: Path) -> None:
    target = tmp_path / "real.json"
    target.write_text("{}")
    target.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    chat = Conversation(ScriptedModel(["hi"]))
    chat.submit("hello")
    chat.save(link)
    assert link.is_symlink() and load(target).messages == chat.messages
    assert target.stat().st_mode & 0o777 == 0o640
