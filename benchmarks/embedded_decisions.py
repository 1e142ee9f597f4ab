"""When does the embedded engine call a tool, and how many calls does it make? Measured on prompts of our own.

    python benchmarks/embedded_decisions.py [--model PATH] [--only on|off]

Everyday tools (weather, currency, bookings, email, files, calendar, units) and four prompt sets written for this
benchmark, none taken from BFCL or another benchmark:
- 32 requests that one of the tools serves, each naming one entity;
- 32 that no tool serves: chit-chat, questions the tools cannot answer, requests for a tool that is not there;
- 24 that name two or three entities of one kind (cities, amounts, people, files), one call each.
Lines, steering on and off from one run (greedy decoding, tool_choice auto):
- false calls: share of the no-tool prompts answered with a call (target <= 20 %);
- missed calls: share of the tool prompts answered without one (steering on must not be worse than before);
- every call made: share of the multi-entity prompts whose every entity got its own call (target >= 50 %);
- extra calls: share of the single-entity tool prompts answered with more than one call (target <= 5 %).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from functionary_agent.models.embedded import EmbeddedModel


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    parameters = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


_STR = {"type": "string"}
TOOLS = [
    _tool("get_weather", "Current weather for a city.", {"city": _STR, "unit": {"enum": ["c", "f"]}}, ["city"]),
    _tool("convert_currency", "Convert an amount of money from one currency to another.",
          {"amount": {"type": "number"}, "from_currency": _STR, "to_currency": _STR},
          ["amount", "from_currency", "to_currency"]),
    _tool("book_table", "Reserve a table at a restaurant.",
          {"restaurant": _STR, "people": {"type": "integer"}, "time": _STR}, ["restaurant", "people"]),
    _tool("send_email", "Send an email to a person.", {"to": _STR, "subject": _STR, "body": _STR}, ["to", "subject"]),
    _tool("find_file", "Find a file on this computer by its name.", {"name": _STR, "folder": _STR}, ["name"]),
    _tool("create_event", "Add an event to the calendar.", {"title": _STR, "date": _STR, "time": _STR},
          ["title", "date"]),
    _tool("convert_units", "Convert a measurement between units of length, weight or volume.",
          {"value": {"type": "number"}, "from_unit": _STR, "to_unit": _STR}, ["value", "from_unit", "to_unit"]),
]

NEED_TOOL = [
    "What's the weather like in Lisbon right now?",
    "Is it raining in Seattle?",
    "How cold is it in Helsinki today, in fahrenheit?",
    "Tell me the current weather in Nairobi.",
    "Convert 250 euros to Japanese yen.",
    "How many Swiss francs do I get for 80 US dollars?",
    "Change 1200 GBP into EUR please.",
    "What is 45 Canadian dollars in Mexican pesos?",
    "Book a table for 2 at Noma tonight at 8pm.",
    "Reserve Chez Panisse for six people.",
    "Can you get us a table at Dishoom for 4 at 19:00?",
    "I'd like a reservation at The Ivy for three.",
    "Email Priya with the subject 'Quarterly numbers'.",
    "Send a message to tom@example.com titled Lunch on Friday.",
    "Write to Marcus: subject 'Invoice 118', say it is paid.",
    "Please email the landlord about the broken heater, subject Heater.",
    "Where is my file taxes_2025.pdf?",
    "Find holiday-photos.zip in the Downloads folder.",
    "Locate the document called thesis_final_v3.docx.",
    "I can't find resume.pdf, can you search for it?",
    "Put 'Dentist appointment' in my calendar on 14 March.",
    "Add an event called Team offsite on 2026-06-02 at 09:30.",
    "Schedule 'Call with Ana' for next Monday at 3pm.",
    "Create a calendar entry: Mum's birthday, 22 August.",
    "How many kilometres is 26.2 miles?",
    "Convert 5 pounds to kilograms.",
    "What is 3 litres in gallons?",
    "Turn 180 centimetres into feet.",
    "What's the temperature in Buenos Aires?",
    "Exchange 10000 yen to dollars.",
    "Book Sushi Saito for 2 people at 7.",
    "Find the spreadsheet budget.xlsx.",
]

NO_TOOL = [
    "Hi! How are you today?",
    "Thanks, that was helpful.",
    "Tell me a joke about cats.",
    "Who wrote Pride and Prejudice?",
    "What is the capital of Australia?",
    "Explain what a black hole is in one sentence.",
    "Write a haiku about the sea.",
    "What does 'serendipity' mean?",
    "How many legs does a spider have?",
    "Give me a tip for sleeping better.",
    "What's your name?",
    "Summarise the plot of Hamlet briefly.",
    "Why is the sky blue?",
    "Recommend a good science fiction novel.",
    "What is 12 times 12?",
    "Translate 'good morning' into Spanish.",
    "Play some jazz music.",
    "Order me a large pepperoni pizza.",
    "Set an alarm for 6:30 tomorrow.",
    "Turn off the living room lights.",
    "Call my sister.",
    "Buy two tickets for the Coldplay concert.",
    "What's the stock price of Apple?",
    "Who won the football world cup in 2014?",
    "Good night!",
    "Can you help me name my new puppy?",
    "What's a good recipe for pancakes?",
    "Is a tomato a fruit or a vegetable?",
    "How do I tie a tie?",
    "What year did the Berlin Wall fall?",
    "Tell me something interesting about octopuses.",
    "Write a short motivational quote.",
]

# Each prompt, and the values that must each appear in a call of their own.
MULTI = [
    ("What is the weather in Istanbul and in Hanoi?", ["Istanbul", "Hanoi"]),
    ("Weather in Paris, Berlin and Madrid, please.", ["Paris", "Berlin", "Madrid"]),
    ("Is it sunny in Cairo or in Athens today?", ["Cairo", "Athens"]),
    ("How warm is it in Lima and Quito?", ["Lima", "Quito"]),
    ("Tell me the weather for Oslo and for Stockholm.", ["Oslo", "Stockholm"]),
    ("Compare the weather in Tokyo and Seoul.", ["Tokyo", "Seoul"]),
    ("Convert 100 USD to EUR and to GBP.", ["EUR", "GBP"]),
    ("How much is 50 euros in dollars and in yen?", ["dollar", "yen"]),
    ("Convert 20 GBP and 35 GBP to euros.", ["20", "35"]),
    ("Email Alice and Bob with the subject 'Launch day'.", ["Alice", "Bob"]),
    ("Send the subject 'Rota' to Sam, to Jo and to Kim.", ["Sam", "Jo", "Kim"]),
    ("Write to Carla and to Dev: subject 'Minutes'.", ["Carla", "Dev"]),
    ("Find report.pdf and budget.xlsx.", ["report.pdf", "budget.xlsx"]),
    ("Where are notes.txt and todo.md?", ["notes.txt", "todo.md"]),
    ("Search for cv.docx, photo.jpg and letter.odt.", ["cv.docx", "photo.jpg", "letter.odt"]),
    ("Book a table for 2 at Nopa and one for 4 at Zuni.", ["Nopa", "Zuni"]),
    ("Reserve Lucca for 3 and Bella for 5.", ["Lucca", "Bella"]),
    ("Add 'Gym' on 3 May and 'Yoga' on 4 May to my calendar.", ["Gym", "Yoga"]),
    ("Put Dentist on 1 June and Haircut on 9 June in the calendar.", ["Dentist", "Haircut"]),
    ("Convert 10 miles and 20 miles to kilometres.", ["10", "20"]),
    ("How many kilograms are 3 pounds and 7 pounds?", ["3", "7"]),
    ("What is 2 litres in gallons and in cups?", ["gallon", "cup"]),
    ("Weather in Dublin & Cork?", ["Dublin", "Cork"]),
    ("What's it like outside in Rome, Naples and Milan right now?", ["Rome", "Naples", "Milan"]),
]


def _ask(model: EmbeddedModel, prompt: str, steer: bool) -> Any:
    return model.complete([{"role": "user", "content": prompt}], tools=TOOLS, max_tokens=120, steer=steer,
                          max_items=5, max_length=40)


def _covered(message: Any, values: list[str]) -> bool:
    """Every value in a call of its own: the calls' arguments, lower-cased, each hold a different one."""
    texts = [_readable(call.arguments).lower() for call in message.tool_calls]
    remaining = list(texts)
    for value in values:
        match = next((text for text in remaining if value.lower() in text), None)
        if match is None:
            return False
        remaining.remove(match)
    return True


