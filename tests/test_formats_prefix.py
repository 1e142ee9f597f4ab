"""Follow-up turns extend the previous prompt: prompt(n) + what the model wrote is where prompt(n+1) begins.

That is what lets a server's prefix cache (vLLM's automatic prefix caching, llama.cpp's KV reuse) skip the whole
history on every agent turn. It holds when parsing keeps the model's own text, arguments included (no
re-serialising), and rendering writes a past turn exactly as the model produced it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from functionary_agent.formats import FORMAT_NAMES, get_format
from tests.formats_support import TOOLS, assistant_messages, model_output

USER = {"role": "user", "content": "What is the weather in Istanbul, and what does a car cost there?"}


def _results_for(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"ok": n})}
        for n, call in enumerate(message.get("tool_calls") or ())
    ]


def _assert_next_prompt_extends(name: str, output: str) -> None:
    fmt = get_format(name)
    history = [USER]
    prompt = fmt.render(history, TOOLS)
    message = fmt.parse(output, tools=TOOLS)
    follow_up = [*_results_for(message)] or [{"role": "user", "content": "And tomorrow?"}]
    next_prompt = fmt.render([*history, message, *follow_up], TOOLS)
    assert next_prompt.startswith(prompt + output), (prompt + output)[-200:]


@pytest.mark.parametrize("name", FORMAT_NAMES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_turn_the_model_wrote_is_rendered_back_byte_for_byte(name: str, data: st.DataObject) -> None:
    message = data.draw(assistant_messages(name))
    _assert_next_prompt_extends(name, model_output(get_format(name), message))


SPACINGS = ['{"city":"Istanbul"}', '{ "city" : "Istanbul" }', '{\n  "city": "Istanbul"\n}', '{"city": "İstanbul"}']


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("arguments", SPACINGS)
def test_arguments_keep_the_spacing_the_model_chose(name: str, arguments: str) -> None:
    call = {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    output = model_output(get_format(name), {"role": "assistant", "content": None, "tool_calls": [call]})
    assert arguments in output
    _assert_next_prompt_extends(name, output)
