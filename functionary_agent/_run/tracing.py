"""Watching a run: DEBUG log lines always, OpenTelemetry spans when the user has set a tracer provider.

A run is an `invoke_agent` span with a `chat {model}` child per model request and an `execute_tool {name}` child
per call, named and tagged after the OpenTelemetry GenAI semantic conventions. Message contents, call arguments
and results are private by default: they are recorded only with `trace_content=True`. Without `opentelemetry-api`,
or with no tracer provider set, no span is made and nothing is imported beyond the check.

Parents are passed explicitly instead of through the current context: the run is an async generator, and a
context attached in one step and detached in another breaks when the consumer changes tasks. A tool span is made
current inside its own task, so spans a tool makes itself nest under it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from functionary_agent.events import ToolResult
from functionary_agent.messages import AssistantMessage, ToolCall
from functionary_agent.usage import Usage

logger = logging.getLogger("functionary_agent")
_PROVIDER = "functionary-agent"
_otel_missing = False


class SpanEnd:
    """Ends one step: it takes what the step produced (an assistant message, a tool result, the run's usage)."""

    def __init__(self, span: Any = None, content: bool = False) -> None:
        self.span, self.content = span, content

    def finish(self, outcome: AssistantMessage | ToolResult | Usage) -> None:
        if isinstance(outcome, ToolResult):
            logger.debug("call %s (id %s) %s in %.3f s", outcome.name, outcome.id,
                         "failed" if outcome.is_error else "done", outcome.duration)
        if self.span is None:
            return
        if isinstance(outcome, AssistantMessage):
            _record_message(self.span, outcome, self.content)
        elif isinstance(outcome, ToolResult):
            _record_result(self.span, outcome, self.content)
        else:
            self.span.set_attributes(_usage_attributes(outcome))


class RunTracer:
    """The spans and log lines of one run; every method is cheap when tracing is off."""

    def __init__(self, model: str, *, content: bool = False) -> None:
        self.model, self.content = model, content
        self._tracer = _otel_tracer()
        self._run: Any = None
        self._parent_context: Any = None

    @contextmanager
    def run_span(self) -> Iterator[SpanEnd]:
        logger.debug("run starts with model %s", self.model)
        if self._tracer is None:
            yield SpanEnd()
            return
        from opentelemetry import trace

        self._run = self._tracer.start_span(
            "invoke_agent functionary-agent", attributes=_attributes("invoke_agent", self.model)
        )
        self._parent_context = trace.set_span_in_context(self._run)
        with _ending(self._run):
            yield SpanEnd(self._run)

    @contextmanager
    def request_span(self, messages: Sequence[Mapping[str, Any]], tool_choice: Any) -> Iterator[SpanEnd]:
        logger.debug("request to %s: %d messages, tool_choice=%s", self.model, len(messages), tool_choice)
        if self._tracer is None:
            yield SpanEnd()
            return
        from opentelemetry import trace

        attributes = _attributes("chat", self.model)
        if self.content:
            attributes["gen_ai.input.messages"] = json.dumps(list(messages), ensure_ascii=False, default=str)
        span = self._tracer.start_span(
            f"chat {self.model}", self._parent(), kind=trace.SpanKind.CLIENT, attributes=attributes
        )
        with _ending(span):
            yield SpanEnd(span, self.content)

    @contextmanager
    def tool_span(self, call: ToolCall) -> Iterator[SpanEnd]:
        """Call inside the call's own task: the span is current there."""
        logger.debug("call %s %s (id %s)", call.name, call.arguments, call.id)
        if self._tracer is None:
            yield SpanEnd()
            return
        from opentelemetry import trace

        attributes = {**_attributes("execute_tool", self.model), "gen_ai.tool.name": call.name,
                      "gen_ai.tool.call.id": call.id, "gen_ai.tool.type": "function"}
        if self.content:
            attributes["gen_ai.tool.call.arguments"] = call.arguments
        span = self._tracer.start_span(f"execute_tool {call.name}", self._parent(), attributes=attributes)
        with _ending(span), trace.use_span(span, end_on_exit=False):
            yield SpanEnd(span, self.content)

    def _parent(self) -> Any:
        return self._parent_context


def model_label(model: object) -> str:
    """The model's name for traces and logs: its `model` (server model id) or file name, else its class."""
    name = getattr(model, "model", None) or getattr(model, "model_path", None)
    return str(getattr(name, "name", name)) if name else type(model).__name__


@contextmanager
def _ending(span: Any) -> Iterator[None]:
    """End `span` when the block ends; an exception (cancellation included) marks it failed."""
    from opentelemetry.trace import Status, StatusCode

    try:
        yield
    except BaseException as exc:
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.set_attribute("error.type", type(exc).__qualname__)
        raise
    finally:
        span.end()


def _otel_tracer() -> Any:
    """A tracer when opentelemetry-api is installed and a real provider is set, else None."""
    global _otel_missing
    if _otel_missing:
        return None
    try:
        from opentelemetry import trace
    except ImportError:
        _otel_missing = True  # looked for once per process, not once per run
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return provider.get_tracer("functionary_agent")


def _attributes(operation: str, model: str) -> dict[str, Any]:
    return {"gen_ai.operation.name": operation, "gen_ai.provider.name": _PROVIDER, "gen_ai.request.model": model}


def _usage_attributes(usage: Usage | Mapping[str, Any]) -> dict[str, int]:
    if isinstance(usage, Usage):
        return {"gen_ai.usage.input_tokens": usage.prompt_tokens, "gen_ai.usage.output_tokens": usage.completion_tokens}
    single = Usage()
    single.add_response(usage)
    return _usage_attributes(single)


def _record_message(span: Any, message: AssistantMessage, content: bool) -> None:
    span.set_attributes(_usage_attributes(message.usage or {}))
    if message.finish_reason:
        span.set_attribute("gen_ai.response.finish_reasons", [message.finish_reason])
    if content:
        span.set_attribute("gen_ai.output.messages", json.dumps([message.to_dict()], ensure_ascii=False))


def _record_result(span: Any, result: ToolResult, content: bool) -> None:
    from opentelemetry.trace import Status, StatusCode

    if content:
        span.set_attribute("gen_ai.tool.call.result", result.content)
    if result.is_error:
        span.set_status(Status(StatusCode.ERROR, result.content[:200]))
        span.set_attribute("error.type", "tool_error")