def _readable(arguments: str) -> str:
    """Arguments as JSON text without escapes ("\\u00e9" read as "é"); a cut-off argument string as it stands."""
    try:
        return json.dumps(json.loads(arguments), ensure_ascii=False)
    except ValueError:
        return arguments


def measure(model: EmbeddedModel, steer: bool) -> dict[str, float]:
    started = time.perf_counter()
    need = [_ask(model, prompt, steer) for prompt in NEED_TOOL]
    none = [_ask(model, prompt, steer) for prompt in NO_TOOL]
    multi = [(_ask(model, prompt, steer), values) for prompt, values in MULTI]
    return {
        "false calls": sum(bool(m.tool_calls) for m in none) / len(none),
        "missed calls": sum(not m.tool_calls for m in need) / len(need),
        "every call made": sum(_covered(m, values) for m, values in multi) / len(multi),
        "extra calls": sum(len(m.tool_calls) > 1 for m in need) / len(need),
        "seconds": (time.perf_counter() - started) / (len(need) + len(none) + len(multi)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--only", choices=["on", "off"], help="measure one setting only")
    args = parser.parse_args()
    model = EmbeddedModel(args.model) if args.model else EmbeddedModel.shared()
    model.load()
    settings = [args.only == "on"] if args.only else [True, False]
    results = {steer: measure(model, steer) for steer in settings}
    for name in ("false calls", "missed calls", "every call made", "extra calls"):
        line = ", ".join(f"steer {'on' if s else 'off'} {r[name]:.1%}" for s, r in results.items())
        print(f"embedded decisions, {name}: {line}")
    line = ", ".join(f"steer {'on' if s else 'off'} {r['seconds']:.2f} s" for s, r in results.items())
    print(f"embedded decisions, seconds per prompt: {line}")


if __name__ == "__main__":
    main()
