"""OpenAPI 3.x services as tools: every operation becomes a tool, called over HTTP with httpx.

One tool per operation, named from its operationId. Its arguments are the operation's path, query, header and
cookie parameters, each under its own name, plus the JSON (or form) request body: an object body's properties sit
beside the parameters when no name clashes, otherwise the whole body is one `body` argument. Local `$ref`s are
inlined (a schema that refers back to itself stays in `$defs`, as for recursive Python models); references to
other files or URLs are not fetched: such a schema accepts any value and says so in its description.

Non-2xx answers and network failures raise `HTTPCallError` with the method, URL, status and the start of the body,
so `Tool.run` hands the model an "Error: ..." message it can act on.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import re
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urljoin

from functionary_agent.errors import ConfigurationError
from functionary_agent.tools import Tool

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("OpenAPI tools need httpx: pip install 'functionary-agent[openapi]'") from exc

__all__ = ["HTTPCallError", "OpenAPITools", "Operation", "openapi_tools"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Include = Sequence[str] | Callable[[str], bool] | None

_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_IGNORED_HEADERS = {"accept", "content-type", "authorization"}  # OpenAPI: such header parameters are ignored
_SCHEMA_KEYS = ("items", "additionalProperties", "not", "contains", "if", "then", "else", "propertyNames")
_SCHEMA_LIST_KEYS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_MAP_KEYS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_NOISE_KEYS = ("title", "xml", "externalDocs", "discriminator")  # titles are noise tokens to a model
_ERROR_BODY_CHARS = 1000


class HTTPCallError(Exception):
    """A call the service refused (non-2xx) or that never reached it; the message is written for the model."""


class _Unsupported(Exception):
    """An operation that cannot become a tool; it is skipped with a warning, the others still load."""


@dataclass(frozen=True)
class _Param:
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
    params: tuple[_Param, ...] = ()
    body: _Body | None = None

    def known_keys(self) -> set[str]:
        keys = {p.key for p in self.params}
        if self.body is not None:
            keys |= {self.body.key} if self.body.key else set(self.body.flat_keys)
        return keys


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
    ) -> None:
        self.operations = {op.name: op for op in operations}
        self.base_url = base_url
        self.tools = [Tool(op.name, op.description, op.parameters, _handler(self, op.name)) for op in operations]
        self._settings = dict(client_settings)
        self._client = httpx.AsyncClient(**self._settings)
        self._loop = asyncio.get_running_loop()
        self._max_chars = max_response_chars
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
        if asyncio.get_running_loop() is not self._loop and not self._loop.is_running():
            return  # that loop has stopped, and its connections went with it
        await self._on_own_loop(self._client.aclose)

    async def __aenter__(self) -> OpenAPITools:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _on_own_loop(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """The client's connections belong to the loop that made them: use it, or make a new client here when
        that loop has stopped (a second `asyncio.run`, say)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop and not self._closed:
            if self._loop.is_running() and not self._loop.is_closed():
                return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(make(), self._loop))
            self._client = httpx.AsyncClient(**self._settings)
            self._loop = loop
        return await make()

    async def _send(self, op: Operation, arguments: dict[str, Any]) -> str:
        request = _build_request(op, arguments)
        if self._closed:
            raise HTTPCallError(f"the tools of this OpenAPI service were closed; {op.name} cannot be called")
        try:
            response = await self._client.request(op.method.upper(), request.url, **request.options)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise HTTPCallError(f"{op.method.upper()} {request.url} failed: {type(exc).__name__}: {exc}") from exc
        if not response.is_success:
            raise HTTPCallError(
                f"{op.method.upper()} {request.url} returned HTTP {response.status_code} {response.reason_phrase}: "
                f"{_trim(response.text, _ERROR_BODY_CHARS) or '(empty body)'}"
            )
        text = response.text
        if not text:
            return f"HTTP {response.status_code} {response.reason_phrase}"
        return _trim(text, self._max_chars)


