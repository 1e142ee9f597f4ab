"""MCP tool servers as tools: the server's tools, with the schemas it gives, called through one MCP session.

The SDK's transports and `ClientSession` are anyio context managers whose cancel scopes must be exited by the task
that entered them. So one long-lived task owns them: it enters, reports ready, waits for `aclose()`, then exits
them in order (for stdio the SDK then closes the server's stdin and, if it lingers, terminates it). Calls from any
other task only send requests through the session; calls from another event loop (a notebook cell's loop while
the connection lives on the sync wrappers' loop) are handed to the loop that owns the session.

Faults of a call reach the model as tool errors: a result with `isError` raises `MCPToolError` with the server's
text, a protocol or transport failure raises `MCPServerError`, and `Tool.run` turns either into "Error: ...".

A stdio server's stderr comes through a pipe of ours (`_StderrTail`): passed on to our stderr as before, with its
last lines kept, so a server that fails (at start or during a call) is reported with its exit status and the end
of what it wrote, not only as "Connection closed".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from http import HTTPStatus
from typing import Any, TextIO, TypeVar

from functionary_agent._text import shorten, visible_controls
from functionary_agent.errors import ConfigurationError
from functionary_agent.integrations._http_guard import Origin, RequestGuard
from functionary_agent.integrations._loop_handover import has_stopped, on_loop
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
_STDERR_TAIL_BYTES = 4096  # what is kept of a stdio server's stderr, at most; of that, at most
_STDERR_TAIL_LINES = 20  # ... this many last lines are shown
_EXIT_WAIT_SECONDS = 5.0  # after a lost connection: the most we wait for the server's exit and its stderr's end
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

    def __init__(
        self,
        label: str,
        *,
        startup_timeout: float,
        call_timeout: float | None,
        prefix: str,
        server: _StdioServer | None = None,
    ) -> None:
        self.label = label
        self.server_name: str | None = None
        self.tools: list[Tool] = []
        self._startup_timeout = startup_timeout
        self._call_timeout = call_timeout
        self._prefix = prefix
        self._loop = asyncio.get_running_loop()
        self._session: ClientSession | None = None
        self._failure: str | None = None
        self._server = server  # a stdio server's process and stderr; None for HTTP
        self._stray_output: str | None = None  # the first thing the server sent that is not an MCP message
        self._http_errors = _HttpErrors()  # an HTTP server's last error status, for the start-up message
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
        started, reached or initialised; for a stdio server that exits, it gives the exit status (or signal) and
        the last lines of the server's stderr.

        `headers` go to `url`'s origin (scheme, host and port) and nowhere else: every request for another
        origin, a redirect hop included, is refused before it is sent, and the call fails with that message.
        """
        if (command is None) == (url is None):
            raise ConfigurationError("MCPConnection.open needs exactly one of command=[...] (stdio) or url=... (HTTP)")
        if url is not None:
            if env is not None or cwd is not None:
                raise ConfigurationError("env= and cwd= apply to a stdio server started by command=, not to url=")
            errors = _HttpErrors()
            transport = _http_transport(url, headers, errors)
            label = url
            server = None
        else:
            if headers is not None:
                raise ConfigurationError("headers= apply to an HTTP server (url=), not to command=")
            argv = _checked_command(command)
            server = _StdioServer(argv, env, _checked_cwd(cwd))
            transport = server.connect
            label = shlex.join(argv)
        connection = cls(label, startup_timeout=timeout, call_timeout=call_timeout, prefix=prefix, server=server)
        if url is not None:
            connection._http_errors = errors
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
            reason = await self._why_start_failed(exc)
            raise ConfigurationError(f"could not start MCP server {self.label}: {reason}") from None
        self.tools = self._make_tools(specs)
        logger.info("MCP server %s: %d tools", self.label, len(self.tools))

    async def _own(
        self,
        transport: Callable[[], contextlib.AbstractAsyncContextManager[Streams]],
        ready: asyncio.Future[list[dict[str, Any]]],
    ) -> None:
        """Enter the transport and the session, serve until asked to close, and exit them in this same task."""
        try:
            async with (
                transport() as streams,
                ClientSession(streams[0], streams[1], message_handler=self._note_incoming) as session,
            ):
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
        own_exit = self._server.own_exit() if self._server is not None else None
        if own_exit is not None:
            self._failure += f"; {_exit_phrase(own_exit)}"
        logger.warning("MCP server %s: the session ended: %s", self.label, self._failure)

    async def _note_incoming(self, message: Any) -> None:
        """The session's message handler: remembers the first thing the server sent that is no MCP message (the
        SDK skips it and logs it), for the error message should the handshake then fail."""
        if isinstance(message, Exception) and self._stray_output is None:
            self._stray_output = _stray_preview(message)

    async def _why_start_failed(self, exc: Exception) -> str:
        """Why the start failed, for a person: how a stdio server ended, what it sent and wrote, what to check."""
        server = self._server
        inner = _innermost(exc)
        if server is not None and server.process is None and isinstance(inner, OSError):
            return server.spawn_failure(inner)
        if server is not None:
            await server.settle(_EXIT_WAIT_SECONDS)
        own_exit = server.own_exit() if server is not None else None
        reason = f"{_exit_phrase(own_exit)} during start-up" if own_exit is not None else _describe(exc)
        if self._http_errors.last is not None:
            reason += f" (the server answered {self._http_errors.last})"
        if self._stray_output is not None:
            reason += f"; it sent something that is not an MCP message: {self._stray_output}"
            if server is not None:
                reason += " (a stdio server must write only MCP messages to stdout; logs belong on stderr)"
        if server is None:
            return reason
        return server.with_stderr(reason, if_silent="; run the command in a terminal to see it start")

    async def _why_call_failed(self, exc: Exception) -> str:
        """Why a call failed: for a lost connection to a stdio server that has exited, its status and stderr."""
        reason = _describe(exc)
        server = self._server
        if server is None or self._close_requested.is_set() or not _lost_connection(exc):
            return reason
        await server.settle(_EXIT_WAIT_SECONDS)
        if server.returncode is None:
            return reason
        return server.with_stderr(f"{reason}: {_exit_phrase(server.returncode)}")

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
            reason = await self._why_call_failed(exc)
            raise MCPServerError(f"MCP server {self._display} did not answer: {reason}") from exc
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
            reason = f" ({self._failure})" if self._failure else ""
            raise MCPServerError(f"the session with MCP server {self._display} was closed during the call{reason}")
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


