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
"""

from __future__ import annotations

import asyncio
import copy
import http.cookiejar
import json
import logging
import os
import re
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar
from urllib.parse import quote, unquote, urljoin

from functionary_agent._schema import map_subschemas
from functionary_agent._text import cut
from functionary_agent.errors import ConfigurationError
from functionary_agent.integrations._http_guard import Origin, RequestGuard, RequestRefused
from functionary_agent.integrations._loop_handover import has_stopped, on_loop
from functionary_agent.tools import Tool, unique_tool_name

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("OpenAPI tools need httpx: pip install 'functionary-agent[openapi]'") from exc

__all__ = ["HTTPCallError", "OpenAPITools", "Operation", "openapi_tools"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Include = Sequence[str] | Callable[[str], bool] | None
OtherOrigins = Literal["refuse", "without_headers"]
_Where = tuple[str | int, ...]  # a JSON pointer into the document, as its parts

_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_LOCATIONS = ("path", "query", "header", "cookie")
_IGNORED_HEADERS = {"accept", "content-type", "authorization"}  # OpenAPI: such header parameters are ignored
# Keywords dropped from schemas, none of them a schema keyword of `map_subschemas`: titles are noise tokens to a model.
_NOISE_KEYS = ("title", "xml", "externalDocs", "discriminator")
_ERROR_BODY_CHARS = 1000
_MAX_REDIRECTS = 5
_MAX_DOCUMENT_NODES = 500_000  # schema nodes inlined for the whole document
_MAX_OPERATION_NODES = 50_000  # ... and for one tool (far more than a model can read)
_MAX_DEPTH = 100  # levels of nested schemas and $refs


class HTTPCallError(Exception):
    """A call the service refused (non-2xx) or that never reached it; the message is written for the model.
    `transient`: the fault may pass (a network failure, 408, 429, 5xx), so an identical retry is allowed."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class _Unsupported(Exception):
    """An operation that cannot become a tool; it is skipped with a warning, the others still load."""


@dataclass(frozen=True)
class _OperationParam:
    name: str  # as sent over HTTP
    location: str  # path, query, header, cookie
    key: str  # the argument's name in the tool's schema
    style: str
    explode: bool
    as_json: bool  # described with `content` rather than `schema`: the value is sent as JSON text


@dataclass(frozen=True)
class _Body:
    media_type: str
    key: str | None  # None: the body's properties are top-level arguments
    flat_keys: frozenset[str] = frozenset()
    extra_allowed: bool = False  # flat body: unknown arguments go into the body


@dataclass(frozen=True)
class Operation:
    """One operation as it is called: the tool's name, the HTTP method and URL template, what goes where."""

    name: str
    operation_id: str | None
    method: str
    path: str
    base_url: str
    description: str
    parameters: dict[str, Any]
    params: tuple[_OperationParam, ...] = ()
    body: _Body | None = None

    def known_keys(self) -> set[str]:
        keys = {p.key for p in self.params}
        if self.body is not None:
            keys |= {self.body.key} if self.body.key else set(self.body.flat_keys)
        return keys


@dataclass(frozen=True)
class _Access:
    """Who gets the user's headers: the guard's home origins; what a request for another origin gets."""

    headers: dict[str, str]
    guard: RequestGuard
    other_origins: OtherOrigins


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
        access: _Access,
    ) -> None:
        self.operations = {op.name: op for op in operations}
        self.base_url = base_url
        self.tools = [Tool(op.name, op.description, op.parameters, _handler(self, op.name)) for op in operations]
        self._settings = dict(client_settings)
        self._client = _client(self._settings)
        self._cookies = _OriginCookies()
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
            self._client = _client(self._settings)
            self._loop = asyncio.get_running_loop()
        return await on_loop(self._loop, make)

    async def _send(self, op: Operation, arguments: dict[str, Any]) -> str:
        request = _build_request(op, arguments)
        if self._closed:
            raise HTTPCallError(f"the tools of this OpenAPI service were closed; {op.name} cannot be called")
        method = op.method.upper()
        try:
            outgoing = _outgoing(self._client, self._access, op, request)
            response = await _within_origin(self._client, outgoing, self._cookies)
        except RequestRefused as exc:
            raise HTTPCallError(f"{method} {request.url}: {exc}") from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            message = f"{method} {request.url} failed: {type(exc).__name__}: {exc}"
            raise HTTPCallError(message, transient=isinstance(exc, httpx.TransportError)) from exc
        if not response.is_success:
            raise HTTPCallError(
                f"{method} {request.url} returned HTTP {response.status_code} {response.reason_phrase}: "
                f"{cut(response.text, _ERROR_BODY_CHARS) or '(empty body)'}",
                transient=response.status_code in (408, 429) or response.status_code >= 500,
            )
        text = response.text
        if not text:
            return f"HTTP {response.status_code} {response.reason_phrase}"
        return cut(text, self._max_chars)


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
    home = _home(spec, base_url, trusted_origins)
    access = _access(home, dict(headers or {}), other_origins, allow_link_local)
    hooks = {"request": [access.guard]}
    settings: dict[str, Any] = {"timeout": timeout, "follow_redirects": False, "event_hooks": hooks}
    async with _client(settings) as client:
        document, spec_url = await _load(spec, client, access.headers)
    operations = _operations(document, base_url, spec_url, include)
    _warn_untrusted(operations, access)
    return OpenAPITools(
        operations,
        base_url=_document_base(document, base_url, spec_url),
        client_settings=settings,
        max_response_chars=max_response_chars,
        access=access,
    )


