"""MCP tool servers as tools: the server's tools, with the schemas it gives, called through one MCP session.

The SDK's transports and `ClientSession` are anyio context managers whose cancel scopes must be exited by the task
that entered them. So one long-lived task owns them: it enters, reports ready, waits for `aclose()`, then exits
them in order (for stdio the SDK then closes the server's stdin and, if it lingers, terminates it). Calls from any
other task only send requests through the session; calls from another event loop (a notebook cell's loop while
the connection lives on the sync wrappers' loop) are handed to the loop that owns the session.

Faults of a call reach the model as tool errors: a result with `isError` raises `MCPToolError` with the server's
text, a protocol or transport failure raises `MCPServerError`, and `Tool.run` turns either into "Error: ...".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, TextIO, TypeVar

from functionary_agent.errors import ConfigurationError
from functionary_agent.integrations._http_guard import Origin, RequestGuard
from functionary_agent.integrations._shared import has_stopped, on_loop
from functionary_agent.tools import Tool, unique_tool_name

try:
    import anyio
    import mcp
    from mcp import ClientSession, StdioServerParameters, stdio_client
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "MCP tools need the official MCP SDK: pip install 'functionary-agent[mcp]'"
    ) from exc

__all__ = ["MCPConnection", "MCPServerError", "MCPToolError"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Streams = Sequence[Any]  # (read_stream, write_stream[, get_session_id]) depending on the SDK version


class MCPToolError(Exception):
    """The server ran the tool and reported failure (`isError`); the message is the server's text."""


class MCPServerError(Exception):
    """The server could not be asked: a protocol error, a lost connection, a closed session. Such a fault may pass,
    so the conversation lets the model retry an identical call (`transient`)."""

    transient = True


