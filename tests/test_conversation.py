"""The agent loop, driven by ScriptedModel: concurrency, faults, turn limits, the repeat guard, persistence."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any, Literal

import pytest

from functionary_agent import ConfigurationError, Conversation, MaxTurnsExceeded, ModelError, ToolDefinitionError
from functionary_agent.events import FinalAnswer, TextDelta, ToolCallArgumentsDelta, ToolCallStarted, ToolResult
from functionary_agent.testing import ScriptedModel, ScriptedRequest, call


def calls(*items: Any) -> dict[str, Any]:
    return {"content": None, "tool_calls": list(items)}


def tool_messages(chat: Conversation) -> list[dict[str, Any]]:
    return [m for m in chat.messages if m["role"] == "tool"]


def test_weather_example_runs_both_calls_and_answers() -> None:
    model = ScriptedModel([
        calls(call("get_weather", {"location": "Istanbul"}, id="c1"),
              call("get_weather", {"location": "Hanoi"}, id="c2")),
        "Istanbul is 21 C, Hanoi is 30 C.",
    ])
    chat = Conversation(model, system="Be brief.")

    @chat.register
    def get_weather(location: str, unit: Literal["c", "f"] = "c") -> dict:
        """Get the current weather."""
        return {"location": location, "temperature": 21 if location == "Istanbul" else 30, "unit": unit}

    assert chat.submit("What is the weather in Istanbul and in Hanoi?") == "Istanbul is 21 C, Hanoi is 30 C."
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert tool_messages(chat) == [
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather",
         "content": '{"location":"Istanbul","temperature":21,"unit":"c"}'},
        {"role": "tool", "tool_call_id": "c2", "name": "get_weather",
         "content": '{"location":"Hanoi","temperature":30,"unit":"c"}'},
    ]
    first = model.requests[0]
    assert first.tools == [get_weather_spec(chat)] and first.tool_choice == "auto"
    assert model.requests[1].messages == chat.messages[:-1]


def get_weather_spec(chat: Conversation) -> dict[str, Any]:
    return chat.tool_specs()[0]


def test_calls_of_one_turn_run_concurrently_and_results_keep_call_order() -> None:
    model = ScriptedModel([calls(call("slow_sync", {"tag": "a"}), call("slow_async", {"tag": "b"}),
                                 call("fast", {"tag": "c"})), "done"])
    chat = Conversation(model)

    @chat.register
    def slow_sync(tag: str) -> str:
        time.sleep(0.4)
        return tag

    @chat.register
    async def slow_async(tag: str) -> str:
        await asyncio.sleep(0.4)
        return tag

    @chat.register
    def fast(tag: str) -> str:
        return tag

    started = time.perf_counter()
    events = list(chat.stream("go"))
    elapsed = time.perf_counter() - started
    assert elapsed < 0.75, f"three calls took {elapsed:.2f} s: they did not overlap"
    results = [e for e in events if isinstance(e, ToolResult)]
    assert results[0].name == "fast"  # events arrive as calls finish
    assert [m["content"] for m in tool_messages(chat)] == ["a", "b", "c"]  # messages keep the model's order


def test_max_concurrency_bounds_parallel_calls() -> None:
    active, peak = 0, 0
    lock = threading.Lock()

    def work(n: int) -> int:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        with lock:
            active -= 1
        return n

    model = ScriptedModel([calls(*(call("work", {"n": i}) for i in range(6))), "ok"])
    chat = Conversation(model, tools=[work], max_concurrency=2)
    chat.submit("go")
    assert peak == 2
    sequential = Conversation(ScriptedModel([calls(call("work", {"n": 1}), call("work", {"n": 2})), "ok"]),
                              tools=[work], parallel_tool_calls=False)
    peak = 0
    sequential.submit("go")
    assert peak == 1
    assert sequential.model.requests[0].settings == {"parallel_tool_calls": False}  # type: ignore[attr-defined]


def test_every_fault_becomes_a_tool_message_and_siblings_survive() -> None:
    model = ScriptedModel([
        calls(
            call("ok", {"x": 1}, id="good"),
            call("nope", {}, id="unknown"),
            call("ok", '{"x": ', id="badjson"),
            call("ok", {"x": "not a number"}, id="invalid"),
            call("boom", {}, id="raises"),
            call("sleepy", {}, id="timeout"),
        ),
        "I handled the errors.",
    ])
    chat = Conversation(model)

    @chat.register
    def ok(x: int) -> int:
        return x + 1

    @chat.register
    def boom() -> None:
        raise RuntimeError("kaput")

    @chat.register(timeout=0.2)
    async def sleepy() -> None:
        await asyncio.sleep(10)

    assert chat.submit("go") == "I handled the errors."
    contents = {m["tool_call_id"]: m["content"] for m in tool_messages(chat)}
    assert contents["good"] == "2"
    assert contents["unknown"] == "Error: unknown tool 'nope'. Available tools: boom, ok, sleepy"
    assert contents["badjson"].startswith("Error: the arguments are not valid JSON")
    assert contents["invalid"].startswith("Error: invalid arguments for ok:\n- x: Input should be a valid integer")
    assert contents["raises"] == "Error: boom raised RuntimeError: kaput"
    assert contents["timeout"] == "Error: sleepy timed out after 0.2 s"
    order = ["good", "unknown", "badjson", "invalid", "raises", "timeout"]
    assert [m["tool_call_id"] for m in tool_messages(chat)] == order


def test_max_turns_raises_and_keeps_every_message() -> None:
    counter = iter(range(100))
    model = ScriptedModel(lambda request: calls(call("tick", {"n": next(counter)})))
    chat = Conversation(model, max_turns=3)
    chat.register(lambda n: n, name="tick")
    with pytest.raises(MaxTurnsExceeded, match="max_turns=3"):
        chat.submit("loop forever")
    assert [m["role"] for m in chat.messages] == ["user"] + ["assistant", "tool"] * 3


def test_repeat_guard_answers_from_the_earlier_result_and_forces_an_answer() -> None:
    executions = []

    def lookup(key: str) -> str:
        executions.append(key)
        return f"value of {key}"

    model = ScriptedModel(
        lambda request: "final: value of a" if request.tool_choice == "none" else calls(call("lookup", {"key": "a"}))
    )
    chat = Conversation(model, tools=[lookup])
    assert chat.submit("what is a?") == "final: value of a"
    assert executions == ["a"]  # the repeat was not executed again
    assert [r.tool_choice for r in model.requests] == ["auto", "auto", "none"]
    assert [m["content"] for m in tool_messages(chat)] == ["value of a", "value of a"]


def test_repeat_guard_ignores_key_order_but_reruns_after_errors() -> None:
    attempts = []

    def flaky(a: int, b: int) -> int:
        attempts.append((a, b))
        if len(attempts) == 1:
            raise ConnectionError("try again")
        return a + b

    model = ScriptedModel([
        calls(call("flaky", '{"a": 1, "b": 2}')),
        calls(call("flaky", '{"b": 2, "a": 1}')),  # the first failed: run it again
        calls(call("flaky", '{"b": 2,   "a": 1}')),  # same call, same key order aside: answered from cache
        "3",
    ])
    chat = Conversation(model, tools=[flaky])
    assert chat.submit("add") == "3"
    assert len(attempts) == 2
    assert model.requests[-1].tool_choice == "none"


def test_forced_tool_choice_applies_to_the_first_turn_only() -> None:
    model = ScriptedModel([calls(call("now", {})), "It is noon."])
    chat = Conversation(model, tool_choice={"type": "function", "function": {"name": "now"}})
    chat.register(lambda: "noon", name="now")
    chat.submit("time?")
    assert [r.tool_choice for r in model.requests] == [{"type": "function", "function": {"name": "now"}}, "auto"]


def test_stream_yields_typed_events_in_order() -> None:
    model = ScriptedModel([
        {"content": "Let me check.", "tool_calls": [call("echo", {"text": "hello world"}, id="c1")]},
        "It said hello world.",
    ], chunk_size=4)
    chat = Conversation(model)
    chat.register(lambda text: text, name="echo")
    events = list(chat.stream("echo please"))
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "TextDelta" and kinds[-1] == "FinalAnswer"
    first_turn_text = "".join(e.text for e in events[: kinds.index("ToolCallStarted")] if isinstance(e, TextDelta))
    assert first_turn_text == "Let me check."
    started = next(e for e in events if isinstance(e, ToolCallStarted))
    assert (started.index, started.id, started.name) == (0, "c1", "echo")
    arguments = "".join(e.delta for e in events if isinstance(e, ToolCallArgumentsDelta))
    assert json.loads(arguments) == {"text": "hello world"}
    result = next(e for e in events if isinstance(e, ToolResult))
    assert (result.id, result.content, result.is_error) == ("c1", "hello world", False)
    assert kinds.index("ToolResult") < len(kinds) - 1
    assert events[-1] == FinalAnswer("It said hello world.")
    assert chat.messages[1]["content"] == "Let me check."


def test_sync_tools_do_not_block_the_event_loop() -> None:
    gaps: list[float] = []

    def blocking() -> str:
        time.sleep(0.5)
        return "slept"

    async def heartbeat() -> str:
        last = time.perf_counter()
        for _ in range(20):
            await asyncio.sleep(0.02)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        return "beat"

    model = ScriptedModel([calls(call("blocking", {}), call("heartbeat", {})), "done"])
    asyncio.run(Conversation(model, tools=[blocking, heartbeat]).asubmit("go"))
    assert max(gaps) < 0.2, f"the loop stalled for {max(gaps):.2f} s while a sync tool ran"


def test_submit_works_inside_a_running_event_loop() -> None:
    """As in Jupyter, where the notebook's loop is already running in the calling thread."""

    async def notebook_cell() -> str:
        chat = Conversation(ScriptedModel(["hi from inside"]))
        return chat.submit("hello")

    assert asyncio.run(notebook_cell()) == "hi from inside"


