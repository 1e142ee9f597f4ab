"""MCP servers as tools, against a real server written with the SDK's FastMCP (tests/servers/mcp_echo_server.py).

Each test starts the server for real (stdio: a child process; HTTP: uvicorn on a loopback port) and talks to it
through the official client SDK, the way a user's conversation would.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp")

from functionary_agent import ConfigurationError, Conversation, _sync
from functionary_agent.integrations._http_guard import RequestRefused
from functionary_agent.integrations.mcp import MCPConnection, _guarded, content_to_text
from functionary_agent.testing import ScriptedModel, call
from functionary_agent.tools import Tool
from tests.processes import process_gone
from tests.servers.recording_http import recording_server, redirect

SERVER = Path(__file__).parent / "servers" / "mcp_echo_server.py"
COMMAND = [sys.executable, str(SERVER)]
TOKEN = "s3cret-token"


def by_name(tools: list[Tool]) -> dict[str, Tool]:
    return {t.name: t for t in tools}


async def server_schemas() -> dict[str, dict[str, Any]]:
    """The input schemas the server sends, read with nothing but the SDK's own client."""
    from mcp import ClientSession, StdioServerParameters, stdio_client

    params = StdioServerParameters(command=COMMAND[0], args=COMMAND[1:])
    async with stdio_client(params) as streams, ClientSession(streams[0], streams[1]) as session:
        await session.initialize()
        listed = await session.list_tools()
    return {t.name: t.model_dump(by_alias=True, mode="json", exclude_none=True)["inputSchema"] for t in listed.tools}


# -- stdio ---------------------------------------------------------------------------------------------------
def test_stdio_tools_keep_the_servers_names_and_schemas() -> None:
    async def main() -> tuple[list[Tool], dict[str, dict[str, Any]]]:
        async with await MCPConnection.open(command=COMMAND) as connection:
            return connection.tools, await server_schemas()

    tools, expected = asyncio.run(main())
    names = {t.name for t in tools}
    assert {"add", "divide", "read_env", "server_pid", "wait", "crash"} <= names
    assert "text_shout" in names and "text.shout" not in names  # a dot is not allowed in an OpenAI tool name
    for tool in tools:
        remote = "text.shout" if tool.name == "text_shout" else tool.name
        assert tool.parameters == expected[remote], tool.name
    assert by_name(tools)["add"].description == "Add two integers."
    assert by_name(tools)["add"].to_openai()["function"]["parameters"]["required"] == ["a", "b"]


def test_calls_round_trip_and_server_errors_reach_the_model_as_tool_errors() -> None:
    async def main() -> list[Any]:
        async with await MCPConnection.open(command=COMMAND) as connection:
            tools = by_name(connection.tools)
            return [
                await tools["add"].run('{"a": 2, "b": 40}'),
                await tools["text_shout"].run({"text": "hi"}),
                await tools["divide"].run({"numerator": 1, "denominator": 0}),
                await tools["add"].run({"a": "two", "b": 1}),
                await tools["add"].run({"a": 1}),
            ]

    added, shouted, divided, bad_type, missing = asyncio.run(main())
    assert (added.content, added.is_error) == ("42", False)
    assert (shouted.content, shouted.is_error) == ("HI!", False)  # the call went to the server's "text.shout"
    assert divided.is_error and divided.content.startswith("Error: divide raised MCPToolError:")
    assert "cannot divide by zero" in divided.content
    assert bad_type.is_error and "valid integer" in bad_type.content  # the server's own validation message
    assert missing.is_error and "- b: Field required" in missing.content  # checked before it is sent


def test_a_conversation_uses_the_servers_tools() -> None:
    model = ScriptedModel([
        {"tool_calls": [call("calc_add", {"a": 20, "b": 22}), call("calc_divide", {"numerator": 1, "denominator": 0})]},
        "20 + 22 = 42, and 1 / 0 is not defined.",
    ])

    async def main() -> str:
        async with await MCPConnection.open(command=COMMAND, prefix="calc_") as connection:
            assert {"calc_add", "calc_divide"} <= {t.name for t in connection.tools}
            chat = Conversation(model, tools=connection.tools)
            return await chat.asubmit("What are 20 + 22 and 1 / 0?")

    assert asyncio.run(main()) == "20 + 22 = 42, and 1 / 0 is not defined."
    results = [m["content"] for m in model.requests[1].messages if m["role"] == "tool"]
    assert results[0] == "42"
    assert results[1].startswith("Error: calc_divide raised MCPToolError:") and "cannot divide by zero" in results[1]