class MCPConnection:
    """One MCP server, connected, with its tools as `Tool` objects; `await aclose()` ends the session.

    Open one with `await MCPConnection.open(command=[...])` (stdio) or `await MCPConnection.open(url=...)`
    (streamable HTTP). It is also an async context manager.
    """

    def __init__(self, label: str, *, startup_timeout: float, call_timeout: float | None, prefix: str) -> None:
        self.label = label
        self.server_name: str | None = None
        self.tools: list[Tool] = []
        self._startup_timeout = startup_timeout
        self._call_timeout = call_timeout
        self._prefix = prefix
        self._loop = asyncio.get_running_loop()
        self._session: ClientSession | None = None
        self._failure: str | None = None
        self._close_requested = asyncio.Event()
        self._ended = asyncio.Event()  # set when the owner task has left the session
        self._owner: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        command: Sequence[str] | str | None = None,
        *,
        url: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        headers: Mapping[str, str] | None = None,
        prefix: str = "",
        timeout: float = 30.0,
        call_timeout: float | None = None,
    ) -> MCPConnection:
        """Start (stdio) or reach (HTTP) the server, initialise the session and list its tools.

        `env` is added to the few variables the SDK passes on (PATH, HOME, ...), not to the whole environment.
        `prefix` goes before every tool name, to keep two servers' tools apart. `timeout` bounds the start-up
        handshake; `call_timeout` bounds each call. Raises `ConfigurationError` when the server cannot be
        started, reached or initialised.

        `headers` go to `url`'s origin (scheme, host and port) and nowhere else: every request for another
        origin, a redirect hop included, is refused before it is sent, and the call fails with that message.
        """
        if (command is None) == (url is None):
            raise ConfigurationError("MCPConnection.open needs exactly one of command=[...] (stdio) or url=... (HTTP)")
        if url is not None:
            if env is not None or cwd is not None:
                raise ConfigurationError("env= and cwd= apply to a stdio server started by command=, not to url=")
            transport = _http_transport(url, headers)
            label = url
        else:
            if headers is not None:
                raise ConfigurationError("headers= apply to an HTTP server (url=), not to command=")
            argv = _checked_command(command)
            transport = _stdio_transport(argv, env, cwd)
            label = shlex.join(argv)
        connection = cls(label, startup_timeout=timeout, call_timeout=call_timeout, prefix=prefix)
        await connection._start(transport)
        return connection

    @property
    def closed(self) -> bool:
        return self._owner is None or self._owner.done()

    async def call(self, name: str, arguments: Mapping[str, Any] | None = None) -> str:
        """Call the server's tool `name` (its own name, without prefix); the result as text for the model."""
        return await _on_loop(self._loop, lambda: self._call(name, dict(arguments or {})))

    async def aclose(self) -> None:
        """End the session and, for stdio, the server process. Safe to call twice."""
        if self._owner is None or self._owner.done():
            return
        if has_stopped(self._loop):
            return  # the owning loop has stopped; its shutdown cancelled the owner, which closed the session
        await _on_loop(self._loop, self._shutdown)

    async def __aenter__(self) -> MCPConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"MCPConnection({self.label!r}, {state}, tools={[t.name for t in self.tools]})"

    # -- the owner task ------------------------------------------------------------------------------------
    async def _start(self, transport: Callable[[], contextlib.AbstractAsyncContextManager[Streams]]) -> None:
        ready: asyncio.Future[list[dict[str, Any]]] = self._loop.create_future()
        self._owner = asyncio.create_task(self._own(transport, ready), name=f"mcp-session {self.label}")
        try:
            specs = await ready
        except asyncio.CancelledError:
            self._owner.cancel()  # it may be stuck in the handshake: stop it there, its exits still run
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._owner
            raise
        except Exception as exc:
            await self._shutdown()
            raise ConfigurationError(f"could not start MCP server {self.label}: {_describe(exc)}") from exc
        self.tools = self._make_tools(specs)
        logger.info("MCP server %s: %d tools", self.label, len(self.tools))

    async def _own(
        self,
        transport: Callable[[], contextlib.AbstractAsyncContextManager[Streams]],
        ready: asyncio.Future[list[dict[str, Any]]],
    ) -> None:
        """Enter the transport and the session, serve until asked to close, and exit them in this same task."""
        try:
            async with transport() as streams, ClientSession(streams[0], streams[1]) as session:
                with anyio.fail_after(self._startup_timeout):
                    initialized = await session.initialize()
                    specs = await _list_tools(session)
                info = _dump(initialized).get("serverInfo") or {}
                self.server_name = info.get("name")
                self._session = session
                ready.set_result(specs)
                await self._close_requested.wait()
        except Exception as exc:
            self._fail(ready, exc)
        finally:
            self._session = None
            self._ended.set()

    def _fail(self, ready: asyncio.Future[list[dict[str, Any]]], exc: Exception) -> None:
        if not ready.done():
            if isinstance(_innermost(exc), TimeoutError):
                exc = TimeoutError(f"no answer to the MCP handshake within {self._startup_timeout:g} s")
            ready.set_exception(exc)
            return
        self._failure = _describe(exc)
        logger.warning("MCP server %s: the session ended: %s", self.label, self._failure)

    async def _shutdown(self) -> None:
        self._close_requested.set()
        if self._owner is not None:
            with contextlib.suppress(Exception):
                await self._owner

    # -- calls -------------------------------------------------------------------------------------------
    async def _call(self, name: str, arguments: dict[str, Any]) -> str:
        session = self._session
        if session is None:
            reason = f" ({self._failure})" if self._failure else ""
            raise MCPServerError(f"the session with MCP server {self._display} is closed{reason}")
        try:
            result = await self._until_ended(session.call_tool(name, arguments))
        except MCPServerError:
            raise
        except Exception as exc:
            raise MCPServerError(f"MCP server {self._display} did not answer: {_describe(exc)}") from exc
        data = _dump(result)
        text = content_to_text(data)
        if data.get("isError"):
            raise MCPToolError(text or "the tool reported an error without a message")
        return text

    async def _until_ended(self, request: Coroutine[Any, Any, T]) -> T:
        """Await a request, or fail when the session ends first (some SDK versions leave it waiting forever)."""
        call = asyncio.ensure_future(request)
        ended = asyncio.ensure_future(self._ended.wait())
        try:
            await asyncio.wait({call, ended}, return_when=asyncio.FIRST_COMPLETED)
            if call.done():
                return call.result()
            raise MCPServerError("the session was closed during the call")
        finally:
            for task in (call, ended):
                task.cancel()

    @property
    def _display(self) -> str:
        return repr(self.server_name) if self.server_name else self.label

    def _make_tools(self, specs: list[dict[str, Any]]) -> list[Tool]:
        tools: list[Tool] = []
        taken: set[str] = set()
        for spec in specs:
            remote = spec["name"]
            local = unique_tool_name(self._prefix + remote, taken)
            if local != self._prefix + remote:
                logger.info("MCP tool %r is offered to the model as %r", remote, local)
            taken.add(local)
            schema = spec.get("inputSchema") or {"type": "object", "properties": {}}
            handler = self._handler(remote, local)
            tools.append(Tool(local, spec.get("description") or "", schema, handler, timeout=self._call_timeout))
        return tools

    def _handler(self, remote: str, local: str) -> Callable[..., Awaitable[str]]:
        async def call_mcp_tool(**arguments: Any) -> str:
            return await self.call(remote, arguments)

        call_mcp_tool.__name__ = call_mcp_tool.__qualname__ = local
        call_mcp_tool.__doc__ = f"Calls tool {remote!r} of MCP server {self.label}."
        return call_mcp_tool


