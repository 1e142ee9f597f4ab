"""Prompt rendering: the official fixtures byte for byte, tool_choice prefixes, and our fixes to upstream's schema
text."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest

from functionary_agent.errors import ConfigurationError, FormatError
from functionary_agent.formats import FORMAT_NAMES, detect_format, get_format
from functionary_agent.formats.typescript import render_namespace
from tests.formats_support import CASE, FIXTURES, TOOLS

OFFICIAL = ("v3.llama3", "v3-llama3.1", "v2", "v2.llama3")


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_fixture_prompts_match_byte_for_byte(name: str) -> None:
    expected = (FIXTURES / f"prompt_test_{name}.txt").read_text()
    rendered = get_format(name).render(CASE["messages"], CASE["tools"], add_generation_prompt=False)
    assert rendered.strip() == expected.strip()


def test_official_schema_fixture_matches_byte_for_byte() -> None:
    functions = json.loads((FIXTURES / "test_schema.input.json").read_text())["functions"]
    expected = (FIXTURES / "test_schema.expected.txt").read_text()
    assert render_namespace(functions).strip() == expected.strip()


def _with_code_json(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fixture conversation as our messages carry it: python arguments as {"code": ...} and call ids."""
    messages = copy.deepcopy(messages)
    for number, message in enumerate(messages):
        for call in message.get("tool_calls") or ():
            call["id"] = f"call_{number}"
            function = call["function"]
            if function["name"] == "python":
                function["arguments"] = json.dumps({"code": function["arguments"]})
    return messages


@pytest.mark.parametrize("name", OFFICIAL)
def test_python_calls_with_code_json_render_as_raw_code(name: str) -> None:
    fmt = get_format(name)
    ours = fmt.render(_with_code_json(CASE["messages"]), TOOLS, add_generation_prompt=False)
    assert ours == fmt.render(CASE["messages"], TOOLS, add_generation_prompt=False)
    assert '{"code"' not in ours


@pytest.mark.parametrize("name", ["v2", "v2.llama3"])
def test_tool_results_without_name_take_it_from_the_call_they_answer(name: str) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    rendered = get_format(name).render(messages, TOOLS)
    expected = "<|from|>get_weather\n" if name == "v2" else "name=get_weather\nsunny"
    assert expected in rendered


def test_content_given_as_parts_renders_its_text() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    assert "user<|end_header_id|>\n\nHello there<|eot_id|>" in get_format("v3.2").render(messages, TOOLS)


GENERATION_ENDINGS = {
    ("v3.llama3", "auto"): "<|start_header_id|>assistant<|end_header_id|>\n\n>>>",
    ("v3.llama3", "required"): "<|start_header_id|>assistant<|end_header_id|>\n\n>>>",
    ("v3.llama3", "none"): ">>>all\n",
    ("v3.llama3", "named"): ">>>get_weather\n",
    ("v3-llama3.1", "auto"): "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ("v3-llama3.1", "required"): "<|end_header_id|>\n\n<function=",
    ("v3-llama3.1", "named"): "<|end_header_id|>\n\n<function=get_weather>",
    ("v2", "auto"): "\n<|from|>assistant\n<|recipient|>",
    ("v2", "none"): "\n<|from|>assistant\n<|recipient|>all\n<|content|>",
    ("v2", "named"): "<|recipient|>get_weather\n<|content|>",
    ("v2.llama3", "auto"): "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ("v2.llama3", "required"): "<|end_header_id|>\n\n<|reserved_special_token_249|>",
    ("v2.llama3", "named"): "<|end_header_id|>\n\n<|reserved_special_token_249|>get_weather\n",
    ("chatml-v3", "auto"): "<|im_start|>assistant\n>>>",
    ("chatml-v3", "named"): "<|im_start|>assistant\n>>>get_weather\n",
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize(("name", "choice"), list(GENERATION_ENDINGS))
def test_generation_prompt_ends_with_the_tool_choice_prefix(name: str, choice: str) -> None:
    tool_choice = NAMED if choice == "named" else choice
    prompt = get_format(name).render([{"role": "user", "content": "hi"}], TOOLS, tool_choice=tool_choice)
    assert prompt.endswith(GENERATION_ENDINGS[(name, choice)])


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_tool_choice_none_hides_tools_and_named_keeps_only_that_one(name: str) -> None:
    fmt = get_format(name)
    messages = [{"role": "user", "content": "hi"}]
    hidden = fmt.render(messages, TOOLS, tool_choice="none")
    assert "get_weather" not in hidden and "get_car_price" not in hidden and "Jupyter" not in hidden
    named = fmt.render(messages, TOOLS, tool_choice=NAMED, add_generation_prompt=False)
    assert "get_weather" in named and "get_car_price" not in named and "Jupyter" not in named


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_named_tool_choice_outside_the_tools_is_a_clear_error(name: str) -> None:
    with pytest.raises(ConfigurationError, match="not among the tools"):
        get_format(name).render([], TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})


