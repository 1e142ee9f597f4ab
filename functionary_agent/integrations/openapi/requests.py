"""Calling an operation: the HTTP request built from the model's arguments, sent, and its answer read back.

Arguments go where the operation says (path, query, header, cookie, body) in the parameter's style; a path value
is percent-encoded piece by piece, so it cannot climb out of its path. Non-2xx answers, refused requests and
network failures raise `HTTPCallError` with the method, URL, status and the start of the body, so `Tool.run` hands
the model an "Error: ..." message it can act on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from functionary_agent._text import cut
from functionary_agent.integrations._http_guard import RequestRefused
from functionary_agent.integrations.openapi.document import Body, Operation, OperationParam, is_json_media_type
from functionary_agent.integrations.openapi.origins import Access, OriginCookies, send_within_origin

_ERROR_BODY_CHARS = 1000


class HTTPCallError(Exception):
    """A call the service refused (non-2xx) or that never reached it; the message is written for the model.
    `transient`: the fault may pass (a network failure, 408, 429, 5xx), so an identical retry is allowed."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


# -- sending ---------------------------------------------------------------------------------------------
async def send(
    client: httpx.AsyncClient, access: Access, cookies: OriginCookies, op: Operation, request: PreparedRequest
) -> httpx.Response:
    """Send `request` with the headers its origin may have, following redirects within the origin; a refusal or
    a request that never reached the service is `HTTPCallError`."""
    method = op.method.upper()
    options = dict(request.options)
    own_headers: dict[str, str] = options.pop("headers")
    try:
        url = httpx.URL(request.url)
        headers = {**access.headers_for(url, op.name), **own_headers}
        outgoing = client.build_request(method, url, headers=headers, **options)
        return await send_within_origin(client, outgoing, cookies)
    except RequestRefused as exc:
        raise HTTPCallError(f"{method} {request.url}: {exc}") from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        message = f"{method} {request.url} failed: {type(exc).__name__}: {exc}"
        raise HTTPCallError(message, transient=isinstance(exc, httpx.TransportError)) from exc


def read_response(op: Operation, request: PreparedRequest, response: httpx.Response, max_chars: int) -> str:
    """The answer's body for the model (cut to `max_chars`, head and tail kept); a non-2xx is `HTTPCallError`."""
    if not response.is_success:
        raise HTTPCallError(
            f"{op.method.upper()} {request.url} returned HTTP {response.status_code} {response.reason_phrase}: "
            f"{cut(response.text, _ERROR_BODY_CHARS) or '(empty body)'}",
            transient=response.status_code in (408, 429) or response.status_code >= 500,
        )
    text = response.text
    if not text:
        return f"HTTP {response.status_code} {response.reason_phrase}"
    return cut(text, max_chars)


# -- building ---------------------------------------------------------------------------------------------
@dataclass
class PreparedRequest:
    """A call before it is sent: the full URL, and httpx's `params`, `headers` and `json`/`data`."""

    url: str
    options: dict[str, Any]


def build_request(op: Operation, arguments: dict[str, Any]) -> PreparedRequest:
    """The request for the model's `arguments`; `ValueError` (for the model) on an argument the tool does not take."""
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
    return PreparedRequest(op.base_url + path, options)


def _add_body(body: Body, op: Operation, arguments: dict[str, Any], options: dict[str, Any]) -> None:
    if body.key is not None:
        if body.key not in arguments:
            return
        payload = arguments[body.key]
    else:
        claimed = {p.key for p in op.params}
        payload = {k: v for k, v in arguments.items() if k not in claimed}
        if not payload:
            return
    if is_json_media_type(body.media_type):
        options["json"] = payload
    else:
        options["data"] = payload if isinstance(payload, dict) else {"value": payload}


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return str(value)


def _joined(value: Any, param: OperationParam, separator: str) -> str:
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


def _path_value(value: Any, param: OperationParam) -> str:
    """Each piece percent-encoded, `/` included, and `.`/`..` too: a value must not climb out of its path."""
    text = _joined(value, param, "\x00")
    pieces = [quote(piece, safe="=") for piece in text.split("\x00")]
    return ",".join(piece.replace(".", "%2E") if piece in (".", "..") else piece for piece in pieces)


def _query_pairs(value: Any, param: OperationParam) -> list[tuple[str, str]]:
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
