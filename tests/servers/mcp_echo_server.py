"""A small MCP server for the tests, written with the official SDK's FastMCP (`MCPServer` since mcp 2).

`python mcp_echo_server.py` serves over stdio. `python mcp_echo_server.py http TOKEN` serves streamable HTTP on a
free loopback port, requires the header `X-Test-Token: TOKEN`, and prints `PORT <n>` once it listens.
"""

from __future__ import annotations

import os
import socket
import sys

import anyio

try:  # mcp >= 2
    from mcp.server.mcpserver import MCPServer as FastMCP
    from mcp.server.mcpserver.exceptions import ToolError
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP  # type: ignore[no-redef]
    from mcp.server.fastmcp.exceptions import ToolError  # type: ignore[no-redef]

server = FastMCP("echo", log_level="WARNING")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def divide(numerator: float, denominator: float) -> float:
    """Divide two numbers."""
    if denominator == 0:
        raise ToolError("cannot divide by zero")
    return numerator / denominator


@server.tool()
def read_env(name: str) -> str:
    """The value of an environment variable of the server process."""
    return os.environ.get(name, "<unset>")


@server.tool()
def server_pid() -> int:
    """The server's process id."""
    return os.getpid()


@server.tool()
async def wait(seconds: float) -> str:
    """Answer after `seconds`, to test concurrent and cancelled calls."""
    await anyio.sleep(seconds)
    return f"waited {seconds:g} s"


@server.tool()
def crash() -> None:
    """Stop the server process at once, as a crashing server would."""
    os._exit(3)


@server.tool(name="text.shout")
def shout(text: str) -> str:
    """A tool whose name is valid for MCP but not for OpenAI-style tools."""
    return text.upper() + "!"


class _RequireToken:
    """ASGI middleware: refuse requests without the expected `X-Test-Token` header."""

    def __init__(self, app: object, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: dict, receive: object, send: object) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"x-test-token") != self.token:
            await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"missing or wrong X-Test-Token"})
            return
        await self.app(scope, receive, send)  # type: ignore[operator]


def _serve_http(token: str) -> None:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections made as soon as PORT is printed wait in the backlog, not refused
    app = _RequireToken(server.streamable_http_app(), token)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    if sys.argv[1:2] == ["http"]:
        _serve_http(sys.argv[2])
    else:
        server.run()
