"""OpenAPI tools keep every cookie with its own origin (scheme, host and port), on every redirect hop and every
later call.

Two plain HTTP servers on 127.0.0.1 at different ports are two origins on one host, which is exactly where a
cookie jar that follows RFC 6265 (cookies scoped by host, not port) would leak: `api` (A) serves the document, sets
a session cookie and redirects within itself or to B; `other` (B) serves two operations of the document, redirects
within itself, to A and back, and sets a cookie of its own. Both servers record every request's headers, every hop
included. The safety net of test_openapi_security.py (no request leaves 127.0.0.0/8) is on for every test here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("httpx")

from functionary_agent.integrations.openapi import openapi_tools
from functionary_agent.tools import ToolOutcome
from tests.servers.recording_http import Answer, Received, Recorder, recording_server, redirect
from tests.test_openapi_security import net  # noqa: F401  (the autouse safety net: only 127.0.0.0/8 is reached)

SESSION = "session=a-secret"
CONFIGURED = "sso=configured-secret"
KEY = {"X-API-Key": "sk-do-not-leak"}


def document(b_url: str) -> dict[str, Any]:
    """Operations at A (where the document was fetched), and two served by B."""

    def get(op_id: str, **extra: Any) -> dict[str, Any]:
        return {"get": {"operationId": op_id, **extra}}

    at_b = {"servers": [{"url": b_url}]}
    flavour = {"name": "flavour", "in": "cookie", "schema": {"type": "string"}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "Cookies", "version": "1"},
        "paths": {
            "/login": get("login"),
            "/a-hop": get("a_hop", parameters=[flavour]),
            "/to-b": get("to_b"),
            "/b-hop": get("b_hop", **at_b),
            "/b-to-a": get("b_to_a", **at_b),
        },
    }


def echo(request: Received) -> Answer:
    seen = {"path": request.path, "cookie": request.headers.get("cookie")}
    return 200, {"Content-Type": "application/json"}, json.dumps(seen).encode()


def a_answer(b_url: str) -> Callable[[Received], Answer]:
    def answer(request: Received) -> Answer:
        if request.path == "/openapi.json":
            return 200, {"Content-Type": "application/json"}, json.dumps(document(b_url)).encode()
        if request.path == "/login":
            return 200, {"Set-Cookie": f"{SESSION}; Path=/", "Content-Type": "text/plain"}, b"logged in"
        hops = {"/a-hop": "/a-hop2", "/a-hop2": "/a-landing", "/to-b": f"{b_url}/landing", "/back-to-b": f"{b_url}/x"}
        return redirect(hops[request.path]) if request.path in hops else echo(request)

    return answer


def b_answer(a_url: Callable[[], str]) -> Callable[[Received], Answer]:
    def answer(request: Received) -> Answer:
        if request.path == "/b-hop":
            status, headers, body = redirect("/b-hop2")
            return status, {**headers, "Set-Cookie": "b-own=1; Path=/"}, body
        if request.path == "/b-hop2":
            return redirect("/b-landing")
        if request.path == "/b-to-a":
            return redirect(f"{a_url()}/back-to-b")
        return echo(request)

    return answer


@pytest.fixture
def servers() -> Iterator[tuple[Recorder, Recorder]]:
    """(A, B); B learns A's URL once A is up."""
    a_url: list[str] = []
    with recording_server(b_answer(lambda: a_url[0])) as b, recording_server(a_answer(b.url)) as a:
        a_url.append(a.url)
        yield a, b


def run_calls(spec: str, calls: list[tuple[str, dict[str, Any]]], **options: Any) -> list[ToolOutcome]:
    async def main() -> list[ToolOutcome]:
        async with await openapi_tools(spec, **options) as service:
            tools = {t.name: t for t in service.tools}
            return [await tools[name].run(arguments) for name, arguments in calls]

    return asyncio.run(main())


def cookies_by_path(recorder: Recorder) -> list[tuple[str, str | None]]:
    return [(r.path, r.headers.get("cookie")) for r in recorder.requests]


