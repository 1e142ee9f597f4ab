"""Parsing model output: round trips through every format, robustness on malformed and hostile output."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from functionary_agent.formats import FORMAT_NAMES, get_format
from tests.formats_support import (
    CASE,
    TOOLS,
    assistant_messages,
    comparable,
    model_output,
    noisy_outputs,
)

CHOICES: list[Any] = ["auto", "none", "required", {"type": "function", "function": {"name": "get_weather"}}]


@pytest.mark.parametrize("name", FORMAT_NAMES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_parse_gives_back_every_rendered_assistant_message(name: str, data: st.DataObject) -> None:
    fmt = get_format(name)
    message = data.draw(assistant_messages(name))
    parsed = fmt.parse(model_output(fmt, message), tools=TOOLS)
    assert comparable(parsed) == comparable(message)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_every_fixture_assistant_turn_parses_back(name: str) -> None:
    fmt = get_format(name)
    for message in CASE["messages"]:
        if message["role"] != "assistant":
            continue
        parsed = fmt.parse(model_output(fmt, message), tools=TOOLS)
        assert parsed["content"] == (message["content"] or None)
        expected_calls = []
        for call in message.get("tool_calls") or ():
            function = call["function"]
            if function["name"] == "python":  # upstream data holds raw code; we hand back {"code": ...}
                expected_calls.append(("python", {"code": function["arguments"]}))
            else:
                expected_calls.append((function["name"], function["arguments"]))
        assert comparable(parsed)[1] == expected_calls


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("choice", CHOICES, ids=["auto", "none", "required", "named"])
@settings(max_examples=60, deadline=None)
@given(text=noisy_outputs())
def test_parse_never_raises_and_always_returns_an_openai_message(name: str, choice: Any, text: str) -> None:
    message = get_format(name).parse(text, tools=TOOLS, tool_choice=choice)
    assert message["role"] == "assistant"
    assert message["content"] is None or (isinstance(message["content"], str) and message["content"])
    for call in message.get("tool_calls", []):
        assert call["id"].startswith("call_") and len(call["id"]) == 29
        assert call["type"] == "function"
        assert isinstance(call["function"]["name"], str) and isinstance(call["function"]["arguments"], str)


# Outputs with malformed JSON, an unknown name, text before several calls, and no trailing newline or stop token.
MESSY = {
    "v3.llama3": 'all\nLet me look.>>>get_weather\n{"location": "Hanoi"\n>>>lookup_stock\n{"ticker": "MK"}',
    "chatml-v3": 'all\nLet me look.>>>get_weather\n{"location": "Hanoi"\n>>>lookup_stock\n{"ticker": "MK"}',
    "v3-llama3.1": 'Let me look.<function=get_weather>{"location": "Hanoi"</function>'
    '<function=lookup_stock>{"ticker": "MK"}</function>',
    "v2": 'all\n<|content|>Let me look.\n<|from|>assistant\n<|recipient|>get_weather\n<|content|>{"location": "Hanoi"'
    '\n<|from|>assistant\n<|recipient|>lookup_stock\n<|content|>{"ticker": "MK"}',
    "v2.llama3": 'Let me look.<|reserved_special_token_249|>get_weather\n{"location": "Hanoi"'
    '<|reserved_special_token_249|>lookup_stock\n{"ticker": "MK"}',
}


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_malformed_arguments_unknown_names_and_text_all_survive(name: str) -> None:
    message = get_format(name).parse(MESSY[name], tools=TOOLS)
    assert message["content"] == "Let me look."
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
    assert calls == [("get_weather", '{"location": "Hanoi"'), ("lookup_stock", '{"ticker": "MK"}')]


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_stop_tokens_end_the_message_and_nothing_after_them_counts(name: str) -> None:
    fmt = get_format(name)
    output = model_output(fmt, {"role": "assistant", "content": "Done"})
    if not any(output.endswith(stop) or output.rstrip("\n").endswith(stop) for stop in fmt.stop):
        output += fmt.stop[0]
    message = fmt.parse(output + "<|start_header_id|>user<|end_header_id|>\n\nmore>>>x\n{}", tools=TOOLS)
    assert message == {"role": "assistant", "content": "Done"}


@pytest.mark.parametrize(
    ("name", "output"),
    [
        ("v3.llama3", "python\nprint('hi')\nx = 1"),
        ("v3-llama3.1", "<|python_tag|>print('hi')\nx = 1<|eom_id|>"),
        ("v2", "python\n<|content|>print('hi')\nx = 1<|stop|>"),
        ("v2.llama3", "<|reserved_special_token_249|>python\nprint('hi')\nx = 1<|eot_id|>"),
    ],
)
def test_python_code_comes_back_as_code_json(name: str, output: str) -> None:
    (call,) = get_format(name).parse(output, tools=TOOLS)["tool_calls"]
    assert call["function"]["name"] == "python"
    assert json.loads(call["function"]["arguments"]) == {"code": "print('hi')\nx = 1"}


@pytest.mark.parametrize(
    ("name", "choice", "output"),
    [
        ("v3.llama3", "none", "Just text, no >>>all needed"),
        ("v3.llama3", "named", '{"location": "Hue"}'),
        ("v3-llama3.1", "required", 'get_weather>{"location": "Hue"}</function>'),
        ("v3-llama3.1", "named", '{"location": "Hue"}</function>'),
        ("v2", "none", "Just text, no >>>all needed"),
        ("v2", "named", '{"location": "Hue"}'),
        ("v2.llama3", "required", 'get_weather\n{"location": "Hue"}'),
        ("v2.llama3", "named", '{"location": "Hue"}'),
        ("chatml-v3", "named", '{"location": "Hue"}<|im_end|>'),
    ],
)
def test_output_after_a_tool_choice_prefix_parses_in_context(name: str, choice: str, output: str) -> None:
    tool_choice = {"type": "function", "function": {"name": "get_weather"}} if choice == "named" else choice
    message = get_format(name).parse(output, tools=TOOLS, tool_choice=tool_choice)
    if choice == "none":
        assert message == {"role": "assistant", "content": output}
    else:
        (call,) = message["tool_calls"]
        assert (call["function"]["name"], call["function"]["arguments"]) == ("get_weather", '{"location": "Hue"}')


@pytest.mark.parametrize(
    ("name", "output", "content"),
    [
        ("v3.llama3", "Sure! Here is the answer.", "Sure! Here is the answer."),  # model ignored the recipient
        ("v3.llama3", "all\nHello", "Hello"),  # upstream dropped the last character here
        ("v3.llama3", "get_weather", None),  # cut off after a known name: still a call
        ("v3.llama3", "get_wea", "get_wea"),  # cut off inside a name: what it wrote was text
        ("v3-llama3.1", "1 < 2 and <functional> programming", "1 < 2 and <functional> programming"),
        ("v3-llama3.1", "<function=no name here", "<function=no name here"),
        ("v2.llama3", "a", "a"),
    ],
)
def test_output_that_breaks_the_protocol_is_kept_as_text(name: str, output: str, content: str | None) -> None:
    message = get_format(name).parse(output, tools=TOOLS)
    assert message["content"] == content
    assert bool(message.get("tool_calls")) == (content is None)


def test_empty_arguments_become_an_empty_object() -> None:
    message = get_format("v3.llama3").parse("get_weather\n  \n", tools=TOOLS)
    assert message["tool_calls"][0]["function"]["arguments"] == "{}"


def test_whitespace_between_calls_is_not_content() -> None:
    output = '<function=get_weather>{"location": "A"}</function>\n\n<function=get_weather>{"location": "B"}</function>'
    message = get_format("v3.1").parse(output, tools=TOOLS)
    assert message["content"] is None and len(message["tool_calls"]) == 2


def test_tool_calls_key_is_left_out_when_there_are_none() -> None:
    assert "tool_calls" not in get_format("v3.2").parse("all\nhi", tools=TOOLS)
