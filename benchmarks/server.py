"""What grammar-constrained calls cost on `functionary-agent serve`, and how the server compares with the embedded
engine on the same model.

    python benchmarks/server.py [--base-url URL | --model PATH [--python PY]] [--rounds N] [--concurrency C]

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
`--parts grammar,embedded,prefix` picks what to run (default: all).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
    parser.add_argument("--parts", default="grammar,embedded,prefix")
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
    from functionary_agent.models.openai_compatible import OpenAICompatibleModel

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
    content, calls = "", {}
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
