"""The context budget: what of the conversation a request sends, so it fits the model's context window.

`chat.messages` always keeps everything (and so does a save); only the request is trimmed. First the user's
`history` hook, if any, picks the messages; then, when the engine knows its context window (the embedded engine's
`n_ctx`, a vLLM server's `max_model_len`, or `context_window=`), tool results are elided oldest first until the
prompt fits with room for the answer, then the text of long earlier answers. The results the model is about to
read (the trailing ones) go last: they are shortened head and tail, never dropped. A call and its result are never
separated: an elided result keeps its tool message, with a marker the model can read. What still does not fit is
a clear `ModelError`.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from functionary_agent._text import head_and_tail
from functionary_agent.errors import ModelError
from functionary_agent.models.base import ChatModel

Messages = list[dict[str, Any]]
HistoryHook = Callable[[Messages], "Messages | Awaitable[Messages]"]
_ANSWER_ROOM_CAP = 1024  # tokens kept for the answer when the request sets no max_tokens (at most a quarter)
_SHORTEST = 200  # a trailing result is not shortened below this many characters


def elided_marker(message: Mapping[str, Any]) -> str:
    size = len(str(message.get("content") or ""))
    what = f"result of {message.get('name') or 'a tool'}" if message.get("role") == "tool" else "answer"
    return f"[earlier {what} elided to fit the context window: {size} characters]"


@dataclass
class ContextBudget:
    """Fits each request to the model's context window; `context_window` overrides what the engine reports."""

    model: ChatModel
    context_window: int | None = None
    history: HistoryHook | None = None

    async def fit(
        self, messages: Messages, tools: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]
    ) -> Messages:
        """The messages to send for this request; `messages` itself is never changed."""
        if self.history is not None:
            messages = await self._apply_hook(messages)
        window = self.context_window or await self.model.acontext_window()
        if window is None:
            return messages
        budget = window - _answer_room(window, settings)
        count = await self.model.acount_tokens(messages, tools)
        if count <= budget:
            return messages
        trimmed = [dict(message) for message in messages]
        count = await self._elide_earlier(trimmed, tools, budget, count)
        count = await self._shorten_trailing(trimmed, tools, budget, count)
        if count > budget:
            raise ModelError(
                f"the request needs {count} tokens but the context holds {window} ({window - budget} kept for the "
                "answer), even with earlier tool results elided; pass a larger context (n_ctx=, a server with a "
                "longer max_model_len), a `history=` hook that drops old turns, or start a new conversation"
            )
        return trimmed

    async def _elide_earlier(
        self, messages: Messages, tools: Sequence[Mapping[str, Any]], budget: int, count: int
    ) -> int:
        """Replace earlier contents with a marker until the prompt fits: tool results before the trailing ones,
        oldest first, then the text of answers before the last user message (their calls stay)."""
        for index in _elidable(messages):
            if count <= budget:
                break
            messages[index]["content"] = elided_marker(messages[index])
            count = await self.model.acount_tokens(messages, tools)
        return count

    async def _shorten_trailing(
        self, messages: Messages, tools: Sequence[Mapping[str, Any]], budget: int, count: int
    ) -> int:
        """Halve the longest trailing result (head and tail kept) until the prompt fits or all are short."""
        trailing = range(_trailing_start(messages), len(messages))
        while count > budget:
            longest = max(trailing, key=lambda i: len(str(messages[i].get("content") or "")), default=None)
            text = str(messages[longest].get("content") or "") if longest is not None else ""
            if longest is None or len(text) <= _SHORTEST:
                break
            messages[longest]["content"] = head_and_tail(text, max(len(text) // 2, _SHORTEST))
            count = await self.model.acount_tokens(messages, tools)
        return count

    async def _apply_hook(self, messages: Messages) -> Messages:
        assert self.history is not None
        name = getattr(self.history, "__qualname__", None) or repr(self.history)
        try:
            picked = self.history([dict(message) for message in messages])
            if inspect.isawaitable(picked):
                picked = await picked
        except Exception as exc:
            raise ModelError(f"the history hook {name} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(picked, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in picked
        ):
            raise ModelError(
                f"the history hook {name} must return a list of message dicts with a 'role', got "
                f"{type(picked).__name__}"
            )
        return picked


def _answer_room(window: int, settings: Mapping[str, Any]) -> int:
    asked = settings.get("max_tokens") or settings.get("max_completion_tokens")
    room = int(asked) if isinstance(asked, int) and asked > 0 else _ANSWER_ROOM_CAP
    return min(room, window // 4)


def _elidable(messages: Messages) -> list[int]:
    trailing = _trailing_start(messages)
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=0)
    results = [i for i in range(trailing) if messages[i].get("role") == "tool"]
    answers = [
        i for i in range(last_user)
        if messages[i].get("role") == "assistant" and isinstance(messages[i].get("content"), str)
        and len(messages[i]["content"]) > _SHORTEST
    ]
    return results + answers


def _trailing_start(messages: Messages) -> int:
    """Where the trailing tool results (the ones the model reads now) begin; len(messages) when there are none."""
    start = len(messages)
    while start > 0 and messages[start - 1].get("role") == "tool":
        start -= 1
    return start
