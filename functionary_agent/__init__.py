"""functionary-agent: Python functions become tools; a Conversation runs the tool loop against a model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from functionary_agent.conversation import Conversation
from functionary_agent.errors import (
    ConfigurationError,
    FunctionaryAgentError,
    MaxTurnsExceeded,
    ModelError,
    ToolDefinitionError,
)
from functionary_agent.models.base import AssistantMessage, ChatModel, ToolCall
from functionary_agent.tools import Tool, tool

if TYPE_CHECKING:
    from functionary_agent.models.openai_compatible import OpenAICompatibleModel

__all__ = [
    "AssistantMessage",
    "ChatModel",
    "ConfigurationError",
    "Conversation",
    "FunctionaryAgentError",
    "MaxTurnsExceeded",
    "ModelError",
    "OpenAICompatibleModel",
    "Tool",
    "ToolCall",
    "ToolDefinitionError",
    "tool",
]


def __getattr__(name: str) -> Any:
    if name == "OpenAICompatibleModel":  # `openai` is slow to import; load it when first used
        from functionary_agent.models.openai_compatible import OpenAICompatibleModel

        return OpenAICompatibleModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
