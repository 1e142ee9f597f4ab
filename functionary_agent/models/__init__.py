"""Engines behind one interface (`ChatModel`); heavy ones are imported only when used."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from functionary_agent.models.base import AssistantMessage, ChatModel, ToolCall

if TYPE_CHECKING:
    from functionary_agent.models.openai_compatible import OpenAICompatibleModel

__all__ = ["AssistantMessage", "ChatModel", "OpenAICompatibleModel", "ToolCall"]


def __getattr__(name: str) -> Any:
    if name == "OpenAICompatibleModel":  # importing `openai` costs ~0.3 s; pay it only when used
        from functionary_agent.models.openai_compatible import OpenAICompatibleModel

        return OpenAICompatibleModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
