"""The execution policy for a kernel on a gateway: the same interface and rules as `engine.Engine`.

One cell at a time. Timeout: interrupt through the gateway; if the kernel is not idle after the grace period,
restart it through the gateway (POST /api/kernels/{id}/restart, a fresh websocket after it) in the background, so
the result returns at once and the next cell waits for the restart. A kernel lost during a cell (the websocket
closed, the gateway reports it restarting or dead, or -- asked every 2 s of silence, like the local engine polls
its process -- no longer lists it) is handled like a dead local one: the result says so and the kernel is restarted,
or replaced by a new one when the gateway cannot restart it. A websocket that dropped between cells is reopened to
the same kernel, state kept, when the gateway still runs it. `close()` deletes every kernel we started.

Output is bounded here, on this machine, exactly as the local kernel bounds it inside itself (`kernel_entry.py`):
the model reads the same text from either backend; only the bytes on the wire differ (the whole output crosses
the network). Images from display data are saved in the local workdir like the local backend's. What the code
writes to files stays on the gateway's machine, so `ExecutionResult.files` is always empty here.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .collect import OutputCollector
from .errors import KernelStartError, SandboxClosedError
from .gateway import GatewayAddress, GatewayClient, describe
from .gateway_kernel import RemoteKernel
from .kernel_entry import _bound_bundle
from .kernel_holder import RESTARTED, KernelHolder
from .output import HeadTail
from .result import ExecutionResult
from .workdir import ImageSaver

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class GatewaySettings:
    """Everything needed to start kernels on one gateway; shared by every restart of a sandbox."""

    url: str
    token: str | None
    kernel_name: str | None
    workdir: Path
    max_output_chars: int
    startup_timeout: float
    env: dict[str, str] = field(default_factory=dict)


class RemoteCollector(OutputCollector):
    """An OutputCollector whose cut matches the local backend's, where the kernel itself keeps max_chars // 2 of
    each stream live and the rest as the tail, and cuts text display data to max_chars: a gateway's kernel does
    neither, so this does both on arrival."""

    def __init__(self, images: ImageSaver, max_chars: int) -> None:
        super().__init__(images, max_chars)
        head, tail = max_chars // 2, max_chars - max_chars // 2
        self._streams = {"stdout": HeadTail(head, tail), "stderr": HeadTail(head, tail)}

    def add(self, msg: dict[str, Any]) -> bool:
        content = msg.get("content")
        if msg.get("msg_type") in ("execute_result", "display_data", "update_display_data") and isinstance(
            content, dict
        ):
            msg = {**msg, "content": {**content, "data": _bound_bundle(content.get("data", {}), self._max_chars)}}
        return super().add(msg)


class GatewayEngine(KernelHolder[RemoteKernel]):
    """What `KernelSandbox` drives when `gateway_url` is set; runs on the sandbox's private loop."""

    kernel_pid: int | None = None  # the kernel is a process on another machine

    def __init__(self, settings: GatewaySettings, interrupt_grace: float) -> None:
        super().__init__()
        self.settings = settings
        self.grace = interrupt_grace
        self.client = GatewayClient(GatewayAddress.parse(settings.url), settings.token, settings.startup_timeout)
        self.visible_workdir = str(settings.workdir)  # images are saved on this machine; the kernel cannot see them
        self._lock = asyncio.Lock()
        self._images = ImageSaver(settings.workdir)
        self.kernels: set[RemoteKernel] = set()  # every kernel not yet deleted, for close and the at-exit path
        self._chores: set[asyncio.Task[Any]] = set()

    @property
    def kernel_id(self) -> str | None:
        """The gateway's id of the running kernel (None before start and after close)."""
        return self._kernel.id if self._kernel is not None else None

    def start_soon(self, previous: RemoteKernel | None = None) -> None:
        """Begin starting a kernel (restarting `previous` when given) unless one runs or is starting."""
        if self.closed or self._kernel is not None or self._starting is not None:
            return
        self._starting = asyncio.ensure_future(self._start(previous))

    async def _start(self, previous: RemoteKernel | None) -> RemoteKernel:
        if previous is not None:
            try:
                restarted = await previous.restart()
            finally:
                if previous.id is None:
                    self.kernels.discard(previous)
            if restarted:
                self._kernel, self._starting = previous, None
                return previous
        kernel = RemoteKernel(self.client, self.settings.kernel_name, self.settings.env, self.settings.startup_timeout)
        self.kernels.add(kernel)
        try:
            await kernel.start()
        except KernelStartError:
            raise
        except Exception as exc:  # anything unforeseen still reaches the caller as a start failure, with the URL
            raise KernelStartError(
                f"the kernel could not be started on the gateway at {self.client.address.url}: {describe(exc)}"
            ) from exc
        finally:
            if kernel.id is None:
                self.kernels.discard(kernel)
        self._kernel, self._starting = kernel, None
        return kernel

    async def execute(self, code: str, timeout: float) -> ExecutionResult:
        async with self._lock:
            begin = asyncio.get_running_loop().time()
            collector = RemoteCollector(self._images, self.settings.max_output_chars)
            kernel = await self._live_kernel(collector.result)
            try:
                await self._run(kernel, code, timeout, collector)
            except asyncio.CancelledError:
                self._chore(kernel.interrupt())  # the caller gave up: do not leave the cell running
                raise
            if self.closed:
                raise SandboxClosedError("the sandbox was closed during this call")
            result = collector.finish()
            result.workdir, result.visible_workdir = self.settings.workdir, self.visible_workdir
            result.duration = asyncio.get_running_loop().time() - begin
            return result

    async def _live_kernel(self, result: ExecutionResult) -> RemoteKernel:
        """A kernel lost while idle (the gateway restarted it) is restarted first; a dropped websocket to a kernel
        the gateway still runs is just reopened, state kept."""
        kernel = await self.kernel()
        if kernel.alive() or await kernel.reconnect():
            return kernel
        result.restarted = True
        result.notes.append(f"the kernel was lost since the last execution ({kernel.exit_description()}); {RESTARTED}")
        self._replace(kernel)
        return await self.kernel()

    async def _run(self, kernel: RemoteKernel, code: str, timeout: float, collector: OutputCollector) -> None:
        msg_id = await kernel.send(code)
        outcome = await kernel.collect(msg_id, collector, asyncio.get_running_loop().time() + timeout)
        if outcome == "timeout":
            outcome = await self._interrupt(kernel, msg_id, timeout, collector)
        if outcome == "died" and not self.closed:
            collector.result.kernel_died = collector.result.restarted = True
            collector.result.notes.append(f"{kernel.exit_description()}; {RESTARTED}")
            self._replace(kernel)

    async def _interrupt(self, kernel: RemoteKernel, msg_id: str, timeout: float, collector: OutputCollector) -> str:
        """Interrupt, then a short grace to reach idle; past it, restart the kernel. Returns the final outcome."""
        result = collector.result
        result.timed_out = True
        result.notes.append(f"timed out after {timeout:g} s")
        outcome = "timeout"
        if await kernel.interrupt():
            outcome = await kernel.collect(msg_id, collector, asyncio.get_running_loop().time() + self.grace)
        if outcome == "timeout":
            logger.info("kernel %s on %s ignored the interrupt; restarting it", kernel.id, self.client.address.url)
            result.restarted = True
            result.notes.append(RESTARTED)
            self._replace(kernel)
            return "restarted"
        return outcome

    def _replace(self, kernel: RemoteKernel) -> None:
        """Restart `kernel` in the background (a new kernel if the gateway lost it); the next cell waits for it."""
        if self._kernel is kernel:
            self._kernel = None
        if not self.closed:
            self.start_soon(previous=kernel)

    def _chore(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def reset(self) -> None:
        """A fresh kernel state: a restart through the gateway (or a new kernel when it lost ours)."""
        async with self._lock:
            self._replace(await self.kernel())
            await self.kernel()

    async def aclose(self) -> None:
        """Delete every kernel we started, without waiting for a running cell (its websocket closes, and the
        sandbox reports that call as SandboxClosedError)."""
        self.closed = True
        starting, self._starting, self._kernel = self._starting, None, None
        for task in [*self._chores, *([starting] if starting is not None else [])]:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for kernel in list(self.kernels):
            await kernel.aclose()
            self.kernels.discard(kernel)
        await self.client.aclose()

    def kill_now(self) -> None:
        """Last resort from any thread (interpreter exit, a loop that is gone): blocking deletes, never raises."""
        self.closed = True
        for kernel in list(self.kernels):
            kernel.delete_now()
        self.kernels.clear()