def test_leaving_a_stream_during_tool_calls_keeps_the_messages_valid() -> None:
    async def forever() -> None:
        await asyncio.sleep(30)

    model = ScriptedModel([calls(call("quick", {}, id="q"), call("forever", {}, id="f"))])
    chat = Conversation(model, tools=[forever])
    chat.register(lambda: "fast", name="quick")
    for event in chat.stream("go"):
        if isinstance(event, ToolResult):
            break  # the user stops reading while `forever` still runs
    contents = {m["tool_call_id"]: m["content"] for m in tool_messages(chat)}
    assert contents == {"q": "fast", "f": "Error: the call was cancelled before it finished"}


def test_model_failure_keeps_messages_and_submit_without_content_continues() -> None:
    replies: list[Any] = [calls(call("add", {"a": 1, "b": 2}))]
    model = ScriptedModel(replies)
    chat = Conversation(model)
    chat.register(lambda a, b: a + b, name="add")
    with pytest.raises(ModelError):
        chat.submit("1+2?")
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool"]
    replies_after = ScriptedModel(["3"])
    chat.model = replies_after
    assert chat.submit() == "3"
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "assistant"]
    assert replies_after.requests[0].messages[-1]["role"] == "tool"


def test_register_forms_and_duplicate_names() -> None:
    chat = Conversation(ScriptedModel([]))

    @chat.register
    def a() -> str:
        return "a"

    @chat.register(name="bee", description="The b tool.")
    def b() -> str:
        return "b"

    def c() -> str:
        return "c"

    assert chat.register(c) is c and a() == "a"  # functions stay plain functions
    assert [t.name for t in chat.tools] == ["a", "bee", "c"]
    assert chat.tool_specs()[1]["function"]["description"] == "The b tool."
    with pytest.raises(ToolDefinitionError, match="already registered"):
        chat.register(c)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    chat = Conversation(ScriptedModel([calls(call("greet", {"name": "Zoë"})), "Hello Zoë! 👋"]), system="sys")
    chat.register(lambda name: f"hi {name}", name="greet")
    chat.submit("greet Zoë")
    path = tmp_path / "chat.json"
    chat.save(path)
    assert "Zoë" in path.read_text(encoding="utf-8")  # not \\u-escaped
    restored = Conversation.load(path, ScriptedModel(["again"]))
    assert restored.messages == chat.messages
    restored.submit("once more")
    assert restored.messages[-1] == {"role": "assistant", "content": "again"}


