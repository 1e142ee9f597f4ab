"""Copied argument values with the embedded engine: leading characters kept, and enum values named by a synonym.

    python benchmarks/embedded_values.py [--steer on|off|both] [--show]

Prompts of our own (never BFCL items), each with one tool and the value one argument must get: values that start
with punctuation or a sign ("/tmp/old.log", "~/notes.txt", ".env", "$12", "@maria_k", "#sunset", "-5", "--verbose")
and enum values the user names by a synonym ("in Fahrenheit" for enum ["c", "f"] described "c for Celsius, f for
Fahrenheit"). Each runs with value repair on and off, side by side: token healing of the opening quote
(`_json_values._Healing`) and, where steering is on, the review's repairs (`_steering.restore_leading`,
`_steering.named_enum_values`). The off switch is the private environment variable
FUNCTIONARY_AGENT_VALUE_REPAIR=0, set here for the "off" runs only.

Prints one line per measure, `name: value`: a value is right when it equals the expected one exactly, and lost its
leading characters when it is a proper tail of the expected one ("tmp/old.log" for "/tmp/old.log", 5 for -5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from functionary_agent.models._json_values import VALUE_REPAIR_SWITCH  # noqa: E402
from functionary_agent.models.embedded import EmbeddedModel  # noqa: E402


def _tool(name: str, description: str, properties: dict[str, Any]) -> dict[str, Any]:
    parameters = {"type": "object", "properties": properties, "required": list(properties)}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def _text(description: str) -> dict[str, str]:
    return {"type": "string", "description": description}


DELETE = _tool("delete_file", "Delete a file.", {"path": _text("The file's path.")})
READ = _tool("read_file", "Read a text file and return its contents.", {"path": _text("The file's path.")})
LIST = _tool("list_directory", "List the files in a directory.", {"path": _text("The directory's path.")})
PRICE = _tool("set_price", "Set the price label of an item.",
              {"item": _text("The item."), "price": _text("The price as shown, with its currency sign.")})
QUOTE = _tool("get_stock_quote", "Get the latest quote of a stock.", {"ticker": _text("The ticker symbol.")})
FOLLOW = _tool("follow_user", "Follow a user on the social network.", {"handle": _text("The user's handle.")})
MESSAGE = _tool("send_message", "Send a direct message to a user.",
                {"to": _text("The user's handle."), "text": _text("The message.")})
TAGS = _tool("search_posts", "Search social network posts by hashtag.", {"tag": _text("The hashtag.")})
VOLUME = _tool("adjust_volume", "Change the volume by a number of steps.",
               {"steps": {"type": "integer", "description": "Steps up (positive) or down (negative)."}})
OFFSET = _tool("set_clock_offset", "Set the clock offset in hours.", {"hours": {"type": "number"}})
READING = _tool("log_temperature", "Log a thermometer reading as written.", {"reading": _text("The reading.")})
BUILD = _tool("run_build", "Run the build with one extra command-line flag.", {"flag": _text("The flag.")})
WEATHER_CF = _tool("get_weather", "Get the weather for a city.", {
    "city": _text("The city."),
    "unit": {"type": "string", "enum": ["c", "f"], "description": "c for Celsius, f for Fahrenheit"}})
WEATHER_WORDS = _tool("get_weather", "Get the weather for a city.", {
    "city": _text("The city."), "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}})
DISTANCE = _tool("get_distance", "Get the driving distance between two cities.", {
    "origin": _text("Where from."), "destination": _text("Where to."),
    "unit": {"type": "string", "enum": ["km", "mi"], "description": "km for kilometers, mi for miles"}})
SORTED = _tool("list_files", "List the files of the current folder, sorted by name.", {
    "order": {"type": "string", "enum": ["asc", "desc"], "description": "'asc' for ascending, 'desc' for descending"}})


@dataclass(frozen=True)
class Case:
    prompt: str
    tool: dict[str, Any]
    argument: str
    expected: Any


LEADING = [
    Case("Delete the file /tmp/old.log", DELETE, "path", "/tmp/old.log"),
    Case("Please delete /var/log/app.log", DELETE, "path", "/var/log/app.log"),
    Case("Remove ~/notes.txt", DELETE, "path", "~/notes.txt"),
    Case("Delete the file named .gitignore", DELETE, "path", ".gitignore"),
    Case("Read the file .env", READ, "path", ".env"),
    Case("Read /etc/hosts", READ, "path", "/etc/hosts"),
    Case("Read the file ~/.bashrc for me", READ, "path", "~/.bashrc"),
    Case("List the files in ./src", LIST, "path", "./src"),
    Case("List the directory /usr/local/bin", LIST, "path", "/usr/local/bin"),
    Case("Set the price of the mug to $12", PRICE, "price", "$12"),
    Case("Get a stock quote for $AAPL", QUOTE, "ticker", "$AAPL"),
    Case("Follow @maria_k", FOLLOW, "handle", "@maria_k"),
    Case("Send a message to @tom saying hello", MESSAGE, "to", "@tom"),
    Case("Search posts tagged #sunset", TAGS, "tag", "#sunset"),
    Case("Find posts with the hashtag #python", TAGS, "tag", "#python"),
    Case("Adjust the volume by -5 steps", VOLUME, "steps", -5),
    Case("Set the clock offset to -3.5 hours", OFFSET, "hours", -3.5),
    Case("Log a temperature reading of -5", READING, "reading", "-5"),
    Case("Run the build with --verbose", BUILD, "flag", "--verbose"),
    Case("Delete the file report_final.pdf", DELETE, "path", "report_final.pdf"),  # no punctuation: a control
]

ENUMS = [
    Case("What's the weather in Boston in Fahrenheit?", WEATHER_CF, "unit", "f"),
    Case("Weather in Oslo in celsius", WEATHER_CF, "unit", "c"),
    Case("Weather in Boston, in F please", WEATHER_WORDS, "unit", "fahrenheit"),
    Case("How far is Lyon from Paris in miles?", DISTANCE, "unit", "mi"),
    Case("List the files in descending order", SORTED, "order", "desc"),
]


def value_of(model: EmbeddedModel, case: Case, steer: bool) -> Any:
    message = model.complete([{"role": "user", "content": case.prompt}], tools=[case.tool], steer=steer)
    for call in message.tool_calls:
        try:
            arguments = json.loads(call.arguments or "")
        except ValueError:
            continue
        if isinstance(arguments, dict) and case.argument in arguments:
            return arguments[case.argument]
    return None


def lost_leading(value: Any, expected: Any) -> bool:
    """`value` is a proper tail of the expected value ("tmp/old.log" for "/tmp/old.log", 5 for -5)."""
    if value is None:
        return False
    got, want = json.dumps(value).strip('"'), json.dumps(expected).strip('"')
    return got != want and want.endswith(got)


def measure(
    model: EmbeddedModel, cases: list[Case], steer: bool, repair: bool, show: bool = False
) -> tuple[int, int, float]:
    """(right values, values that lost leading characters, seconds per prompt)."""
    os.environ[VALUE_REPAIR_SWITCH] = "1" if repair else "0"
    right = lost = 0
    start = time.perf_counter()
    for case in cases:
        value = value_of(model, case, steer)
        if show and value != case.expected:
            print(f"  steer {steer}, repair {repair}: {case.prompt!r} gave {value!r}, want {case.expected!r}")
        right += value == case.expected and type(value) is type(case.expected)
        lost += lost_leading(value, case.expected)
    return right, lost, (time.perf_counter() - start) / len(cases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steer", default="both", choices=["on", "off", "both"])
    parser.add_argument("--show", action="store_true", help="print each value that is not the expected one")
    args = parser.parse_args()
    model = EmbeddedModel().load()
    value_of(model, LEADING[0], True)  # warm-up: the first call builds caches (the vocabulary's texts)
    for steer in {"on": [True], "off": [False], "both": [True, False]}[args.steer]:
        label = f"steer {'on' if steer else 'off'}"
        results = {repair: measure(model, LEADING, steer, repair, args.show) for repair in (True, False)}
        enums = {repair: measure(model, ENUMS, steer, repair, args.show) for repair in (True, False)}
        (on_right, on_lost, on_s), (off_right, off_lost, off_s) = results[True], results[False]
        total = len(LEADING)
        print(f"lost leading characters ({label}): repair on {on_lost}/{total}, off {off_lost}/{total}")
        print(f"values right ({label}): repair on {on_right}/{total}, off {off_right}/{total}")
        print(f"enum values named by a synonym right ({label}): repair on {enums[True][0]}/{len(ENUMS)}, "
              f"off {enums[False][0]}/{len(ENUMS)}")
        print(f"seconds per prompt ({label}): repair on {on_s:.2f} s, off {off_s:.2f} s")
    os.environ.pop(VALUE_REPAIR_SWITCH, None)


if __name__ == "__main__":
    main()
