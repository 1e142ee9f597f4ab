"""How each item's conversation is made: `BatchSettings`, plain data that a Ray worker unpickles by this module's
path (`functionary_agent.batch.settings.BatchSettings`, re-exported as `functionary_agent.batch.BatchSettings`), and
`ConversationFactory`, the function a run may take instead."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field

from functionary_agent.conversation import Conversation
from functionary_agent.errors import ConfigurationError, ToolDefinitionError
from functionary_agent.integrations.tool_files import answer_type_names, load_tools
from functionary_agent.models import ChatModel, check_model_choice, resolve_model
from functionary_agent.tools import Tool

ConversationFactory = Callable[[], Conversation]


@dataclass(frozen=True)
class BatchSettings:
    """How each item's conversation is made, as plain data (so Ray workers can make the same ones): tools files or
    modules as `--tools` takes them, the server (`base_url`, else `FUNCTIONARY_BASE_URL`, else the embedded
    engine), `model` (a name on the server, or a GGUF file), `format` (of a GGUF), `system`, `max_turns`.
    Every conversation of a run shares one model object (one connection pool; the embedded engine serialises
    its turns by itself)."""

    tools: tuple[str, ...] = ()
    base_url: str | None = None
    model: str | None = None
    format: str | None = None
    system: str | None = None
    max_turns: int = 10
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        tools = (self.tools,) if isinstance(self.tools, str) else tuple(self.tools)
        object.__setattr__(self, "tools", tools)  # a list or one name given: still a tuple of names

    def resolved(self) -> BatchSettings:
        """These settings with the server, model name and key filled in from `FUNCTIONARY_BASE_URL`,
        `FUNCTIONARY_MODEL` and `FUNCTIONARY_API_KEY` here, for workers whose environment may lack them."""
        base_url = self._base_url()
        if not base_url:
            return self
        return dataclasses.replace(
            self, base_url=base_url, model=self.model or os.environ.get("FUNCTIONARY_MODEL") or None,
            api_key=self.api_key or os.environ.get("FUNCTIONARY_API_KEY") or None,
        )

    def load_tools(self) -> list[Tool]:
        """The tools of every file or module named (a file that defines only types to answer in gives none);
        `ConfigurationError` / `ToolDefinitionError` as `--tools`."""
        return [tool for spec in self.tools for tool in load_tools(spec, types_file_ok=True)]

    def check(self, output_types: Collection[str] = ()) -> None:
        """Refuse settings that cannot work before any item runs: tools that do not load or share a name, a tools
        file that defines neither tools nor one of the `output_types` (the type names items answer in), an
        engine choice that cannot work (`check_model_choice`: a model name with no server, a format for a server),
        max_turns below 1."""
        if self.max_turns < 1:
            raise ConfigurationError(f"max_turns must be at least 1, got {self.max_turns}")
        check_model_choice(self.model, base_url=self._base_url(), format=self.format)  # as Conversation and the CLI
        names = [tool.name for spec in self.tools for tool in _tools_or_types(spec, output_types)]
        clashes = sorted({name for name in names if names.count(name) > 1})
        if clashes:
            raise ToolDefinitionError(f"more than one tool is named {', '.join(clashes)}; rename all but one")

    @contextlib.asynccontextmanager
    async def conversations(self) -> AsyncIterator[ConversationFactory]:
        """A factory of fresh conversations over one shared model, closed when the block ends."""
        tools = self.load_tools()
        model, owned = self._model()
        try:
            yield lambda: Conversation(model, tools=tools, system=self.system, max_turns=self.max_turns)
        finally:
            if owned:
                await model.aclose()

    def _base_url(self) -> str | None:
        return self.base_url or os.environ.get("FUNCTIONARY_BASE_URL") or None

    def _model(self) -> tuple[ChatModel, bool]:
        return resolve_model(self.model, base_url=self._base_url(), api_key=self.api_key, format=self.format)


def _tools_or_types(spec: str, output_types: Collection[str]) -> list[Tool]:
    """The tools of `spec`; none for a file of types only that the items use (one they do not use is refused)."""
    tools = load_tools(spec, types_file_ok=True)
    defined = answer_type_names(spec) if not tools else []
    if not tools and not set(defined) & set(output_types):
        raise ToolDefinitionError(
            f"{spec} defines no public functions and no @tool functions, only types ({', '.join(defined)}) that no "
            'item names as its "output_type"'
        )
    return tools
