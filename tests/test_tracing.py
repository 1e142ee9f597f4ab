"""Tracing with the real OpenTelemetry SDK (in-memory exporter) and DEBUG logging."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from functionary_agent import Conversation, ModelError
from functionary_agent.testing import ScriptedModel, call

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The process-wide provider is set once (OpenTelemetry allows no second one); each test reads its own spans."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def weather(city: str) -> str:
    """The weather in a city."""
    with trace.get_tracer("user-code").start_as_current_span("user lookup"):
        return f"{city}: sunny"


def broken(city: str) -> str:
    """Always fails."""
    raise RuntimeError("backend down")


def _two_calls_one_failure() -> ScriptedModel:
    usage = {"prompt_tokens": 40, "completion_tokens": 12}
    return ScriptedModel([
        {"tool_calls": [call("weather", {"city": "Oslo"}, id="call_a"), call("broken", {"city": "Rome"}, id="call_b")],
         "usage": usage},
        {"content": "Oslo is sunny; Rome is unknown.", "usage": {"prompt_tokens": 90, "completion_tokens": 8}},
    ])


def by_name(finished: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in finished}


def test_a_run_is_a_span_tree_after_the_genai_conventions(spans: InMemorySpanExporter) -> None:
    chat = Conversation(_two_calls_one_failure(), tools=[weather, broken])
    chat.submit("Weather in Oslo and Rome?")
    finished = spans.get_finished_spans()
    named = by_name(finished)
    run = named["invoke_agent functionary-agent"]
    chats = [span for span in finished if span.name == "chat ScriptedModel"]
    ok, failed = named["execute_tool weather"], named["execute_tool broken"]
    assert run.parent is None
    assert len(chats) == 2 and all(span.parent.span_id == run.context.span_id for span in chats)
    assert ok.parent.span_id == run.context.span_id and failed.parent.span_id == run.context.span_id
    assert named["user lookup"].parent.span_id == ok.context.span_id  # a tool's own spans nest under its call
    assert {span.context.trace_id for span in finished} == {run.context.trace_id}

    assert chats[0].attributes["gen_ai.operation.name"] == "chat"
    assert chats[0].attributes["gen_ai.request.model"] == "ScriptedModel"
    assert chats[0].attributes["gen_ai.usage.input_tokens"] == 40
    assert chats[0].attributes["gen_ai.usage.output_tokens"] == 12
    assert chats[0].kind == trace.SpanKind.CLIENT
    assert ok.attributes["gen_ai.operation.name"] == "execute_tool"
    assert (ok.attributes["gen_ai.tool.name"], ok.attributes["gen_ai.tool.call.id"]) == ("weather", "call_a")
    assert ok.status.status_code == StatusCode.UNSET
    assert failed.status.status_code == StatusCode.ERROR and "backend down" in failed.status.description
    assert run.attributes["gen_ai.usage.input_tokens"] == 130 and run.attributes["gen_ai.usage.output_tokens"] == 20
    assert run.status.status_code == StatusCode.UNSET


def test_contents_are_private_unless_the_user_opts_in(spans: InMemorySpanExporter) -> None:
    Conversation(_two_calls_one_failure(), tools=[weather, broken]).submit("secret question")
    recorded = json.dumps([dict(span.attributes) for span in spans.get_finished_spans()])
    assert "secret question" not in recorded and "Oslo" not in recorded
    spans.clear()

    Conversation(_two_calls_one_failure(), tools=[weather, broken], trace_content=True).submit("secret question")
    named = by_name(spans.get_finished_spans())
    first_chat = next(s for s in spans.get_finished_spans() if s.name.startswith("chat"))
    assert "secret question" in first_chat.attributes["gen_ai.input.messages"]
    assert named["execute_tool weather"].attributes["gen_ai.tool.call.arguments"] == '{"city": "Oslo"}'
    assert named["execute_tool weather"].attributes["gen_ai.tool.call.result"] == "Oslo: sunny"


def test_a_failed_run_marks_its_span_and_streams_trace_the_same(spans: InMemorySpanExporter) -> None:
    chat = Conversation(ScriptedModel([{"tool_calls": [call("weather", {"city": "Oslo"})]}]), tools=[weather])
    with pytest.raises(ModelError):
        list(chat.stream("Oslo?"))  # the script has no second reply
    named = by_name(spans.get_finished_spans())
    assert named["invoke_agent functionary-agent"].status.status_code == StatusCode.ERROR
    assert "execute_tool weather" in named


def test_requests_and_calls_are_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="functionary_agent"):
        Conversation(_two_calls_one_failure(), tools=[weather, broken]).submit("Go")
    lines = [record.getMessage() for record in caplog.records if record.name == "functionary_agent"]
    assert any(line.startswith("request to ScriptedModel: 1 messages") for line in lines)
    assert any(line.startswith("call broken (id call_b) failed") for line in lines)


def test_no_tracing_and_no_logging_by_default() -> None:
    script = """
import logging, sys
from functionary_agent import Conversation
from functionary_agent.testing import ScriptedModel, call
def weather(city: str) -> str:
    return city
chat = Conversation(ScriptedModel([{"tool_calls": [call("weather", {"city": "Oslo"})]}, "ok"]), tools=[weather])
print(chat.submit("Go"), "opentelemetry.sdk" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["ok", "False"] and done.stderr == ""


