"""Runaway answers of the embedded engine, with its runaway guards on and off. Measured on prompts of our own.

    python benchmarks/embedded_runaways.py [--model PATH] [--max-tokens 512] [--only on|off]

The guards (`functionary_agent.models._turn`): free text ends where the model starts to loop (a line, a phrase or a
sentence repeated in a row; the text keeps the first occurrence and the message says `finish_reason: "repetition"`),
so does a call's argument value (`_json_values._ValueLoops`: the value is closed after the loop's first occurrence,
the JSON stays valid, the message says "repetition" and a warning is logged), and a call identical to one already
made in the same turn ends the turn. The off switch is the environment variable
`FUNCTIONARY_AGENT_RUNAWAY_GUARDS=off`, which this script sets for the "off" runs (read when a turn is planned).

Fifteen everyday requests written for this benchmark (none from BFCL or another benchmark), each with the tools it
may use and a generous count of the tokens a right answer needs (the calls and the final answer together). Each
request runs as a small agent loop (up to 4 model turns; the tools return fixed results), greedy decoding.
Lines, guards on and off from one run:
- runaway answers: requests that spent more than 3x the tokens a right answer needs (target <= 5 %);
- identical calls: the most calls with the same name and arguments in one model turn (target 1 with guards on);
- cut for repetition: model turns that ended with finish_reason "repetition" (on the "off" side too: the older rule
  of steered text, a repeated line of 12+ characters ends it, is not part of the guards and stays on);
- tokens: completion tokens over all requests (the copies of a looping value that were taken back count too);
  seconds: wall time over all requests (CPU-bound: other load counts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from functionary_agent.models.embedded import EmbeddedModel

SWITCH = "FUNCTIONARY_AGENT_RUNAWAY_GUARDS"
MAX_TURNS = 4


def _tool(name: str, description: str, properties: dict[str, Any]) -> dict[str, Any]:
    parameters = {"type": "object", "properties": properties, "required": list(properties)}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


_STR, _NUM = {"type": "string"}, {"type": "number"}
CAPITAL = _tool("get_capital", "The capital city of a country.", {"country": _STR})
PRICE = _tool("get_price", "The price of one item in the shop, in euros.", {"item": _STR})
MULTIPLY = _tool("multiply", "Multiply two numbers.", {"a": _NUM, "b": _NUM})
WEATHER = _tool("get_weather", "Current weather for a city.", {"city": _STR})
CONVERT = _tool("convert_units", "Convert a length, weight or volume between units.",
                {"value": _NUM, "from_unit": _STR, "to_unit": _STR})
EMAIL = _tool("send_email", "Send an email to a person.", {"to": _STR, "body": _STR})


def _result(name: str, arguments: dict[str, Any]) -> str:
    """Fixed tool results: the benchmark measures the model, not the tools."""
    capitals = {"france": "Paris", "peru": "Lima", "japan": "Tokyo", "kenya": "Nairobi"}
    results: dict[str, Callable[[], str]] = {
        "get_capital": lambda: capitals.get(str(arguments.get("country", "")).lower(), "unknown"),
        "get_price": lambda: "2.50",
        "multiply": lambda: str(_number(arguments.get("a")) * _number(arguments.get("b"))),
        "get_weather": lambda: "12 C, light rain",
        "convert_units": lambda: "16.09",
        "send_email": lambda: "sent",
    }
    return results.get(name, lambda: "unknown tool")()


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


@dataclass(frozen=True)
class Task:
    prompt: str
    tools: tuple[dict[str, Any], ...]
    need: int  # tokens a right answer needs, calls included (generous)


TASKS = [
    Task("Capitals of France and Peru?", (CAPITAL,), 80),
    Task("What are the capitals of Japan and Kenya?", (CAPITAL,), 80),
    Task("How much do 3 loaves of bread cost? Look up the price of bread, then multiply it by 3.",
         (PRICE, MULTIPLY), 100),
    Task("What's the weather in Oslo right now?", (WEATHER,), 60),
    Task("How many kilometres are 10 miles?", (CONVERT,), 60),
    Task("Email Ana that I will be ten minutes late.", (EMAIL,), 70),
    Task("List the days of the week.", (), 60),
    Task("Give me three tips for sleeping better.", (), 150),
    Task("Write a haiku about autumn.", (), 50),
    Task("Translate 'good morning' into Spanish and French.", (), 40),
    Task("Who wrote Romeo and Juliet?", (), 40),
    Task("Name five fruits that are red.", (), 60),
    Task("What is the boiling point of water in Fahrenheit?", (), 40),
    Task("Explain in two sentences what a browser cookie is.", (), 90),
    Task("Suggest a name for a grey cat.", (), 40),
]


@dataclass
class Outcome:
    tokens: int = 0
    seconds: float = 0.0
    identical: int = 0  # the most identical calls in one turn
    cut: int = 0  # turns that ended with finish_reason "repetition"


def run_task(model: EmbeddedModel, task: Task, max_tokens: int) -> Outcome:
    """The task as a small agent loop; tokens, time, identical calls and repetition cuts over its turns."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": task.prompt}]
    outcome, start = Outcome(), time.perf_counter()
    for _ in range(MAX_TURNS):
        message = model.complete(messages, tools=list(task.tools), max_tokens=max_tokens)
        outcome.tokens += (message.usage or {}).get("completion_tokens", 0)
        outcome.cut += message.finish_reason == "repetition"
        same = Counter((call.name, call.arguments.replace(" ", "")) for call in message.tool_calls)
        outcome.identical = max(outcome.identical, *same.values(), 0)
        messages.append(message.to_dict())
        if not message.tool_calls:
            break
        for call in message.tool_calls:
            try:
                arguments = json.loads(call.arguments)
            except ValueError:
                arguments = {}
            content = _result(call.name, arguments if isinstance(arguments, dict) else {})
            messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": content})
    outcome.seconds = time.perf_counter() - start
    return outcome


