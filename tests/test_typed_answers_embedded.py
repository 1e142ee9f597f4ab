"""The grammar guarantee: with the bundled model, a typed answer always parses, whatever the sentence."""

from __future__ import annotations

from typing import Literal

import pydantic
import pytest

from functionary_agent import Conversation

pytestmark = pytest.mark.slow

SENTENCES = [
    "Lyon is home to roughly 520,000 people.",
    "The census counted 1,350,000 residents in Prague last year.",
    "Nearly 95000 people live in the harbour town of Bergen's old centre.",
    "With 3.6 million inhabitants, Berlin is Germany's largest city.",
    "Tiny Vaduz has a population of about 5,700.",
    "Our records say Nairobi: population 4397073.",
    "Montreal, a city of 1.7 million, hosts the festival.",
    "About eight hundred thousand people call Amsterdam home.",
    "Kyoto (pop. 1,460,000) was the imperial capital.",
    "I moved to Porto, which has around 230000 residents.",
]


class CityRecord(pydantic.BaseModel):
    city: str
    population: int


def test_a_typed_record_is_always_valid_over_ten_varied_sentences() -> None:
    chat = Conversation()
    records = []
    for sentence in SENTENCES:
        records.append(chat.submit(f"Extract the city and its population: {sentence}", output_type=CityRecord))
        assert chat.last_usage.requests == 1  # valid at the first answer: no retry was needed
        chat.reset()
    assert all(isinstance(record, CityRecord) for record in records)


def test_plain_typed_answers_from_the_bundled_model() -> None:
    chat = Conversation()
    assert isinstance(chat.submit("How many legs does a cat have?", output_type=int), int)
    assert chat.submit("Is water wet? Answer yes or no.", output_type=Literal["yes", "no"]) in ("yes", "no")
    colours = chat.submit("List three colours.", output_type=list[str])
    assert isinstance(colours, list) and all(isinstance(colour, str) for colour in colours)