def test_calls_run_concurrently_and_a_close_ends_calls_in_flight() -> None:
    async def main() -> tuple[float, list[Any], Any, float]:
        connection = await MCPConnection.open(command=COMMAND)
        wait = by_name(connection.tools)["wait"]
        started = time.monotonic()
        together = await asyncio.gather(*(wait.run({"seconds": 1}) for _ in range(4)))
        elapsed = time.monotonic() - started
        in_flight = asyncio.ensure_future(wait.run({"seconds": 30}))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await connection.aclose()
        return elapsed, together, await asyncio.wait_for(in_flight, 10), time.monotonic() - started

    elapsed, together, cut, close_time = asyncio.run(main())
    assert [o.content for o in together] == ["waited 1 s"] * 4 and elapsed < 2.5
    assert cut.is_error and cut.content.startswith("Error: wait raised MCPServerError:") and close_time < 8


def test_call_timeout_reaches_the_model() -> None:
    async def main() -> Any:
        async with await MCPConnection.open(command=COMMAND, call_timeout=0.5) as connection:
            return await by_name(connection.tools)["wait"].run({"seconds": 10})

    outcome = asyncio.run(main())
    assert (outcome.content, outcome.is_error) == ("Error: wait timed out after 0.5 s", True)


def test_env_reaches_the_server_process() -> None:
    async def main() -> str:
        async with await MCPConnection.open(command=COMMAND, env={"FA_MCP_TEST": "from the test"}) as connection:
            return (await by_name(connection.tools)["read_env"].run({"name": "FA_MCP_TEST"})).content

    assert asyncio.run(main()) == "from the test"


def test_closing_ends_the_server_process_and_later_calls_fail_clearly() -> None:
    async def main() -> tuple[int, Any]:
        connection = await MCPConnection.open(command=COMMAND)
        tools = by_name(connection.tools)
        pid = int((await tools["server_pid"].run({})).content)
        assert not connection.closed and not process_gone(pid, within=0)
        await connection.aclose()
        await connection.aclose()  # a second close is harmless
        return pid, await tools["add"].run({"a": 1, "b": 2})

    pid, after = asyncio.run(main())
    assert process_gone(pid)
    assert after.is_error and "is closed" in after.content


def test_a_server_that_dies_mid_session_gives_tool_errors_not_a_crash() -> None:
    async def main() -> tuple[Any, Any]:
        connection = await MCPConnection.open(command=COMMAND)
        tools = by_name(connection.tools)
        crashed = await tools["crash"].run({})
        after = await tools["add"].run({"a": 1, "b": 2})
        await connection.aclose()  # still closes cleanly with the process already gone
        assert connection.closed
        return crashed, after

    crashed, after = asyncio.run(main())
    for outcome in (crashed, after):
        assert outcome.is_error
        assert outcome.content.startswith(f"Error: {'crash' if outcome is crashed else 'add'} raised MCPServerError:")
        assert "closed" in outcome.content.lower()  # "Connection closed" (mcp 2) or "connection ... is closed" (1.x)


def test_an_unknown_command_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"no-such-mcp-server-xyz.*not found"):
        asyncio.run(MCPConnection.open(command=["no-such-mcp-server-xyz", "--stdio"]))
    with pytest.raises(ConfigurationError, match="exactly one of"):
        asyncio.run(MCPConnection.open())


def test_a_program_that_exits_at_once_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="could not start MCP server"):
        asyncio.run(MCPConnection.open(command=[sys.executable, "-c", "pass"], timeout=20))


def test_a_silent_program_times_out_and_is_stopped(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match="within 1 s"):
        asyncio.run(MCPConnection.open(command=[sys.executable, "-c", script, str(pid_file)], timeout=1))
    assert time.monotonic() - started < 15
    assert process_gone(int(pid_file.read_text()))


def test_sync_conversation_and_another_event_loop_share_one_connection() -> None:
    """Opened through the sync wrappers' loop, then used from `asyncio.run` (a notebook cell's loop, say)."""
    connection = _sync.run(MCPConnection.open(command=COMMAND))
    try:
        model = ScriptedModel([
            {"tool_calls": [call("add", {"a": 1, "b": 2})]}, "3", {"tool_calls": [call("add", {"a": 3, "b": 4})]}, "7"
        ])
        chat = Conversation(model, tools=connection.tools)
        assert chat.submit("1 + 2?") == "3"
        assert asyncio.run(chat.asubmit("3 + 4?")) == "7"
        tool_results = [m["content"] for m in chat.messages if m["role"] == "tool"]
        assert tool_results == ["3", "7"]
    finally:
        asyncio.run(connection.aclose())  # closing from another loop is handed over too
    assert connection.closed


