"""The one seam every engine plugs into: OpenAI chat dicts in, one assistant message (or its deltas) out.

Engines implement `acomplete` or `astream` (or both); the other is derived. Streams yield OpenAI-style chunk
deltas in their clean form (a call's first delta carries index, id, type, name and `arguments: ""`; later ones
only index and arguments) and end with the whole `AssistantMessage`, so consumers never re-assemble anything.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from functionary_agent import _sync
from functionary_agent._openai_messages import new_call_id

ToolChoice = Literal["auto", "none", "required"] | Mapping[str, Any]
Delta = dict[str, Any]


@dataclass
class ToolCall:
    """One call as the model emitted it; `arguments` is its JSON text, kept even when it is not valid JSON."""

    id: str
    name: str
    arguments: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToolCall:
        """Tolerant of what servers and people write: the OpenAI shape or a flat {"name", "arguments"},
        arguments as a dict or null, a missing id."""
        nested = data.get("function")
        function: Mapping[str, Any] = nested if isinstance(nested, Mapping) else data
        return cls(
            id=str(data.get("id") or new_call_id()),
            name=str(function.get("name") or ""),
            arguments=arguments_text(function.get("arguments")),
        )


def arguments_text(arguments: Any) -> str:
    """Arguments as JSON text; servers sometimes send a dict or null instead of a string."""
    if arguments is None:
        return ""
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


@dataclass
class AssistantMessage:
    """One assistant turn. Whether the loop goes on is decided by `tool_calls`, never by `finish_reason`."""

    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.to_dict() for call in self.tool_calls]
        return message

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AssistantMessage:
        calls = [c if isinstance(c, ToolCall) else ToolCall.from_dict(c) for c in data.get("tool_calls") or ()]
        usage = data.get("usage")
        usage = dict(usage) if isinstance(usage, Mapping) else None
        return cls(data.get("content"), calls, data.get("finish_reason"), usage)


StreamItem = Delta | AssistantMessage
CHARS_PER_TOKEN = 3


def estimate_tokens(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = ()) -> int:
    """A cautious token count for engines without a tokenizer: one token per `CHARS_PER_TOKEN` characters of JSON."""
    text = json.dumps([list(messages), list(tools)], ensure_ascii=False, default=str)
    return -(-len(text) // CHARS_PER_TOKEN)


def stream_call_index(open_calls: Mapping[int, str | None], call_id: str | None) -> int:
    """Where a streamed tool-call delta without `index` belongs (some servers omit it), given the ids of the
    calls opened so far by index: a known id continues its call, a new id opens one, no id continues the last."""
    for index, known_id in open_calls.items():
        if call_id is not None and known_id == call_id:
            return index
    return len(open_calls) if call_id is not None or not open_calls else max(open_calls)


class DeltaAccumulator:
    """Clean deltas -> the finished message; the one place streams are assembled."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._calls: dict[int, ToolCall] = {}

    def add(self, delta: Mapping[str, Any]) -> None:
        if delta.get("content"):
            self._text.append(delta["content"])
        for part in delta.get("tool_calls") or ():
            index = part.get("index")
            if index is None:
                index = stream_call_index({i: c.id for i, c in self._calls.items()}, part.get("id") or None)
            call = self._calls.get(index)
            function = part.get("function") or {}
            if call is None:
                call = self._calls[index] = ToolCall(part.get("id") or new_call_id(), function.get("name", ""))
            call.arguments += function.get("arguments") or ""

    def message(self, finish_reason: str | None = None) -> AssistantMessage:
        calls = [self._calls[index] for index in sorted(self._calls)]
        content = "".join(self._text) or None
        return AssistantMessage(content, calls, finish_reason or ("tool_calls" if calls else "stop"))


def message_deltas(message: AssistantMessage, chunk_size: int | None = None) -> Iterator[Delta]:
    """The clean deltas of a finished message, text and arguments cut into `chunk_size` pieces."""

    def pieces(text: str) -> Iterator[str]:
        step = chunk_size or max(len(text), 1)
        for start in range(0, len(text), step):
            yield text[start : start + step]

    for piece in pieces(message.content or ""):
        yield {"content": piece}
    for index, call in enumerate(message.tool_calls):
        head = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        yield {"tool_calls": [head]}
        for piece in pieces(call.arguments):
            yield {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}


class ChatModel:
    """Base of every engine: override `acomplete`, `astream`, or both; the sync twins run them for you."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.acomplete is ChatModel.acomplete and cls.astream is ChatModel.astream:
            raise TypeError(f"{cls.__name__} must override acomplete or astream")

    async def acomplete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] = (),
        tool_choice: ToolChoice = "auto",
        **settings: Any,
    ) -> AssistantMessage:
        """One assistant message for the chat so far."""
        final: AssistantMessage | None = None
        async for item in self.astream(messages, tools=tools, tool_choice=tool_choice, **settings):
            if isinstance(item, AssistantMessage):
                final = item
        if final is None:
            raise RuntimeError(f"{type(self).__name__}.astream ended without an AssistantMessage")
        return final

    async def astream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] = (),
        tool_choice: ToolChoice = "auto",
        **settings: Any,
    ) -> AsyncIterator[StreamItem]:
        """Clean deltas, then the finished `AssistantMessage` as the last item."""
        message = await self.acomplete(messages, tools=tools, tool_choice=tool_choice, **settings)
        for delta in message_deltas(message):
            yield delta
        yield message

    def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] = (),
        tool_choice: ToolChoice = "auto",
        **settings: Any,
    ) -> AssistantMessage:
        return _sync.run(self.acomplete(messages, tools=tools, tool_choice=tool_choice, **settings))

    def stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] = (),
        tool_choice: ToolChoice = "auto",
        **settings: Any,
    ) -> Iterator[StreamItem]:
        return _sync.iterate(self.astream(messages, tools=tools, tool_choice=tool_choice, **settings))

    async def acontext_window(self) -> int | None:
        """How many tokens the model's context holds (prompt and answer together), or None when unknown; the
        conversation trims requests to fit only when it knows."""
        return None

    async def acount_tokens(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = ()
    ) -> int:
        """How many tokens the prompt of this request takes. Engines with a tokenizer count exactly; this default
        estimates one token per `CHARS_PER_TOKEN` characters of the request's JSON, a cautious figure for English
        and code under the usual BPE tokenizers (more tokens than that per character is rare)."""
        return estimate_tokens(messages, tools)

    async def aclose(self) -> None:
        """Release connections or engines; the default holds none."""