@pytest.mark.parametrize(
    ("content", "message"),
    [("not json", "not JSON"), ('{"messages": [{"no_role": 1}]}', "list of messages"), ('"text"', "list of messages")],
)
def test_load_rejects_bad_files_clearly(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match=message):
        Conversation.load(path, ScriptedModel([]))
    with pytest.raises(ConfigurationError, match="cannot read"):
        Conversation.load(tmp_path / "missing.json", ScriptedModel([]))


def test_a_model_name_without_a_server_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FUNCTIONARY_BASE_URL", raising=False)
    with pytest.raises(ConfigurationError, match="is not a GGUF file; to use a model on a server pass base_url"):
        Conversation("meetkai/functionary-small-v3.2")
    with pytest.raises(ConfigurationError, match="no GGUF model file at"):
        Conversation("missing/model.gguf")


def test_scripted_model_records_requests_and_runs_out_clearly() -> None:
    model = ScriptedModel(["one"])
    chat = Conversation(model, temperature=0.2)
    chat.submit("first")
    assert isinstance(model.requests[0], ScriptedRequest) and model.requests[0].settings == {"temperature": 0.2}
    with pytest.raises(ModelError, match="has 1 replies and was asked for reply 2"):
        chat.submit("second")


def test_reset_keeps_the_system_message() -> None:
    chat = Conversation(ScriptedModel(["a"]), system="rules")
    chat.submit("q")
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "rules"}]
