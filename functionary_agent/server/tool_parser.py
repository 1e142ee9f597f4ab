"""vLLM tool parsers for the Functionary formats, thin adapters over `formats` (its parse and stream parser).

vLLM makes one parser per request. It asks `adjust_request` to set the request's structured outputs (our call
grammar as a structural tag), then feeds the output: whole to `extract_tool_calls`, or delta by delta to
`extract_tool_calls_streaming` and, at the end, `finish_streaming` (vLLM calls it on parsers that declare
`engine_based_streaming`), so text our stream parser holds back (a possible marker) is never lost.

Before any grammar exists, the request's tools pass `checks.check_tools` (the renderer runs it too, since vLLM
renders the prompt first): a tool the grammar or the parser could not handle gets an HTTP 400 that names it.

`supports_required_and_named = False` keeps vLLM from swapping in its own JSON-list output for tool_choice
required / named: those outputs are in the Functionary format too, enforced by the prompt's prefix and the grammar.

Facts from vLLM 0.32's source (`vllm/tool_parsers/abstract_tool_parser.py`, `vllm/parser/abstract_parser.py`):
`adjust_request` runs only when tool_choice is not "none" unless the composed parser class says
`always_adjust_request`; with `engine_based_streaming` the serving layer passes only the new text and also routes
tool_choice "none" through the parser (calls dropped, text kept).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from vllm.sampling_params import StructuredOutputsParams

from functionary_agent.formats import Format, StreamParser
from functionary_agent.server._settings import grammar_enabled, grammar_limits, plain_data, resolve_format
from functionary_agent.server.checks import SchemaCompiler, ToolRejected, check_tools
from functionary_agent.server.grammar import structural_tag

try:  # vLLM with its own error classes: a validation error is a 400 with OpenAI's `param`
    from vllm.exceptions import VLLMValidationError as _ValidationError
except ImportError:  # pragma: no cover - older vLLM, where a ValueError is a 400 too
    _ValidationError = ValueError

try:  # vLLM >= 0.30
    from vllm.tool_parsers import ToolParser
except ImportError:  # pragma: no cover - older vLLM
    from vllm.entrypoints.openai.tool_parsers import ToolParser
try:
    from vllm.entrypoints.generate.base.protocol import (
        DeltaFunctionCall,
        DeltaMessage,
        DeltaToolCall,
        ExtractedToolCallInformation,
        FunctionCall,
        ToolCall,
    )
except ImportError:  # pragma: no cover - older vLLM
    from vllm.entrypoints.openai.protocol import (
        DeltaFunctionCall,
        DeltaMessage,
        DeltaToolCall,
        ExtractedToolCallInformation,
        FunctionCall,
        ToolCall,
    )

logger = logging.getLogger(__name__)
_none_grammar_enabled = False


class FunctionaryToolParser(ToolParser):
    """Parses a Functionary output; the format comes from the model (see `_settings.resolve_format`)."""

    format_name: ClassVar[str | None] = None
    supports_required_and_named = False
    engine_based_streaming = True

    def __init__(self, tokenizer: Any, tools: Any = None) -> None:
        try:
            super().__init__(tokenizer, tools)
        except TypeError:  # pragma: no cover - vLLM before tools were passed to parsers
            super().__init__(tokenizer)
        self.format: Format = resolve_format(self.format_name, tokenizer)
        self._stream: StreamParser | None = None
        _let_adjust_request_see_tool_choice_none()

    # -- request ------------------------------------------------------------------------------------------------

    def adjust_request(self, request: Any) -> Any:
        """Markers can be special tokens, so keep them in the text; constrain decoding to the call grammar (a
        request without tools gets the text-only grammar of tool_choice "none")."""
        if not hasattr(request, "messages"):  # the Responses API: not ours to shape
            return request
        request.skip_special_tokens = False
        tools = request_tools(request)
        xargs = getattr(request, "vllm_xargs", None)
        constrained = grammar_enabled(xargs) and not _has_own_constraint(request)
        check_request_tools(tools, self.format, _schema_compiler() if constrained else None)
        if not constrained:
            return request
        tag = structural_tag(
            self.format, tools, request_tool_choice(request),
            parallel_tool_calls=getattr(request, "parallel_tool_calls", True) is not False,
            **grammar_limits(xargs),
        )
        request.structured_outputs = StructuredOutputsParams(structural_tag=json.dumps(tag))
        request.response_format = None
        return request

    # -- whole output -------------------------------------------------------------------------------------------

    def extract_tool_calls(self, model_output: str, request: Any) -> Any:
        tools, choice = request_tools(request), request_tool_choice(request)
        message = self.format.parse(model_output, tools=tools, tool_choice=choice)
        calls = [
            ToolCall(id=call["id"], type="function",
                     function=FunctionCall(name=call["function"]["name"], arguments=call["function"]["arguments"]))
            for call in message.get("tool_calls") or ()
        ]
        return ExtractedToolCallInformation(tools_called=bool(calls), tool_calls=calls, content=message["content"])

    # -- streamed output ----------------------------------------------------------------------------------------

    def extract_tool_calls_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int],
        current_token_ids: Sequence[int],
        delta_token_ids: Sequence[int],
        request: Any,
    ) -> Any:
        if self._stream is None:
            self._stream = self.format.stream_parser(
                tools=request_tools(request), tool_choice=request_tool_choice(request)
            )
        return self._message(self._stream.feed(delta_text))

    def finish_streaming(self) -> Any:
        if self._stream is None:
            return None
        deltas, _ = self._stream.finish()
        return self._message(deltas)

    def get_remaining_unstreamed_args(self) -> str:
        """Nothing: every argument byte is streamed as it is parsed (vLLM's own catch-up would duplicate it)."""
        return ""

    def _message(self, deltas: Sequence[Mapping[str, Any]]) -> Any:
        """Our chunk deltas as one vLLM DeltaMessage (None when there is nothing to send yet)."""
        content: list[str] = []
        calls: list[Any] = []
        for delta in deltas:
            if delta.get("content"):
                content.append(delta["content"])
            for part in delta.get("tool_calls") or ():
                calls.append(self._tool_call_delta(part))
        if not content and not calls:
            return None
        return DeltaMessage(content="".join(content) or None, tool_calls=calls)

    def _tool_call_delta(self, part: Mapping[str, Any]) -> Any:
        function = part.get("function") or {}
        index = int(part["index"])
        if part.get("id"):  # a call starts: its id, type and whole name come in one piece
            self.prev_tool_call_arr.append({"name": function.get("name", ""), "arguments": ""})
            self.streamed_args_for_tool.append("")
            self.current_tool_id = index
            return DeltaToolCall(index=index, id=part["id"], type="function",
                                 function=DeltaFunctionCall(name=function.get("name"), arguments=""))
        piece = function.get("arguments") or ""
        if index < len(self.streamed_args_for_tool):
            self.streamed_args_for_tool[index] += piece
            self.prev_tool_call_arr[index]["arguments"] = self.streamed_args_for_tool[index]
        return DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=piece))