async def openapi_tools(
    spec: Mapping[str, Any] | str | os.PathLike[str],
    base_url: str | None = None,
    headers: Mapping[str, str] | None = None,
    include: Include = None,
    *,
    timeout: float = 30.0,
    max_response_chars: int = 20_000,
) -> OpenAPITools:
    """Tools for the operations of an OpenAPI 3.x document: a dict, a JSON/YAML file, or an http(s) URL.

    `base_url` overrides the document's `servers` (needed when those are relative and the document was not
    fetched from a URL). `headers` go with every request, the spec download included (authentication, say).
    `include` keeps only some operations: a list of operationIds, or a predicate on the operationId (for an
    operation without one, on the tool name made from method and path).
    """
    settings: dict[str, Any] = {"headers": dict(headers or {}), "timeout": timeout, "follow_redirects": True}
    async with httpx.AsyncClient(**settings) as client:
        document, spec_url = await _load(spec, client)
    operations = _operations(document, base_url, spec_url, include)
    return OpenAPITools(
        operations,
        base_url=_document_base(document, base_url, spec_url),
        client_settings=settings,
        max_response_chars=max_response_chars,
    )


def _handler(tools: OpenAPITools, name: str) -> Callable[..., Coroutine[Any, Any, str]]:
    async def call_operation(**arguments: Any) -> str:
        return await tools.call(name, arguments)

    call_operation.__name__ = call_operation.__qualname__ = name
    return call_operation