def _checked_cwd(cwd: str | os.PathLike[str] | None) -> str | None:
    if cwd is None:
        return None
    if not os.path.isdir(cwd):
        raise ConfigurationError(f"cwd={os.fspath(cwd)!r} for the MCP server is not a directory")
    return os.fspath(cwd)


class _StdioServer:
    """A stdio server's process, as far as the SDK lets us see it: started by `stdio_client`, its stderr read
    through `_StderrTail`, and its exit status once it has ended."""

    def __init__(self, argv: list[str], env: Mapping[str, str] | None, cwd: str | None) -> None:
        self._params = StdioServerParameters(
            command=argv[0], args=argv[1:], env=dict(env) if env is not None else None, cwd=cwd
        )
        self.process: Any = None  # the SDK's process object, once spawned
        self.stderr: _StderrTail | None = None
        self.exited_by_itself = False  # it had ended before the SDK closed its stdin to stop it

    @property
    def returncode(self) -> int | None:
        """The exit status, negative for a signal (-9: SIGKILL); None while it runs or when it is not known."""
        code = getattr(self.process, "returncode", None)
        return code if isinstance(code, int) else None

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[Streams]:
        """The SDK's stdio transport, with the server's stderr captured and its exit noted."""
        stderr = self.stderr = _StderrTail()
        try:
            client = stdio_client(self._params, errlog=stderr.writer)
            async with client as streams:
                stderr.close_writer()  # the server has its own copy: the pipe ends with it (and its children)
                self.process = _spawned_process(client)
                try:
                    yield streams
                except Exception as exc:
                    if _lost_connection(exc):  # it may have crashed: let its exit status arrive before stopping it
                        await _until(lambda: self.returncode is not None, _EXIT_WAIT_SECONDS)
                    raise
                finally:
                    self.exited_by_itself = self.returncode is not None
        finally:
            stderr.close_writer()

    def own_exit(self) -> int | None:
        """The exit status if the server ended by itself, before the transport began to stop it."""
        return self.returncode if self.exited_by_itself else None

    async def settle(self, within: float) -> None:
        """Wait, polling on the loop, until the process has exited and its stderr has been read to the end."""
        stderr = self.stderr
        await _until(
            lambda: (self.process is None or self.returncode is not None)
            and (stderr is None or stderr.ended.is_set()),
            within,
        )

    def with_stderr(self, reason: str, if_silent: str = "") -> str:
        """`reason`, then the last lines of the server's stderr (controls shown), or that it wrote none and then
        `if_silent`."""
        lines = self.stderr.last_lines() if self.stderr is not None else []
        if lines:
            quoted = "\n".join(f"  | {line}" for line in lines)
            return f"{reason}; the last lines of its stderr:\n{quoted}"
        return f"{reason}, with nothing on stderr{if_silent}" if self.returncode is not None else reason + if_silent

    def spawn_failure(self, error: OSError) -> str:
        """Why the program could not be run at all, naming it and what to check."""
        program = self._params.command
        hints = {
            FileNotFoundError: "check the interpreter on its #! line, and PATH if env= sets it",
            PermissionError: "check that it is executable by this user",
        }
        hint = hints.get(type(error), "is it a program, or a script starting with a #! line?")
        return f"cannot run {program!r}: {error.strerror or error} ({hint})"


