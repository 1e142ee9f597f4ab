"""An OpenAPI 3.x document and its operations as tools: loading it, then one `Operation` per operation.

One tool per operation, named from its operationId. Its arguments are the operation's path, query, header and
cookie parameters, each under its own name, plus the JSON (or form) request body: an object body's properties sit
beside the parameters when no name clashes, otherwise the whole body is one `body` argument. Schemas are resolved
by `refs`; an operation that cannot become a tool (a parameter in no known place, a required body that is neither
JSON nor a form) is skipped with a warning, and a malformed one is a `ConfigurationError` naming the operation.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx

from functionary_agent.errors import ConfigurationError
from functionary_agent.integrations._http_guard import RequestRefused
from functionary_agent.integrations.openapi.origins import OriginCookies, is_http_url, send_within_origin
from functionary_agent.integrations.openapi.refs import (
    Budget,
    Refs,
    Where,
    expect_list,
    expect_object,
    kind_of,
    malformed,
)
from functionary_agent.tools import unique_tool_name

logger = logging.getLogger(__name__)

Include = Sequence[str] | Callable[[str], bool] | None

_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_LOCATIONS = ("path", "query", "header", "cookie")
_IGNORED_HEADERS = {"accept", "content-type", "authorization"}  # OpenAPI: such header parameters are ignored


class _Unsupported(Exception):
    """An operation that cannot become a tool; it is skipped with a warning, the others still load."""


@dataclass(frozen=True)
class OperationParam:
    """One parameter: where it goes over HTTP, under which argument, and how its value is written."""

    name: str  # as sent over HTTP
    location: str  # path, query, header, cookie
    key: str  # the argument's name in the tool's schema
    style: str
    explode: bool
    as_json: bool  # described with `content` rather than `schema`: the value is sent as JSON text


@dataclass(frozen=True)
class Body:
    """The request body: its media type, and the argument it comes from (or the flat arguments)."""

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
    params: tuple[OperationParam, ...] = ()
    body: Body | None = None

    def known_keys(self) -> set[str]:
        """The argument names the tool takes."""
        keys = {p.key for p in self.params}
        if self.body is not None:
            keys |= {self.body.key} if self.body.key else set(self.body.flat_keys)
        return keys


# -- loading ---------------------------------------------------------------------------------------------
async def load_document(
    spec: Mapping[str, Any] | str | os.PathLike[str], client: httpx.AsyncClient, headers: Mapping[str, str]
) -> tuple[dict[str, Any], str | None]:
    """The document as a dict, and the URL it came from (relative server URLs are relative to it)."""
    if isinstance(spec, Mapping):
        document: Any = copy.deepcopy(dict(spec))
        spec_url = None
    elif isinstance(spec, str) and is_http_url(spec):
        try:
            request = client.build_request("GET", spec, headers=dict(headers))
            response = await send_within_origin(client, request, OriginCookies())
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
    return str(value) if isinstance(value, (str, int, float)) else kind_of(value)


# -- operations ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Found:
    """One operation of the document, and where it is (its path item's JSON pointer; it is at `method` below)."""

    path: str
    method: str
    op: dict[str, Any]
    item: dict[str, Any]
    where: Where

    @property
    def op_where(self) -> Where:
        return (*self.where, self.method)


def operations_of(
    document: dict[str, Any], base_url: str | None, spec_url: str | None, include: Include
) -> list[Operation]:
    found: list[Operation] = []
    taken: set[str] = set()
    seen: set[str] = set()  # operationIds and tool names, to check `include` against
    predicate, wanted = _include_filter(include)
    budget = Budget()
    for entry in _walk_operations(document):
        op_id = entry.op.get("operationId") if isinstance(entry.op.get("operationId"), str) else None
        name = unique_tool_name(op_id or f"{entry.method} {entry.path}", taken, "operation")
        seen.update(n for n in (op_id, name) if n)
        if not _included(predicate, wanted, op_id, name):
            continue
        url = _operation_url(document, entry, base_url, spec_url)
        try:
            found.append(_build_operation(Refs(document, budget), entry, name, op_id, url))
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
    refs = Refs(document)
    paths = document.get("paths")
    if paths is None:
        return
    for path, raw in expect_object(paths, ("paths",)).items():
        if not isinstance(path, str):
            malformed(("paths",), f"the path {path!r} is not a string")
        item, where = refs.deref(raw, ("paths", path))
        for method in _METHODS:
            if method in item:
                yield _Found(path, method, expect_object(item[method], (*where, method)), item, where)


def _included(predicate: Callable[[str], bool] | None, wanted: set[str] | None, op_id: str | None, name: str) -> bool:
    if wanted is not None:
        return op_id in wanted or name in wanted
    return predicate is None or bool(predicate(op_id or name))


def _build_operation(refs: Refs, entry: _Found, name: str, op_id: str | None, base_url: str) -> Operation:
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
    refs: Refs, entry: _Found, properties: dict[str, Any], required: list[str]
) -> tuple[OperationParam, ...]:
    merged: dict[tuple[str, str], tuple[dict[str, Any], Where]] = {}
    for owner, where in ((entry.item, entry.where), (entry.op, entry.op_where)):  # the operation's win
        listed = expect_list(owner.get("parameters") or [], (*where, "parameters"))
        for index, raw in enumerate(listed):
            param, at = refs.deref(raw, (*where, "parameters", index))
            merged[_parameter_key(param, at)] = (param, at)
    names = [name for name, _ in merged]
    params: list[OperationParam] = []
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
        params.append(OperationParam(name, location, key, style, explode, as_json))
    return tuple(params)


