"""Talking to a Jupyter Kernel Gateway or Enterprise Gateway: its address, REST calls over httpx, the websocket.

Client choice. `jupyter-kernel-client` (1.0) is synchronous: `requests` for REST (which follows redirects) and a
`websocket-client` thread per kernel that reconnects by itself, with no awaitable, per-message API; we would have
to bridge threads into the sandbox's loop and still route messages ourselves. jupyter_server's gateway client is
configured through a process-wide `GatewayClient` singleton (one gateway URL per process) and brings all of
jupyter_server. What we need is small: five REST calls (start, look up, interrupt, restart, delete) and JSON
messages on one websocket, routed by `parent_header.msg_id` on the sandbox's own event loop. So it is written here
on two maintained asyncio libraries: `httpx` (the `openapi` extra's client already) and `websockets`. tornado's
websocket client (installed with ipykernel) would do too; `websockets` is the dedicated, typed asyncio library
(keepalive pings with a timeout, open and close timeouts, a message size limit, no proxy, all in one call), and it
keeps the remote backend free of packages only the local one needs.

Security: the token is sent only to the configured origin. httpx does not follow redirects here (a 3xx is an error
naming the target), no proxy from the environment is used (an explicit transport for httpx, `proxy=None` for
websockets), the websocket is opened with an explicit host and port, so websockets refuses any cross-origin
redirect, and a kernel id from the gateway must be a plain path segment before it goes into a URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import urllib.parse
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException

from .errors import KernelStartError, SandboxConfigurationError

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 2**20  # one websocket message; a 16 MB image is about 22 MB of JSON
_KERNEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_CONNECT_S = 10.0  # connecting is quick or it fails: a closed port answers at once, a dead host within this
_CONTROL_S = 10.0  # interrupt: a quick call on a healthy gateway
_DELETE_S = 5.0  # close must not wait long on a gateway that stopped answering
CHECK_S = 2.0  # during a silent cell, how often to ask the gateway whether the kernel still exists
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class GatewayAddress:
    """The gateway's base URL (no trailing slash) and the websocket origin derived from it."""

    url: str
    ws_url: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> GatewayAddress:
        """Accept http(s)://host[:port][/prefix]; refuse anything else with the reason."""
        if not isinstance(url, str):
            raise SandboxConfigurationError(f"gateway_url must be a string, not {type(url).__name__}")
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https"):
            raise SandboxConfigurationError(f"gateway_url must be an http:// or https:// URL, not {url!r}")
        if not parts.hostname:
            raise SandboxConfigurationError(f"gateway_url {url!r} names no host")
        if parts.username or parts.password:
            raise SandboxConfigurationError("gateway_url must not carry credentials: pass token=... instead")
        if parts.query or parts.fragment:
            raise SandboxConfigurationError(f"gateway_url {url!r} must not have a query or fragment")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise SandboxConfigurationError(f"gateway_url {url!r}: {exc}") from None
        path = parts.path.rstrip("/")
        base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        ws = urllib.parse.urlunsplit(("wss" if parts.scheme == "https" else "ws", parts.netloc, path, "", ""))
        return cls(url=base, ws_url=ws, host=parts.hostname, port=port)

    @property
    def loopback(self) -> bool:
        return self.host in _LOOPBACK


def request_message(msg_type: str, content: dict[str, Any], session: str) -> dict[str, Any]:
    """A Jupyter message (protocol 5.3) in the JSON form the gateway's websocket takes; all our requests are shell."""
    header = {
        "msg_id": uuid.uuid4().hex,
        "msg_type": msg_type,
        "session": session,
        "username": "sandbox",
        "date": datetime.now(timezone.utc).isoformat(),
        "version": "5.3",
    }
    return {"header": header, "parent_header": {}, "metadata": {}, "content": content, "channel": "shell",
            "buffers": []}


