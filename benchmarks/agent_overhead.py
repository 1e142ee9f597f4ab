"""The framework's own cost: per model turn with an instant model, tracing off vs on, and the memory of 1,000
concurrent conversations over HTTP.

1. 1,000 turns of two tool calls each (async tools that return at once) against a model that answers instantly:
   the time per turn is what the loop, the repeat guard, the usage count, the budget checks and the events cost.
   `ScriptedModel` records a deep copy of every request (for tests to inspect), which over 1,000 turns of a
   growing chat would measure the recorder, so the model here is an `InstantModel` that only counts.
2. The same with an OpenTelemetry SDK tracer provider and an in-memory exporter (spans made and exported).
   The provider can be set only once per process, so "off" runs first. Target: on / off <= 1.15.
3. 1,000 conversations at once on one event loop against the project's test OpenAI server on loopback (one tool
   call, then an answer): wall time and the peak resident memory they added.

    python benchmarks/agent_overhead.py [--turns 1000] [--conversations 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from functionary_agent import AssistantMessage, ChatModel, Conversation, ToolCall
from tests.openai_server import ScriptedServer, function_call, reply


class InstantModel(ChatModel):
    """Two calls per turn until `turns` turns, then an answer; no copies, no waiting."""

    def __init__(self, turns: int, latency: float = 0.0) -> None:
        self.turns, self.asked, self.latency = turns, 0, latency

    async def acomplete(self, messages: Sequence[Mapping[str, Any]], **_: Any) -> AssistantMessage:
        self.asked += 1
        if self.latency:
            await asyncio.sleep(self.latency)
        if self.asked > self.turns:
            return AssistantMessage("done", usage={"prompt_tokens": 10, "completion_tokens": 1})
        calls = [ToolCall(f"call_{self.asked}_{i}", "echo", f'{{"n": {self.asked * 2 + i}}}') for i in range(2)]
        return AssistantMessage(None, calls, usage={"prompt_tokens": 10, "completion_tokens": 5})


async def echo(n: int) -> int:
    return n


def per_turn(turns: int, repeats: int = 3, latency: float = 0.0) -> float:
    """Best of `repeats` runs: seconds per turn."""
    best = float("inf")
    for _ in range(repeats):
        chat = Conversation(InstantModel(turns, latency), tools=[echo], max_turns=turns + 1)
        started = time.perf_counter()
        chat.submit("go")
        best = min(best, (time.perf_counter() - started) / turns)
        assert chat.last_usage.tool_calls == 2 * turns
    return best


def trace_on() -> Any:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def many_conversations(base_url: str, count: int) -> int:
    def lookup(city: str) -> str:
        return f"{city}: 21 C"

    chats = [Conversation("test-model", base_url=base_url, tools=[lookup]) for _ in range(count)]
    answers = await asyncio.gather(*(chat.asubmit(f"Weather in city {i}?") for i, chat in enumerate(chats)))
    for chat in chats:
        await chat.aclose()
    return sum(answer == "It is 21 C." for answer in answers)


def answer_or_call(body: dict[str, Any]) -> dict[str, Any]:
    if body["messages"][-1]["role"] == "tool":
        return reply("It is 21 C.")
    return reply(tool_calls=[function_call("lookup", '{"city": "Oslo"}')])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--conversations", type=int, default=1000)
    args = parser.parse_args()

    per_turn(50)  # warm up
    off = per_turn(args.turns)
    off_5ms = per_turn(args.turns // 5, latency=0.005)
    print(f"per turn, 2 calls, tracing off: {off * 1e3:.3f} ms (1.00x)")
    exporter = trace_on()
    per_turn(50)
    exporter.clear()
    on = per_turn(args.turns)
    spans = len(exporter.get_finished_spans())
    on_5ms = per_turn(args.turns // 5, latency=0.005)
    print(f"per turn, 2 calls, tracing on: {on * 1e3:.3f} ms ({on / off:.2f}x off; target <= 1.15x; {spans} spans)")
    print(f"per turn with a 5 ms model, tracing on vs off: {on_5ms * 1e3:.3f} ms vs {off_5ms * 1e3:.3f} ms "
          f"({on_5ms / off_5ms:.2f}x)")

    before = peak_rss_mb()
    with ScriptedServer(handler=answer_or_call) as server:
        started = time.perf_counter()
        answered = asyncio.run(many_conversations(server.base_url, args.conversations))
        seconds = time.perf_counter() - started
    print(f"{args.conversations} concurrent conversations over HTTP: {answered} answered in {seconds:.1f} s, "
          f"peak memory +{peak_rss_mb() - before:.0f} MB ({(peak_rss_mb() - before) * 1024 / args.conversations:.0f}"
          " KB each)")


if __name__ == "__main__":
    main()
