"""Conversation faults from the robustness review: concurrent runs, closing that fails, deltas without `index`."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest

from functionary_agent import ConfigurationError, Conversation
from functionary_agent.errors import CloseError, ConversationBusyError, FunctionaryAgentError
from functionary_agent.events import Event, FinalAnswer, ToolCallArgumentsDelta, ToolCallStarted, ToolResult
from functionary_agent.messages import AssistantMessage, ToolCall
from functionary_agent.models import embedded_model
from functionary_agent.models.base import ChatModel, StreamItem
from functionary_agent.testing import ScriptedModel

# -- one run at a time -----------------------------------------------------------------------------------


def test_a_second_asubmit_during_a_run_is_refused_and_leaves_the_messages_alone() -> None:
    async def two_at_once() -> tuple[Conversation, str]:
        chat = Conversation(ScriptedModel(["the only answer"], delay=0.3))  # the reply waits, the run stays open
        first = asyncio.create_task(chat.asubmit("first"))
        await asyncio.sleep(0.05)
        with pytest.raises(ConversationBusyError, match="already running") as info:
            await chat.asubmit("second")
        assert isinstance(info.value, FunctionaryAgentError) and isinstance(info.value, RuntimeError)
        with pytest.raises(ConversationBusyError):
            async for _ in chat.astream("third"):
                pass
        return chat, await first

    chat, answer = asyncio.run(two_at_once())
    assert answer == "the only answer"
    assert chat.messages == [{"role": "user", "content": "first"},
                             {"role": "assistant", "content": "the only answer"}]
    assert len(chat.model.requests) == 1  # type: ignore[attr-defined]


def test_sync_submit_and_stream_are_refused_while_a_stream_is_open() -> None:
    chat = Conversation(ScriptedModel(["streaming along", "next answer"], chunk_size=3))
    events = chat.stream("first")
    next(events)  # the run is under way, paused at its first event
    with pytest.raises(ConversationBusyError):
        chat.submit("second")
    with pytest.raises(ConversationBusyError):
        list(chat.stream("third"))
    assert isinstance(list(events)[-1], FinalAnswer)
    assert chat.submit("after") == "next answer"  # free again once the first run is over
    assert [m["content"] for m in chat.messages] == ["first", "streaming along", "after", "next answer"]


def test_a_failed_run_frees_the_conversation() -> None:
    chat = Conversation(ScriptedModel([]))  # no replies: the run fails with ModelError
    for _ in range(2):
        with pytest.raises(FunctionaryAgentError) as info:
            chat.submit("hello")
        assert not isinstance(info.value, ConversationBusyError)


# -- closing ---------------------------------------------------------------------------------------------


class Resource:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True
        if self.error is not None:
            raise self.error


class ClosableModel(ScriptedModel):
    closed = False

    async def aclose(self) -> None:
        self.closed = True


def test_close_attempts_every_resource_and_reports_every_failure() -> None:
    model = ClosableModel([])
    chat = Conversation(model)
    chat._owns_model = True  # as for a client the conversation created from base_url=...
    first, fine, second = Resource(RuntimeError("first broke")), Resource(), Resource(OSError("second broke"))
    chat._sources.extend([first, fine, second])
    with pytest.raises(CloseError) as info:
        chat.close()
    assert first.closed and fine.closed and second.closed and model.closed
    assert info.value.errors == [first.error, second.error]
    assert info.value.__cause__ is first.error
    assert "RuntimeError: first broke" in str(info.value) and "OSError: second broke" in str(info.value)
    assert chat._sources == []


def test_a_single_close_failure_is_raised_as_it_is_after_closing_the_rest() -> None:
    chat = Conversation(ScriptedModel([]))
    broken, fine = Resource(ValueError("broken")), Resource()
    chat._sources.extend([broken, fine])
    with pytest.raises(ValueError, match=r"^broken$"):
        chat.close()
    assert fine.closed


# -- stream deltas without `index` -----------------------------------------------------------------------


class IndexlessModel(ChatModel):
    """Streams tool calls the way some servers do: no `index`, ids only on some deltas."""

    async def astream(self, messages: Sequence[Mapping[str, Any]], **request: Any) -> AsyncIterator[StreamItem]:
        if messages[-1]["role"] == "tool":
            yield {"content": "both echoed"}
            yield AssistantMessage("both echoed")
            return
        yield {"tool_calls": [{"id": "a", "function": {"name": "echo", "arguments": ""}}]}
        yield {"tool_calls": [{"function": {"arguments": '{"text": '}}]}  # no id: continues the last call
        yield {"tool_calls": [{"id": "b", "function": {"name": "echo", "arguments": '{"text": "B"}'}}]}  # new id
        yield {"tool_calls": [{"id": "a", "function": {"arguments": '"A"}'}}]}  # a known id: back to call a
        yield AssistantMessage(None, [ToolCall("a", "echo", '{"text": "A"}'), ToolCall("b", "echo", '{"text": "B"}')])


def test_stream_deltas_without_index_are_placed_by_id() -> None:
    chat = Conversation(IndexlessModel())
    chat.register(lambda text: text, name="echo")
    events: list[Event] = list(chat.stream("echo A and B"))
    calls = [e for e in events if isinstance(e, ToolCallStarted | ToolCallArgumentsDelta)]
    assert calls == [
        ToolCallStarted(0, "a", "echo"),
        ToolCallArgumentsDelta(0, "a", '{"text": '),
        ToolCallStarted(1, "b", "echo"),
        ToolCallArgumentsDelta(1, "b", '{"text": "B"}'),
        ToolCallArgumentsDelta(0, "a", '"A"}'),
    ]
    assert {e.id: e.content for e in events if isinstance(e, ToolResult)} == {"a": "A", "b": "B"}
    assert events[-1] == FinalAnswer("both echoed")


# -- the embedded engine's install hint ------------------------------------------------------------------


def test_a_broken_embedded_engine_names_no_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "functionary_agent.models.embedded", None)  # its import now fails
    with pytest.raises(ConfigurationError) as info:
        embedded_model()
    message = str(info.value)
    assert "[embedded]" not in message
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF' in message and "llama-cpp-python" in message
