"""What both engines (a local kernel, a kernel on a gateway) share: one kernel, running or being started, and the
wait for a start in progress."""

from __future__ import annotations

import asyncio
from typing import Any, Generic, TypeVar

from .errors import SandboxClosedError

K = TypeVar("K")

RESTARTED = "kernel restarted, state lost"  # the note after a restart, one wording whichever engine restarted


class KernelHolder(Generic[K]):
    """Holds an engine's one kernel: `_kernel` once running, `_starting` while a start task runs (begun by the
    engine's `start_soon`, which sets `_kernel` and clears `_starting` when it succeeds), nothing once `closed`."""

    def __init__(self) -> None:
        self.closed = False
        self._kernel: K | None = None
        self._starting: asyncio.Task[Any] | None = None

    @property
    def ready(self) -> bool:
        return self._kernel is not None

    def start_soon(self) -> None:
        raise NotImplementedError

    async def kernel(self) -> K:
        """The running kernel, waiting for a start in progress; a failed start is raised once, then retried."""
        if self.closed:
            raise SandboxClosedError("the sandbox is closed")
        self.start_soon()
        starting = self._starting
        if self._kernel is None and starting is not None:
            try:
                await asyncio.shield(starting)
            except asyncio.CancelledError:
                if self.closed:
                    raise SandboxClosedError("the sandbox was closed while its kernel was starting") from None
                raise
            except Exception:  # a KernelStartError: the next call starts again
                if self._starting is starting:
                    self._starting = None
                raise
        if self._kernel is None:
            raise SandboxClosedError("the sandbox was closed while its kernel was starting")
        return self._kernel
