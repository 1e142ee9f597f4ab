"""The vLLM plugin's pure parts, without vLLM: the structural tag built from the call grammar, the format and
switch resolution, and the `serve` command line. The parts that need vLLM are in test_server_vllm.py (-m vllm)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from functionary_agent.errors import ConfigurationError, FormatError
from functionary_agent.formats import FORMAT_NAMES, Format, get_format
from functionary_agent.server import _settings
from functionary_agent.server.cli import add_serve_parser, vllm_command
from functionary_agent.server.grammar import MAX_JSON_WHITESPACE, structural_tag
from tests.structural_tags import accepts

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}},
]
NAMED = {"type": "function", "function": {"name": "add"}}


def _nodes(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _nodes(value)
    elif isinstance(node, list):
        for item in node:
            yield from _nodes(item)


def _kinds(tag: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [node for node in _nodes(tag["format"]) if node.get("type") == kind]


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_auto_lists_every_tool_and_free_text(name: str) -> None:
    tag = structural_tag(get_format(name), TOOLS, "auto")
    assert tag["type"] == "structural_tag"
    json.dumps(tag)  # plain data, ready for StructuredOutputsParams(structural_tag=...)
    consts = " ".join(node["value"] for node in _kinds(tag, "const_string"))
    assert "get_weather" in consts and "add" in consts
    schemas = [node["json_schema"] for node in _kinds(tag, "json_schema")]
    assert {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]} in schemas
    assert all(node["max_whitespace_cnt"] == MAX_JSON_WHITESPACE for node in _kinds(tag, "json_schema"))
    assert _kinds(tag, "any_text"), "auto allows text"
    assert _kinds(tag, "star"), "auto allows several calls"


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_none_allows_only_text_without_call_markers(name: str) -> None:
    fmt = get_format(name)
    tag = structural_tag(fmt, TOOLS, "none")
    assert not _kinds(tag, "json_schema")
    markers = {marker for marker, _ in fmt.protocol.text_markers}
    for node in _kinds(tag, "any_text"):
        assert markers <= set(node["excludes"])


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_named_choice_is_one_call_of_that_tool(name: str) -> None:
    tag = structural_tag(get_format(name), TOOLS, NAMED)
    schemas = [node["json_schema"] for node in _kinds(tag, "json_schema")]
    assert schemas == [TOOLS[1]["function"]["parameters"]]
    assert not _kinds(tag, "star"), "a named choice ends after its call"
    assert "get_weather" not in json.dumps(tag)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_required_starts_with_a_call(name: str) -> None:
    tag = structural_tag(get_format(name), TOOLS, "required")
    first = tag["format"]["elements"][0] if tag["format"]["type"] == "sequence" else tag["format"]
    assert not any(node.get("type") == "any_text" and node is first for node in _nodes(first))
    options = first["elements"] if first["type"] == "or" else [first]
    for option in options:  # each alternative of the first segment is a call: opener (maybe empty), JSON, end
        assert any(node.get("type") == "json_schema" for node in _nodes(option))


def test_parallel_tool_calls_false_allows_one_call() -> None:
    tag = structural_tag(get_format("chatml-v3"), TOOLS, "required", parallel_tool_calls=False)
    assert not _kinds(tag, "star") and not _kinds(tag, "repeat")
    auto = structural_tag(get_format("v3-llama3.1"), TOOLS, "auto", parallel_tool_calls=False)
    assert [node["max"] for node in _kinds(auto, "repeat")] == [1] and not _kinds(auto, "star")


def _output(fmt: Format, content: str | None, *calls: tuple[str, dict[str, Any]], choice: Any = "auto") -> str:
    """What the model writes after the prompt (tool_choice prefix included) for this message, without the stop."""
    message = {"role": "assistant", "content": content, "tool_calls": [
        {"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
        for n, (name, arguments) in enumerate(calls)]}
    prompt = fmt.render([], TOOLS, tool_choice=choice)
    text = fmt.render([message], TOOLS, tool_choice=choice, add_generation_prompt=False)[len(prompt):].rstrip("\n")
    for stop in fmt.stop:
        text = text.removesuffix(stop)
    return text


def _text_after_call(fmt: Format) -> str:
    return fmt.call_grammar(TOOLS).text_begin + "It is sunny there, 31 degrees."


ISTANBUL, HANOI = ("get_weather", {"city": "Istanbul"}), ("get_weather", {"city": "Hanoi"})


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_parallel_tool_calls_false_ends_the_turn_after_its_call(name: str) -> None:
    fmt = get_format(name)
    tag = structural_tag(fmt, TOOLS, "auto", parallel_tool_calls=False)
    assert accepts(tag, _output(fmt, None, ISTANBUL))
    assert accepts(tag, _output(fmt, "Sure, I can answer that without tools."))
    assert not accepts(tag, _output(fmt, None, ISTANBUL) + _text_after_call(fmt)), "an answer invented before results"
    assert not accepts(tag, _output(fmt, None, ISTANBUL, HANOI))
    for choice in ("required", NAMED):
        limited = structural_tag(fmt, TOOLS, choice, parallel_tool_calls=False)
        call = ("add", {"a": 1, "b": 2})
        assert accepts(limited, _output(fmt, None, call, choice=choice))
        assert not accepts(limited, _output(fmt, None, call, call, choice=choice))


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_without_a_limit_text_may_still_follow_calls(name: str) -> None:
    fmt = get_format(name)
    tag = structural_tag(fmt, TOOLS, "auto")
    assert accepts(tag, _output(fmt, None, ISTANBUL, HANOI))
    assert accepts(tag, _output(fmt, None, ISTANBUL) + _text_after_call(fmt))


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_max_calls_caps_the_calls_of_a_turn(name: str) -> None:
    fmt = get_format(name)
    required = structural_tag(fmt, TOOLS, "required", max_calls=3)
    assert [node["max"] for node in _kinds(required, "repeat")] == [2]
    auto = structural_tag(fmt, TOOLS, "auto", max_calls=3)
    assert accepts(auto, _output(fmt, None, ISTANBUL, HANOI, ISTANBUL))
    assert not accepts(auto, _output(fmt, None, ISTANBUL, HANOI, ISTANBUL, HANOI))
    two_then_text = _output(fmt, None, ISTANBUL, HANOI) + _text_after_call(fmt)
    assert accepts(auto, two_then_text) and not accepts(structural_tag(fmt, TOOLS, "auto", max_calls=2), two_then_text)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_a_request_without_tools_allows_text_only(name: str) -> None:
    fmt = get_format(name)
    tag = structural_tag(fmt, [], "auto")
    assert not _kinds(tag, "json_schema")
    assert accepts(tag, "A haiku: leaves fall, the year turns, the kettle sings.")


def test_argument_bounds_tighten_free_strings_and_arrays() -> None:
    tools = [{"type": "function", "function": {"name": "send", "parameters": {"type": "object", "properties": {
        "to": {"type": "array", "items": {"type": "string"}}, "kind": {"type": "string", "enum": ["a", "b"]}}}}}]
    tag = structural_tag(get_format("v3.llama3"), tools, "required", max_items=4, max_length=64)
    schema, *later = [node["json_schema"] for node in _kinds(tag, "json_schema")]
    assert all(other == schema for other in later)  # the first call and any later one
    assert schema["properties"]["to"]["maxItems"] == 4
    assert schema["properties"]["to"]["items"]["maxLength"] == 64
    assert "maxLength" not in schema["properties"]["kind"]


def test_python_calls_are_raw_text_up_to_the_next_opener() -> None:
    tools = [*TOOLS, {"type": "code_interpreter"}]
    tag = structural_tag(get_format("v3.llama3"), tools, {"type": "code_interpreter"})
    assert not _kinds(tag, "json_schema")
    assert _kinds(tag, "any_text")[0]["excludes"] == [">>>"]


def test_a_named_tool_that_does_not_exist_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        structural_tag(get_format("v3.llama3"), TOOLS, {"type": "function", "function": {"name": "nope"}})


# -- names, formats, switches ------------------------------------------------------------------------------------


class _Tokenizer:
    def __init__(self, template: str, added: dict[str, int] | None = None) -> None:
        self.chat_template = template
        self._added = added or {}

    def get_added_vocab(self) -> dict[str, int]:
        return self._added


def test_every_format_has_a_parser_and_a_mode() -> None:
    modes = _settings.mode_names()
    assert modes["functionary"] is None
    assert {modes[f"functionary-{name}"] for name in FORMAT_NAMES} == set(FORMAT_NAMES)
    assert set(_settings.PARSER_CLASSES) == {None, *FORMAT_NAMES}
    assert _settings.mode_for("v3.2") == "functionary-v3.llama3"
    assert _settings.format_of_mode("functionary-chatml-v3") == "chatml-v3"
    assert _settings.format_of_mode("hf") is None
    with pytest.raises(FormatError):
        _settings.mode_for("v9")


def test_format_is_pinned_then_from_the_environment_then_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    chatml = _Tokenizer("{{ '<|im_start|>' + message['role'] }}")
    monkeypatch.delenv(_settings.FORMAT_ENV, raising=False)
    assert _settings.resolve_format(None, chatml).name == "chatml-v3"
    assert _settings.resolve_format(None, _Tokenizer("x", {"<|from|>": 7})).name == "v2"
    assert _settings.resolve_format("v3.1", chatml).name == "v3-llama3.1"
    monkeypatch.setenv(_settings.FORMAT_ENV, "v2.5")
    assert _settings.resolve_format(None, chatml).name == "v2.llama3"
    monkeypatch.delenv(_settings.FORMAT_ENV)
    with pytest.raises(FormatError):
        _settings.resolve_format(None, _Tokenizer("{{ messages }}"))


def test_grammar_switch_server_wide_and_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_settings.GRAMMAR_ENV, raising=False)
    assert _settings.grammar_enabled()
    assert not _settings.grammar_enabled({"functionary_grammar": "off"})
    monkeypatch.setenv(_settings.GRAMMAR_ENV, "0")
    assert not _settings.grammar_enabled()
    assert _settings.grammar_enabled({"functionary_grammar": 1})


def test_grammar_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FUNCTIONARY_AGENT_MAX_ITEMS", raising=False)
    monkeypatch.delenv("FUNCTIONARY_AGENT_MAX_CALLS", raising=False)
    monkeypatch.setenv("FUNCTIONARY_AGENT_MAX_LENGTH", "128")
    assert _settings.grammar_limits() == {"max_calls": None, "max_items": None, "max_length": 128}
    limits = _settings.grammar_limits({"functionary_max_items": 3, "functionary_max_calls": "2"})
    assert limits == {"max_calls": 2, "max_items": 3, "max_length": 128}
    with pytest.raises(ConfigurationError):
        _settings.grammar_limits({"functionary_max_items": "many"})


# -- the serve command line --------------------------------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="functionary-agent")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


def test_serve_keeps_unknown_flags_for_vllm_in_order() -> None:
    args = _parse("--tensor-parallel-size", "2", "--model", "m", "--enable-lora", "--lora-modules", "a=/p", "b=/q",
                  "--api-key", "k", "--port", "9000")
    assert (args.model, args.port, args.host, args.format) == ("m", 9000, "127.0.0.1", None)
    assert args.vllm_args == ["--tensor-parallel-size", "2", "--enable-lora", "--lora-modules", "a=/p", "b=/q",
                              "--api-key", "k"]


def test_vllm_command_configures_the_plugin_and_passes_the_rest() -> None:
    command = vllm_command("m", "v3.2", "127.0.0.1", 8000, ["--max-model-len", "4096"])
    assert command[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    text = " ".join(command)
    assert "--enable-auto-tool-choice" in text
    assert "--tool-parser-plugin functionary_agent.server.plugin" in text
    assert "--tool-call-parser functionary-v3.llama3" in text and "--tokenizer-mode functionary-v3.llama3" in text
    assert command[-2:] == ["--max-model-len", "4096"]
    own = vllm_command("m", None, "0.0.0.0", 1, ["--tool-call-parser=hermes", "--tokenizer-mode", "hf"])
    assert own.count("--tool-call-parser=hermes") == 1 and "functionary" not in own[own.index("--host"):-3]
    with pytest.raises(ConfigurationError):
        vllm_command("m", "nope", "127.0.0.1", 8000, [])


def test_serve_dry_run_prints_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse("--model", "m", "--no-grammar", "--dry-run", "--max-num-seqs", "4")
    assert args.handler(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("FUNCTIONARY_AGENT_GRAMMAR=0 ") and line.endswith("--max-num-seqs 4")


def test_serve_without_a_model_is_a_configuration_error() -> None:
    args = _parse("--dry-run")
    with pytest.raises(ConfigurationError, match="--model"):
        args.handler(args)


def test_serve_module_reports_errors_without_a_traceback() -> None:
    done = subprocess.run([sys.executable, "-m", "functionary_agent.server", "serve", "--model", "m", "--format",
                           "nope", "--dry-run"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("functionary-agent: error: unknown prompt format 'nope'")


def test_importing_the_server_package_does_not_import_vllm() -> None:
    code = "import sys, functionary_agent.server, functionary_agent.server.cli; print('vllm' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
