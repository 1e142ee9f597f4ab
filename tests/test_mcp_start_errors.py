"""MCP stdio servers that fail, as real processes: at import, silently, by a signal, with garbage on stdout, by a
program that cannot be run, and later during a call. What the user (or the model) reads must say how the server
ended (exit status or signal) and end with the last lines of its stderr, as plain text, not only "Connection
closed" (issue 24, item 6).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mcp")

from functionary_agent import ConfigurationError, Conversation
from functionary_agent.integrations.mcp import MCPConnection
from functionary_agent.testing import ScriptedModel, call

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def script(tmp_path: Path, name: str, text: str) -> list[str]:
    path = tmp_path / name
    path.write_text(text)
    return [PYTHON, str(path)]


def start_error(command: list[str], timeout: float = 30) -> str:
    """The message of the ConfigurationError a conversation raises when it registers the server."""
    chat = Conversation(ScriptedModel(["unused"]))
    try:
        with pytest.raises(ConfigurationError) as caught:
            chat.register_mcp(command=command, timeout=timeout)
    finally:
        chat.close()
    assert caught.value.__cause__ is None  # the message says it all: no SDK exception group behind it
    return str(caught.value)


def test_a_server_that_raises_at_import_shows_its_exit_status_and_traceback(tmp_path: Path) -> None:
    command = script(tmp_path, "needs_key.py", (
        "import sys\n"
        "print('weather server: reading configuration', file=sys.stderr)\n"
        "raise RuntimeError('WEATHER_API_KEY is not set')\n"
    ))
    message = start_error(command)
    first, *quoted = message.splitlines()
    assert first == (
        f"could not start MCP server {PYTHON} {command[1]}: it exited with status 1 during start-up; "
        "the last lines of its stderr:"
    )
    assert quoted[0] == "  | weather server: reading configuration"
    assert quoted[1] == "  | Traceback (most recent call last):"
    assert quoted[-1] == "  | RuntimeError: WEATHER_API_KEY is not set"
    assert "Connection closed" not in message


def test_a_server_that_exits_silently_gives_its_status_and_what_to_do(tmp_path: Path) -> None:
    command = script(tmp_path, "quits.py", "import sys\nsys.exit(3)\n")
    assert start_error(command) == (
        f"could not start MCP server {PYTHON} {command[1]}: it exited with status 3 during start-up, "
        "with nothing on stderr; run the command in a terminal to see it start"
    )


def test_a_program_that_cannot_be_run_is_named(tmp_path: Path) -> None:
    missing = start_error(["no-such-mcp-server-xyz", "--stdio"])
    assert missing.startswith("MCP server command 'no-such-mcp-server-xyz' was not found")
    broken = tmp_path / "broken-server"
    broken.write_text("#!/nonexistent/python3\nprint('never runs')\n")
    broken.chmod(0o755)
    assert start_error([str(broken)]) == (
        f"could not start MCP server {broken}: cannot run {str(broken)!r}: No such file or directory "
        "(check the interpreter on its #! line, and PATH if env= sets it)"
    )
    with pytest.raises(ConfigurationError, match=r"^cwd='/nonexistent/dir' for the MCP server is not a directory$"):
        asyncio.run(MCPConnection.open(command=[PYTHON, "-c", "pass"], cwd="/nonexistent/dir"))


def test_a_server_killed_by_a_signal_during_start_is_reported_with_the_signal(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    command = script(tmp_path, "slow.py", (
        "import os, sys, time\n"
        "print('loading a large index...', file=sys.stderr, flush=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(120)\n"
    ))

    async def kill_when_started() -> None:
        while not pid_file.exists() or not pid_file.read_text():
            await asyncio.sleep(0.05)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)  # as the OOM killer would

    async def main() -> str:
        killer = asyncio.ensure_future(kill_when_started())
        with pytest.raises(ConfigurationError) as caught:
            await MCPConnection.open(command=command, timeout=120)
        await killer
        return str(caught.value)

    started = time.monotonic()
    message = asyncio.run(main())
    assert time.monotonic() - started < 60  # the kill ends the start, not the 120 s handshake timeout
    assert message.splitlines() == [
        f"could not start MCP server {PYTHON} {command[1]}: it was killed by SIGKILL (signal 9) during start-up; "
        "the last lines of its stderr:",
        "  | loading a large index...",
    ]


def test_a_server_that_prints_garbage_on_stdout_is_told_to_log_on_stderr(tmp_path: Path) -> None:
    command = script(tmp_path, "chatty.py", (
        "import sys\n"
        "print('Weather server listening on stdio', flush=True)\n"
        "sys.stdin.read()\n"  # never answers; exits when its stdin closes
    ))
    message = start_error(command, timeout=8)
    assert message.startswith(f"could not start MCP server {PYTHON} {command[1]}: ")
    assert "no answer to the MCP handshake within 8 s" in message
    assert (
        "it sent something that is not an MCP message: 'Weather server listening on stdio' "
        "(a stdio server must write only MCP messages to stdout; logs belong on stderr)"
    ) in message
    assert len(message.splitlines()) == 1


def test_the_stderr_tail_is_plain_text_and_bounded(tmp_path: Path) -> None:
    command = script(tmp_path, "noisy.py", (
        "import sys\n"
        "for n in range(20000):\n"
        "    sys.stderr.write(f'debug line {n} ' + 'x' * 40 + '\\n')\n"
        "sys.stderr.write('\\x1b]52;c;cm0gLXJmIH4=\\x07\\x1b[2J\\rfatal: \\u202eoops\\xff\\n')\n"
        "sys.exit(2)\n"
    ))
    message = start_error(command)
    first, *quoted = message.splitlines()
    assert first.endswith(": it exited with status 2 during start-up; the last lines of its stderr:")
    assert len(quoted) == 20 and len(message) < 4500  # 1 MB written; the tail kept is bounded
    assert quoted[-2] == "  | debug line 19999 " + "x" * 40
    assert quoted[-1] == "  | ^[]52;c;cm0gLXJmIH4=^G^[[2J^Mfatal: <U+202E>oops\xff"  # controls shown, not obeyed
    assert all(ch == "\n" or ch.isprintable() for ch in message)


CRASHING_SERVER = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from tests.servers.mcp_echo_server import server

@server.tool()
def fail(message: str, status: int) -> str:
    '''Write `message` to stderr, then exit with `status` (a negative one: killed by that signal).'''
    print(message, file=sys.stderr, flush=True)
    if status < 0:
        os.kill(os.getpid(), -status)
    os._exit(status)

server.run()
"""