def _handler(tools: OpenAPITools, name: str) -> Callable[..., Coroutine[Any, Any, str]]:
    async def call_operation(**arguments: Any) -> str:
        return await tools.call(name, arguments)

    call_operation.__name__ = call_operation.__qualname__ = name
    return call_operation


# -- where requests go -----------------------------------------------------------------------------------
def _home(
    spec: Mapping[str, Any] | str | os.PathLike[str], base_url: str | None, trusted: Sequence[str]
) -> set[Origin]:
    """The origins the user named: the only ones that receive `headers`."""
    if isinstance(trusted, str):
        trusted = [trusted]
    named = [("trusted_origins", url) for url in trusted]
    if base_url:
        named.append(("base_url", base_url))
    if isinstance(spec, str) and _is_http(spec):
        named.append(("the document URL", spec))
    return {_origin(setting, url) for setting, url in named}


def _access(home: set[Origin], headers: dict[str, str], other_origins: str, allow_link_local: bool) -> _Access:
    if other_origins not in ("refuse", "without_headers"):
        raise ConfigurationError(f"other_origins must be 'refuse' or 'without_headers', not {other_origins!r}")
    if headers and not home:
        raise ConfigurationError(
            "headers= go only where you point them, and nothing does: pass base_url= (or trusted_origins=[...]) "
            "for a document given as a dict or a file"
        )
    guard = RequestGuard(home, headers, allow_link_local=allow_link_local)
    return _Access(headers, guard, "refuse" if other_origins == "refuse" else "without_headers")


