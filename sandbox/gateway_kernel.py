"""One kernel on a gateway: its websocket, the messages of the request we wait for, interrupt, restart, close.

Latency: the gateways (tornado) write the websocket without TCP_NODELAY, which with Linux's delayed ACKs cost a
trivial cell 44 ms here; we acknowledge every message at once (TCP_QUICKACK) and it takes 4 ms, about 1.3x local.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from .collect import OutputCollector
from .errors import KernelStartError
from .gateway import CHECK_S, GatewayClient, describe, request_message

logger = logging.getLogger(__name__)

_POLL_S = 0.25  # how long a silent websocket may go before the waiting side looks at `lost` again
_GONE = (None, "missing", "dead", "restarting")  # kernel states in which a reconnect would not find our state
_BACKLOG = 1_000  # messages of the current request waiting for the collector; the reader pauses beyond it


def _ack_at_once(ws: ClientConnection) -> Callable[[], None]:
    """Gateways (tornado) write the websocket without TCP_NODELAY, so each small message after the first waits for
    our ACK, which Linux delays by up to 40 ms: a trivial cell took 44 ms instead of 4. Re-arming TCP_QUICKACK after
    every message makes us acknowledge at once (the flag does not stick, hence every time). A no-op elsewhere."""
    sock = ws.transport.get_extra_info("socket") if ws.transport is not None else None
    option = getattr(socket, "TCP_QUICKACK", None)
    if sock is None or option is None:
        return lambda: None

    def rearm() -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, option, 1)

    rearm()
    return rearm


class _Inbox:
    """Messages answering the one request we wait for: the websocket reader appends, the collector takes.

    An Event rather than an asyncio.Queue with `wait_for`, whose timeout could drop an item on Python < 3.12.
    """

    def __init__(self) -> None:
        self._items: deque[dict[str, Any]] = deque()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def clear(self) -> None:
        self._items.clear()
        self._room.set()

    async def put(self, msg: dict[str, Any]) -> None:
        await self._room.wait()
        self._items.append(msg)
        self._arrived.set()
        if len(self._items) >= _BACKLOG:
            self._room.clear()

    def wake(self) -> None:
        self._arrived.set()

    async def get(self, timeout: float) -> dict[str, Any] | None:
        """The next message, or None after `timeout` (or a `wake`) without one."""
        if not self._items:
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout)
        if not self._items:
            return None
        if len(self._items) < _BACKLOG // 2:
            self._room.set()
        return self._items.popleft()


class RemoteKernel:
    """One kernel on the gateway and our websocket to it. `lost` says why it can no longer be used (its
    websocket closed, or the gateway reported it restarting or dead); None while it is usable."""

    def __init__(self, client: GatewayClient, name: str | None, env: dict[str, str], startup_timeout: float) -> None:
        self.client = client
        self.name = name
        self.env = env
        self.startup_timeout = startup_timeout
        self.id: str | None = None
        self.lost: str | None = "not started"
        self.gateway_restarting = False
        self.dropped = False  # only our websocket was lost: the kernel itself may be fine
        self._session = uuid.uuid4().hex
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._inbox = _Inbox()
        self._expected: str | None = None  # msg_id whose replies and iopub messages the reader keeps

    async def start(self) -> None:
        """Start the kernel on the gateway and wait until it answers; on any failure delete it again."""
        try:
            self.id = await self.client.start_kernel(self.name, self.env, self.startup_timeout)
            await self.connect()
        except BaseException:
            await self.aclose()
            raise

    async def connect(self) -> None:
        """Open the websocket and wait until the kernel answers on shell *and* iopub (the gateway's iopub
        subscription may join late, after a restart especially, and would miss a cell's output), then run a first
        silent execution (IPython's first-execution cost is paid here, not by the user's first cell)."""
        assert self.id is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout
        self._ws = await self.client.open_channels(self.id, deadline - loop.time())
        self.lost, self.gateway_restarting, self.dropped = None, False, False
        self._reader = asyncio.ensure_future(self._read(self._ws))
        while not await self._kernel_info(min(1.0, deadline - loop.time())):
            if self.lost is not None or loop.time() >= deadline:
                raise KernelStartError(self._start_failure(f"did not answer within {self.startup_timeout:g} s"))
        msg_id = await self.send("pass", silent=True)
        outcome = await self.collect(msg_id, None, deadline)
        if outcome != "idle":
            raise KernelStartError(self._start_failure(f"failed its first execution ({outcome})"))

    def _start_failure(self, what: str) -> str:
        reason = f" ({self.lost})" if self.lost else ""
        return f"the kernel {self.id} on the gateway at {self.client.address.url} {what}{reason}"

    async def _kernel_info(self, timeout: float) -> bool:
        """One kernel_info request: True when both its reply (shell) and its status messages (iopub) arrived."""
        msg = request_message("kernel_info_request", {}, self._session)
        self._expect(msg["header"]["msg_id"])
        await self._transmit(msg)
        deadline = asyncio.get_running_loop().time() + timeout
        replied = subscribed = False
        while self.lost is None and (remaining := deadline - asyncio.get_running_loop().time()) > 0:
            answer = await self._inbox.get(min(remaining, _POLL_S))
            if answer is not None and answer["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                replied = replied or answer.get("msg_type") == "kernel_info_reply"
                subscribed = subscribed or answer.get("channel") == "iopub"
            if replied and subscribed:
                return True
        return False

    def _expect(self, msg_id: str) -> None:
        self._expected = msg_id
        self._inbox.clear()

    async def _transmit(self, msg: dict[str, Any]) -> None:
        if self._ws is None:
            self.lost = self.lost or "no connection to the kernel"
            return
        try:
            await self._ws.send(json.dumps(msg))
        except ConnectionClosed as exc:
            self._mark_lost(f"lost the connection to the kernel gateway ({describe(exc)})", dropped=True)

    async def _read(self, ws: ClientConnection) -> None:
        """Keep the messages of the request we wait for, drop the rest; notice a closed socket or dead kernel."""
        ack_at_once = _ack_at_once(ws)
        try:
            async for raw in ws:
                ack_at_once()
                if isinstance(raw, str):
                    await self._route(raw)
            self._mark_lost("the kernel gateway closed the connection", dropped=True)
        except ConnectionClosed as exc:
            self._mark_lost(f"lost the connection to the kernel gateway ({describe(exc)})", dropped=True)
        except Exception as exc:  # a protocol error, a broken frame: the connection is unusable either way
            self._mark_lost(f"the connection to the kernel gateway failed ({describe(exc)})")

    async def _route(self, raw: str) -> None:
        try:
            msg = json.loads(raw)
        except ValueError:
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), dict):
            return
        state = msg["content"].get("execution_state")
        if msg.get("msg_type") == "status" and state in ("restarting", "dead"):
            self.gateway_restarting = state == "restarting"  # its auto-restart after the kernel died is under way
            self._mark_lost(f"the kernel died (the gateway reports it {state})")
            return
        parent = msg.get("parent_header")
        if self._expected is not None and isinstance(parent, dict) and parent.get("msg_id") == self._expected:
            await self._inbox.put(msg)

    def _mark_lost(self, reason: str, *, dropped: bool = False) -> None:
        if self.lost is None:
            self.lost, self.dropped = reason, dropped
        self._inbox.wake()

    def alive(self) -> bool:
        return self.lost is None

    def exit_description(self) -> str:
        return self.lost or "still running"

    async def send(self, code: str, *, silent: bool = False) -> str:
        msg = request_message("execute_request", {
            "code": code, "silent": silent, "store_history": not silent, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": False,
        }, self._session)
        self._expect(msg["header"]["msg_id"])
        await self._transmit(msg)
        return str(msg["header"]["msg_id"])

    async def collect(self, msg_id: str, collector: OutputCollector | None, deadline: float) -> str:
        """Feed our iopub messages to `collector` (an OutputCollector, or None to just wait) until idle;
        returns "idle", "timeout" or "died" (the connection or the kernel was lost)."""
        loop = asyncio.get_running_loop()
        next_check = loop.time() + CHECK_S
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return "timeout"
            msg = await self._inbox.get(min(remaining, _POLL_S))
            if msg is None:
                if self.lost is None and loop.time() >= next_check:
                    await self._check_on_gateway()
                    next_check = loop.time() + CHECK_S
                if self.lost is not None:
                    return "died"
                continue
            next_check = loop.time() + CHECK_S
            if msg.get("channel", "iopub") != "iopub" or msg["parent_header"].get("msg_id") != msg_id:
                continue
            if collector is not None:
                if collector.add(msg):
                    return "idle"
            elif msg.get("msg_type") == "status" and msg["content"].get("execution_state") == "idle":
                return "idle"

    async def _check_on_gateway(self) -> None:
        """A kernel can die without its status reaching us (the gateway's own restart failed at once, say)."""
        if self.id is not None and await self.client.kernel_state(self.id) in ("missing", "dead"):
            self._mark_lost("the kernel died (the gateway no longer runs it)")

    async def interrupt(self) -> bool:
        """Ask the gateway to interrupt the kernel (SIGINT for a Python kernel); False when that failed."""
        if self.id is None:
            return False
        try:
            await self.client.interrupt_kernel(self.id)
        except KernelStartError as exc:
            logger.warning("%s", exc)
            return False
        return True

    async def reconnect(self) -> bool:
        """After our websocket dropped between cells (a proxy's idle timeout, a network blip), open a new one to
        the same kernel, its state kept, when the gateway still runs it. False otherwise: restart it then."""
        if not self.dropped or self.id is None or await self.client.kernel_state(self.id) in _GONE:
            return False
        await self.disconnect()
        try:
            await self.connect()
        except KernelStartError as exc:
            logger.info("reconnecting to kernel %s failed: %s", self.id, exc)
            await self.disconnect()
            return False
        return True

    async def restart(self) -> bool:
        """Restart through the gateway (or let its own restart, already under way, finish) and reconnect. True when
        done; False when that failed, after deleting the kernel: the caller starts a new one."""
        restarting = self.gateway_restarting
        await self.disconnect()
        try:
            if self.id is not None and (restarting or await self.client.restart_kernel(self.id)):
                await self.connect()
                return True
        except KernelStartError as exc:
            logger.warning("restarting kernel %s failed (%s); starting a new one", self.id, exc)
        except BaseException:
            await self.aclose()
            raise
        await self.aclose()
        return False

    async def disconnect(self) -> None:
        ws, self._ws = self._ws, None
        self.lost = self.lost or "disconnected"
        self._inbox.wake()
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 3)
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def aclose(self) -> None:
        """Close the websocket and delete the kernel on the gateway (a kernel it no longer knows is fine)."""
        await self.disconnect()
        kernel_id, self.id = self.id, None
        if kernel_id is not None:
            try:
                await self.client.delete_kernel(kernel_id)
            except KernelStartError as exc:
                logger.warning("could not delete kernel %s: %s", kernel_id, exc)

    def delete_now(self) -> None:
        """Blocking delete from any thread, for the at-exit path; never raises."""
        kernel_id, self.id = self.id, None
        if kernel_id is not None:
            self.client.delete_now(kernel_id)
