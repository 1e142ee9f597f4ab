"""`Conversation.register_mcp` / `register_openapi`: real servers' tools in the agent loop, closed with it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from functionary_agent import Conversation, ToolDefinitionError
from functionary_agent.testing import ScriptedModel, call

pytest.importorskip("mcp")
pytest.importorskip("fastapi")
from tests.processes import process_gone
from tests.servers.openapi_app import serve

MCP_SERVER = [sys.executable, str(Path(__file__).parent / "servers" / "mcp_echo_server.py")]


def test_mcp_tools_in_the_loop_and_the_server_stops_with_the_conversation() -> None:
    model = ScriptedModel([
        {"tool_calls": [call("add", {"a": 2, "b": 3}, id="a"), call("divide", {"numerator": 1, "denominator": 0},
                                                                    id="d"), call("server_pid", {}, id="p")]},
        "2 + 3 = 5, and 1/0 is undefined.",
    ])
    chat = Conversation(model)
    names = [tool.name for tool in chat.register_mcp(MCP_SERVER)]
    assert {"add", "divide", "server_pid"} <= set(names)
    assert chat.submit("add and divide") == "2 + 3 = 5, and 1/0 is undefined."
    results = {m["tool_call_id"]: m["content"] for m in chat.messages if m["role"] == "tool"}
    assert results["a"] == "5"
    assert results["d"].startswith("Error: divide raised MCPToolError")
    pid = int(results["p"])
    chat.close()
    assert process_gone(pid), "closing the conversation left the MCP server running"


def test_a_second_server_with_the_same_names_is_refused_unless_prefixed() -> None:
    chat = Conversation(ScriptedModel([]))
    chat.register_mcp(MCP_SERVER)
    with pytest.raises(ToolDefinitionError, match="already registered; pass prefix"):
        chat.register_mcp(MCP_SERVER)
    second = chat.register_mcp(MCP_SERVER, prefix="b_")
    assert all(tool.name.startswith("b_") for tool in second)
    chat.close()


def test_openapi_operations_in_the_loop() -> None:
    with serve() as base:
        model = ScriptedModel([
            {"tool_calls": [call("create_item", {"name": "kettle", "price": 20, "tags": ["kitchen"]}, id="new")]},
            {"tool_calls": [call("list_items", {"tag": ["kitchen"]}, id="list"), call("fail", {}, id="bad")]},
            "We have a kettle.",
        ])
        with Conversation(model) as chat:
            tools = chat.register_openapi(f"{base}/openapi.json", include=["create_item", "list_items", "fail"])
            assert sorted(tool.name for tool in tools) == ["create_item", "fail", "list_items"]
            assert chat.submit("stock a kettle, then list the kitchen") == "We have a kettle."
        results = {m["tool_call_id"]: m["content"] for m in chat.messages if m["role"] == "tool"}
        assert '"name":"kettle"' in results["new"].replace(" ", "")
        assert "kettle" in results["list"]
        assert results["bad"].startswith("Error: fail raised HTTPCallError") and "500" in results["bad"]