def _origin(setting: str, text: str) -> Origin:
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigurationError(f"{setting} {text!r} is not a valid URL: {exc}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigurationError(f"{setting} {text!r} is not an absolute http(s) URL")
    return Origin.of(url)


def _is_http(text: str) -> bool:
    return re.match(r"(?i)https?://", text) is not None


def _warn_untrusted(operations: Sequence[Operation], access: _Access) -> None:
    if not access.headers:
        return
    for op in operations:
        try:
            trusted = access.guard.trusts(httpx.URL(op.base_url))
        except httpx.InvalidURL:
            continue
        if not trusted:
            fate = "refused" if access.other_origins == "refuse" else "sent without headers="
            logger.warning(
                "OpenAPI operation %s is served at %s, not at %s: its calls will be %s (see trusted_origins=)",
                op.name, op.base_url, access.guard.home_text(), fate,
            )


def _outgoing(client: httpx.AsyncClient, access: _Access, op: Operation, request: _PreparedRequest) -> httpx.Request:
    """The request as it is sent: with the user's headers for a home origin, else refused or without them (the
    cookies kept for its origin are added as it is sent, by `_within_origin`)."""
    url = httpx.URL(request.url)
    options = dict(request.options)
    own_headers: dict[str, str] = options.pop("headers")
    if access.guard.trusts(url):
        return client.build_request(op.method.upper(), url, headers={**access.headers, **own_headers}, **options)
    if access.headers and access.other_origins == "refuse":
        raise RequestRefused(
            f"{op.name} is served at {Origin.of(url)}, but this service's headers go only to "
            f"{access.guard.home_text()}, so the call was refused before it was sent; the user can name that origin in "
            "trusted_origins=, or allow calls without the headers with other_origins='without_headers'"
        )
    return client.build_request(op.method.upper(), url, headers=own_headers, **options)


async def _within_origin(
    client: httpx.AsyncClient, request: httpx.Request, cookies: _OriginCookies
) -> httpx.Response:
    """Send, following a redirect only when it stays within the origin, at most `_MAX_REDIRECTS` times; any
    other redirect raises `RequestRefused` (its body is never read out to the model). Every hop carries the
    call's own Cookie header (the user's, cookie parameters) or else the cookies kept for the hop's origin."""
    given = "; ".join(request.headers.get_list("cookie")) or None
    for _ in range(_MAX_REDIRECTS + 1):
        cookies.attach(request, given)
        response = await client.send(request)
        cookies.keep(response)
        following = response.next_request
        if following is None:
            return response
        await response.aclose()
        if not Origin.of(request.url).covers(Origin.of(following.url)):
            raise RequestRefused(
                f"the server redirected it to {Origin.of(following.url)}{following.url.path}, another origin; "
                "redirects are followed only within an origin, so nothing was sent there"
            )
        request = following
    raise RequestRefused(f"the server redirected it more than {_MAX_REDIRECTS} times; the last hop was not followed")


class _KeepNoCookies(http.cookiejar.CookiePolicy):
    """The policy of httpx's own jar: it keeps no cookie and sends none. That jar scopes cookies by host, so it
    would hand one origin's cookies to another port of the same host; `_OriginCookies` keeps them instead."""

    netscape = True
    rfc2965 = False
    hide_cookie2 = True

    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False

    def domain_return_ok(self, domain: str, request: Any) -> bool:
        return False

    def path_return_ok(self, path: str, request: Any) -> bool:
        return False


def _client(settings: Mapping[str, Any]) -> httpx.AsyncClient:
    return httpx.AsyncClient(**settings, cookies=http.cookiejar.CookieJar(_KeepNoCookies()))


class _OriginCookies:
    """The cookies services set, one jar per origin (scheme, host and port): a cookie goes back only to the
    origin whose response set it. Within a jar, the usual rules (path, expiry, Secure) apply."""

    def __init__(self) -> None:
        self._jars: dict[Origin, httpx.Cookies] = {}

    def keep(self, response: httpx.Response) -> None:
        if "set-cookie" in response.headers:
            origin = Origin.of(response.request.url)
            self._jars.setdefault(origin, httpx.Cookies()).extract_cookies(response)

    def attach(self, request: httpx.Request, given: str | None) -> None:
        """Replace `request`'s Cookie header: `given` when there is one, else what its origin's jar holds."""
        request.headers.pop("cookie", None)
        if given is not None:
            request.headers["Cookie"] = given
        elif (jar := self._jars.get(Origin.of(request.url))) is not None:
            jar.set_cookie_header(request)


# -- loading ---------------------------------------------------------------------------------------------
async def _load(
    spec: Mapping[str, Any] | str | os.PathLike[str], client: httpx.AsyncClient, headers: Mapping[str, str]
) -> tuple[dict[str, Any], str | None]:
    """The document as a dict, and the URL it came from (relative server URLs are relative to it)."""
    if isinstance(spec, Mapping):
        document: Any = copy.deepcopy(dict(spec))
        spec_url = None
    elif isinstance(spec, str) and _is_http(spec):
        try:
            request = client.build_request("GET", spec, headers=dict(headers))
            response = await _within_origin(client, request, _OriginCookies())
            response.raise_for_status()
        except (httpx.HTTPError, RequestRefused) as exc:
            raise ConfigurationError(f"could not fetch the OpenAPI document {spec}: {exc}") from exc
        document, spec_url = _parse(response.text, spec), str(response.url)
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigurationError(f"OpenAPI document {str(path)!r} is not a file (nor an http(s) URL)")
        document, spec_url = _parse(path.read_text(encoding="utf-8"), str(path)), None
    _check_version(document, spec if isinstance(spec, str) else "the document")
    return document, spec_url


def _parse(text: str, source: str) -> Any:
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ConfigurationError(f"OpenAPI document {source} is not valid JSON: {exc}") from exc
    try:
        import yaml
    except ImportError as exc:
        hint = "pip install 'functionary-agent[openapi]'"
        raise ConfigurationError(f"YAML OpenAPI documents need PyYAML: {hint}") from exc
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigurationError(f"OpenAPI document {source} is neither JSON nor valid YAML: {exc}") from exc


def _check_version(document: Any, source: str) -> None:
    if not isinstance(document, dict):
        raise ConfigurationError(f"OpenAPI document {source} is not an object")
    version = _short(document.get("openapi", ""))
    if not version.startswith("3."):
        found = f"openapi: {version or '(missing)'}"
        if "swagger" in document:
            found = f"Swagger {_short(document['swagger'])}"
        raise ConfigurationError(
            f"{source} is {found}; only OpenAPI 3.x is supported (convert Swagger 2.0 with swagger2openapi)"
        )


def _short(value: Any) -> str:
    """A scalar as text; anything else (a nested structure that may be huge) as its kind."""
    return str(value) if isinstance(value, (str, int, float)) else _kind(value)


# -- operations ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Found:
    """One operation of the document, and where it is (its path item's JSON pointer; it is at `method` below)."""

    path: str
    method: str
    op: dict[str, Any]
    item: dict[str, Any]
    where: _Where

    @property
    def op_where(self) -> _Where:
        return (*self.where, self.method)


def _operations(
    document: dict[str, Any], base_url: str | None, spec_url: str | None, include: Include
) -> list[Operation]:
    found: list[Operation] = []
    taken: set[str] = set()
    seen: set[str] = set()  # operationIds and tool names, to check `include` against
    predicate, wanted = _include_filter(include)
    budget = _Budget(_MAX_DOCUMENT_NODES)
    for entry in _walk_operations(document):
        op_id = entry.op.get("operationId") if isinstance(entry.op.get("operationId"), str) else None
        name = unique_tool_name(op_id or f"{entry.method} {entry.path}", taken, "operation")
        seen.update(n for n in (op_id, name) if n)
        if not _included(predicate, wanted, op_id, name):
            continue
        url = _operation_url(document, entry, base_url, spec_url)
        try:
            found.append(_build_operation(_Refs(document, budget), entry, name, op_id, url))
        except _Unsupported as reason:
            logger.warning("OpenAPI operation %s skipped: %s", name, reason)
            continue
        except ConfigurationError as exc:
            raise ConfigurationError(f"{exc} (operation {name}; include= can leave it out)") from exc
        taken.add(name)
    if wanted and wanted - seen:
        known = sorted(e.op["operationId"] for e in _walk_operations(document) if _is_text(e.op.get("operationId")))
        raise ConfigurationError(f"include names unknown operations {sorted(wanted - seen)}; the document has {known}")
    return found


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _include_filter(include: Include) -> tuple[Callable[[str], bool] | None, set[str] | None]:
    if isinstance(include, str):
        return None, {include}
    if callable(include):
        return include, None
    return None, None if include is None else set(include)


def _walk_operations(document: dict[str, Any]) -> Iterator[_Found]:
    refs = _Refs(document)
    paths = document.get("paths")
    if paths is None:
        return
    for path, raw in _object(paths, ("paths",)).items():
        if not isinstance(path, str):
            _malformed(("paths",), f"the path {path!r} is not a string")
        item, where = refs.deref(raw, ("paths", path))
        for method in _METHODS:
            if method in item:
                yield _Found(path, method, _object(item[method], (*where, method)), item, where)


def _included(predicate: Callable[[str], bool] | None, wanted: set[str] | None, op_id: str | None, name: str) -> bool:
    if wanted is not None:
        return op_id in wanted or name in wanted
    return predicate is None or bool(predicate(op_id or name))


def _build_operation(refs: _Refs, entry: _Found, name: str, op_id: str | None, base_url: str) -> Operation:
    properties: dict[str, Any] = {}
    required: list[str] = []
    params = _parameters(refs, entry, properties, required)
    raw_body = entry.op.get("requestBody")
    body = _request_body(refs, raw_body, (*entry.op_where, "requestBody"), properties, required)
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    if refs.defs:
        schema["$defs"] = refs.finish()
    summary, details = (_text(entry.op.get(key)) for key in ("summary", "description"))
    description = "\n\n".join(part for part in (summary, details if details != summary else "") if part)
    method, path = entry.method, entry.path
    return Operation(
        name, op_id, method, path, base_url, description or f"{method.upper()} {path}", schema, params, body
    )


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _parameters(
    refs: _Refs, entry: _Found, properties: dict[str, Any], required: list[str]
) -> tuple[_OperationParam, ...]:
    merged: dict[tuple[str, str], tuple[dict[str, Any], _Where]] = {}
    for owner, where in ((entry.item, entry.where), (entry.op, entry.op_where)):  # the operation's win
        listed = _list(owner.get("parameters") or [], (*where, "parameters"))
        for index, raw in enumerate(listed):
            param, at = refs.deref(raw, (*where, "parameters", index))
            merged[_parameter_key(param, at)] = (param, at)
    names = [name for name, _ in merged]
    params: list[_OperationParam] = []
    for (name, location), (param, at) in merged.items():
        if location == "header" and name.lower() in _IGNORED_HEADERS:
            continue
        key = name if names.count(name) == 1 else f"{name}_{location}"
        prop, as_json = _parameter_schema(refs, param, at)
        properties[key] = prop
        if param.get("required") is True or location == "path":
            required.append(key)
        style = param.get("style") if isinstance(param.get("style"), str) else None
        style = style or ("form" if location in ("query", "cookie") else "simple")
        explode = bool(param.get("explode", style == "form"))
        params.append(_OperationParam(name, location, key, style, explode, as_json))
    return tuple(params)


def _parameter_key(param: dict[str, Any], at: _Where) -> tuple[str, str]:
    name, location = param.get("name"), param.get("in")
    if not isinstance(name, str) or not isinstance(location, str):
        _malformed(at, "a parameter needs a string `name` and a string `in`")
    if location not in _LOCATIONS:
        raise _Unsupported(f"its parameter {name!r} is in {location!r}, which is none of {', '.join(_LOCATIONS)}")
    return name, location


def _parameter_schema(refs: _Refs, param: dict[str, Any], at: _Where) -> tuple[dict[str, Any], bool]:
    """The parameter's schema, and whether it is described by `content` (sent as JSON text) rather than `schema`."""
    if "schema" in param:
        prop = refs.schema(param["schema"] or {}, (*at, "schema"))
    else:
        content = _object(param.get("content") or {}, (*at, "content"))
        media, first = next(iter(content.items()), ("", {}))
        prop = refs.schema(_object(first, (*at, "content", media)).get("schema") or {}, (*at, "content", media))
    if isinstance(param.get("description"), str) and "description" not in prop:
        prop["description"] = param["description"]
    return prop, "schema" not in param and bool(param.get("content"))


def _request_body(
    refs: _Refs, raw: Any, where: _Where, properties: dict[str, Any], required: list[str]
) -> _Body | None:
    """The body's arguments, added to `properties`; `_Unsupported` when a required body is neither JSON nor a
    form (multipart, binary)."""
    if raw is None:
        return None
    body, at = refs.deref(raw, where)
    content = _object(body.get("content") or {}, (*at, "content"))
    media_types = [m for m in content if isinstance(m, str)]
    media = next((m for m in media_types if _is_json_media_type(m)), None) or next(
        (m for m in media_types if m == "application/x-www-form-urlencoded"), None
    )
    if media is None:
        if body.get("required") is True:
            raise _Unsupported(f"its request body is none of JSON or form, but {sorted(media_types)}")
        return None
    media_at = (*at, "content", media)
    schema = refs.schema(_object(content[media], media_at).get("schema") or {}, (*media_at, "schema"))
    flat = schema.get("properties") if _is_plain_object(schema) else None
    if isinstance(flat, dict) and flat and not set(flat) & set(properties):
        properties.update(flat)
        if body.get("required") is True and isinstance(schema.get("required"), list):
            required.extend(key for key in schema["required"] if isinstance(key, str) and key in flat)
        extra = schema.get("additionalProperties", True) is not False
        return _Body(media, None, frozenset(flat), extra)
    key = "body" if "body" not in properties else "request_body"
    properties[key] = schema
    if body.get("required") is True:
        required.append(key)
    return _Body(media, key)


def _is_json_media_type(media_type: str) -> bool:
    base = media_type.split(";")[0].strip().lower()
    return base in ("application/json", "*/*") or base.endswith("+json")


def _is_plain_object(schema: dict[str, Any]) -> bool:
    composed = any(key in schema for key in ("allOf", "anyOf", "oneOf", "$ref"))
    return schema.get("type", "object") == "object" and not composed


def _operation_url(document: dict[str, Any], entry: _Found, base_url: str | None, spec_url: str | None) -> str:
    """The operation's base URL: `base_url`, else the first of its own, its path's or the document's `servers`."""
    for owner, where in ((entry.op, entry.op_where), (entry.item, entry.where), (document, ())):
        if owner.get("servers"):
            return _server_url(owner["servers"], (*where, "servers"), base_url, spec_url)
    return _server_url(None, ("servers",), base_url, spec_url)


def _server_url(servers: Any, where: _Where, base_url: str | None, spec_url: str | None) -> str:
    url = _first_server(servers, where)
    if base_url:
        return base_url.rstrip("/")
    if _is_http(url):
        return url.rstrip("/")
    if spec_url is None:
        raise ConfigurationError(
            f"the OpenAPI document's server URL {url!r} is relative and it was not fetched from a URL; pass base_url="
        )
    return urljoin(spec_url, url).rstrip("/")


def _first_server(servers: Any, where: _Where) -> str:
    """The first server's URL with its variables at their defaults ("/" when there is none); every entry of
    `servers` must be an object."""
    if not servers:
        return "/"
    listed = _list(servers, where)
    for index, server in enumerate(listed):
        _object(server, (*where, index))
    first, at = listed[0], (*where, 0)
    url = first.get("url", "/")
    if not isinstance(url, str):
        _malformed((*at, "url"), f"a server URL must be a string, not {_kind(url)}")
    for var, spec in _object(first.get("variables") or {}, (*at, "variables")).items():
        default = _object(spec, (*at, "variables", var)).get("default", "")
        if not isinstance(default, (str, int, float)):
            _malformed((*at, "variables", var, "default"), f"a default must be a string, not {_kind(default)}")
        url = url.replace("{" + str(var) + "}", str(default))
    return url


def _document_base(document: dict[str, Any], base_url: str | None, spec_url: str | None) -> str | None:
    servers = document.get("servers")
    _first_server(servers, ("servers",))
    if base_url:
        return base_url.rstrip("/")
    try:
        return _server_url(servers, ("servers",), None, spec_url)
    except ConfigurationError:
        return None


# -- malformed documents ---------------------------------------------------------------------------------
def _malformed(where: _Where, problem: str) -> NoReturn:
    raise ConfigurationError(f"malformed OpenAPI document at {_pointer(where)}: {problem}")


def _pointer(where: _Where) -> str:
    """The JSON pointer (as a URI fragment) of `where`; very long keys are cut short."""
    parts = (str(part)[:80].replace("~", "~0").replace("/", "~1") for part in where)
    return "#" + "".join("/" + part for part in parts)


def _kind(value: Any) -> str:
    kinds = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _object(node: Any, where: _Where) -> dict[str, Any]:
    if not isinstance(node, dict):
        _malformed(where, f"expected an object, found {_kind(node)}")
    return node


def _list(node: Any, where: _Where) -> list[Any]:
    if not isinstance(node, list):
        _malformed(where, f"expected a list, found {_kind(node)}")
    return node


class _Budget:
    """Bounds the work of inlining `$ref`s: nodes for the whole document (and, by `Refs`, for one tool) and
    nesting depth, so that nested references that multiply (billion laughs) or YAML aliases that contain
    themselves end as a `ConfigurationError`, not as hours of work or a RecursionError."""

    def __init__(self, nodes: int) -> None:
        self.limit = self.left = nodes

    def spend(self, where: _Where, depth: int) -> None:
        self.left -= 1
        if self.left < 0:
            _malformed(where, f"its schemas expand to more than {self.limit:,} nodes once $refs are inlined")
        if depth > _MAX_DEPTH:
            _malformed(where, f"schemas nest deeper than {_MAX_DEPTH} levels once $refs are inlined")


# -- $ref ------------------------------------------------------------------------------------------------
class _Refs:
    """Local `$ref`s of one document, inlined; a reference back into itself goes to `$defs` once.

    One per tool: its own `$defs`, and a node budget of its own inside the document's."""

    def __init__(self, document: dict[str, Any], budget: _Budget | None = None) -> None:
        self.document = document
        self.defs: dict[str, Any] = {}
        self._names: dict[str, str] = {}  # ref -> name in $defs
        self._pending: list[str] = []
        self._document_budget = budget or _Budget(_MAX_DOCUMENT_NODES)
        self._budget = _Budget(_MAX_OPERATION_NODES)
        self._acyclic: set[str] = set()  # refs whose chain of `$ref`s ends somewhere

    def deref(self, node: Any, where: _Where) -> tuple[dict[str, Any], _Where]:
        """A parameter, request body or path item that may be a `$ref` to one, and where it really is."""
        node, where = self._follow(node, where)
        return _object(node, where), where

    def pointer(self, ref: str, where: _Where) -> Any:
        """What the local `ref` (met at `where`) points to."""
        node: Any = self.document
        for part in _ref_parts(ref, where):
            if isinstance(node, list) and isinstance(part, str) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                _malformed(where, f"$ref {ref!r} points to nothing in the document")
        return node

    def schema(self, node: Any, where: _Where) -> dict[str, Any]:
        result = self._schema(node, (), where, 0)
        return result if isinstance(result, dict) else {}

    def finish(self) -> dict[str, Any]:
        """Every recursive schema met so far, itself resolved (its own self-references stay `$ref`s)."""
        while self._pending:
            ref = self._pending.pop()
            where = _ref_parts(ref, ())
            self.defs[self._names[ref]] = self._schema(self.pointer(ref, where), (ref,), where, 0)
        return self.defs

    def _follow(self, node: Any, where: _Where, *, schema: bool = False) -> tuple[Any, _Where]:
        """Through a chain of `$ref`s to what it ends at; a chain that comes back to itself is malformed. A
        reference outside the document ends a schema's chain (it becomes a placeholder) and fails any other."""
        chain: list[str] = []
        start = where
        while isinstance(node, dict) and isinstance(node.get("$ref"), str):
            ref = node["$ref"]
            if schema and not _is_local(ref):
                break
            if not ref.startswith("#"):
                _malformed(where, f"$ref {ref!r} is outside the document, which is not fetched")
            if ref in chain:
                _malformed(start, f"$ref cycle: {' -> '.join([*chain, ref])}")
            chain.append(ref)
            node, where = self.pointer(ref, where), _ref_parts(ref, where)
        return node, where

    def _schema(self, node: Any, stack: tuple[str, ...], where: _Where, depth: int) -> Any:
        self._spend(where, depth)
        if isinstance(node, list):
            return [self._schema(item, stack, (*where, index), depth + 1) for index, item in enumerate(node)]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str):
            siblings = {k: self._schema(v, stack, (*where, k), depth + 1) for k, v in node.items() if k != "$ref"}
            return {**self._resolve(ref, stack, where, depth), **siblings}
        return _request_view(
            map_subschemas(
                {key: value for key, value in node.items() if key not in _NOISE_KEYS},
                lambda sub, keys: self._schema(sub, stack, (*where, *keys), depth + 1),
                lambda key, value: self._value(value, (*where, key), depth + 1),
            )
        )

    def _value(self, value: Any, where: _Where, depth: int) -> Any:
        """A keyword's value (enum, default, example, ...), copied within the budget: YAML aliases may share one
        structure many times over, or make it contain itself."""
        self._spend(where, depth)
        if isinstance(value, list):
            return [self._value(item, (*where, index), depth + 1) for index, item in enumerate(value)]
        if isinstance(value, dict):
            return {key: self._value(item, (*where, key), depth + 1) for key, item in value.items()}
        return value

    def _spend(self, where: _Where, depth: int) -> None:
        self._budget.spend(where, depth)
        self._document_budget.spend(where, depth)

    def _resolve(self, ref: str, stack: tuple[str, ...], where: _Where, depth: int) -> dict[str, Any]:
        if not _is_local(ref):
            logger.warning("OpenAPI $ref %r is outside the document and is not fetched; it accepts any value", ref)
            return {"description": f"(a value described by {ref}, which was not fetched)"}
        if ref not in self._acyclic:
            self._follow({"$ref": ref}, where, schema=True)
            self._acyclic.add(ref)
        if ref in stack:
            if ref not in self._names:
                self._names[ref] = unique_tool_name(ref.rsplit("/", 1)[-1], set(self._names.values()), "schema")
                self.defs[self._names[ref]] = {}
                self._pending.append(ref)
            return {"$ref": f"#/$defs/{self._names[ref]}"}
        target = _ref_parts(ref, where)
        resolved = self._schema(self.pointer(ref, where), (*stack, ref), target, depth + 1)
        return resolved if isinstance(resolved, dict) else {}


