"""OpenAPI 3.x services as tools: every operation becomes a tool, called over HTTP with httpx.

One tool per operation, named from its operationId. Its arguments are the operation's path, query, header and
cookie parameters, each under its own name, plus the JSON (or form) request body: an object body's properties sit
beside the parameters when no name clashes, otherwise the whole body is one `body` argument. Local `$ref`s are
inlined (a schema that refers back to itself stays in `$defs`, as for recursive Python models); references to
other files or URLs are not fetched: such a schema accepts any value and says so in its description.

The document, the model's arguments and the service's answers are untrusted. The user's `headers` go only to the
origins the user named (`base_url`, the document's URL, `trusted_origins`); redirects are followed within an
origin only; link-local and cloud metadata addresses are refused unless allowed (`_http_guard` checks every
request, redirect hops included, before it is sent). Cookies are kept per origin (scheme, host and port, not the
host alone as RFC 6265 has it): a cookie a service sets goes back only to that origin, on every redirect hop and
later call, and httpx's shared jar keeps none. A malformed document is a `ConfigurationError` that names
the JSON pointer of the bad part, and inlining `$ref`s is bounded by a node budget.

Non-2xx answers, refused requests and network failures raise `HTTPCallError` with the method, URL, status and the
start of the body, so `Tool.run` hands the model an "Error: ..." message it can act on.

This module is the face; the work is done by `document` (loading, operations -> tools), `refs` (`$ref`s, the node
budget, malformed-document errors), `origins` (where headers and cookies go, redirects) and `requests` (building,
sending and reading a call).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

try:
    import httpx  # noqa: F401  (checked here, with a hint, before the modules that need it)
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("OpenAPI tools need httpx: pip install 'functionary-agent[openapi]'") from exc

from functionary_agent.integrations._loop_handover import has_stopped, on_loop
from functionary_agent.integrations.openapi.document import (
    Include,
    Operation,
    document_base,
    load_document,
    operations_of,
)
from functionary_agent.integrations.openapi.origins import (
    Access,
    OriginCookies,
    OtherOrigins,
    make_access,
    named_origins,
    new_client,
    warn_untrusted,
)
from functionary_agent.integrations.openapi.requests import HTTPCallError, build_request, read_response, send
from functionary_agent.tools import Tool

__all__ = ["HTTPCallError", "OpenAPITools", "Operation", "openapi_tools"]

T = TypeVar("T")


class OpenAPITools:
    """The tools of one OpenAPI document and the HTTP client they share; `await aclose()` closes the client.

    Made by `await openapi_tools(...)`; also an async context manager.
    """

    def __init__(
        self,
        operations: Sequence[Operation],
        *,
        base_url: str | None,
        client_settings: Mapping[str, Any],
        max_response_chars: int,
        access: Access,
    ) -> None:
        self.operations = {op.name: op for op in operations}
        self.base_url = base_url
        self.tools = [Tool(op.name, op.description, op.parameters, _handler(self, op.name)) for op in operations]
        self._settings = dict(client_settings)
        self._client = new_client(self._settings)
        self._cookies = OriginCookies()
        self._loop = asyncio.get_running_loop()
        self._max_chars = max_response_chars
        self._access = access
        self._closed = False

    def __repr__(self) -> str:
        return f"OpenAPITools(base_url={self.base_url!r}, tools={list(self.operations)})"

    async def call(self, name: str, arguments: Mapping[str, Any] | None = None) -> str:
        """Call the operation behind tool `name`; the response body as text, or `HTTPCallError`."""
        operation = self.operations[name]
        return await self._on_own_loop(lambda: self._send(operation, dict(arguments or {})))

    async def aclose(self) -> None:
        """Close the HTTP client; later calls answer that the tools were closed."""
        self._closed = True
        if self._client.is_closed:
            return
        if has_stopped(self._loop):
            return  # that loop has stopped, and its connections went with it
        await self._on_own_loop(self._client.aclose)

    async def __aenter__(self) -> OpenAPITools:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _on_own_loop(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """The client's connections belong to the loop that made them: use it, or make a new client here when
        that loop has stopped (a second `asyncio.run`, say). Once closed, everything runs here."""
        if self._closed:
            return await make()
        if has_stopped(self._loop):
            self._client = new_client(self._settings)
            self._loop = asyncio.get_running_loop()
        return await on_loop(self._loop, make)

    async def _send(self, op: Operation, arguments: dict[str, Any]) -> str:
        request = build_request(op, arguments)
        if self._closed:
            raise HTTPCallError(f"the tools of this OpenAPI service were closed; {op.name} cannot be called")
        response = await send(self._client, self._access, self._cookies, op, request)
        return read_response(op, request, response, self._max_chars)


async def openapi_tools(
    spec: Mapping[str, Any] | str | os.PathLike[str],
    base_url: str | None = None,
    headers: Mapping[str, str] | None = None,
    include: Include = None,
    *,
    timeout: float = 30.0,
    max_response_chars: int = 20_000,
    trusted_origins: Sequence[str] = (),
    other_origins: OtherOrigins = "refuse",
    allow_link_local: bool = False,
) -> OpenAPITools:
    """Tools for the operations of an OpenAPI 3.x document: a dict, a JSON/YAML file, or an http(s) URL.

    `base_url` overrides the document's `servers` (needed when those are relative and the document was not
    fetched from a URL). `include` keeps only some operations: a list of operationIds, or a predicate on the
    operationId (for an operation without one, on the tool name made from method and path).

    `headers` (credentials, say) go only to the origins you named: `base_url`'s, the document URL's, and those in
    `trusted_origins` (e.g. `["https://uploads.example.com"]`); the document's own `servers` never add one. A
    call whose server is elsewhere is refused with a message to the model, or, with
    `other_origins="without_headers"`, sent without `headers`. Redirects are followed only within an origin (at
    most 5). Link-local and cloud metadata addresses (169.254.169.254, fe80::/10, metadata.google.internal, ...)
    are refused unless `allow_link_local=True`.
    """
    home = named_origins(spec, base_url, trusted_origins)
    access = make_access(home, dict(headers or {}), other_origins, allow_link_local)
    hooks = {"request": [access.guard]}
    settings: dict[str, Any] = {"timeout": timeout, "follow_redirects": False, "event_hooks": hooks}
    async with new_client(settings) as client:
        document, spec_url = await load_document(spec, client, access.headers)
    operations = operations_of(document, base_url, spec_url, include)
    warn_untrusted({op.name: op.base_url for op in operations}, access)
    return OpenAPITools(
        operations,
        base_url=document_base(document, base_url, spec_url),
        client_settings=settings,
        max_response_chars=max_response_chars,
        access=access,
    )


def _handler(tools: OpenAPITools, name: str) -> Callable[..., Coroutine[Any, Any, str]]:
    async def call_operation(**arguments: Any) -> str:
        return await tools.call(name, arguments)

    call_operation.__name__ = call_operation.__qualname__ = name
    return call_operation
