"""`SandboxPool`: kernels started ahead of need, each handed out once.

    from sandbox import SandboxPool
    with SandboxPool(size=4, timeout=30) as pool:
        box = pool.acquire()              # warm: its kernel started when the pool (or its last refill) did
        print(box.execute("1 + 1").to_model_text())
        box.close()                       # destroyed; a fresh sandbox starts in its place

A sandbox never goes back to the pool: the one handed out belongs to its caller (a conversation) and is destroyed
when closed, however that happens (close, garbage collection, exit), and the pool starts a fresh one to refill.
No state, file or process of one user can reach the next. The count is bounded: `size` sandboxes at most,
handed out or waiting; `acquire` waits for one to come back up to `acquire_timeout`, then raises
`PoolExhaustedError`. Closing the pool closes every sandbox it made, handed out or not.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import logging
import threading
import time
import weakref
from collections import deque
from types import TracebackType
from typing import Any

from .errors import PoolExhaustedError, SandboxClosedError, SandboxConfigurationError
from .kernel import KernelSandbox

logger = logging.getLogger(__name__)


def _nothing() -> None:
    return None


# weakref.finalize runs its pending finalizers (each sandbox's close) from one atexit hook, registered with its first
# finalizer. Registering it now, at import, puts it before every pool's own hook, and atexit runs hooks last
# first: a pool is closed (no refills) before any of its sandboxes is.
weakref.finalize(_nothing, _nothing)


class SandboxPool:
    """`size` sandboxes with `KernelSandbox(**sandbox_settings)`, started ahead and handed out one per caller.

    `workdir` cannot be pooled (each sandbox makes its own, removed with it). Bad settings raise at once, from
    the first sandbox the pool makes. Thread-safe.

    Attributes:
        size: The most sandboxes the pool holds at once, handed out or waiting.
        acquire_timeout: The default number of seconds `acquire` waits while every sandbox is handed out.
    """

    def __init__(self, size: int = 4, *, acquire_timeout: float = 30.0, **sandbox_settings: Any) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        if acquire_timeout < 0:
            raise ValueError("acquire_timeout must be >= 0 seconds")
        if "workdir" in sandbox_settings:
            raise SandboxConfigurationError("a pool's sandboxes each make their own workdir: leave workdir out")
        self.size = size
        self.acquire_timeout = float(acquire_timeout)
        self._settings = dict(sandbox_settings)
        self._cond = threading.Condition()
        self._idle: deque[KernelSandbox] = deque()
        self._handed_out: dict[int, weakref.ref[KernelSandbox]] = {}
        self._tokens = itertools.count()
        self._making = 0  # sandboxes being constructed right now, counted against `size`
        self._closed = False
        self._last_failure = ""
        self._close_at_exit = functools.partial(_close_pool, weakref.ref(self))
        atexit.register(self._close_at_exit)  # before any sandbox's own exit hook: no refill while exiting
        self._idle.append(self._new_sandbox())  # bad settings raise here, with nothing to clean up
        self._refill()

    @property
    def idle(self) -> int:
        """Sandboxes waiting to be handed out (their kernels started or starting)."""
        with self._cond:
            return len(self._idle)

    @property
    def in_use(self) -> int:
        """Sandboxes handed out and not closed yet."""
        with self._cond:
            return len(self._handed_out)

    @property
    def closed(self) -> bool:
        """True once the pool is closed (its sandboxes are closed and `acquire` raises `SandboxClosedError`)."""
        return self._closed

    def acquire(self, timeout: float | None = None) -> KernelSandbox:
        """A sandbox of your own (a ready one when any is); close it when done. Waits up to `timeout` seconds
        (default `acquire_timeout`) while all `size` are handed out, then raises `PoolExhaustedError`."""
        wait = self.acquire_timeout if timeout is None else timeout
        self._refill()
        deadline = time.monotonic() + wait
        with self._cond:
            while not self._idle:
                if self._closed:
                    raise SandboxClosedError("the sandbox pool is closed")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PoolExhaustedError(self._exhausted_message(wait))
                self._cond.wait(remaining)
            if self._closed:
                raise SandboxClosedError("the sandbox pool is closed")
            box = self._take_idle()
            token = next(self._tokens)
            self._handed_out[token] = weakref.ref(box)
        box._call_after_close(functools.partial(self._gone, token))
        return box

    def _exhausted_message(self, waited: float) -> str:
        message = f"all {self.size} sandboxes of the pool are in use and none was closed within {waited:g} s"
        if self._last_failure:
            message += f" (the last replacement could not start: {self._last_failure})"
        return message + "; close finished conversations or make the pool larger"

    def _take_idle(self) -> KernelSandbox:
        for box in self._idle:
            if box.ready:
                self._idle.remove(box)
                return box
        return self._idle.popleft()

    def wait_ready(self) -> None:
        """Block until every waiting sandbox's kernel answers (raises `KernelStartError` if one cannot start)."""
        with self._cond:
            waiting = list(self._idle)
        for box in waiting:
            box.start()

    def _new_sandbox(self) -> KernelSandbox:
        box = KernelSandbox(**self._settings)
        box.start_background()
        return box

    def _gone(self, token: int) -> None:
        """A handed-out sandbox was closed: forget it and start one in its place."""
        with self._cond:
            if self._handed_out.pop(token, None) is None:
                return
            self._cond.notify_all()
        self._refill()

    def _refill(self) -> None:
        """Make sandboxes until the pool holds `size` again (waiting, handed out or being made); never raises:
        a failure is logged and kept for the next `PoolExhaustedError`."""
        while True:
            with self._cond:
                if self._closed or len(self._idle) + len(self._handed_out) + self._making >= self.size:
                    return
                self._making += 1
            box = self._try_new_sandbox()
            with self._cond:
                self._making -= 1
                keep = box is not None and not self._closed
                if keep and box is not None:
                    self._idle.append(box)
                    self._cond.notify_all()
            if not keep:
                if box is not None:
                    box.close()
                return

    def _try_new_sandbox(self) -> KernelSandbox | None:
        try:
            return self._new_sandbox()
        except Exception as exc:
            logger.warning("the sandbox pool could not start a sandbox: %s", exc)
            self._last_failure = str(exc)
            return None

    def close(self) -> None:
        """Close every sandbox the pool made, handed out or not; `acquire` then raises `SandboxClosedError`."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            boxes = [*self._idle, *(ref() for ref in self._handed_out.values())]
            self._idle.clear()
            self._handed_out.clear()
            self._cond.notify_all()
        atexit.unregister(self._close_at_exit)
        for box in boxes:
            if box is not None:
                box.close()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


def _close_pool(pool_ref: weakref.ref[SandboxPool]) -> None:
    pool = pool_ref()
    if pool is not None:
        pool.close()
