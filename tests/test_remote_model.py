"""The remote model over real HTTP against a scripted OpenAI-compatible server on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import pytest

from functionary_agent import Conversation, ModelError, OpenAICompatibleModel
from functionary_agent.events import FinalAnswer, ToolCallStarted, ToolResult
from functionary_agent.messages import AssistantMessage
from tests.openai_server import ScriptedServer, chunk, function_call, reply

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
    },
}


def fast_model(server: ScriptedServer, **kwargs: Any) -> OpenAICompatibleModel:
    return OpenAICompatibleModel(
        base_url=server.base_url, retry_initial_delay=0.01, retry_max_delay=0.05, timeout=10, **kwargs
    )


def collect(model: OpenAICompatibleModel, **kwargs: Any) -> tuple[list[dict[str, Any]], AssistantMessage]:
    items = list(model.stream([{"role": "user", "content": "hi"}], **kwargs))
    assert isinstance(items[-1], AssistantMessage)
    return items[:-1], items[-1]  # type: ignore[return-value]


def test_non_streaming_call_and_request_shape() -> None:
    with ScriptedServer([reply(None, [function_call("get_weather", '{"location": "Hanoi"}', id="call_1")])]) as server:
        message = fast_model(server).complete(
            [{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL], tool_choice="required", temperature=0
        )
    assert message.tool_calls[0].to_dict() == function_call("get_weather", '{"location": "Hanoi"}', id="call_1")
    body = server.requests[0]
    assert body["model"] == "test-model"  # discovered through /models
    assert body["tools"] == [WEATHER_TOOL] and body["tool_choice"] == "required" and body["temperature"] == 0
    assert "parallel_tool_calls" not in body


def test_no_tools_means_no_tool_fields_and_extra_settings_travel_in_the_body() -> None:
    with ScriptedServer([reply("hello")]) as server:
        message = fast_model(server, model="m").complete([{"role": "user", "content": "hi"}], top_k=5)
    assert message.content == "hello" and message.tool_calls == []
    assert "tools" not in server.requests[0] and "tool_choice" not in server.requests[0]
    assert server.requests[0]["top_k"] == 5 and server.requests[0]["model"] == "m"


def test_streaming_survives_what_real_servers_send() -> None:
    chunks = [
        chunk({"role": "assistant", "content": "Checking"}),
        chunk({"content": " now."}),
        # no id, `arguments: null`, and the name split over two deltas
        chunk({"tool_calls": [{"index": 0, "type": "function", "function": {"name": "get_", "arguments": None}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "weather"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"location": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Hanoi"}'}}]}),
        # a second call whose arguments arrive as a dict in one piece
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "get_weather",
                                                                       "arguments": {"location": "Paris"}}}]}),
        chunk({}, finish_reason="stop"),  # "stop" although there are calls
    ]
    with ScriptedServer([{"sse": chunks}]) as server:
        deltas, message = collect(fast_model(server), tools=[WEATHER_TOOL])
    assert message.content == "Checking now."
    assert [(c.name, json.loads(c.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"location": "Hanoi"}), ("get_weather", {"location": "Paris"})]
    assert message.tool_calls[0].id.startswith("call_") and message.tool_calls[1].id == "call_b"
    heads = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert [(h["index"], h["function"]["name"], h["function"]["arguments"]) for h in heads] == [
        (0, "get_weather", ""), (1, "get_weather", "")]
    for delta in deltas:  # later deltas carry only index and arguments
        for part in delta.get("tool_calls", []):
            if "id" not in part:
                assert set(part) == {"index", "function"} and set(part["function"]) == {"arguments"}


def test_stream_without_indexes_or_with_repeated_names() -> None:
    chunks = [
        chunk({"tool_calls": [{"id": "call_x", "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"function": {"name": "get_weather", "arguments": '{"location": "Rome"}'}}]}),
        chunk({"tool_calls": [{"id": "call_y", "function": {"name": "get_weather", "arguments": "{}"}}]}),
        chunk({}, finish_reason="tool_calls"),
    ]
    with ScriptedServer([{"sse": chunks}]) as server:
        _, message = collect(fast_model(server), tools=[WEATHER_TOOL])
    assert [(c.id, c.name, c.arguments) for c in message.tool_calls] == [
        ("call_x", "get_weather", '{"location": "Rome"}'), ("call_y", "get_weather", "{}")]


def test_500_then_success_is_retried() -> None:
    actions = [{"status": 500, "body": {"error": {"message": "overloaded"}}}, reply("fine")]
    with ScriptedServer(actions) as server:
        assert fast_model(server, model="m").complete([{"role": "user", "content": "hi"}]).content == "fine"
    assert len(server.requests) == 2


def test_429_honours_retry_after() -> None:
    actions = [{"status": 429, "headers": {"Retry-After": "0.3"}, "body": {"error": {"message": "slow down"}}},
               reply("after waiting")]
    with ScriptedServer(actions) as server:
        started = time.perf_counter()
        message = fast_model(server, model="m").complete([{"role": "user", "content": "hi"}])
        waited = time.perf_counter() - started
    assert message.content == "after waiting" and waited >= 0.3


def test_dropped_connection_is_retried_for_plain_and_streaming_requests() -> None:
    with ScriptedServer([{"drop": True}, reply("back")]) as server:
        assert fast_model(server, model="m").complete([{"role": "user", "content": "hi"}]).content == "back"
    with ScriptedServer([{"drop": True}, {"sse": [chunk({"content": "streamed"}), chunk({}, "stop")]}]) as server:
        assert collect(fast_model(server, model="m"))[1].content == "streamed"


def test_400_fails_at_once_with_url_and_server_message() -> None:
    bad_request = {"status": 400, "body": {"error": {"message": "tool_choice names no tool"}}}
    with ScriptedServer([bad_request]) as server, pytest.raises(ModelError) as info:
        fast_model(server, model="m").complete([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 1
    assert str(info.value) == f"{server.base_url} answered 400: tool_choice names no tool"


def test_persistent_5xx_gives_up_after_max_retries() -> None:
    down = [{"status": 503, "body": {"error": {"message": "down"}}}] * 5
    with ScriptedServer(down) as server, pytest.raises(ModelError, match="answered 503: down"):
        fast_model(server, model="m", max_retries=2).complete([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 3


def test_stream_cut_mid_way_is_a_clear_error() -> None:
    cut = {"sse": [chunk({"content": "partial"})], "drop": True}
    with ScriptedServer([cut]) as server, pytest.raises(ModelError, match="broke off"):
        collect(fast_model(server, model="m"))


def test_unreachable_server_names_the_url() -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model = OpenAICompatibleModel("m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, retry_initial_delay=0.01)
    with pytest.raises(ModelError, match=f"cannot reach http://127.0.0.1:{port}/v1"):
        model.complete([{"role": "user", "content": "hi"}])


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with ScriptedServer([reply("env ok")]) as server:
        monkeypatch.setenv("FUNCTIONARY_BASE_URL", server.base_url)
        monkeypatch.setenv("FUNCTIONARY_MODEL", "env-model")
        monkeypatch.setenv("FUNCTIONARY_API_KEY", "sk-test")
        assert Conversation().submit("hi") == "env ok"
    assert server.requests[0]["model"] == "env-model"
    assert server.headers[0]["authorization"] == "Bearer sk-test"


def test_conversation_end_to_end_over_http_submit_and_stream() -> None:
    def script(body: dict[str, Any]) -> dict[str, Any]:
        if body["messages"][-1]["role"] == "tool":
            return _answer(body)
        calls = [function_call("get_weather", json.dumps({"location": city}), id=f"call_{i}")
                 for i, city in enumerate(["Istanbul", "Hanoi"])]
        if body.get("stream"):
            heads = [chunk({"tool_calls": [{"index": i, **c, "function": {**c["function"], "arguments": ""}}]})
                     for i, c in enumerate(calls)]
            args = [chunk({"tool_calls": [{"index": i, "function": {"arguments": c["function"]["arguments"]}}]})
                    for i, c in enumerate(calls)]
            return {"sse": [*heads, *args, chunk({}, "tool_calls")]}
        return reply(None, calls)

    def get_weather(location: str) -> dict[str, Any]:
        return {"location": location, "temperature": len(location)}

    with ScriptedServer(handler=script) as server, Conversation(
        base_url=server.base_url, model="functionary", tools=[get_weather]
    ) as chat:
        assert chat.submit("weather in Istanbul and Hanoi?") == "Istanbul 8, Hanoi 5"
        events = list(chat.stream("again, streamed"))
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "tool", "assistant"] * 2
    assert [e.name for e in events if isinstance(e, ToolCallStarted)] == ["get_weather", "get_weather"]
    assert sorted(e.content for e in events if isinstance(e, ToolResult)) == [
        '{"location":"Hanoi","temperature":5}', '{"location":"Istanbul","temperature":8}']
    assert events[-1] == FinalAnswer("Istanbul 8, Hanoi 5", finish_reason="stop")
    assert server.requests[1]["messages"][2]["name"] == "get_weather"


def _answer(body: dict[str, Any]) -> dict[str, Any]:
    results = [json.loads(m["content"]) for m in body["messages"] if m["role"] == "tool"][-2:]
    text = ", ".join(f"{r['location']} {r['temperature']}" for r in results)
    if body.get("stream"):
        return {"sse": [chunk({"content": text[:5]}), chunk({"content": text[5:]}), chunk({}, "stop")]}
    return reply(text)


def test_a_plain_json_body_for_a_stream_request_is_an_error() -> None:
    not_a_stream = {"status": 200, "body": reply("x")["json"]}
    with ScriptedServer([not_a_stream]) as server, pytest.raises(ModelError, match="no stream chunks"):
        collect(fast_model(server, model="m"))


def test_usage_is_reported_for_plain_and_streamed_requests_over_http() -> None:
    with ScriptedServer([reply("one"), reply("two")]) as server:
        chat = Conversation("test-model", base_url=server.base_url)
        chat.submit("Hi")
        list(chat.stream("Again"))
    assert server.requests[1]["stream_options"] == {"include_usage": True}
    assert chat.usage.requests == 2 and chat.usage.total_tokens == 4  # the test server reports 1 + 1 per reply


def test_the_context_window_comes_from_the_servers_model_list_and_trims_requests() -> None:
    big = "x" * 30_000
    replies = [reply(tool_calls=[function_call("dump", "{}")]), reply("short enough")]
    with ScriptedServer(replies, model_card={"max_model_len": 4096}) as server:
        model = OpenAICompatibleModel("test-model", base_url=server.base_url)
        chat = Conversation(model, max_result_chars=None)
        chat.register(lambda: big, name="dump")
        assert chat.submit("Dump it.") == "short enough"
        assert asyncio.run(model.acontext_window()) == 4096
    sent = server.requests[-1]["messages"][-1]["content"]
    assert len(sent) < 4096 * 3 and "characters omitted" in sent
    assert chat.messages[-2]["content"] == big  # the conversation keeps the whole result


def test_models_on_one_loop_share_a_pool_and_closing_one_leaves_the_others_working() -> None:
    async def scenario(url: str) -> list[str]:
        first, second = (OpenAICompatibleModel("test-model", base_url=url, max_retries=0) for _ in range(2))
        one = await first.acomplete([{"role": "user", "content": "a"}])
        await second.acomplete([{"role": "user", "content": "b"}])
        assert first._client()._client is second._client()._client  # one httpx pool, one TLS context
        await first.aclose()
        two = await second.acomplete([{"role": "user", "content": "c"}])  # the pool outlives the first model
        await second.aclose()
        three = await first.acomplete([{"role": "user", "content": "d"}])  # a closed model opens a new pool
        await first.aclose()
        return [one.content or "", two.content or "", three.content or ""]

    with ScriptedServer([reply("one"), reply("x"), reply("two"), reply("three")]) as server:
        assert asyncio.run(scenario(server.base_url)) == ["one", "two", "three"]