class ToolRequestError(_ValidationError):
    """A refused tool as vLLM reports it: HTTP 400, OpenAI's error body with `param`, our message unchanged."""

    def __init__(self, error: ToolRejected) -> None:
        super().__init__(str(error))
        self.parameter: str | None = error.parameter
        self.value: Any = None

    def __str__(self) -> str:  # vLLM's own adds "(parameter=...)", which the message already names
        return str(self.args[0])


def check_request_tools(tools: Sequence[Any], fmt: Format, compile_schema: SchemaCompiler | None = None) -> None:
    """`checks.check_tools` for a request vLLM is serving: a refusal becomes its 400, before any grammar exists."""
    try:
        check_tools(tools, fmt, compile_schema)
    except ToolRejected as error:
        raise ToolRequestError(error) from None


@functools.cache
def _schema_compiler() -> SchemaCompiler | None:
    """xgrammar's JSON-schema compiler, the one vLLM's structural tags go through (None where it is missing): a
    schema it cannot compile is refused by name here, rather than by vLLM's fallback backend about no tool."""
    try:
        import xgrammar
    except ImportError:  # pragma: no cover - vLLM always brings it
        return None
    compiler: SchemaCompiler = xgrammar.Grammar.from_json_schema
    return compiler


def request_tools(request: Any) -> list[dict[str, Any]]:
    """The request's tools as OpenAI dicts (vLLM holds them as pydantic models)."""
    return [plain_data(tool) for tool in getattr(request, "tools", None) or ()]


def request_tool_choice(request: Any) -> Any:
    choice = getattr(request, "tool_choice", None)
    return "auto" if choice is None else plain_data(choice)


def _has_own_constraint(request: Any) -> bool:
    """A request that brings its own structured output keeps it; the tool grammar is not layered on top."""
    outputs = getattr(request, "structured_outputs", None)
    response_format = getattr(request, "response_format", None)
    kind = getattr(response_format, "type", None)
    return outputs is not None or kind in ("json_object", "json_schema", "structural_tag")


def _let_adjust_request_see_tool_choice_none() -> None:
    """vLLM skips `adjust_request` for tool_choice "none" unless the composed parser opts in; opt in, so that
    "none" is enforced by decoding too (free text without call markers). Only parsers of ours call this."""
    global _none_grammar_enabled
    if _none_grammar_enabled:
        return
    _none_grammar_enabled = True
    try:
        from vllm.parser.abstract_parser import DelegatingParser
    except ImportError:  # pragma: no cover - vLLM before the unified parser
        return
    if hasattr(DelegatingParser, "always_adjust_request"):
        DelegatingParser.always_adjust_request = True


class V3ToolParser(FunctionaryToolParser):
    format_name = "v3.llama3"


class V31ToolParser(FunctionaryToolParser):
    format_name = "v3-llama3.1"


class V25ToolParser(FunctionaryToolParser):
    format_name = "v2.llama3"


class V2ToolParser(FunctionaryToolParser):
    format_name = "v2"


class ChatMLV3ToolParser(FunctionaryToolParser):
    format_name = "chatml-v3"
