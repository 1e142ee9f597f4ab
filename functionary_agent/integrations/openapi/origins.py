"""Where an OpenAPI service's requests may go, and with what: the user's headers, cookies, redirects.

The user's `headers` (credentials, say) go only to the origins the user named (`base_url`, the document's URL,
`trusted_origins`); a request for another origin is refused, or sent without them. Redirects are followed within
an origin only, and `_http_guard` checks every request, redirect hops included, before it is sent. Cookies are kept
per origin (scheme, host and port, not the host alone as RFC 6265 has it): a cookie a service sets goes back only
to that origin, on every redirect hop and later call, and httpx's shared jar keeps none.
"""

from __future__ import annotations

import http.cookiejar
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from functionary_agent.errors import ConfigurationError
from functionary_agent.integrations._http_guard import Origin, RequestGuard, RequestRefused

logger = logging.getLogger(__name__)

OtherOrigins = Literal["refuse", "without_headers"]
_MAX_REDIRECTS = 5


@dataclass(frozen=True)
class Access:
    """Who gets the user's headers: the guard's home origins; what a request for another origin gets."""

    headers: dict[str, str]
    guard: RequestGuard
    other_origins: OtherOrigins

    def headers_for(self, url: httpx.URL, tool_name: str) -> dict[str, str]:
        """The user's headers for a home origin, none for another (or `RequestRefused`, when other origins are
        refused and there are headers to withhold). The cookies kept for its origin are added as the request is
        sent, by `send_within_origin`."""
        if self.guard.trusts(url):
            return dict(self.headers)
        if self.headers and self.other_origins == "refuse":
            raise RequestRefused(
                f"{tool_name} is served at {Origin.of(url)}, but this service's headers go only to "
                f"{self.guard.home_text()}, so the call was refused before it was sent; the user can name that origin "
                "in trusted_origins=, or allow calls without the headers with other_origins='without_headers'"
            )
        return {}


# -- the origins the user named ---------------------------------------------------------------------------
def named_origins(
    spec: Mapping[str, Any] | str | os.PathLike[str], base_url: str | None, trusted: Sequence[str]
) -> set[Origin]:
    """The origins the user named: the only ones that receive `headers`."""
    if isinstance(trusted, str):
        trusted = [trusted]
    named = [("trusted_origins", url) for url in trusted]
    if base_url:
        named.append(("base_url", base_url))
    if isinstance(spec, str) and is_http_url(spec):
        named.append(("the document URL", spec))
    return {_origin(setting, url) for setting, url in named}


def make_access(home: set[Origin], headers: dict[str, str], other_origins: str, allow_link_local: bool) -> Access:
    """Who gets `headers` (the `home` origins), checked: headers need a home to go to."""
    if other_origins not in ("refuse", "without_headers"):
        raise ConfigurationError(f"other_origins must be 'refuse' or 'without_headers', not {other_origins!r}")
    if headers and not home:
        raise ConfigurationError(
            "headers= go only where you point them, and nothing does: pass base_url= (or trusted_origins=[...]) "
            "for a document given as a dict or a file"
        )
    guard = RequestGuard(home, headers, allow_link_local=allow_link_local)
    return Access(headers, guard, "refuse" if other_origins == "refuse" else "without_headers")


def _origin(setting: str, text: str) -> Origin:
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigurationError(f"{setting} {text!r} is not a valid URL: {exc}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigurationError(f"{setting} {text!r} is not an absolute http(s) URL")
    return Origin.of(url)


def is_http_url(text: str) -> bool:
    """Whether `text` is an http(s) URL (rather than a file path)."""
    return re.match(r"(?i)https?://", text) is not None


def warn_untrusted(served_at: Mapping[str, str], access: Access) -> None:
    """A warning for each operation (tool name -> base URL) whose calls will not get the user's headers."""
    if not access.headers:
        return
    for name, base_url in served_at.items():
        try:
            trusted = access.guard.trusts(httpx.URL(base_url))
        except httpx.InvalidURL:
            continue
        if not trusted:
            fate = "refused" if access.other_origins == "refuse" else "sent without headers="
            logger.warning(
                "OpenAPI operation %s is served at %s, not at %s: its calls will be %s (see trusted_origins=)",
                name, base_url, access.guard.home_text(), fate,
            )


# -- redirects and cookies ------------------------------------------------------------------------------
async def send_within_origin(
    client: httpx.AsyncClient, request: httpx.Request, cookies: OriginCookies
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
    would hand one origin's cookies to another port of the same host; `OriginCookies` keeps them instead."""

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


def new_client(settings: Mapping[str, Any]) -> httpx.AsyncClient:
    """An httpx client whose own cookie jar keeps nothing (`OriginCookies` keeps them)."""
    return httpx.AsyncClient(**settings, cookies=http.cookiejar.CookieJar(_KeepNoCookies()))


class OriginCookies:
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
