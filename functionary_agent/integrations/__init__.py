"""Tool sources: tools that come from elsewhere, behind one seam.

A `ToolSource` is anything with `tools` (a list of `Tool`) and `aclose()`: an MCP server's session
(`integrations.mcp`), an OpenAPI service's client (`integrations.openapi`). `Conversation.aregister_source` takes
any of them and closes it with the conversation; `open_mcp` and `open_openapi` make the two built in. Python files
of tools (`integrations.tool_files`, the CLI's `--tools`) hold nothing to close and give plain lists.

Each integration imports its optional dependencies itself, so `import functionary_agent` never pays for them; a
missing one is a `ConfigurationError` naming the extra that installs it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from functionary_agent.errors import ConfigurationError

if TYPE_CHECKING:
    from functionary_agent.tools import Tool


__all__ = ["ToolSource", "open_mcp", "open_openapi"]


class ToolSource(Protocol):
    """Tools from elsewhere, and the connection behind them."""

    @property
    def tools(self) -> Sequence[Tool]:
        """The tools this source offers, ready to register on a conversation."""
        ...

    async def aclose(self) -> None:
        """Close the connection behind the tools (a session, a server process, an HTTP client); it is safe to
        call more than once."""
        ...


async def open_mcp(command: Sequence[str] | str | None = None, **options: Any) -> ToolSource:
    """An MCP server's session (`command=[...]` over stdio, or `url=...`); see `mcp.MCPConnection.open`."""
    try:
        from functionary_agent.integrations.mcp import MCPConnection
    except ImportError as exc:
        raise _missing(exc, "mcp") from None
    return await MCPConnection.open(command, **options)


async def open_openapi(spec: Mapping[str, Any] | str | os.PathLike[str], **options: Any) -> ToolSource:
    """An OpenAPI service's operations as tools; see `openapi.openapi_tools`."""
    try:
        from functionary_agent.integrations.openapi import openapi_tools
    except ImportError as exc:
        raise _missing(exc, "openapi") from None
    return await openapi_tools(spec, **options)


def _missing(exc: ImportError, extra: str) -> ConfigurationError:
    return ConfigurationError(f"{exc}; install it with: pip install 'functionary-agent[{extra}]'")
