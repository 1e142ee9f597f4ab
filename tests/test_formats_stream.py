"""Streaming: any split of an output gives what `parse` gives, with OpenAI's chunk conventions and no marker
fragments leaking into the text."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from functionary_agent.formats import FORMAT_NAMES, get_format, message_from_deltas
from tests.formats_support import (
    TOOLS,
    assistant_messages,
    model_output,
    noisy_outputs,
    streamed,
    without_ids,
)

CHOICES: list[Any] = ["auto", "none", "required", {"type": "function", "function": {"name": "get_weather"}}]


def _outputs(name: str) -> st.SearchStrategy[str]:
    fmt = get_format(name)
    rendered = assistant_messages(name).map(lambda message: model_output(fmt, message))
    return rendered | noisy_outputs() | st.tuples(rendered, noisy_outputs()).map("".join)


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("choice", CHOICES, ids=["auto", "none", "required", "named"])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_split_streams_to_the_same_message_as_parse(name: str, choice: Any, data: st.DataObject) -> None:
    fmt = get_format(name)
    text = data.draw(_outputs(name))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=30))
    deltas, reason = streamed(fmt, text, cuts, tool_choice=choice)
    expected = fmt.parse(text, tools=TOOLS, tool_choice=choice)
    assert without_ids(message_from_deltas(deltas)) == without_ids(expected)
    assert reason == ("tool_calls" if expected.get("tool_calls") else "stop")


@pytest.mark.parametrize("name", FORMAT_NAMES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_character_by_character_streaming_follows_openai_chunk_conventions(name: str, data: st.DataObject) -> None:
    fmt = get_format(name)
    text = model_output(fmt, data.draw(assistant_messages(name)))
    deltas, _ = streamed(fmt, text, list(range(len(text))))
    started: set[int] = set()
    for delta in deltas:
        assert set(delta) in ({"content"}, {"tool_calls"})
        for part in delta.get("tool_calls", []):
            if part["index"] not in started:
                assert part["index"] == len(started), "calls start in order"
                assert set(part) == {"index", "id", "type", "function"} and part["function"]["arguments"] == ""
                started.add(part["index"])
            else:
                assert set(part) == {"index", "function"} and set(part["function"]) == {"arguments"}


@pytest.mark.parametrize(
    ("name", "pieces"),
    [
        ("v3.llama3", ["all\nSee", " >", ">", '>get_weather\n{"location": "x"}']),
        ("chatml-v3", ["all\nSee", " >", ">", '>get_weather\n{"location": "x"}']),
        ("v3-llama3.1", ["See <", "func", "tion=", 'get_weather>{"location": "x"}</function>']),
        ("v2.llama3", ["See <|reserved", "_special_token_249|>", 'get_weather\n{"location": "x"}']),
        (
            "v2",
            ["all\n<|content|>See\n<", "|from|>assistant\n<|recipient|>", 'get_weather\n<|content|>{"location": "x"}'],
        ),
    ],
)
def test_possible_marker_starts_are_held_back_until_decided(name: str, pieces: list[str]) -> None:
    parser = get_format(name).stream_parser(tools=TOOLS)
    shown = ""
    for piece in pieces:
        for delta in parser.feed(piece):
            shown += delta.get("content", "")
        assert "<" not in shown and ">" not in shown, f"a marker fragment leaked into the text: {shown!r}"
    rest, reason = parser.finish()
    assert shown == "See" and reason == "tool_calls"
    assert not any("content" in delta for delta in rest)


def test_held_back_text_comes_out_once_it_cannot_be_a_marker() -> None:
    parser = get_format("v3.1").stream_parser(tools=TOOLS)
    assert parser.feed("x <func") == [{"content": "x"}]
    assert parser.feed("!") == [{"content": " <func!"}]


def test_arguments_stream_as_they_are_generated() -> None:
    parser = get_format("v3.2").stream_parser(tools=TOOLS)
    first = parser.feed('get_weather\n{"location": ')
    assert first[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert first[1] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"location":'}}]}
    second = parser.feed('"Hue"}')
    assert second == [{"tool_calls": [{"index": 0, "function": {"arguments": ' "Hue"}'}}]}]
    assert parser.finish() == ([], "tool_calls")


def test_python_code_streams_as_escaped_json() -> None:
    parser = get_format("v3.1").stream_parser(tools=TOOLS)
    deltas = parser.feed('<|python_tag|>print("a")\n')
    deltas += parser.feed("x")
    rest, reason = parser.finish()
    message = message_from_deltas(deltas + rest)
    assert message["tool_calls"][0]["function"]["arguments"] == '{"code": "print(\\"a\\")\\nx"}'
    assert reason == "tool_calls"


def test_named_tool_choice_streams_the_call_header_first() -> None:
    parser = get_format("v3.1").stream_parser(
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    first = parser.feed("{")
    assert first[0]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert first[1]["tool_calls"][0]["function"]["arguments"] == "{"


def test_text_only_output_finishes_with_stop() -> None:
    parser = get_format("v2.5").stream_parser(tools=TOOLS)
    assert parser.feed("Hello") == [{"content": "Hello"}]
    assert parser.finish() == ([], "stop")