class GatewayClient:
    """The REST side, one per sandbox. Failures are `KernelStartError`s naming the gateway and the reason."""

    def __init__(self, address: GatewayAddress, token: str | None, request_timeout: float) -> None:
        self.address = address
        self.request_timeout = request_timeout
        self._headers = {"Authorization": f"token {token}"} if token else {}
        self._http: httpx.AsyncClient | None = None
        if token and address.url.startswith("http://") and not address.loopback:
            logger.warning("the gateway token travels unencrypted to %s: use https:// off this machine", address.url)

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:  # made on first use, so it belongs to the sandbox's loop
            self._http = httpx.AsyncClient(
                base_url=self.address.url,
                headers=self._headers,
                follow_redirects=False,
                transport=httpx.AsyncHTTPTransport(),  # an explicit transport: no proxy from the environment
                timeout=self._timeout(self.request_timeout),
            )
        return self._http

    @staticmethod
    def _timeout(seconds: float) -> httpx.Timeout:
        return httpx.Timeout(seconds, connect=min(seconds, _CONNECT_S))

    async def request(
        self, method: str, path: str, what: str, *, timeout: float, body: Any = None, missing_ok: bool = False
    ) -> httpx.Response | None:
        """One REST call; None for a 404 when `missing_ok` (the kernel is gone already)."""
        try:
            response = await self._client().request(method, path, json=body, timeout=self._timeout(timeout))
        except httpx.TimeoutException:
            raise KernelStartError(
                f"the kernel gateway at {self.address.url} did not answer ({what}) within {timeout:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise KernelStartError(
                f"cannot reach the kernel gateway at {self.address.url} ({what}): {describe(exc)}"
            ) from None
        if response.status_code == 404 and missing_ok:
            return None
        self._check(response, what)
        return response

    def _check(self, response: httpx.Response, what: str) -> None:
        code, url = response.status_code, self.address.url
        if 300 <= code < 400:
            raise KernelStartError(
                f"the kernel gateway at {url} redirected ({what}, HTTP {code}) to "
                f"{response.headers.get('location', '?')!r}; redirects are not followed, so that the token goes "
                "only to gateway_url: set gateway_url to the final address"
            )
        if code in (401, 403):
            raise KernelStartError(
                f"the kernel gateway at {url} refused the request ({what}): HTTP {code} {_detail(response)}; "
                "check token= (the gateway's auth token)"
            )
        if code >= 400:
            raise KernelStartError(f"the kernel gateway at {url} failed ({what}): HTTP {code} {_detail(response)}")

    async def start_kernel(self, name: str | None, env: dict[str, str], timeout: float) -> str:
        body: dict[str, Any] = {}
        if name:
            body["name"] = name
        if env:
            body["env"] = env
        response = await self.request("POST", "/api/kernels", "start a kernel", timeout=timeout, body=body)
        assert response is not None
        try:
            kernel_id = response.json().get("id")
        except (ValueError, AttributeError):
            kernel_id = None
        if not isinstance(kernel_id, str) or not _KERNEL_ID.match(kernel_id):
            raise KernelStartError(f"the kernel gateway at {self.address.url} started a kernel without a usable id")
        return kernel_id

    async def kernel_state(self, kernel_id: str) -> str | None:
        """The gateway's `execution_state` of the kernel, "missing" when it no longer knows it, None when unsure."""
        try:
            response = await self.request("GET", f"/api/kernels/{kernel_id}", "look up the kernel", timeout=CHECK_S,
                                          missing_ok=True)
        except KernelStartError as exc:
            logger.debug("%s", exc)
            return None
        if response is None:
            return "missing"
        try:
            return str(response.json().get("execution_state"))
        except (ValueError, AttributeError):
            return None

    async def delete_kernel(self, kernel_id: str) -> None:
        await self.request("DELETE", f"/api/kernels/{kernel_id}", "delete the kernel", timeout=_DELETE_S,
                           missing_ok=True)

    async def interrupt_kernel(self, kernel_id: str) -> None:
        await self.request("POST", f"/api/kernels/{kernel_id}/interrupt", "interrupt", timeout=_CONTROL_S)

    async def restart_kernel(self, kernel_id: str) -> bool:
        """True once the gateway restarted the kernel; False when it does not know the kernel any more."""
        path = f"/api/kernels/{kernel_id}/restart"
        response = await self.request("POST", path, "restart the kernel", timeout=self.request_timeout + _CONTROL_S,
                                      missing_ok=True)
        return response is not None

    def delete_now(self, kernel_id: str) -> None:
        """Blocking DELETE from any thread (the at-exit path, when the sandbox's loop is gone); never raises."""
        try:
            with httpx.Client(base_url=self.address.url, headers=self._headers, follow_redirects=False,
                              transport=httpx.HTTPTransport(), timeout=self._timeout(3.0)) as client:
                client.delete(f"/api/kernels/{kernel_id}")
        except httpx.HTTPError as exc:
            logger.warning("could not delete kernel %s on %s: %s", kernel_id, self.address.url, describe(exc))

    async def open_channels(self, kernel_id: str, timeout: float) -> ClientConnection:
        """The kernel's websocket: only to the configured host and port, with no proxy and no cross-origin
        redirect; an error is a `KernelStartError` with the reason. No `session_id`: the gateway then keeps no
        buffer of missed messages to replay to us."""
        url = f"{self.address.ws_url}/api/kernels/{kernel_id}/channels"
        try:
            return await connect(
                url, additional_headers=self._headers, host=self.address.host, port=self.address.port, proxy=None,
                max_size=MAX_MESSAGE_BYTES, open_timeout=min(timeout, _CONNECT_S), close_timeout=2,
            )
        except InvalidStatus as exc:
            code = exc.response.status_code
            hint = "; check token= (the gateway's auth token)" if code in (401, 403) else ""
            raise KernelStartError(
                f"the kernel gateway at {self.address.url} refused the kernel's websocket: HTTP {code}{hint}"
            ) from None
        except (OSError, TimeoutError, asyncio.TimeoutError, WebSocketException, ValueError) as exc:
            raise KernelStartError(
                f"cannot open the kernel's websocket on the gateway at {self.address.url}: {describe(exc)}"
            ) from None

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


def describe(exc: BaseException) -> str:
    """An exception as one line for a user: its type and message, never a traceback."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _detail(response: httpx.Response) -> str:
    """The gateway's own words about a failed call (its JSON `message`/`reason`), bounded."""
    detail = response.reason_phrase
    with contextlib.suppress(ValueError, AttributeError):
        body = response.json()
        detail = str(body.get("message") or body.get("reason") or detail)
    return detail[:300]