# -- transports ----------------------------------------------------------------------------------------------
def _checked_command(command: Sequence[str] | str | None) -> list[str]:
    argv = shlex.split(command) if isinstance(command, str) else [str(part) for part in command or ()]
    if not argv or not argv[0]:
        raise ConfigurationError("command= must name the MCP server program, e.g. ['uvx', 'mcp-server-time']")
    if shutil.which(argv[0]) is None:
        raise ConfigurationError(
            f"MCP server command {argv[0]!r} was not found (not an executable path, nor on PATH); "
            "check the command or install the server"
        )
    return argv


def _stdio_transport(
    argv: list[str], env: Mapping[str, str] | None, cwd: str | os.PathLike[str] | None
) -> Callable[[], contextlib.AbstractAsyncContextManager[Streams]]:
    params = StdioServerParameters(
        command=argv[0], args=argv[1:], env=dict(env) if env is not None else None, cwd=_path(cwd)
    )
    return lambda: stdio_client(params, errlog=_errlog())


def _errlog() -> TextIO:
    """Where the server's stderr goes: ours, or the process's own when ours has no file descriptor (Jupyter
    kernels may replace sys.stderr with a stream a child process cannot write to)."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            if stream is not None:
                stream.fileno()
                return stream
        except (AttributeError, OSError, ValueError):
            continue
    return _devnull()


@functools.cache
def _devnull() -> TextIO:
    return open(os.devnull, "w")  # one for the whole process, never closed


def _http_transport(
    url: str, headers: Mapping[str, str] | None
) -> Callable[[], contextlib.AbstractAsyncContextManager[Streams]]:
    """Streamable HTTP across SDK versions: 2.x (and late 1.x) take an HTTP client, early 1.x a client factory.
    Either way the client is guarded: its requests go to `url`'s origin only (see `_guarded`)."""
    from mcp.client import streamable_http
    from mcp.shared._httpx_utils import create_mcp_http_client

    def make_client(headers: dict[str, str] | None = None, timeout: Any = None, auth: Any = None) -> Any:
        return _guarded(create_mcp_http_client(headers=headers, timeout=timeout, auth=auth), url)

    modern = getattr(streamable_http, "streamable_http_client", None)
    if modern is None:  # mcp < 1.24
        legacy = getattr(streamable_http, "streamablehttp_client")  # noqa: B009 - absent from the 2.x stubs
        return lambda: legacy(url, headers=dict(headers) if headers else None, httpx_client_factory=make_client)

    @contextlib.asynccontextmanager
    async def connect() -> Any:
        client = make_client(headers=dict(headers) if headers else None)
        async with client, modern(url, http_client=client) as streams:
            yield streams

    return connect


