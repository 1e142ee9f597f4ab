"""What the embedded engine's design buys: prefix reuse, cheap grammars, little overhead over raw llama.cpp.

    python benchmarks/embedded_speed.py [--repeat N]

Three lines, each `name: value (ratio vs anchor)`, anchors measured in the same run on the same `Llama`:
- turn-2 prompt evaluation of an agent conversation (six tools, a system message, a call and its result) with the
  first turn's prefix reused, vs the same prompt evaluated cold (llama.cpp's own prompt-eval timer);
- tokens per second of a text answer decoded through our phases (recipient under a grammar, text free), vs raw
  unconstrained `create_completion` on the same prompt for the same number of tokens;
- one grammar-constrained call through `EmbeddedModel.complete`, vs raw `Llama.create_completion` with the same
  prompt and the same GBNF (wall time, end to end).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import llama_cpp  # noqa: E402
from llama_cpp import LlamaGrammar  # noqa: E402
from weather import get_weather  # noqa: E402

from functionary_agent.models._turn import TurnPlan  # noqa: E402
from functionary_agent.models.embedded import EmbeddedModel  # noqa: E402
from functionary_agent.tools import Tool  # noqa: E402


def search_flights(origin: str, destination: str, date: str, passengers: int = 1) -> list[dict[str, Any]]:
    """Search flights between two airports.

    Args:
        origin: IATA code of the departure airport, e.g. "IST".
        destination: IATA code of the arrival airport.
        date: Departure date, YYYY-MM-DD.
        passengers: Number of travellers.
    """
    return []


def book_hotel(city: str, check_in: str, nights: int, guests: int = 2, breakfast: bool = False) -> dict[str, Any]:
    """Book a hotel room.

    Args:
        city: City of the hotel.
        check_in: Arrival date, YYYY-MM-DD.
        nights: Number of nights.
        guests: Number of guests.
        breakfast: Whether breakfast is included.
    """
    return {}


def convert_currency(amount: float, source: str, target: str) -> float:
    """Convert money between currencies at today's rate.

    Args:
        amount: The amount to convert.
        source: ISO code of the currency converted from, e.g. "EUR".
        target: ISO code of the currency converted to.
    """
    return amount


def local_time(city: str) -> str:
    """The current local time in a city, ISO 8601.

    Args:
        city: The city.
    """
    return ""


def translate(text: str, language: str) -> str:
    """Translate text into another language.

    Args:
        text: The text to translate.
        language: The target language, e.g. "Turkish".
    """
    return text


TOOLS = [Tool.from_function(f).to_openai()
         for f in (get_weather, search_flights, book_hotel, convert_currency, local_time, translate)]
SYSTEM = "You are a travel assistant. Answer briefly and use the tools for facts you do not know."


def _median(measure: Callable[[], float], repeat: int) -> float:
    return statistics.median(measure() for _ in range(repeat))


def prefix_reuse(model: EmbeddedModel, repeat: int) -> tuple[float, float, int, int]:
    """(warm ms, cold ms, tokens evaluated warm, tokens evaluated cold) for the second turn's prompt."""
    llama = model.llama
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the weather in Istanbul?"}]
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"location": "Istanbul"})}}
    turn2 = [*turn1, {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(get_weather("Istanbul"))}]
    counts: dict[str, int] = {}

    def prompt_eval(cold: bool) -> float:
        model.clear_cache()  # no parked states: the prefix comes from the first turn alone
        model.complete(turn1, tools=TOOLS, max_tokens=40)  # the context now holds the first turn
        if cold:
            model.clear_cache()
        llama_cpp.llama_perf_context_reset(llama.ctx)
        message = model.complete(turn2, tools=TOOLS, max_tokens=2, steer=False)  # a sampled first token
        assert message.usage is not None
        cached = message.usage["prompt_tokens_details"]["cached_tokens"]
        counts["cold" if cold else "warm"] = message.usage["prompt_tokens"] - cached
        return float(llama_cpp.llama_perf_context(llama.ctx).t_p_eval_ms)

    warm, cold = _median(lambda: prompt_eval(False), repeat), _median(lambda: prompt_eval(True), repeat)
    return warm, cold, counts["warm"], counts["cold"]


