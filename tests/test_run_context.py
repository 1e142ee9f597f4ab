"""Tools that see their run: a `RunContext` parameter gets the deps, the call id, the usage and the conversation."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated, Any

import pytest

from functionary_agent import Conversation, RunContext, Tool, ToolDefinitionError
from functionary_agent.testing import ScriptedModel, call


@dataclass
class Shop:
    prices: dict[str, float]


def price(item: str, ctx: RunContext[Shop]) -> float:
    """The price of an item."""
    return ctx.deps.prices[item]


async def basket(ctx: RunContext[Shop], items: list[str]) -> dict[str, Any]:
    """What a basket costs."""
    await asyncio.sleep(0)
    return {"total": sum(ctx.deps.prices[i] for i in items), "call": ctx.call_id, "requests": ctx.usage.requests,
            "messages": len(ctx.conversation.messages)}


def test_the_context_parameter_is_not_in_the_schema() -> None:
    assert Tool.from_function(price).parameters["properties"].keys() == {"item"}
    assert Tool.from_function(basket).parameters["required"] == ["items"]


def test_sync_and_async_tools_receive_deps_call_id_usage_and_the_conversation() -> None:
    model = ScriptedModel([
        {"tool_calls": [call("price", {"item": "tea"}, id="call_1"), call("basket", {"items": ["tea", "jam"]},
                                                                            id="call_2")]},
        "Tea is 2.5.",
    ])
    chat = Conversation(model, tools=[price, basket], deps=Shop({"tea": 2.5, "jam": 4.0}))
    chat.submit("Prices?")
    tea, total = (m["content"] for m in chat.messages if m["role"] == "tool")
    assert tea == "2.5"
    assert total == '{"total":6.5,"call":"call_2","requests":1,"messages":2}'


def test_annotated_context_and_a_tool_run_outside_a_conversation() -> None:
    def whoami(ctx: Annotated[RunContext[None], "the run"]) -> str:
        return "outside" if ctx is None else ctx.call_id

    tool = Tool.from_function(whoami)
    assert tool.parameters["properties"] == {}
    assert asyncio.run(tool.run("{}")).content == "outside"


def test_a_context_parameter_with_a_default_is_refused() -> None:
    def bad(x: int, ctx: RunContext[None] | None = None) -> int:
        return x

    def worse(x: int, ctx: RunContext[None] = None) -> int:  # type: ignore[assignment]
        return x

    for fn in (bad, worse):
        with pytest.raises(ToolDefinitionError, match="RunContext parameter ctx must have no default"):
            Tool.from_function(fn)


def test_ordinary_unions_stay_ordinary_parameters() -> None:
    def either(x: int | str, y: int | None = None) -> str:
        return f"{x}{y}"

    assert Tool.from_function(either).parameters["properties"].keys() == {"x", "y"}
