"""The host's end of the kernel's ZeroMQ sockets: a minimal ZMTP 3.0 peer (NULL security) that counts every byte
the kernel sends before it allocates it.

Why not libzmq on the host: libzmq assembles a whole multipart message before the application sees any of it, and
ZMQ_MAXMSGSIZE bounds each frame, not the message. A kernel that sends one message of many frames just under that
cap (one buffer referenced many times, so it costs the kernel nothing) makes the host hold all of them: 16 frames of
60 MB took a receiver with a 64 MB cap to 976 MB. Here each frame's size is read and checked against what is left
of the message's allowance before its body is allocated, and a connection holds at most one message that its reader
has not taken yet: the rest waits in the kernel (the socket buffer, then its own send queue).

A connection is made once, to the path the caller names (see `process.py`: /proc/self/fd/N, which resolves to one
pinned inode), and never remade: a kernel that closes it has lost that channel for good.
Protocol: ZMTP 3.0 (rfc.zeromq.org/spec/23), as libzmq speaks it to a 3.0 peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

Frame = bytes | bytearray

_MORE, _LONG, _COMMAND = 0x01, 0x02, 0x04
_FRAME_COST = 64  # counted per frame on top of its body, so a million empty frames cost as much as 64 MB
_CHUNK = 65536
_MAX_COMMAND = 65536
_GREETING_SIZE = 64
_PEER_TYPES = {"DEALER": ("ROUTER",), "SUB": ("PUB", "XPUB")}
_CONNECT_RETRY_S = 0.01


class ChannelLost(Exception):
    """The connection closed, or the kernel broke the protocol on it; the message says how."""


class MessageTooLarge(ChannelLost):
    """A message was larger than the connection accepts; its body was not read (the connection is given up)."""


@dataclass(frozen=True)
class Received:
    """One message as it came: its frames, and what it cost (bodies plus a fixed cost per frame)."""

    frames: list[Frame]
    size: int


def _greeting() -> bytes:
    """Signature, version 3.0, the NULL mechanism, as-server 0, filler."""
    return b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\x00" + bytes(31)


def _check_greeting(greeting: bytes) -> None:
    if greeting[0] != 0xFF or not greeting[9] & 1 or greeting[10] < 3:
        raise ChannelLost("the kernel's socket does not speak ZMTP 3")
    if greeting[12:32].rstrip(b"\0") != b"NULL":
        raise ChannelLost("the kernel's socket asks for a security mechanism other than NULL")


def _frame(body: bytes, flags: int) -> bytes:
    if len(body) > 255:
        return bytes([flags | _LONG]) + len(body).to_bytes(8, "big") + body
    return bytes([flags, len(body)]) + body


def _ready_command(socket_type: str) -> bytes:
    properties = {"Socket-Type": socket_type.encode()}
    if socket_type == "DEALER":
        properties["Identity"] = b""
    body = b"\x05READY" + b"".join(
        bytes([len(name)]) + name.encode() + len(value).to_bytes(4, "big") + value for name, value in properties.items()
    )
    return _frame(body, _COMMAND)


def _parse_command(body: bytes) -> tuple[bytes, dict[str, bytes]]:
    """A command's name and, for READY, its properties; ChannelLost when the body does not hold together."""
    if not body or len(body) < 1 + body[0]:
        raise ChannelLost("the kernel sent a truncated ZMTP command")
    name, at, properties = body[1 : 1 + body[0]], 1 + body[0], {}
    while name == b"READY" and at < len(body):
        size = body[at]
        key, at = body[at + 1 : at + 1 + size].decode("latin-1"), at + 1 + size
        length = int.from_bytes(body[at : at + 4], "big")
        value, at = body[at + 4 : at + 4 + length], at + 4 + length
        if at > len(body):
            raise ChannelLost("the kernel sent a truncated ZMTP READY command")
        properties[key] = value
    return name, properties


async def _connect(path: str, deadline: float) -> socket.socket:
    """Connect a Unix stream socket, retrying while the kernel has bound its socket but not listened on it yet."""
    loop = asyncio.get_running_loop()
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, path)
            return sock
        except ConnectionRefusedError:
            sock.close()
            if loop.time() > deadline:
                raise ChannelLost("the kernel never listened on its socket") from None
            await asyncio.sleep(_CONNECT_RETRY_S)
        except OSError as exc:
            sock.close()
            raise ChannelLost(f"could not connect to the kernel's socket: {exc}") from None
        except BaseException:
            sock.close()
            raise