def text_speed(model: EmbeddedModel, repeat: int) -> tuple[float, float]:
    """(ours, raw) tokens per second over a text answer, from its first token to its last."""
    llama = model.llama
    messages = [{"role": "user", "content": "Describe the city of Istanbul for a tourist, in detail."}]
    fmt = model.format

    def ours() -> tuple[float, int]:
        first, text = 0.0, ""
        for item in model.stream(messages, tools=TOOLS, tool_choice="none", max_tokens=160, steer=False):
            if isinstance(item, dict) and item.get("content"):
                first = first or time.perf_counter()
                text += item["content"]
        return time.perf_counter() - first, len(llama.tokenize(text.encode(), add_bos=False))

    def raw(n_tokens: int) -> float:
        prompt = llama.tokenize(fmt.render(messages, TOOLS, tool_choice="none").encode(), add_bos=True, special=True)
        llama.reset()
        stream = llama.create_completion(prompt, max_tokens=n_tokens, temperature=0.0, stream=True)
        first, count = 0.0, 0
        for _ in stream:
            first = first or time.perf_counter()
            count += 1
        return (count - 1) / (time.perf_counter() - first)

    runs = [ours() for _ in range(repeat)]
    ours_rate = statistics.median((n - 1) / seconds for seconds, n in runs)
    n_tokens = int(statistics.median(n for _, n in runs))
    return ours_rate, statistics.median(raw(n_tokens) for _ in range(repeat))


def grammar_overhead(model: EmbeddedModel, repeat: int) -> tuple[float, float]:
    """(ours, raw) seconds for one call under tool_choice naming get_weather, same prompt, same GBNF."""
    llama = model.llama
    messages = [{"role": "user", "content": "What is the weather in Istanbul and is it warm enough to swim?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    fmt = model.format
    grammar = fmt.call_grammar(TOOLS, named)
    plan = TurnPlan(grammar, (), (), 1, 16, 512, lambda spec, text, may: text)
    gbnf = plan.arguments_grammar(grammar.call("get_weather"))
    prompt = fmt.render(messages, TOOLS, tool_choice=named)

    def ours() -> float:
        start = time.perf_counter()
        model.complete(messages, tools=TOOLS, tool_choice=named, max_tokens=64, steer=False)
        return time.perf_counter() - start

    def raw() -> float:
        start = time.perf_counter()
        tokens = llama.tokenize(prompt.encode(), add_bos=True, special=True)
        llama.create_completion(tokens, max_tokens=64, temperature=0.0,
                                grammar=LlamaGrammar.from_string(gbnf, verbose=False))
        return time.perf_counter() - start

    ours()
    raw()  # both warm: the prompt's prefix is in the context for each
    return _median(ours, repeat), _median(raw, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per measure; the median is reported")
    args = parser.parse_args()
    model = EmbeddedModel().load()
    warm, cold, warm_tokens, cold_tokens = prefix_reuse(model, args.repeat)
    print(f"turn-2 prompt evaluation with prefix reuse: {warm:.1f} ms for {warm_tokens} tokens "
          f"({warm / cold:.3f}x cold: {cold:.1f} ms for {cold_tokens} tokens)")
    ours_rate, raw_rate = text_speed(model, args.repeat)
    print(f"text answer speed through the grammar path: {ours_rate:.1f} tokens/s "
          f"({ours_rate / raw_rate:.2f}x unconstrained create_completion: {raw_rate:.1f} tokens/s)")
    ours_s, raw_s = grammar_overhead(model, args.repeat)
    print(f"grammar-constrained call, EmbeddedModel.complete: {ours_s * 1000:.0f} ms "
          f"({ours_s / raw_s:.2f}x raw Llama.create_completion with the same prompt and GBNF: {raw_s * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