# -- streamable HTTP -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    process = subprocess.Popen([*COMMAND, "http", TOKEN], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("PORT "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}/mcp"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_http_server_tools_round_trip_with_headers(http_url: str) -> None:
    async def main() -> tuple[set[str], Any, Any, MCPConnection]:
        connection = await MCPConnection.open(url=http_url, headers={"X-Test-Token": TOKEN})
        async with connection:
            tools = by_name(connection.tools)
            added = await tools["add"].run({"a": 5, "b": 6})
            divided = await tools["divide"].run({"numerator": 1, "denominator": 0})
        return set(tools), added, divided, connection

    names, added, divided, connection = asyncio.run(main())
    assert {"add", "divide", "text_shout"} <= names
    assert (added.content, added.is_error) == ("11", False)
    assert divided.is_error and "cannot divide by zero" in divided.content
    assert connection.closed and connection.server_name == "echo"


def test_http_server_refusing_the_request_is_a_configuration_error(http_url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"could not start MCP server http://127\.0\.0\.1") as refused:
        asyncio.run(MCPConnection.open(url=http_url, headers={"X-Test-Token": "wrong"}, timeout=10))
    assert "HTTP 401 Unauthorized" in str(refused.value)  # the status says what to fix (the SDK drops it)


def test_unreachable_http_server_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="ConnectError"):
        asyncio.run(MCPConnection.open(url="http://127.0.0.1:9/mcp", timeout=10))


def test_http_headers_do_not_follow_a_redirect_to_another_origin() -> None:
    with (
        recording_server() as other,
        recording_server(lambda _: redirect(f"{other.url}/mcp", 307)) as redirector,
        pytest.raises(ConfigurationError, match=r"could not start MCP server http://127\.0\.0\.1:\d+/mcp") as caught,
    ):
        asyncio.run(MCPConnection.open(url=f"{redirector.url}/mcp", headers={"X-Test-Token": TOKEN}, timeout=10))
    assert "not followed" in str(caught.value) or "refused before it was sent" in str(caught.value)  # SDK, or ours
    assert set(redirector.header_values("x-test-token")) == {TOKEN}
    assert other.requests == []  # neither the token nor the session's messages went there


def test_the_connections_client_refuses_other_origins_even_when_it_follows_redirects() -> None:
    """SDKs before 1.24 made clients that follow every redirect; the guard stops each hop before it is sent."""
    from mcp.shared._httpx_utils import create_mcp_http_client

    def answer(request: Any) -> Any:
        if request.path == "/mcp":
            return 200, {"Content-Type": "application/json"}, b"{}"
        return redirect("/mcp", 307) if request.path == "/old" else redirect(f"{other.url}/mcp", 307)

    async def post(path: str) -> int:
        client = _guarded(create_mcp_http_client(headers={"X-Test-Token": TOKEN}), f"{redirector.url}/mcp")
        async with client:
            return (await client.post(f"{redirector.url}{path}", json={}, follow_redirects=True)).status_code

    with recording_server() as other, recording_server(answer) as redirector:
        with pytest.raises(RequestRefused, match=f"only {redirector.url} receives"):
            asyncio.run(post("/elsewhere"))
        assert asyncio.run(post("/old")) == 200  # within the origin: followed
    assert other.requests == []
    assert [r.path for r in redirector.requests] == ["/elsewhere", "/old", "/mcp"]


# -- result text ---------------------------------------------------------------------------------------------
def test_non_text_content_is_named_not_dumped() -> None:
    result = {
        "content": [
            {"type": "text", "text": "chart:"},
            {"type": "image", "mimeType": "image/png", "data": "iVBORw0KGgo="},
            {"type": "resource", "resource": {"uri": "file:///a.txt", "text": "file body"}},
            {"type": "resource", "resource": {"uri": "file:///b.bin", "blob": "AAAA"}},
            {"type": "resource_link", "name": "report", "uri": "file:///r.pdf"},
        ]
    }
    assert content_to_text(result).splitlines() == [
        "chart:",
        "[image image/png, 8 bytes, not shown]",
        "file body",
        "[resource file:///b.bin, binary, not shown]",
        "[resource link report: file:///r.pdf]",
    ]
    assert content_to_text({"content": [], "structuredContent": {"temperature": 21}}) == '{"temperature": 21}'


def test_stdio_works_where_stderr_has_no_file_descriptor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jupyter replaces sys.stderr with a stream that has no fileno(); the server process still needs one."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())

    async def main() -> str:
        async with await MCPConnection.open(command=COMMAND) as connection:
            return (await by_name(connection.tools)["add"].run({"a": 1, "b": 1})).content

    assert asyncio.run(main()) == "2"