class _StderrTail:
    """A stdio server's stderr, through a pipe of ours: passed on to our stderr as it comes, as if the server wrote
    there itself, with its last `_STDERR_TAIL_BYTES` kept for error messages.

    A daemon thread reads the pipe, so the event loop never waits on it. It ends at end of file, when the server
    and every child that inherited its stderr have exited (`ended`), and then closes the pipe.
    """

    def __init__(self) -> None:
        read_fd, write_fd = os.pipe()
        self.writer: TextIO = os.fdopen(write_fd, "w")  # the server's stderr; ours is closed once it has its copy
        self.ended = threading.Event()
        self._tail = bytearray()
        self._cut = False  # the tail no longer starts at the server's first byte
        self._lock = threading.Lock()
        forward_fd = _stderr_fd()
        self._forward_fd = os.dup(forward_fd) if forward_fd is not None else None  # ours, even if fd 2 is closed
        threading.Thread(target=self._pump, args=(read_fd,), name="mcp-server-stderr", daemon=True).start()

    def close_writer(self) -> None:
        self.writer.close()  # a second close does nothing

    def last_lines(self) -> list[str]:
        """At most `_STDERR_TAIL_LINES` last lines, as plain text: control characters shown (`visible_controls`),
        undecodable bytes replaced, a first line cut short by the size bound left out."""
        with self._lock:
            data, cut = bytes(self._tail), self._cut
        lines = [line.rstrip() for line in visible_controls(data.decode("utf-8", errors="replace")).split("\n")]
        if cut and len(lines) > 1:
            lines = lines[1:]
        while lines and not lines[-1]:
            lines.pop()
        return lines[-_STDERR_TAIL_LINES:]

    def _pump(self, read_fd: int) -> None:
        try:
            while chunk := os.read(read_fd, 65536):
                with self._lock:
                    self._tail += chunk
                    if len(self._tail) > _STDERR_TAIL_BYTES:
                        del self._tail[:-_STDERR_TAIL_BYTES]
                        self._cut = True
                self._forward(chunk)
        except OSError as exc:
            logger.debug("reading an MCP server's stderr failed: %s", exc)
        finally:
            os.close(read_fd)
            if self._forward_fd is not None:
                os.close(self._forward_fd)
            self.ended.set()

    def _forward(self, chunk: bytes) -> None:
        if self._forward_fd is None:
            return
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(self._forward_fd, view) :]
        except OSError:  # our stderr is gone or full and non-blocking: the tail is kept all the same
            pass


