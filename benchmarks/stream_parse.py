"""Stream-parser cost grows linearly with the output: feed a 200 KB and a 400 KB output one character at a time.

Each output is one long assistant turn as the model would write it in that format: prose (with "<" and ">" that
look like the start of markers, so the parser has to hold text back), many calls with JSON arguments, and python
code. The 400 KB run should take about twice the 200 KB run (the anchor); re-parsing the buffer on every delta
would make it about four times. A second pair of runs is a small model stuck in a loop of blank lines, the case
where holding back trailing whitespace could turn quadratic.

Run: .venv/bin/python benchmarks/stream_parse.py [--formats v3.llama3,v3-llama3.1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from functionary_agent.formats import FORMAT_NAMES, Format, get_format

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}},
    {"type": "code_interpreter"},
]
PROSE = "The cheaper car costs less: 20 < 25 and 25 > 20, so <b>Tang</b> wins -> buy it. "


def build_output(fmt: Format, size: int) -> str:
    """One assistant turn of about `size` characters, rendered by `fmt` and cut after its generation prompt."""
    arguments = json.dumps({"location": "Hanoi, Vietnam", "days": list(range(30)), "note": "x > y"})
    calls_size = size // 2
    call = {"type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    calls = [dict(call, id=f"call_{i}") for i in range(calls_size // (len(arguments) + 20))]
    code = "for i in range(10):\n    print(i < 5, i > 2)\n" * (size // 10 // 40)
    calls.append({"id": "call_code", "type": "function", "function": {"name": "python", "arguments": code}})
    message = {"role": "assistant", "content": PROSE * (size * 4 // 10 // len(PROSE)), "tool_calls": calls}
    prompt = fmt.render([], TOOLS)
    return fmt.render([message], TOOLS, add_generation_prompt=False)[len(prompt) :]


def build_blank_loop(fmt: Format, size: int) -> str:
    """A short answer followed by `size` characters of blank lines, as a looping small model writes."""
    opener = next(k for k, v in fmt.call_grammar(TOOLS, "auto").first_openers().items() if v is None)
    return opener + "Hello" + " \n" * (size // 2)


def feed_by_character(fmt: Format, text: str) -> tuple[float, int]:
    start = time.perf_counter()
    parser = fmt.stream_parser(tools=TOOLS)
    calls = 0
    for char in text:
        for delta in parser.feed(char):
            calls += "id" in (delta.get("tool_calls") or [{}])[0]
    parser.finish()
    return time.perf_counter() - start, calls


def best_time(fmt: Format, text: str, repeats: int) -> float:
    return min(feed_by_character(fmt, text)[0] for _ in range(repeats))


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--formats", default=",".join(FORMAT_NAMES))
    options.add_argument("--repeats", type=int, default=3)
    args = options.parse_args()
    for name in args.formats.split(","):
        fmt = get_format(name)
        for label, build in (("", build_output), (" blank-loop", build_blank_loop)):
            small, large = build(fmt, 200_000), build(fmt, 400_000)
            anchor = best_time(fmt, small, args.repeats)
            slow = best_time(fmt, large, args.repeats)
            title = f"stream_parse {fmt.name}{label}"
            print(f"{title} 200KB ({len(small)} chars): {anchor:.3f} s (1.00 vs 200KB anchor)")
            print(f"{title} 400KB ({len(large)} chars): {slow:.3f} s ({slow / anchor:.2f} vs 200KB anchor)")


if __name__ == "__main__":
    main()