def test_a_server_that_crashes_during_a_call_tells_the_model_how_it_ended(tmp_path: Path) -> None:
    command = script(tmp_path, "crashing_server.py", CRASHING_SERVER)
    model = ScriptedModel([
        {"tool_calls": [call("fail", {"message": "fatal: index file is corrupt", "status": 7})]},
        {"tool_calls": [call("add", {"a": 1, "b": 2})]},
        "The weather server crashed.",
    ])
    with Conversation(model) as chat:
        chat.register_mcp(command=command)
        assert chat.submit("What is the weather?") == "The weather server crashed."
    results = [m["content"] for m in chat.messages if m["role"] == "tool"]
    assert results[0].startswith("Error: fail raised MCPServerError: MCP server 'echo' did not answer: ")
    assert "closed" in results[0]  # "MCPError: Connection closed" (mcp 2) or "... connection ... is closed" (1.x)
    assert results[0].endswith(
        ": it exited with status 7; the last lines of its stderr:\n  | fatal: index file is corrupt"
    )
    assert results[1].startswith("Error: add raised MCPServerError: ") and "it exited with status 7" in results[1]


def test_a_server_killed_during_a_call_names_the_signal(tmp_path: Path) -> None:
    command = script(tmp_path, "crashing_server.py", CRASHING_SERVER)

    async def main() -> str:
        async with await MCPConnection.open(command=command) as connection:
            fail = next(tool for tool in connection.tools if tool.name == "fail")
            return (await fail.run({"message": "out of memory", "status": -int(signal.SIGKILL)})).content

    content = asyncio.run(main())
    assert content.startswith("Error: fail raised MCPServerError: MCP server 'echo' did not answer: ")
    assert content.endswith(": it was killed by SIGKILL (signal 9); the last lines of its stderr:\n  | out of memory")


def test_a_working_servers_stderr_still_reaches_ours_and_nothing_is_left_open(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    command = script(tmp_path, "greeting_server.py", CRASHING_SERVER.replace(
        "server.run()", "print('echo server: ready', file=sys.stderr, flush=True)\nserver.run()"
    ))

    def open_descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def session() -> str:
        async with await MCPConnection.open(command=command) as connection:
            add = next(tool for tool in connection.tools if tool.name == "add")
            return (await add.run({"a": 2, "b": 3})).content

    assert asyncio.run(session()) == "5"  # a first run loads what stays loaded
    before = open_descriptors()
    assert [asyncio.run(session()) for _ in range(3)] == ["5"] * 3
    deadline = time.monotonic() + 10  # the stderr reader closes its pipe when it reads the end, just after
    while open_descriptors() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_descriptors() == before
    assert capfd.readouterr().err.count("echo server: ready\n") == 4