def _stderr_fd() -> int | None:
    """Where a server's stderr is passed on: ours, or the process's own when ours has no file descriptor (Jupyter
    kernels replace sys.stderr with a stream that has none); None when neither has one."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            if stream is not None:
                return stream.fileno()
        except (AttributeError, OSError, ValueError):
            continue
    return None


def _spawned_process(client: object) -> Any:
    """The process object `stdio_client` spawned. The SDK gives it no handle, so it is read from the local of that
    name in the generator behind the context manager; without it (another SDK layout) errors still carry the
    server's stderr, only not its exit status."""
    frame = getattr(getattr(client, "gen", None), "ag_frame", None)
    process = frame.f_locals.get("process") if frame is not None else None
    return process if hasattr(process, "returncode") else None


async def _until(condition: Callable[[], bool], within: float) -> None:
    """Return once `condition()` holds or `within` seconds have passed, polling without blocking the loop."""
    deadline = time.monotonic() + within
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def _exit_phrase(returncode: int) -> str:
    if returncode >= 0:
        return f"it exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = "an unknown signal"
    return f"it was killed by {name} (signal {-returncode})"


def _http_transport(
    url: str, headers: Mapping[str, str] | None, errors: _HttpErrors | None = None
) -> Callable[[], contextlib.AbstractAsyncContextManager[Streams]]:
    """Streamable HTTP across SDK versions: 2.x (and late 1.x) take an HTTP client, early 1.x a client factory.
    Either way the client is guarded: its requests go to `url`'s origin only (see `_guarded`); `errors` notes the
    server's error statuses (the SDK reports them without the status)."""
    from mcp.client import streamable_http
    from mcp.shared._httpx_utils import create_mcp_http_client

    def make_client(headers: dict[str, str] | None = None, timeout: Any = None, auth: Any = None) -> Any:
        return _guarded(create_mcp_http_client(headers=headers, timeout=timeout, auth=auth), url, errors)

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


class _HttpErrors:
    """An httpx response hook that keeps the last error status a server answered (`HTTP 401 Unauthorized`): the
    status code and its standard phrase only, never the server's own words."""

    def __init__(self) -> None:
        self.last: str | None = None

    async def __call__(self, response: Any) -> None:
        code = response.status_code
        if code >= 400:
            try:
                self.last = f"HTTP {code} {HTTPStatus(code).phrase}"
            except ValueError:
                self.last = f"HTTP {code}"


def _guarded(client: Any, url: str, errors: _HttpErrors | None = None) -> Any:
    """`client` with a request hook that refuses, before it is sent, any request for another origin than `url`'s:
    the headers given for this server (and the session's messages) never follow a redirect elsewhere, whatever
    the SDK version's own redirect rules. The hook runs for every request and every redirect hop."""
    home = Origin.of(client.build_request("GET", url).url)  # parsed by the client's own URL class; nothing is sent
    hooks = {name: list(value) for name, value in client.event_hooks.items()}
    hooks["request"] = [*hooks.get("request", []), RequestGuard({home}, only_home=True, allow_link_local=True)]
    if errors is not None:
        hooks["response"] = [*hooks.get("response", []), errors]
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


def _lost_connection(exc: BaseException) -> bool:
    """Whether a call failed because the connection is gone (rather than the server answering with an error)."""
    inner = _innermost(exc)
    if isinstance(inner, (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream)):
        return True
    code = getattr(getattr(inner, "error", None), "code", None)
    return code is not None and code == getattr(mcp.types, "CONNECTION_CLOSED", -32000)


def _stray_preview(exc: Exception) -> str:
    """What the server sent that is no MCP message, quoted and shortened: pydantic's error carries the input."""
    try:
        text = str(exc.errors()[0]["input"])  # type: ignore[attr-defined]
    except (AttributeError, IndexError, KeyError, TypeError):
        text = str(exc)
    return repr(shorten(text, 120))


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