def test_invalid_tool_choice_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="tool_choice must be"):
        get_format("v3.2").render([], TOOLS, tool_choice="sometimes")


def test_chatml_v3_is_v3_with_chatml_turns() -> None:
    """chatml-v3 must stay a mechanical translation of v3, so what is known about v3 outputs carries over."""
    v3 = get_format("v3.llama3").render(CASE["messages"], TOOLS)
    chatml = get_format("chatml-v3").render(CASE["messages"], TOOLS)
    translated = re.sub(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n", r"<|im_start|>\1\n", v3)
    assert chatml == translated.replace("<|eot_id|>", "<|im_end|>\n")
    assert "<|im_start|>tool\n" in chatml and chatml.endswith("<|im_start|>assistant\n>>>")


def _namespace(parameters: dict[str, Any]) -> str:
    return render_namespace([{"name": "f", "description": "d", "parameters": parameters}])


def test_any_of_renders_as_a_union_not_an_empty_type() -> None:
    text = _namespace({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}})
    assert "a?: string | number," in text


def test_untyped_property_renders_as_any() -> None:
    assert "a?: any," in _namespace({"type": "object", "properties": {"a": {"description": "whatever"}}})


def test_enum_keeps_every_separator_when_values_repeat_the_last() -> None:
    text = _namespace({"type": "object", "properties": {"a": {"type": "string", "enum": ["x", "y", "x"]}}})
    assert 'a?: "x" | "y",' in text


def test_one_of_without_formats_prints_no_empty_format() -> None:
    schema = {"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, {"type": "null"}]}}}
    text = _namespace(schema)
    assert "Format=" not in text and "a?: string | null," in text


def test_integer_in_a_type_list_becomes_number_and_unions_in_arrays_get_parentheses() -> None:
    properties = {"a": {"type": ["integer", "null"]}, "b": {"type": "array", "items": {"type": ["string", "null"]}}}
    text = _namespace({"type": "object", "properties": properties})
    assert "a?: number | null," in text and "b?: (string | null)[]," in text


def test_examples_objects_without_properties_and_all_of_render_what_they_mean() -> None:
    properties = {
        "size": {"type": "integer", "examples": [3, 4]},
        "meta": {"type": "object", "description": "free-form"},
        "both": {"allOf": [{"properties": {"a": {"type": "string"}}}, {"properties": {"b": {"type": "boolean"}}}]},
        "flag": {"type": "boolean", "default": False},
    }
    text = _namespace({"type": "object", "properties": properties})
    assert "// Example size:\n// 3\n// 4\nsize?: number," in text
    assert "// free-form.\nmeta?: object," in text
    assert "both?: {\n    a?: string,\n    b?: boolean,\n}," in text
    assert "// Default=False.\nflag?: boolean," in text


def test_refs_in_parameters_are_inlined() -> None:
    parameters = {
        "type": "object",
        "properties": {"place": {"$ref": "#/$defs/Place"}},
        "required": ["place"],
        "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    }
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": parameters}}]
    text = get_format("v3.2").render([], tools)
    assert "place: {\n    city: string,\n}," in text


def test_function_without_parameters_and_multiline_description() -> None:
    text = render_namespace([{"name": "now", "description": "Current time.\nIn UTC."}])
    assert "// Current time.\n// In UTC.\ntype now = () => any;" in text


@pytest.mark.parametrize(
    ("alias", "name"),
    [("v3.2", "v3.llama3"), ("v3.1", "v3-llama3.1"), ("v2.5", "v2.llama3"), ("V2", "v2"), ("chatml-v3", "chatml-v3")],
)
def test_get_format_knows_names_and_aliases(alias: str, name: str) -> None:
    assert get_format(alias).name == name


def test_unknown_format_name_lists_the_known_ones() -> None:
    with pytest.raises(FormatError, match=r"v3\.llama3"):
        get_format("v9")


@pytest.mark.parametrize("name", OFFICIAL)
def test_detect_format_recognises_functionary_templates_from_their_markers(name: str) -> None:
    # A rendered prompt carries the same markers as the model's chat template.
    template = get_format(name).render(CASE["messages"], TOOLS)
    tokens = ["<|from|>", "<|recipient|>"] if name == "v2" else ["<|eot_id|>"]
    assert detect_format(template, tokens) == name


def test_detect_format_reads_v2_from_its_special_token_and_chatml_from_the_template() -> None:
    assert detect_format(None, {"<|from|>": 32000}) == "v2"
    assert detect_format("{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}", []) == "chatml-v3"


def test_detect_format_names_the_format_option_when_nothing_matches() -> None:
    with pytest.raises(FormatError, match="--format"):
        detect_format("[INST] {{ content }} [/INST]", ["</s>"])