def _parameter_key(param: dict[str, Any], at: Where) -> tuple[str, str]:
    name, location = param.get("name"), param.get("in")
    if not isinstance(name, str) or not isinstance(location, str):
        malformed(at, "a parameter needs a string `name` and a string `in`")
    if location not in _LOCATIONS:
        raise _Unsupported(f"its parameter {name!r} is in {location!r}, which is none of {', '.join(_LOCATIONS)}")
    return name, location


def _parameter_schema(refs: Refs, param: dict[str, Any], at: Where) -> tuple[dict[str, Any], bool]:
    """The parameter's schema, and whether it is described by `content` (sent as JSON text) rather than `schema`."""
    if "schema" in param:
        prop = refs.schema(param["schema"] or {}, (*at, "schema"))
    else:
        content = expect_object(param.get("content") or {}, (*at, "content"))
        media, first = next(iter(content.items()), ("", {}))
        prop = refs.schema(expect_object(first, (*at, "content", media)).get("schema") or {}, (*at, "content", media))
    if isinstance(param.get("description"), str) and "description" not in prop:
        prop["description"] = param["description"]
    return prop, "schema" not in param and bool(param.get("content"))


def _request_body(
    refs: Refs, raw: Any, where: Where, properties: dict[str, Any], required: list[str]
) -> Body | None:
    """The body's arguments, added to `properties`; `_Unsupported` when a required body is neither JSON nor a
    form (multipart, binary)."""
    if raw is None:
        return None
    body, at = refs.deref(raw, where)
    content = expect_object(body.get("content") or {}, (*at, "content"))
    media_types = [m for m in content if isinstance(m, str)]
    media = next((m for m in media_types if is_json_media_type(m)), None) or next(
        (m for m in media_types if m == "application/x-www-form-urlencoded"), None
    )
    if media is None:
        if body.get("required") is True:
            raise _Unsupported(f"its request body is none of JSON or form, but {sorted(media_types)}")
        return None
    media_at = (*at, "content", media)
    schema = refs.schema(expect_object(content[media], media_at).get("schema") or {}, (*media_at, "schema"))
    flat = schema.get("properties") if _is_plain_object(schema) else None
    if isinstance(flat, dict) and flat and not set(flat) & set(properties):
        properties.update(flat)
        if body.get("required") is True and isinstance(schema.get("required"), list):
            required.extend(key for key in schema["required"] if isinstance(key, str) and key in flat)
        extra = schema.get("additionalProperties", True) is not False
        return Body(media, None, frozenset(flat), extra)
    key = "body" if "body" not in properties else "request_body"
    properties[key] = schema
    if body.get("required") is True:
        required.append(key)
    return Body(media, key)


def is_json_media_type(media_type: str) -> bool:
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


def _server_url(servers: Any, where: Where, base_url: str | None, spec_url: str | None) -> str:
    url = _first_server(servers, where)
    if base_url:
        return base_url.rstrip("/")
    if is_http_url(url):
        return url.rstrip("/")
    if spec_url is None:
        raise ConfigurationError(
            f"the OpenAPI document's server URL {url!r} is relative and it was not fetched from a URL; pass base_url="
        )
    return urljoin(spec_url, url).rstrip("/")


def _first_server(servers: Any, where: Where) -> str:
    """The first server's URL with its variables at their defaults ("/" when there is none); every entry of
    `servers` must be an object."""
    if not servers:
        return "/"
    listed = expect_list(servers, where)
    for index, server in enumerate(listed):
        expect_object(server, (*where, index))
    first, at = listed[0], (*where, 0)
    url = first.get("url", "/")
    if not isinstance(url, str):
        malformed((*at, "url"), f"a server URL must be a string, not {kind_of(url)}")
    for var, spec in expect_object(first.get("variables") or {}, (*at, "variables")).items():
        default = expect_object(spec, (*at, "variables", var)).get("default", "")
        if not isinstance(default, (str, int, float)):
            malformed((*at, "variables", var, "default"), f"a default must be a string, not {kind_of(default)}")
        url = url.replace("{" + str(var) + "}", str(default))
    return url


def document_base(document: dict[str, Any], base_url: str | None, spec_url: str | None) -> str | None:
    servers = document.get("servers")
    _first_server(servers, ("servers",))
    if base_url:
        return base_url.rstrip("/")
    try:
        return _server_url(servers, ("servers",), None, spec_url)
    except ConfigurationError:
        return None