def _guarded(client: Any, url: str) -> Any:
    """`client` with a request hook that refuses, before it is sent, any request for another origin than `url`'s:
    the headers given for this server (and the session's messages) never follow a redirect elsewhere, whatever
    the SDK version's own redirect rules. The hook runs for every request and every redirect hop."""
    home = Origin.of(client.build_request("GET", url).url)  # parsed by the client's own URL class; nothing is sent
    hooks = {name: list(value) for name, value in client.event_hooks.items()}
    hooks["request"] = [*hooks.get("request", []), RequestGuard({home}, only_home=True, allow_link_local=True)]
    client.event_hooks = hooks
    return client


# -- helpers -------------------------------------------------------------------------------------------------
async def _list_tools(session: ClientSession) -> list[dict[str, Any]]:
    """Every tool of every page, as wire-format dicts (the same keys for every SDK version)."""
    result = _dump(await session.list_tools())
    specs = list(result.get("tools") or [])
    while result.get("nextCursor"):
        params = mcp.types.PaginatedRequestParams(cursor=result["nextCursor"])
        result = _dump(await session.list_tools(params=params))
        specs.extend(result.get("tools") or [])
    return specs


def content_to_text(result: Mapping[str, Any]) -> str:
    """A tool result (wire format) as the text the model reads: text blocks as they are, other blocks named."""
    parts: list[str] = []
    for block in result.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            parts.append(str(block.get("text", "")))
        elif kind in ("image", "audio"):
            data = str(block.get("data", ""))
            size = len(data) * 3 // 4 - data[-2:].count("=")  # decoded size of the base64 text
            parts.append(f"[{kind} {block.get('mimeType', '')}, {size} bytes, not shown]")
        elif kind == "resource":
            resource = block.get("resource") or {}
            text = resource.get("text")
            parts.append(text if text is not None else f"[resource {resource.get('uri', '')}, binary, not shown]")
        elif kind == "resource_link":
            parts.append(f"[resource link {block.get('name', '')}: {block.get('uri', '')}]")
        else:
            parts.append(json.dumps(block, ensure_ascii=False))
    if not parts and result.get("structuredContent") is not None:
        return json.dumps(result["structuredContent"], ensure_ascii=False)
    return "\n".join(parts)


def _path(value: str | os.PathLike[str] | None) -> str | None:
    return None if value is None else os.fspath(value)


def _dump(model: Any) -> dict[str, Any]:
    return dict(model.model_dump(by_alias=True, mode="json", exclude_none=True))


def _describe(exc: BaseException) -> str:
    """The innermost cause of an anyio exception group, with the MCP error's own message when it has one."""
    exc = _innermost(exc)
    if isinstance(exc, (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream)):
        return f"{type(exc).__name__}: the connection to the server is closed"
    error = getattr(exc, "error", None)
    message = getattr(error, "message", None) or str(exc) or "no details"
    return f"{type(exc).__name__}: {message}"


def _innermost(exc: BaseException) -> BaseException:
    inner = getattr(exc, "exceptions", None)
    while inner:
        exc = inner[0]
        inner = getattr(exc, "exceptions", None)
    return exc


async def _on_loop(loop: asyncio.AbstractEventLoop, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run on `loop`, which owns the session's streams; from another loop, hand the work over and wait."""
    if has_stopped(loop):
        raise MCPServerError("the MCP session's event loop has stopped; open the connection again")
    return await on_loop(loop, make)