def _is_local(ref: str) -> bool:
    return ref == "#" or ref.startswith("#/")


def _ref_parts(ref: str, where: _Where) -> _Where:
    """The keys of a local `$ref` ("#/components/schemas/Pet" -> components, schemas, Pet)."""
    if ref == "#":
        return ()
    if not ref.startswith("#/"):
        _malformed(where, f"$ref {ref!r} is not a JSON pointer into the document")
    return tuple(unquote(part).replace("~1", "/").replace("~0", "~") for part in ref[2:].split("/"))


def _request_view(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI 3.0 quirks as JSON Schema, seen from a request: `nullable` becomes a null type, and
    `readOnly` properties (which a client must not send) go."""
    if schema.pop("nullable", False) is True and isinstance(schema.get("type"), str):
        schema["type"] = [schema["type"], "null"]
    properties = schema.get("properties")
    if isinstance(properties, dict):
        hidden = {k for k, v in properties.items() if isinstance(v, dict) and v.get("readOnly") is True}
        if hidden:
            schema["properties"] = {k: v for k, v in properties.items() if k not in hidden}
            if isinstance(schema.get("required"), list):
                schema["required"] = [k for k in schema["required"] if k not in hidden]
    return schema


# -- requests --------------------------------------------------------------------------------------------
@dataclass
class _PreparedRequest:
    url: str
    options: dict[str, Any]


def _build_request(op: Operation, arguments: dict[str, Any]) -> _PreparedRequest:
    unknown = set(arguments) - op.known_keys()
    if unknown and not (op.body is not None and op.body.key is None and op.body.extra_allowed):
        expected = ", ".join(sorted(op.known_keys())) or "none"
        raise ValueError(f"unknown argument(s) {', '.join(sorted(unknown))}; {op.name} takes: {expected}")
    path, query, headers, cookies = op.path, [], {}, []
    for param in op.params:
        if param.key not in arguments or arguments[param.key] is None:
            continue
        value = arguments[param.key]
        if param.location == "path":
            path = path.replace("{" + param.name + "}", _path_value(value, param))
        elif param.location == "query":
            query.extend(_query_pairs(value, param))
        elif param.location == "header":
            headers[param.name] = _joined(value, param, ",")
        elif param.location == "cookie":
            cookies.append(f"{param.name}={quote(_joined(value, param, ','), safe='')}")
    if cookies:
        headers["Cookie"] = "; ".join(cookies)
    options: dict[str, Any] = {"params": query, "headers": headers}
    if op.body is not None:
        _add_body(op.body, op, arguments, options)
    return _PreparedRequest(op.base_url + path, options)


def _add_body(body: _Body, op: Operation, arguments: dict[str, Any], options: dict[str, Any]) -> None:
    if body.key is not None:
        if body.key not in arguments:
            return
        payload = arguments[body.key]
    else:
        claimed = {p.key for p in op.params}
        payload = {k: v for k, v in arguments.items() if k not in claimed}
        if not payload:
            return
    if _is_json_media_type(body.media_type):
        options["json"] = payload
    else:
        options["data"] = payload if isinstance(payload, dict) else {"value": payload}


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return str(value)


def _joined(value: Any, param: _OperationParam, separator: str) -> str:
    """The `simple` style (and form without explode): items and key-value pairs joined by `separator`."""
    if param.as_json:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if isinstance(value, list):
        return separator.join(_scalar(v) for v in value)
    if isinstance(value, dict):
        if param.explode:
            return separator.join(f"{k}={_scalar(v)}" for k, v in value.items())
        return separator.join(f"{k}{separator}{_scalar(v)}" for k, v in value.items())
    return _scalar(value)


def _path_value(value: Any, param: _OperationParam) -> str:
    """Each piece percent-encoded, `/` included, and `.`/`..` too: a value must not climb out of its path."""
    text = _joined(value, param, "\x00")
    pieces = [quote(piece, safe="=") for piece in text.split("\x00")]
    return ",".join(piece.replace(".", "%2E") if piece in (".", "..") else piece for piece in pieces)


def _query_pairs(value: Any, param: _OperationParam) -> list[tuple[str, str]]:
    if param.as_json:
        return [(param.name, _joined(value, param, ","))]
    if param.style == "deepObject" and isinstance(value, dict):
        return [(f"{param.name}[{k}]", _scalar(v)) for k, v in value.items()]
    if param.explode and isinstance(value, list):
        return [(param.name, _scalar(v)) for v in value]
    if param.explode and isinstance(value, dict):
        return [(str(k), _scalar(v)) for k, v in value.items()]
    separator = {"spaceDelimited": " ", "pipeDelimited": "|"}.get(param.style, ",")
    return [(param.name, _joined(value, param, separator))]