class _Reader:
    """Exact-size reads from a non-blocking socket: small ones through a buffer of at most two chunks, large ones
    straight into one allocation of the announced (already checked) size."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    async def exactly(self, count: int) -> Frame:
        if count > _CHUNK:
            return await self._large(count)
        loop = asyncio.get_running_loop()
        while len(self._buffer) < count:
            chunk = await loop.sock_recv(self._sock, _CHUNK)
            if not chunk:
                raise ChannelLost("the kernel closed the connection")
            self._buffer += chunk
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    async def _large(self, count: int) -> bytearray:
        loop = asyncio.get_running_loop()
        out = bytearray(count)
        have = min(len(self._buffer), count)
        out[:have] = self._buffer[:have]
        del self._buffer[:have]
        with memoryview(out) as view:
            while have < count:
                got = await loop.sock_recv_into(self._sock, view[have:])
                if not got:
                    raise ChannelLost("the kernel closed the connection")
                have += got
        return out


class Connection:
    """One ZMTP connection to one of the kernel's sockets. A background task reads whole messages, each at most
    `max_message_bytes`, and holds at most one that `receive` has not taken; `send` writes one message."""

    def __init__(self, sock: socket.socket, max_message_bytes: int) -> None:
        self._sock = sock
        self._max = max_message_bytes
        self._reader = _Reader(sock)
        self._inbox: deque[Received] = deque()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task[None] | None = None
        self.failure: ChannelLost | None = None

    @classmethod
    async def open(cls, path: str, socket_type: str, max_message_bytes: int, deadline: float) -> Connection:
        """Connect to `path` as a `socket_type` ("DEALER" or "SUB", which subscribes to everything) and shake
        hands; ChannelLost when that fails or takes past `deadline` (the loop's clock)."""
        loop = asyncio.get_running_loop()
        connection = cls(await _connect(path, deadline), max_message_bytes)
        try:
            await asyncio.wait_for(connection._handshake(socket_type), max(deadline - loop.time(), 0.001))
        except (asyncio.TimeoutError, OSError) as exc:
            await connection.aclose()
            raise ChannelLost(f"the kernel's socket did not complete the ZMTP handshake ({exc!r})") from None
        except BaseException:
            await connection.aclose()
            raise
        connection._task = asyncio.ensure_future(connection._read_forever())
        return connection

    async def _handshake(self, socket_type: str) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self._sock, _greeting())
        _check_greeting(bytes(await self._reader.exactly(_GREETING_SIZE)))
        await loop.sock_sendall(self._sock, _ready_command(socket_type))
        flags, length = await self._frame_header()
        if not flags & _COMMAND or length > _MAX_COMMAND:
            raise ChannelLost("the kernel's socket sent no READY command")
        name, properties = _parse_command(bytes(await self._reader.exactly(length)))
        peer = properties.get("Socket-Type", b"").decode("latin-1")
        if name != b"READY" or peer not in _PEER_TYPES[socket_type]:
            raise ChannelLost(f"the kernel's socket answered {name!r} as {peer!r}, not as a {socket_type}'s peer")
        if socket_type == "SUB":
            await self.send([b"\x01"])  # ZMTP 3.0 subscription to every topic

    async def _frame_header(self) -> tuple[int, int]:
        flags = (await self._reader.exactly(1))[0]
        if flags & ~(_MORE | _LONG | _COMMAND):
            raise ChannelLost(f"the kernel sent a ZMTP frame with unknown flags {flags:#x}")
        return flags, int.from_bytes(await self._reader.exactly(8 if flags & _LONG else 1), "big")

    async def _read_message(self) -> Received:
        frames: list[Frame] = []
        size = 0
        while True:
            flags, length = await self._frame_header()
            size += length + _FRAME_COST  # commands too: a stream of them must end like a message that never does
            if size > self._max:
                raise MessageTooLarge(f"the kernel sent a message of more than {self._max // 2**20} MB")
            if flags & _COMMAND:  # PING and the like, between messages; nothing we need to answer
                if frames or length > _MAX_COMMAND:
                    raise ChannelLost("the kernel sent a ZMTP command inside a message, or an oversized one")
                await self._reader.exactly(length)
                continue
            frames.append(await self._reader.exactly(length))
            if not flags & _MORE:
                return Received(frames, size)

    async def _read_forever(self) -> None:
        try:
            while True:
                await self._room.wait()
                received = await self._read_message()
                self._inbox.append(received)
                self._room.clear()
                self._arrived.set()
        except ChannelLost as exc:
            self.failure = exc
        except OSError as exc:
            self.failure = ChannelLost(f"the connection to the kernel failed: {exc}")
        self._arrived.set()

    async def receive(self, timeout: float) -> Received | None:
        """The next message; None when none came within `timeout`; ChannelLost once the connection is gone and every
        message that came before that was taken."""
        if not self._inbox and self.failure is None:
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout)
        if self._inbox:
            received = self._inbox.popleft()
            self._room.set()
            return received
        if self.failure is not None:
            raise type(self.failure)(*self.failure.args)
        return None

    async def send(self, frames: Sequence[bytes]) -> None:
        last = len(frames) - 1
        data = b"".join(_frame(frame, _MORE if i < last else 0) for i, frame in enumerate(frames))
        try:
            await asyncio.get_running_loop().sock_sendall(self._sock, data)
        except OSError as exc:
            raise ChannelLost(f"could not write to the kernel: {exc}") from None

    async def aclose(self) -> None:
        """Stop the reader (its pending read leaves the loop's selector first), then close the socket."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._sock.close()
