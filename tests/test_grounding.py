"""Grounding checks the embedded engine uses to steer a small model (no model needed)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from functionary_agent.formats import CallSpec
from functionary_agent.models._grounding import Evidence, Review, numbers_in

SPEC = CallSpec(name="get_weather", begin="", end="", parameters={
    "type": "object",
    "properties": {"location": {"type": "string"}, "unit": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["location"],
})


@pytest.mark.parametrize(("text", "numbers"), [
    ("Sample1: [22,33,42]", ["22", "33", "42"]),  # a list is several numbers, not 223342
    ("a population of 1,500,000 and 0.05", ["1500000", "0.05"]),
    ("a = 3, b = -11", ["3", "-11"]),
    ("a six-sided die, rolled twice", ["6", "2"]),
    ("the id DNA123", []),  # digits inside a word are a name, not a number
])
def test_numbers_in_reads_numbers_as_people_write_them(text: str, numbers: list[str]) -> None:
    assert numbers_in(text) == numbers


def test_evidence_accepts_values_the_conversation_states_whatever_their_spelling() -> None:
    evidence = Evidence("What's the weather in new-york for the next 3 days?")
    assert evidence.supports("New York") and evidence.supports(3) and evidence.supports(3.0)
    assert not evidence.supports("Istanbul") and not evidence.supports(4) and not evidence.supports("")
    assert evidence.supports(True) and evidence.supports(["New York"]) and not evidence.supports(["Paris"])


def review(messages: list[dict[str, Any]], arguments: dict[str, Any], may_reject: bool = True) -> Any:
    result = Review(messages)(SPEC, json.dumps(arguments), may_reject)
    return json.loads(result) if result is not None else None


ASK = [{"role": "user", "content": "Weather in Hanoi?"}]


def test_ungrounded_optional_values_are_dropped_so_the_tool_default_applies() -> None:
    assert review(ASK, {"location": "Hanoi", "unit": "kelvin", "days": 7}) == {"location": "Hanoi"}


def test_a_call_with_no_grounded_required_value_is_rejected_only_where_text_may_replace_it() -> None:
    assert review(ASK, {"location": "Istanbul"}) is None
    assert review(ASK, {"location": "Istanbul"}, may_reject=False) == {"location": "Istanbul"}


def test_a_call_the_conversation_already_made_is_rejected() -> None:
    made = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"location": "Hanoi"}'}}
    ]}
    history = [*ASK, made, {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 30}'}]
    assert review(history, {"location": "Hanoi", "days": 30}) is None
    assert review(history, {"location": "Hanoi"}, may_reject=False) == {"location": "Hanoi"}


def test_arguments_that_are_not_a_json_object_pass_through_for_the_tool_to_report() -> None:
    assert Review(ASK)(SPEC, "[1, 2", True) == "[1, 2"


def test_an_array_that_ran_to_max_items_loses_its_repeats() -> None:
    cards = {"type": "array", "items": {"type": "string"}}
    spec = CallSpec(name="deal", begin="", end="", parameters={
        "type": "object", "properties": {"cards": cards}, "required": ["cards"]})
    ask = [{"role": "user", "content": "I hold an Ace and a 10"}]
    looped = json.dumps({"cards": ["Ace", "10", "10", "Ace"]})
    assert json.loads(Review(ask, max_items=4)(spec, looped, True) or "") == {"cards": ["Ace", "10"]}
    assert json.loads(Review(ask, max_items=5)(spec, looped, True) or "") == {"cards": ["Ace", "10", "10", "Ace"]}
