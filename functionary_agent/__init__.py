"""functionary-agent: Python functions become tools; a Conversation runs the tool loop against a model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from functionary_agent.conversation import Conversation
from functionary_agent.errors import (
    ApprovalRequired,
    CloseError,
    ConfigurationError,
    ConversationBusyError,
    FunctionaryAgentError,
    LimitExceeded,
    MaxTurnsExceeded,
    ModelError,
    OutputValidationError,
    ToolDefinitionError,
    UsageLimitExceeded,
)
from functionary_agent.models.base import AssistantMessage, ChatModel, ToolCall
from functionary_agent.run_context import RunContext
from functionary_agent.tools import Tool, tool
from functionary_agent.usage import Limits, Usage

if TYPE_CHECKING:
    from functionary_agent.models.embedded import EmbeddedModel
    from functionary_agent.models.openai_compatible import OpenAICompatibleModel

__all__ = [
    "ApprovalRequired",
    "AssistantMessage",
    "ChatModel",
    "CloseError",
    "ConfigurationError",
    "Conversation",
    "ConversationBusyError",
    "EmbeddedModel",
    "FunctionaryAgentError",
    "LimitExceeded",
    "Limits",
    "MaxTurnsExceeded",
    "ModelError",
    "OpenAICompatibleModel",
    "OutputValidationError",
    "RunContext",
    "Tool",
    "ToolCall",
    "ToolDefinitionError",
    "Usage",
    "UsageLimitExceeded",
    "tool",
]


def __getattr__(name: str) -> Any:
    if name in ("OpenAICompatibleModel", "EmbeddedModel"):  # heavy engines load when first used
        from functionary_agent import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
