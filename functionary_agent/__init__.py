"""functionary-agent: Python functions become tools; a Conversation runs the tool loop against a model."""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any

from functionary_agent._run.approvals import PendingCall
from functionary_agent._run.state import RunEnd
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
from functionary_agent.messages import AssistantMessage, ToolCall
from functionary_agent.models.base import ChatModel
from functionary_agent.run_context import RunContext
from functionary_agent.tools import Tool, tool
from functionary_agent.usage import Limits, Usage

if TYPE_CHECKING:
    from functionary_agent.models.embedded import EmbeddedModel
    from functionary_agent.models.openai_compatible import OpenAICompatibleModel

    __version__: str

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
    "PendingCall",
    "RunContext",
    "RunEnd",
    "Tool",
    "ToolCall",
    "ToolDefinitionError",
    "Usage",
    "UsageLimitExceeded",
    "tool",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":  # read from the installed package's metadata when asked, not at every import
        return _package_version()
    if name in ("OpenAICompatibleModel", "EmbeddedModel"):  # heavy engines load when first used
        from functionary_agent import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _package_version() -> str:
    """The installed distribution's version (pyproject.toml is its one source); "0+unknown" in a source tree that
    was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("functionary-agent")
    except PackageNotFoundError:
        return "0+unknown"


if "IPython" in sys.modules:  # inside IPython (Jupyter): the notebook front end shows runs as they happen
    import functionary_agent.notebook  # noqa: F401  (registers its display hook with the core)
