"""Typed answers (`output_type=`): the reserved final_result tool, validation and retries, on every engine."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import pydantic
import pytest
from typing_extensions import TypedDict  # pydantic reads typing.TypedDict only from Python 3.12

from functionary_agent import (
    ConfigurationError,
    Conversation,
    OutputValidationError,
    ToolDefinitionError,
)
from functionary_agent.events import FinalAnswer, ToolCallStarted, ToolResult
from functionary_agent.testing import ScriptedModel, call
from tests.openai_server import ScriptedServer, function_call, reply


class City(pydantic.BaseModel):
    city: str
    population: int


def final(arguments: dict[str, Any] | str) -> dict[str, Any]:
    return {"tool_calls": [call("final_result", arguments)]}


def _assert_valid_chat(messages: list[dict[str, Any]]) -> None:
    for index, message in enumerate(messages):
        for offset, tool_call in enumerate(message.get("tool_calls") or (), start=1):
            assert messages[index + offset]["tool_call_id"] == tool_call["id"]


def test_an_invalid_answer_goes_back_to_the_model_then_the_valid_one_is_returned() -> None:
    model = ScriptedModel([final('{"city": "Oslo", "population": "many"'),
                           final({"city": "Oslo", "population": "lots"}),
                           final({"city": "Oslo", "population": 709_000})])
    chat = Conversation(model)
    assert chat.submit("Oslo has 709,000 people.", output_type=City) == City(city="Oslo", population=709_000)
    results = [m["content"] for m in chat.messages if m["role"] == "tool"]
    assert results[0].startswith("Error: the final answer does not match its type:")
    assert "- population: Input should be a valid integer" in results[1]
    assert results[2] == "The final answer was accepted."
    assert [request.tool_choice for request in model.requests] == ["required"] * 3
    assert model.requests[0].tools[-1]["function"]["name"] == "final_result"
    assert model.requests[0].tools[-1]["function"]["parameters"]["required"] == ["city", "population"]
    _assert_valid_chat(chat.messages)


def test_after_the_retries_a_typed_error_carries_the_last_output_and_nothing_is_lost() -> None:
    model = ScriptedModel([final({"city": "Oslo"})] * 2)
    chat = Conversation(model, output_retries=1)
    with pytest.raises(OutputValidationError) as caught:
        chat.submit("Oslo?", output_type=City)
    assert caught.value.raw == '{"city": "Oslo"}' and "population: Field required" in caught.value.errors
    assert len(chat.messages) == 4  # user, call, error, call: the last call has no tool message yet
    assert chat.messages[-1]["tool_calls"][0]["function"]["name"] == "final_result"


def test_a_text_answer_that_is_the_value_is_accepted_and_other_text_is_sent_back() -> None:
    model = ScriptedModel(["I think about 700k.", '{"city": "Oslo", "population": 700000}'])
    chat = Conversation(model)
    assert chat.submit("Oslo?", output_type=City).population == 700_000
    assert chat.messages[2]["role"] == "user" and "final_result" in chat.messages[2]["content"]


@pytest.mark.parametrize(("output_type", "arguments", "expected"), [
    (int, {"value": 8}, 8),
    (list[str], {"value": ["red", "blue"]}, ["red", "blue"]),
    (Literal["yes", "no"], {"value": "no"}, "no"),
    (str, {"value": "Paris"}, "Paris"),
])
def test_plain_types_travel_wrapped_in_a_value(output_type: Any, arguments: dict[str, Any], expected: Any) -> None:
    model = ScriptedModel([final(arguments)])
    assert Conversation(model).submit("?", output_type=output_type) == expected
    schema = model.requests[0].tools[0]["function"]["parameters"]
    assert schema["required"] == ["value"] and schema["type"] == "object"


def test_dataclasses_and_typed_dicts() -> None:
    @dataclasses.dataclass
    class Point:
        x: int
        y: int

    class Pair(TypedDict):
        left: str
        right: str

    assert Conversation(ScriptedModel([final({"x": 1, "y": 2})])).submit("?", output_type=Point) == Point(1, 2)
    pair = Conversation(ScriptedModel([final({"left": "a", "right": "b"})])).submit("?", output_type=Pair)
    assert pair == {"left": "a", "right": "b"}


def lookup(city: str) -> int:
    """The population of a city."""
    return {"Oslo": 709_000}[city]


def test_tools_first_then_the_answer_and_the_reserved_call_never_shows_as_a_call() -> None:
    model = ScriptedModel([{"tool_calls": [call("lookup", {"city": "Oslo"})]},
                           final({"city": "Oslo", "population": 709_000})])
    chat = Conversation(model, tools=[lookup])
    events = list(chat.stream("How many live in Oslo?", output_type=City))
    assert [e.name for e in events if isinstance(e, ToolCallStarted)] == ["lookup"]
    assert [e.name for e in events if isinstance(e, ToolResult)] == ["lookup"]
    answer = events[-1]
    assert isinstance(answer, FinalAnswer) and answer.output == City(city="Oslo", population=709_000)
    assert answer.content == '{"city":"Oslo","population":709000}'


def test_calls_beside_the_final_answer_are_not_run() -> None:
    ran: list[str] = []

    def note(text: str) -> str:
        """Take a note."""
        ran.append(text)
        return "noted"

    model = ScriptedModel([{"tool_calls": [call("note", {"text": "x"}), call("final_result", {"value": 3})]}])
    chat = Conversation(model, tools=[note])
    assert chat.submit("?", output_type=int) == 3
    assert ran == []
    assert [m["content"] for m in chat.messages[-2:]] == [
        "Error: not run: the final answer was given in the same turn", "The final answer was accepted."]
    _assert_valid_chat(chat.messages)


def test_a_turn_of_repeats_gets_the_final_answer_asked_for_by_name() -> None:
    model = ScriptedModel([{"tool_calls": [call("lookup", {"city": "Oslo"})]}] * 2 + [final({"value": 709_000})])
    assert Conversation(model, tools=[lookup]).submit("?", output_type=int) == 709_000
    assert model.requests[2].tool_choice == {"type": "function", "function": {"name": "final_result"}}


def test_bad_output_setups_are_clear_errors() -> None:
    class Opaque:
        pass

    with pytest.raises(ConfigurationError, match="has no JSON schema"):
        Conversation(ScriptedModel([])).submit("?", output_type=Opaque)

    def final_result(x: int) -> int:
        return x

    chat = Conversation(ScriptedModel([]), tools=[final_result])
    with pytest.raises(ToolDefinitionError, match="clashes with the reserved tool"):
        chat.submit("?", output_type=int)
    assert chat.messages == []
    with pytest.raises(ConfigurationError):
        Conversation(ScriptedModel([]), output_retries=-1)


def test_over_http_the_server_gets_the_reserved_tool_and_tool_choice_required() -> None:
    answer = reply(tool_calls=[function_call("final_result", '{"city": "Oslo", "population": 709000}')])
    with ScriptedServer([answer, answer]) as server:
        chat = Conversation("test-model", base_url=server.base_url)
        assert chat.submit("Oslo?", output_type=City).population == 709_000
        events = list(chat.stream("Again", output_type=City))
    assert server.requests[0]["tool_choice"] == "required"
    assert server.requests[0]["tools"][0]["function"]["name"] == "final_result"
    assert not any(isinstance(e, ToolCallStarted) for e in events)
    assert isinstance(events[-1], FinalAnswer) and events[-1].output.city == "Oslo"
