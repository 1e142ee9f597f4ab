"""The one seam every engine plugs into: OpenAI chat dicts in, one assistant message (or its deltas) out.

Engines implement `acomplete` or `astream` (or both); the other is derived. Streams yield OpenAI-style chunk
deltas in their clean form (a call's first delta carries index, id, type, name and `arguments: ""`; later ones
only index and arguments) and end with the whole `AssistantMessage`, so consumers never re-assemble anything.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

from functionary_agent import _sync
from functionary_agent._openai_messages import new_call_id
from functionary_agent.messages import AssistantMessage, ToolCall, ToolChoice

Delta = dict[str, Any]


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
            if index is None:  # engines assemble raw server deltas here, before the seam places them
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


def _indexed_stream(astream: Callable[..., AsyncIterator[StreamItem]]) -> Callable[..., AsyncIterator[StreamItem]]:
    """An engine's `astream` whose tool-call deltas always carry their `index`: the stream contract, kept here at
    the seam once for every engine (some servers, and hand-written engines, leave it out)."""

    @functools.wraps(astream)
    async def indexed(self: ChatModel, *args: Any, **kwargs: Any) -> AsyncIterator[StreamItem]:
        open_calls: dict[int, str | None] = {}
        async for item in astream(self, *args, **kwargs):
            if not isinstance(item, AssistantMessage) and item.get("tool_calls"):
                item = {**item, "tool_calls": [_placed(part, open_calls) for part in item["tool_calls"]]}
            yield item

    indexed._indexed = True  # type: ignore[attr-defined]
    return indexed


def _placed(part: Mapping[str, Any], open_calls: dict[int, str | None]) -> dict[str, Any]:
    """A tool-call delta with its index (placed by `stream_call_index` when missing); records the calls opened."""
    index = part.get("index")
    if index is None:
        index = stream_call_index(open_calls, part.get("id") or None)
    if index not in open_calls:
        open_calls[index] = part.get("id") or None
    return {**part, "index": index}


class ChatModel:
    """Base of every engine: override `acomplete`, `astream`, or both; the sync twins run them for you."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.acomplete is ChatModel.acomplete and cls.astream is ChatModel.astream:
            raise TypeError(f"{cls.__name__} must override acomplete or astream")
        own = cls.__dict__.get("astream")
        if own is not None and not getattr(own, "_indexed", False):
            cls.astream = _indexed_stream(own)  # type: ignore[method-assign]

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
        """`acomplete` from sync code (a script, a notebook cell); it runs on the package's background event loop.

        Args:
            messages: The chat so far, as OpenAI chat dicts.
            tools: The OpenAI tool dicts the model may call.
            tool_choice: Whether the model may, must or must not call a tool (see `ToolChoice`).
            **settings: Sampling settings for this request (`temperature`, `max_tokens`, ...).

        Returns:
            The assistant message.

        Raises:
            RuntimeError: It was called from inside the package's own event loop (await `acomplete` there).
        """
        return _sync.run(self.acomplete(messages, tools=tools, tool_choice=tool_choice, **settings))

    def stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] = (),
        tool_choice: ToolChoice = "auto",
        **settings: Any,
    ) -> Iterator[StreamItem]:
        """`astream` from sync code: the clean deltas, then the finished `AssistantMessage` as the last item.
        Leaving the loop early closes the stream.

        Args:
            messages: The chat so far, as OpenAI chat dicts.
            tools: The OpenAI tool dicts the model may call.
            tool_choice: Whether the model may, must or must not call a tool (see `ToolChoice`).
            **settings: Sampling settings for this request (`temperature`, `max_tokens`, ...).

        Returns:
            An iterator of delta dicts, ending with the `AssistantMessage`.

        Raises:
            RuntimeError: It was iterated inside the package's own event loop (iterate `astream` there).
        """
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
