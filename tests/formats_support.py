"""Shared data and hypothesis strategies for the format tests (no tests here)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from functionary_agent.formats import FORMAT_NAMES, Format, message_from_deltas

FIXTURES = Path(__file__).parent / "fixtures" / "functionary"
CASE: dict[str, Any] = json.loads((FIXTURES / "test_case.json").read_text())
TOOLS: list[dict[str, Any]] = CASE["tools"]
FUNCTION_NAMES = ("get_car_price", "get_weather")
ALL_FORMATS = FORMAT_NAMES

# Every marker of every format, to build outputs that stress the parsers.
MARKERS = (
    ">>>",
    ">>",
    "all\n",
    "get_weather\n",
    "python\n",
    "<function=",
    "<function=get_weather>",
    "</function>",
    "</func",
    "<|python_tag|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|from|>",
    "\n<|from|>assistant\n<|recipient|>",
    "<|recipient|>",
    "<|content|>",
    "<|stop|>",
    "<|reserved_special_token_249|>",
    "<|reserved_special",
    '{"location": "Hanoi"}',
    "{",
    "}",
    "\n",
    " ",
    "<",
)

# Text free of marker characters: what a message may hold and still round-trip through any format.
SAFE_TEXT = st.text(
    alphabet=st.characters(exclude_characters="<>|", exclude_categories=["Cs"]),
    max_size=40,
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | SAFE_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SAFE_TEXT, inner, max_size=3),
    max_leaves=8,
)
JSON_ARGUMENTS = st.dictionaries(SAFE_TEXT, JSON_VALUES, max_size=4).map(
    lambda value: json.dumps(value, ensure_ascii=False)
)


def noisy_outputs() -> st.SearchStrategy[str]:
    """Arbitrary model output built from marker pieces and random text."""
    piece = st.sampled_from(MARKERS) | st.text(max_size=12)
    return st.lists(piece, max_size=25).map("".join)


@st.composite
def assistant_messages(draw: st.DrawFn, fmt_name: str) -> dict[str, Any]:
    """An assistant message with stripped text and/or calls whose arguments are valid JSON."""
    text = draw(SAFE_TEXT).strip()
    calls = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(FUNCTION_NAMES))
        calls.append(_call(name, draw(JSON_ARGUMENTS)))
    # v3.1 runs python code to the end of the turn, so there a python call can only come last.
    if draw(st.booleans()):
        code = draw(SAFE_TEXT)
        position = len(calls) if fmt_name == "v3-llama3.1" else draw(st.integers(0, len(calls)))
        calls.insert(position, _call("python", json.dumps({"code": code})))
    if not text and not calls:
        text = "ok"
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": "call_x", "type": "function", "function": {"name": name, "arguments": arguments}}


def model_output(fmt: Format, message: dict[str, Any], tool_choice: Any = "auto") -> str:
    """What the model generates for `message`: its rendered turn after the generation prompt."""
    prompt = fmt.render([], TOOLS, tool_choice=tool_choice)
    full = fmt.render([message], TOOLS, tool_choice=tool_choice, add_generation_prompt=False)
    assert full.startswith(prompt), "the generation prompt must be the start of an assistant turn"
    return full[len(prompt) :]


def without_ids(message: dict[str, Any]) -> dict[str, Any]:
    calls = [{**call, "id": None} for call in message.get("tool_calls") or ()]
    return {**message, "tool_calls": calls}


def comparable(message: dict[str, Any]) -> tuple[Any, ...]:
    """A message's content and calls with python code compared as values, not JSON spelling."""
    calls = []
    for call in message.get("tool_calls") or ():
        name, arguments = call["function"]["name"], call["function"]["arguments"]
        calls.append((name, json.loads(arguments) if name == "python" else arguments))
    return message.get("content"), calls


def streamed(fmt: Format, text: str, cuts: list[int], **options: Any) -> tuple[list[dict[str, Any]], str]:
    """Feed `text` split at `cuts`; return all deltas and the finish reason."""
    parser = fmt.stream_parser(tools=TOOLS, **options)
    deltas: list[dict[str, Any]] = []
    bounds = [0, *sorted(set(cuts)), len(text)]
    for start, end in itertools.pairwise(bounds):
        deltas.extend(parser.feed(text[start:end]))
    rest, reason = parser.finish()
    return deltas + rest, reason


__all__ = ["ALL_FORMATS", "message_from_deltas"]
