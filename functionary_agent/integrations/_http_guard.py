"""Where an HTTP request of a tool may go, checked before it is sent.

The OpenAPI and MCP-over-HTTP tools install `RequestGuard` as an httpx request event hook. httpx calls request
hooks before it sends each request, every redirect hop included, and before it opens a connection, so a refused
request never leaves the machine. The guard knows two rules:

- credentials: a request that carries the user's headers goes only to an origin the user configured (with
  `only_home=True`, every request does: an MCP connection has one server and nothing else to talk to);
- link-local: no request goes to a link-local address (169.254.0.0/16, fe80::/10) or a cloud metadata endpoint
  (by address or by name), unless the user allows it. Host names are resolved first and every address checked.

It is duck-typed on the request (`url` with `scheme`, `host`, `port`; `headers`), so it serves httpx and the
httpx2 fork that newer MCP SDKs use alike.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote

__all__ = ["Origin", "RequestGuard", "RequestRefused", "link_local_reason"]

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_DEFAULT_PORTS = {"http": 80, "https": 443}
_METADATA_NAMES = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"}
)
_METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200"))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_RESOLVE_TIMEOUT = 10.0


class RequestRefused(Exception):
    """A request the guard stopped before it was sent; the message says why and which setting would allow it."""


class _URL(Protocol):
    @property
    def scheme(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int | None: ...


@dataclass(frozen=True)
class Origin:
    """Scheme, host and port (the default one filled in): what a browser would call the origin."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: _URL) -> Origin:
        scheme = url.scheme.lower()
        return cls(scheme, url.host.lower().rstrip("."), url.port or _DEFAULT_PORTS.get(scheme, 0))

    def covers(self, other: Origin) -> bool:
        """The same origin, or its https upgrade (http on 80 to https on 443 of the same host)."""
        upgrade = (self.scheme, self.port, other.scheme, other.port) == ("http", 80, "https", 443)
        return self == other or (upgrade and self.host == other.host)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if _DEFAULT_PORTS.get(self.scheme) == self.port else f":{self.port}"
        return f"{self.scheme}://{host}{port}"


class RequestGuard:
    """An httpx request hook that raises `RequestRefused` for a request that must not be sent."""

    def __init__(
        self,
        home: Iterable[Origin],
        credentials: Mapping[str, str] | None = None,
        *,
        only_home: bool = False,
        allow_link_local: bool = False,
    ) -> None:
        self.home = frozenset(home)
        self.credentials = {name.lower(): value for name, value in (credentials or {}).items()}
        self.only_home = only_home
        self.allow_link_local = allow_link_local

    def trusts(self, url: _URL) -> bool:
        """Whether the user's headers may go to `url`."""
        origin = Origin.of(url)
        return any(home.covers(origin) for home in self.home)

    def home_text(self) -> str:
        return ", ".join(sorted(str(origin) for origin in self.home)) or "(none)"

    async def __call__(self, request: Any) -> None:
        url = request.url
        if not self.trusts(url) and (self.only_home or self._carries_credentials(request.headers)):
            raise RequestRefused(
                f"a request for {Origin.of(url)} was refused before it was sent: only {self.home_text()} "
                "receives the headers configured for these tools"
            )
        if not self.allow_link_local:
            reason = link_local_reason(url.host) or await _resolved_reason(url.host, url.port)
            if reason:
                raise RequestRefused(
                    f"a request for {Origin.of(url)} was refused before it was sent: {reason} "
                    "(link-local and cloud metadata addresses need allow_link_local=True)"
                )

    def _carries_credentials(self, headers: Mapping[str, str]) -> bool:
        return any(headers.get(name) == value for name, value in self.credentials.items())


def link_local_reason(host: str) -> str | None:
    """Why `host` (a name or an address literal, in any form the system resolver accepts) is off limits, if it is."""
    name = _normal(host)
    if name in _METADATA_NAMES:
        return f"{host} is a cloud metadata host name"
    address = _literal_address(name)
    if address is not None and _is_link_local(address):
        return f"{host} is a link-local or cloud metadata address"
    return None


def _normal(host: str) -> str:
    return unquote(host).lower().rstrip(".")


def _literal_address(name: str) -> IPAddress | None:
    """An IP literal, including the legacy IPv4 forms (`2852039166`, `0xa9.0xfe.0xa9.0xfe`) resolvers accept."""
    try:
        return ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        pass
    if not name or not all(c.isalnum() or c == "." for c in name) or not name[0].isdigit():
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(name))
    except OSError:
        return None


def _is_link_local(address: IPAddress) -> bool:
    if address in _METADATA_ADDRESSES or address.is_link_local:
        return True
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        return embedded is not None and _is_link_local(embedded)
    return False


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped, 6to4 or NAT64 IPv6 address."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


async def _resolved_reason(host: str, port: int | None) -> str | None:
    """Resolve a host name and check every address it has; a name that does not resolve is left to httpx."""
    if _literal_address(_normal(host)) is not None:
        return None
    try:
        addresses = await asyncio.wait_for(_resolve(host, port or 0), _RESOLVE_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as exc:
        logger.debug("could not resolve %s before the request: %s", host, exc)
        return None
    for address in addresses:
        if link_local_reason(address):
            return f"{host} resolves to {address}, a link-local or cloud metadata address"
    return None


async def _resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]
