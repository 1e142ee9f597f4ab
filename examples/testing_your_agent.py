"""Test an agent without a server: ScriptedModel plays the model, your tools run for real.

    python examples/testing_your_agent.py
"""

from __future__ import annotations

from functionary_agent import Conversation
from functionary_agent.testing import ScriptedModel, call

inventory = {"apples": 3, "pears": 0}


def stock(item: str) -> int:
    """How many of an item are in stock.

    Args:
        item: The item's name, e.g. "apples".
    """
    if item not in inventory:
        raise KeyError(f"unknown item {item!r}")
    return inventory[item]


def main() -> None:
    model = ScriptedModel([
        {"tool_calls": [call("stock", {"item": "apples"}), call("stock", {"item": "kiwis"})]},
        "We have 3 apples; kiwis are not something we sell.",
    ])
    chat = Conversation(model, tools=[stock])
    answer = chat.submit("Do you have apples and kiwis?")

    tool_results = [m["content"] for m in chat.messages if m["role"] == "tool"]
    assert tool_results == ["3", "Error: stock raised KeyError: \"unknown item 'kiwis'\""], tool_results
    assert model.requests[1].messages[-1]["role"] == "tool"  # the model saw both results, the error included
    print(answer)


if __name__ == "__main__":
    main()