# -- loading ---------------------------------------------------------------------------------------------
async def _load(
    spec: Mapping[str, Any] | str | os.PathLike[str], client: httpx.AsyncClient
) -> tuple[dict[str, Any], str | None]:
    """The document as a dict, and the URL it came from (relative server URLs are relative to it)."""
    if isinstance(spec, Mapping):
        document: Any = copy.deepcopy(dict(spec))
        spec_url = None
    elif isinstance(spec, str) and re.match(r"(?i)https?://", spec):
        try:
            response = await client.get(spec)
            response.raise_for_status()
        except httpx.HTTPError as exc:
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
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"OpenAPI document {source} is not valid JSON: {exc}") from exc
    try:
        import yaml
    except ImportError as exc:
        hint = "pip install 'functionary-agent[openapi]'"
        raise ConfigurationError(f"YAML OpenAPI documents need PyYAML: {hint}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"OpenAPI document {source} is neither JSON nor valid YAML: {exc}") from exc


def _check_version(document: Any, source: str) -> None:
    if not isinstance(document, dict):
        raise ConfigurationError(f"OpenAPI document {source} is not an object")
    version = str(document.get("openapi", ""))
    if not version.startswith("3."):
        found = f"Swagger {document['swagger']}" if "swagger" in document else f"openapi: {version or '(missing)'}"
        raise ConfigurationError(
            f"{source} is {found}; only OpenAPI 3.x is supported (convert Swagger 2.0 with swagger2openapi)"
        )


# -- operations ------------------------------------------------------------------------------------------
def _operations(
    document: dict[str, Any], base_url: str | None, spec_url: str | None, include: Include
) -> list[Operation]:
    found: list[Operation] = []
    taken: set[str] = set()
    seen: set[str] = set()  # operationIds and tool names, to check `include` against
    predicate, wanted = _include_filter(include)
    for path, method, op, item in _walk_operations(document):
        op_id = op.get("operationId") if isinstance(op.get("operationId"), str) else None
        name = _tool_name(op_id or f"{method} {path}", taken)
        seen.update(n for n in (op_id, name) if n)
        if not _included(predicate, wanted, op_id, name):
            continue
        servers = op.get("servers") or item.get("servers")
        url = base_url.rstrip("/") if base_url else _server_url(servers or document.get("servers"), spec_url)
        try:
            found.append(_build_operation(document, name, op_id, method, path, op, item, url))
        except _Unsupported as reason:
            logger.warning("OpenAPI operation %s skipped: %s", name, reason)
            continue
        taken.add(name)
    if wanted and wanted - seen:
        known = sorted(str(op["operationId"]) for _, _, op, _ in _walk_operations(document) if op.get("operationId"))
        raise ConfigurationError(f"include names unknown operations {sorted(wanted - seen)}; the document has {known}")
    return found


def _include_filter(include: Include) -> tuple[Callable[[str], bool] | None, set[str] | None]:
    if isinstance(include, str):
        return None, {include}
    if callable(include):
        return include, None
    return None, None if include is None else set(include)


def _walk_operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    refs = _Refs(document)
    for path, item in (document.get("paths") or {}).items():
        item = refs.deref(item)
        for method in _METHODS:
            if isinstance(item.get(method), dict):
                yield path, method, item[method], item


def _included(predicate: Callable[[str], bool] | None, wanted: set[str] | None, op_id: str | None, name: str) -> bool:
    if wanted is not None:
        return op_id in wanted or name in wanted
    return predicate is None or bool(predicate(op_id or name))


def _build_operation(
    document: dict[str, Any],
    name: str,
    op_id: str | None,
    method: str,
    path: str,
    op: dict[str, Any],
    item: dict[str, Any],
    base_url: str,
) -> Operation:
    refs = _Refs(document)
    properties: dict[str, Any] = {}
    required: list[str] = []
    params = _parameters(refs, op, item, properties, required)
    body = _request_body(refs, op.get("requestBody"), properties, required)
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    if refs.defs:
        schema["$defs"] = refs.finish()
    summary, details = op.get("summary") or "", op.get("description") or ""
    description = "\n\n".join(part for part in (summary, details if details != summary else "") if part)
    return Operation(
        name, op_id, method, path, base_url, description or f"{method.upper()} {path}", schema, params, body
    )


def _parameters(
    refs: _Refs, op: dict[str, Any], item: dict[str, Any], properties: dict[str, Any], required: list[str]
) -> tuple[_Param, ...]:
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for raw in [*(item.get("parameters") or []), *(op.get("parameters") or [])]:  # the operation's win
        param = refs.deref(raw)
        merged[(param.get("name", ""), param.get("in", ""))] = param
    names = [name for name, _ in merged]
    params: list[_Param] = []
    for (name, location), param in merged.items():
        if location == "header" and name.lower() in _IGNORED_HEADERS:
            continue
        key = name if names.count(name) == 1 else f"{name}_{location}"
        content: dict[str, Any] = param.get("content") or {}
        first_media: dict[str, Any] = next(iter(content.values()), {})
        raw_schema = param.get("schema") if "schema" in param else first_media.get("schema")
        prop = refs.schema(raw_schema or {})
        if param.get("description") and "description" not in prop:
            prop["description"] = param["description"]
        properties[key] = prop
        if param.get("required") or location == "path":
            required.append(key)
        style = param.get("style") or ("form" if location in ("query", "cookie") else "simple")
        explode = bool(param.get("explode", style == "form"))
        params.append(_Param(name, location, key, style, explode, "schema" not in param and bool(content)))
    return tuple(params)


def _request_body(refs: _Refs, raw: Any, properties: dict[str, Any], required: list[str]) -> _Body | None:
    """The body's arguments, added to `properties`; `_Unsupported` when a required body is neither JSON nor a
    form (multipart, binary)."""
    if raw is None:
        return None
    body = refs.deref(raw)
    content = body.get("content") or {}
    media = next((m for m in content if _is_json(m)), None) or next(
        (m for m in content if m == "application/x-www-form-urlencoded"), None
    )
    if media is None:
        if body.get("required"):
            raise _Unsupported(f"its request body is none of JSON or form, but {sorted(content)}")
        return None
    schema = refs.schema(content[media].get("schema") or {})
    flat = schema.get("properties") if _is_plain_object(schema) else None
    if isinstance(flat, dict) and flat and not set(flat) & set(properties):
        properties.update(flat)
        if body.get("required"):
            required.extend(key for key in schema.get("required", []) if key in flat)
        extra = schema.get("additionalProperties", True) is not False
        return _Body(media, None, frozenset(flat), extra)
    key = "body" if "body" not in properties else "request_body"
    properties[key] = schema
    if body.get("required"):
        required.append(key)
    return _Body(media, key)


def _is_json(media_type: str) -> bool:
    base = media_type.split(";")[0].strip().lower()
    return base in ("application/json", "*/*") or base.endswith("+json")


def _is_plain_object(schema: dict[str, Any]) -> bool:
    composed = any(key in schema for key in ("allOf", "anyOf", "oneOf", "$ref"))
    return schema.get("type", "object") == "object" and not composed


def _server_url(servers: Any, spec_url: str | None) -> str:
    server: dict[str, Any] = servers[0] if isinstance(servers, list) and servers else {"url": "/"}
    url = str(server.get("url", "/"))
    for var, spec in (server.get("variables") or {}).items():
        url = url.replace("{" + var + "}", str(spec.get("default", "")))
    if re.match(r"(?i)https?://", url):
        return url.rstrip("/")
    if spec_url is None:
        raise ConfigurationError(
            f"the OpenAPI document's server URL {url!r} is relative and it was not fetched from a URL; pass base_url="
        )
    return urljoin(spec_url, url).rstrip("/")


def _document_base(document: dict[str, Any], base_url: str | None, spec_url: str | None) -> str | None:
    if base_url:
        return base_url.rstrip("/")
    try:
        return _server_url(document.get("servers"), spec_url)
    except ConfigurationError:
        return None


def _tool_name(raw: str, taken: set[str]) -> str:
    """`^[a-zA-Z0-9_-]{1,64}$` from an operationId (or "get /items/{id}"), never a name already taken."""
    name = re.sub(r"[^a-zA-Z0-9_-]+", "_", raw).strip("_")[:64] or "operation"
    candidate, number = name, 2
    while candidate in taken:
        suffix = f"_{number}"
        candidate, number = name[: 64 - len(suffix)] + suffix, number + 1
    return candidate


# -- $ref ------------------------------------------------------------------------------------------------
class _Refs:
    """Local `$ref`s of one document, inlined; a reference back into itself goes to `$defs` once."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.defs: dict[str, Any] = {}
        self._names: dict[str, str] = {}  # ref -> name in $defs
        self._pending: list[str] = []

    def deref(self, node: Any, seen: tuple[str, ...] = ()) -> dict[str, Any]:
        """A parameter, request body or path item that may be a `$ref` to one."""
        if isinstance(node, dict) and isinstance(node.get("$ref"), str):
            ref = node["$ref"]
            if ref in seen or not ref.startswith("#"):
                raise ConfigurationError(f"cannot follow $ref {ref!r} (a loop, or outside the document)")
            return self.deref(self.pointer(ref), (*seen, ref))
        return node if isinstance(node, dict) else {}

    def pointer(self, ref: str) -> Any:
        node: Any = self.document
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                raise ConfigurationError(f"$ref {ref!r} points to nothing in the OpenAPI document")
        return node

    def schema(self, node: Any) -> dict[str, Any]:
        result = self._schema(node, ())
        return result if isinstance(result, dict) else {}

    def finish(self) -> dict[str, Any]:
        """Every recursive schema met so far, itself resolved (its own self-references stay `$ref`s)."""
        while self._pending:
            ref = self._pending.pop()
            self.defs[self._names[ref]] = self._schema(self.pointer(ref), (ref,))
        return self.defs

    def _schema(self, node: Any, stack: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [self._schema(item, stack) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str):
            siblings = {k: self._schema(v, stack) for k, v in node.items() if k != "$ref"}
            return {**self._resolve(ref, stack), **siblings}
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _SCHEMA_MAP_KEYS and isinstance(value, dict):
                out[key] = {name: self._schema(sub, stack) for name, sub in value.items()}
            elif key in _SCHEMA_KEYS or key in _SCHEMA_LIST_KEYS:
                out[key] = self._schema(value, stack)
            elif key not in _NOISE_KEYS:
                out[key] = value
        return _request_view(out)

    def _resolve(self, ref: str, stack: tuple[str, ...]) -> dict[str, Any]:
        if not ref.startswith("#"):
            logger.warning("OpenAPI $ref %r is outside the document and is not fetched; it accepts any value", ref)
            return {"description": f"(a value described by {ref}, which was not fetched)"}
        if ref in stack:
            if ref not in self._names:
                self._names[ref] = _tool_name(ref.rsplit("/", 1)[-1], set(self._names.values()))
                self.defs[self._names[ref]] = {}
                self._pending.append(ref)
            return {"$ref": f"#/$defs/{self._names[ref]}"}
        resolved = self._schema(self.pointer(ref), (*stack, ref))
        return resolved if isinstance(resolved, dict) else {}


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
class _Request:
    url: str
    options: dict[str, Any]


def _build_request(op: Operation, arguments: dict[str, Any]) -> _Request:
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
    return _Request(op.base_url + path, options)


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
    if _is_json(body.media_type):
        options["json"] = payload
    else:
        options["data"] = payload if isinstance(payload, dict) else {"value": payload}


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return str(value)


def _joined(value: Any, param: _Param, separator: str) -> str:
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


def _path_value(value: Any, param: _Param) -> str:
    """Each piece percent-encoded, `/` included, and `.`/`..` too: a value must not climb out of its path."""
    text = _joined(value, param, "\x00")
    pieces = [quote(piece, safe="=") for piece in text.split("\x00")]
    return ",".join(piece.replace(".", "%2E") if piece in (".", "..") else piece for piece in pieces)


def _query_pairs(value: Any, param: _Param) -> list[tuple[str, str]]:
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


def _trim(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit} more characters not shown]"
