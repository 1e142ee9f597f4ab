"""Requests as OpenAI clients really send them: tool results out of call order, and requests without tools."""

from __future__ import annotations

import json
from typing import Any

import pytest

from functionary_agent.formats import FORMAT_NAMES, get_format
from functionary_agent.formats._common import in_call_order

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "convert_currency",
            "description": "Convert an amount between currencies.",
            "parameters": {
                "type": "object",
                "properties": {"amount": {"type": "number"}, "to": {"type": "string"}},
                "required": ["amount", "to"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "book_room",
            "description": "Book a meeting room.",
            "parameters": {"type": "object", "properties": {"room": {"type": "string"}}, "required": ["room"]},
        },
    },
]


def _call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def _result(call_id: str | None, content: str, name: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "tool", "content": content}
    if call_id is not None:
        message["tool_call_id"] = call_id
    if name is not None:
        message["name"] = name
    return message


CALLS = [
    _call("call_a", "convert_currency", {"amount": 10, "to": "EUR"}),
    _call("call_b", "convert_currency", {"amount": 99, "to": "JPY"}),
    _call("call_c", "book_room", {"room": "Aurora"}),
]
RESULTS = [_result("call_a", "9.2 EUR"), _result("call_b", "14,800 JPY"), _result("call_c", "booked")]


def _conversation(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "Convert 10 USD to EUR and 99 USD to JPY, and book Aurora."},
        {"role": "assistant", "content": None, "tool_calls": CALLS},
        *results,
        {"role": "assistant", "content": "Done: 9.2 EUR, 14,800 JPY, Aurora is booked."},
        {"role": "user", "content": "Thanks. Book Borealis too."},
    ]


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_results_in_reverse_order_render_the_prompt_of_call_order(name: str) -> None:
    fmt = get_format(name)
    in_order = fmt.render(_conversation(RESULTS), TOOLS)
    assert fmt.render(_conversation(RESULTS[::-1]), TOOLS) == in_order
    assert in_order.index("9.2 EUR") < in_order.index("14,800 JPY") < in_order.index("booked")


def test_two_calls_to_the_same_function_are_told_apart_by_their_ids() -> None:
    shuffled = _conversation([RESULTS[1], RESULTS[2], RESULTS[0]])
    ordered = in_call_order(shuffled)
    assert [m.get("tool_call_id") for m in ordered[2:5]] == ["call_a", "call_b", "call_c"]


def test_results_without_an_id_or_with_an_unknown_one_keep_their_order_after_the_matched_ones() -> None:
    stray, nameless = _result("call_zzz", "from nowhere"), _result(None, "no id at all")
    messages = _conversation([stray, RESULTS[2], nameless, RESULTS[0], RESULTS[1]])
    ordered = in_call_order(messages)
    assert [m["content"] for m in ordered[2:7]] == ["9.2 EUR", "14,800 JPY", "booked", "from nowhere", "no id at all"]
    assert sorted(map(json.dumps, ordered)) == sorted(map(json.dumps, messages))  # nothing dropped or repeated


def test_only_the_results_right_after_a_call_turn_move() -> None:
    later = [{"role": "user", "content": "and?"}, _result("call_b", "a late result")]
    messages = [*_conversation(RESULTS[::-1]), *later]
    ordered = in_call_order(messages)
    assert ordered[-2:] == later and len(ordered) == len(messages)
    assert in_call_order([RESULTS[1], RESULTS[0]]) == [RESULTS[1], RESULTS[0]]  # no call turn before them


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_a_request_without_tools_is_a_none_request(name: str) -> None:
    fmt = get_format(name)
    messages = [{"role": "user", "content": "Write a haiku about autumn."}]
    for tools in (None, []):
        assert fmt.render(messages, tools) == fmt.render(messages, None, tool_choice="none")
        assert fmt.render(messages, tools, tool_choice="required") == fmt.render(messages, None, tool_choice="none")
        grammar = fmt.call_grammar(tools, "auto")
        assert grammar.calls == () and grammar.text_allowed and grammar.max_calls == 0
        parsed = fmt.parse("Leaves fall softly down", tools=tools)
        assert parsed == {"role": "assistant", "content": "Leaves fall softly down"}


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_a_code_interpreter_alone_still_counts_as_a_tool(name: str) -> None:
    fmt = get_format(name)
    messages = [{"role": "user", "content": "Plot a sine."}]
    tools = [{"type": "code_interpreter"}]
    assert fmt.render(messages, tools) != fmt.render(messages, tools, tool_choice="none")