# -- cookies a service sets -----------------------------------------------------------------------------------
def test_a_session_cookie_never_reaches_another_port_on_any_hop(servers: tuple[Recorder, Recorder]) -> None:
    a, b = servers
    login, b_hop, b_to_a, a_hop = run_calls(
        f"{a.url}/openapi.json", [("login", {}), ("b_hop", {}), ("b_to_a", {}), ("a_hop", {})],
        headers=KEY, other_origins="without_headers",
    )
    assert login.content == "logged in"
    assert json.loads(b_hop.content) == {"path": "/b-landing", "cookie": "b-own=1"}
    assert b_to_a.is_error and f"redirected it to {a.url}/back-to-b, another origin" in b_to_a.content
    assert cookies_by_path(b) == [
        ("/b-hop", None), ("/b-hop2", "b-own=1"), ("/b-landing", "b-own=1"), ("/b-to-a", "b-own=1")
    ]  # B's own cookie comes back to B; A's session never does, on the first request or any hop
    assert cookies_by_path(a) == [
        ("/openapi.json", None), ("/login", None), ("/a-hop", SESSION), ("/a-hop2", SESSION), ("/a-landing", SESSION)
    ]  # A's own hops carry A's cookie, never B's; B's redirect to A was not followed
    assert json.loads(a_hop.content) == {"path": "/a-landing", "cookie": SESSION}
    assert b.header_values("x-api-key") == [None] * 4


def test_a_trusted_origin_gets_the_headers_but_not_the_cookies_another_origin_set(
    servers: tuple[Recorder, Recorder],
) -> None:
    a, b = servers
    _, b_hop = run_calls(f"{a.url}/openapi.json", [("login", {}), ("b_hop", {})], headers=KEY, trusted_origins=[b.url])
    assert json.loads(b_hop.content) == {"path": "/b-landing", "cookie": "b-own=1"}
    assert b.header_values("x-api-key") == [KEY["X-API-Key"]] * 3
    assert SESSION not in str(cookies_by_path(b))


def test_a_redirect_from_a_to_b_is_still_refused(servers: tuple[Recorder, Recorder]) -> None:
    a, b = servers
    _, to_b = run_calls(f"{a.url}/openapi.json", [("login", {}), ("to_b", {})], other_origins="without_headers")
    assert to_b.is_error and f"redirected it to {b.url}/landing, another origin" in to_b.content
    assert b.requests == []
    assert cookies_by_path(a)[-1] == ("/to-b", SESSION)


# -- a cookie the user configured, and cookie parameters -------------------------------------------------------
def test_a_configured_cookie_goes_to_its_origin_on_every_hop_and_nowhere_else(
    servers: tuple[Recorder, Recorder],
) -> None:
    a, b = servers
    b_hop, b_to_a, a_hop = run_calls(
        f"{a.url}/openapi.json", [("b_hop", {}), ("b_to_a", {}), ("a_hop", {})],
        headers={"Cookie": CONFIGURED}, other_origins="without_headers",
    )
    assert json.loads(b_hop.content)["cookie"] == "b-own=1"
    assert b_to_a.is_error
    assert json.loads(a_hop.content) == {"path": "/a-landing", "cookie": CONFIGURED}
    assert CONFIGURED not in str(cookies_by_path(b))
    assert cookies_by_path(a) == [
        ("/openapi.json", CONFIGURED), ("/a-hop", CONFIGURED), ("/a-hop2", CONFIGURED), ("/a-landing", CONFIGURED)
    ]


def test_cookie_parameters_stay_on_the_redirect_hops_of_their_call(servers: tuple[Recorder, Recorder]) -> None:
    a, _ = servers
    first, second = run_calls(f"{a.url}/openapi.json", [("a_hop", {"flavour": "oat"}), ("a_hop", {})])
    assert json.loads(first.content)["cookie"] == "flavour=oat"
    assert json.loads(second.content)["cookie"] is None  # an argument of one call, not a cookie kept for later