def run_all(model: EmbeddedModel, guards: bool, max_tokens: int, verbose: bool) -> list[Outcome]:
    os.environ[SWITCH] = "on" if guards else "off"
    outcomes = []
    for task in TASKS:
        model.clear_cache()
        outcome = run_task(model, task, max_tokens)
        outcomes.append(outcome)
        if verbose:
            print(f"# guards {'on' if guards else 'off'}: {task.prompt!r}: {outcome}", file=sys.stderr)
    return outcomes


def report(results: dict[str, list[Outcome]]) -> None:
    def line(name: str, measure: Callable[[list[Outcome]], str]) -> None:
        print(f"{name}: " + ", ".join(f"{mode} {measure(outcomes)}" for mode, outcomes in results.items()))

    def runaways(outcomes: list[Outcome]) -> str:
        count = sum(o.tokens > 3 * task.need for o, task in zip(outcomes, TASKS, strict=True))
        return f"{count}/{len(outcomes)} ({100 * count / len(outcomes):.0f} %)"

    line("runaway answers", runaways)
    line("identical calls", lambda outcomes: str(max(o.identical for o in outcomes)))
    line("cut for repetition", lambda outcomes: str(sum(o.cut for o in outcomes)))
    line("tokens", lambda outcomes: str(sum(o.tokens for o in outcomes)))
    line("seconds", lambda outcomes: f"{sum(o.seconds for o in outcomes):.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a GGUF file (default: the bundled SmolLM2-135M)")
    parser.add_argument("--max-tokens", type=int, default=512, help="per model turn (a runaway's ceiling)")
    parser.add_argument("--only", choices=["on", "off"], help="run one side only")
    parser.add_argument("--verbose", action="store_true", help="one line per request on stderr")
    args = parser.parse_args()
    model = EmbeddedModel(args.model).load()
    modes = [args.only] if args.only else ["on", "off"]
    results = {mode: run_all(model, mode == "on", args.max_tokens, args.verbose) for mode in modes}
    print(f"requests: {len(TASKS)}, max_tokens per turn: {args.max_tokens}, model: {model.model_path.name}")
    report(results)


if __name__ == "__main__":
    main()
