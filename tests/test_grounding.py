"""Steering checks for small models, without a model: grounding, relevance and listed values.

Every example is everyday tool use written for these tests (bookings, files, units, dates, money), none taken
from a benchmark.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from functionary_agent.formats import CallSpec
from functionary_agent.models._steering import Evidence, FurtherCalls, Relevance, Review, listed_with, numbers_in

SPEC = CallSpec(name="book_room", begin="", end="", parameters={
    "type": "object",
    "properties": {"hotel": {"type": "string"}, "nights": {"type": "integer"}, "view": {"type": "string"}},
    "required": ["hotel"],
})


@pytest.mark.parametrize(("text", "numbers"), [
    ("Seats [12,14,16] please", ["12", "14", "16"]),  # a list is several numbers, not 121416
    ("a budget of 2,500,000 and a fee of 0.75", ["2500000", "0.75"]),
    ("set the freezer to -18 and the fridge to 4", ["-18", "4"]),
    ("a dozen eggs, delivered twice", ["12", "2"]),
    ("ticket ABC123", []),  # digits inside a word are a name, not a number
])
def test_numbers_in_reads_numbers_as_people_write_them(text: str, numbers: list[str]) -> None:
    assert numbers_in(text) == numbers


def test_evidence_accepts_values_the_conversation_states_whatever_their_spelling() -> None:
    evidence = Evidence("Book the Grand-Hotel in new-york for 3 nights")
    assert evidence.supports("Grand Hotel") and evidence.supports("New York") and evidence.supports("NewYork")
    assert evidence.supports(3) and evidence.supports(3.0) and evidence.supports(["New York"])
    assert not evidence.supports("Ritz") and not evidence.supports(4) and not evidence.supports("")
    assert evidence.supports(True) and not evidence.supports(["Paris"])


def test_evidence_matches_whole_words_only() -> None:
    """A one- or two-letter value is not grounded by a longer word that contains it."""
    evidence = Evidence("Is there any bus to Boston at 15:45?")
    assert not evidence.supports("NY") and not evidence.supports("US") and not evidence.supports(5)
    assert not evidence.supports("ost") and evidence.supports("Boston") and evidence.supports("bus")


def review(messages: list[dict[str, Any]], arguments: dict[str, Any], may_reject: bool = True) -> Any:
    result = Review(messages)(SPEC, json.dumps(arguments), may_reject)
    return json.loads(result) if result is not None else None


ASK = [{"role": "user", "content": "Book the Ritz for me."}]


def test_ungrounded_optional_values_are_dropped_so_the_tool_default_applies() -> None:
    assert review(ASK, {"hotel": "Ritz", "view": "sea", "nights": 7}) == {"hotel": "Ritz"}


def test_a_call_with_no_grounded_required_value_is_rejected_only_where_text_may_replace_it() -> None:
    assert review(ASK, {"hotel": "Savoy"}) is None
    assert review(ASK, {"hotel": "Savoy"}, may_reject=False) == {"hotel": "Savoy"}


def test_a_call_the_conversation_already_made_is_rejected() -> None:
    made = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "book_room", "arguments": '{"hotel": "Ritz"}'}}
    ]}
    history = [*ASK, made, {"role": "tool", "tool_call_id": "call_1", "content": '{"booked": true}'}]
    assert review(history, {"hotel": "Ritz", "nights": 30}) is None
    assert review(history, {"hotel": "Ritz"}, may_reject=False) == {"hotel": "Ritz"}


def test_arguments_that_are_not_a_json_object_pass_through_for_the_tool_to_report() -> None:
    assert Review(ASK)(SPEC, "[1, 2", True) == "[1, 2"


def test_an_array_that_ran_to_max_items_loses_its_repeats() -> None:
    tags = {"type": "array", "items": {"type": "string"}}
    spec = CallSpec(name="tag_note", begin="", end="", parameters={
        "type": "object", "properties": {"tags": tags}, "required": ["tags"]})
    ask = [{"role": "user", "content": "Tag the note with work and urgent"}]
    looped = json.dumps({"tags": ["work", "urgent", "urgent", "work"]})
    assert json.loads(Review(ask, max_items=4)(spec, looped, True) or "") == {"tags": ["work", "urgent"]}
    assert json.loads(Review(ask, max_items=5)(spec, looped, True) or "") == {"tags": ["work", "urgent", "urgent",
                                                                                          "work"]}


TOOLS = [
    {"type": "function", "function": {"name": "convert_currency", "description": "Convert money between currencies.",
                                      "parameters": {"type": "object", "properties": {"amount": {"type": "number"}}}}},
    {"type": "function", "function": {"name": "reserve_table", "description": "Reserve a restaurant table.",
                                      "parameters": {"type": "object", "properties": {"people": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "find_file", "description": "Find a file by its name.",
                                      "parameters": {"type": "object", "properties": {"folder": {
                                          "type": "string", "description": "Where to look"}}}}},
]


@pytest.mark.parametrize(("request_text", "served"), [
    ("Convert 20 dollars to euros", {"convert_currency"}),  # "convert" is in the name
    ("I'd like a reservation for two at Nopa", {"reserve_table"}),  # reservation / reserve share their stem
    ("Is budget.xlsx in my Documents folder?", {"find_file"}),  # a parameter name counts too
    ("Who wrote Pride and Prejudice?", set()),
    ("What's your name?", set()),  # "name" says nothing of a tool's purpose
])
def test_relevance_is_a_word_of_the_request_meeting_the_tools_purpose(request_text: str, served: set[str]) -> None:
    assert Relevance(TOOLS, request_text).served() == served


@pytest.mark.parametrize(("text", "value", "siblings"), [
    ("What is the weather in Istanbul and in Hanoi?", "Istanbul", ["Hanoi"]),
    ("Weather in Paris, Berlin and Madrid, please.", "Berlin", ["Madrid", "Paris"]),
    ("Convert 100 USD to EUR and to GBP.", "EUR", ["GBP"]),
    ("Convert 10 miles and 20 miles to kilometres.", 10, ["20"]),
    ("Find report.pdf and budget.xlsx.", "report.pdf", ["budget.xlsx"]),
    ("Email Alice and tell her the news.", "Alice", []),  # "tell" is not a name
    ("Book a table for 2 at Noma tonight.", 2, []),
    ("Email Alice with the subject Lunch.", "Lunch", []),
])
def test_listed_values_are_same_shaped_neighbours_joined_by_a_comma_or_a_conjunction(
    text: str, value: Any, siblings: list[str]
) -> None:
    assert listed_with(text, value) == siblings


def test_further_calls_cover_each_listed_value_once() -> None:
    further = FurtherCalls("Weather in Paris, Berlin and Madrid, please.")
    second = further("get_weather", json.dumps({"city": "Paris", "unit": "c"}))
    assert second is not None and json.loads(second) == {"city": "Berlin", "unit": "c"}
    third = further("get_weather", second)
    assert third is not None and json.loads(third) == {"city": "Madrid", "unit": "c"}
    assert further("get_weather", third) is None
    assert FurtherCalls("What is the weather in Paris?")("get_weather", '{"city": "Paris"}') is None
    amounts = FurtherCalls("Convert 20 GBP and 35 GBP to euros.")
    assert json.loads(amounts("convert", '{"amount": 20, "to": "EUR"}') or "") == {"amount": 35, "to": "EUR"}
    floats = FurtherCalls("Convert 20 GBP and 35 GBP to euros.")  # 20.0 is the 20 of the text: no third call
    second = floats("convert", '{"amount": 20.0, "to": "EUR"}')
    assert second is not None and json.loads(second) == {"amount": 35.0, "to": "EUR"}
    assert floats("convert", second) is None
