"""The execution policy, on the sandbox's own event loop: one cell at a time, time limits, restarts.

Timeout: interrupt (SIGINT to the process group); if the kernel is not idle after a short grace, kill it and start
a fresh one in the background. Death (os._exit, a segfault, SIGKILL for memory): detected by polling the process
while iopub is silent; the result says so and a fresh kernel starts in the background, so the result returns
without waiting for it. The files a cell wrote come from two snapshots of the workdir, before and after it, each
bounded in entries and time (`workdir.snapshot`): a tree too big for them costs a cell at most about 0.4 s of host
work, and the result's notes say that its list of files is partial.
"""

from __future__ import annotations

import asyncio
import logging

from .collect import OutputCollector
from .errors import KernelStartError
from .kernel_holder import RESTARTED, KernelHolder
from .process import KernelProcess, KernelSettings
from .result import ExecutionResult
from .workdir import ImageSaver, changed_files, snapshot

logger = logging.getLogger(__name__)


class Engine(KernelHolder[KernelProcess]):
    def __init__(self, settings: KernelSettings, interrupt_grace: float) -> None:
        super().__init__()
        self.settings = settings
        self.grace = interrupt_grace
        self.visible_workdir = settings.isolation.data_path or str(settings.workdir)
        self._lock = asyncio.Lock()
        self._images = ImageSaver(settings.workdir, settings.idmap_workdir)
        self.processes: set[KernelProcess] = set()  # every kernel not yet closed, for the at-exit killer

    @property
    def kernel_pid(self) -> int | None:
        return self._kernel.pid if self._kernel is not None else None

    def start_soon(self) -> None:
        """Begin starting a kernel unless one runs or is starting; must run on the engine's loop."""
        if self.closed or self._kernel is not None or self._starting is not None:
            return
        process = KernelProcess(self.settings)
        self.processes.add(process)
        self._starting = asyncio.ensure_future(self._start(process))

    async def _start(self, process: KernelProcess) -> None:
        try:
            await process.start()
        except BaseException as exc:
            self.processes.discard(process)
            if isinstance(exc, Exception) and not isinstance(exc, KernelStartError):
                raise KernelStartError(f"the kernel could not be launched: {exc}") from exc
            raise
        self._kernel, self._starting = process, None

    async def execute(self, code: str, timeout: float) -> ExecutionResult:
        async with self._lock:
            begin = asyncio.get_running_loop().time()
            collector = OutputCollector(self._images, self.settings.max_output_chars)
            kernel = await self._live_kernel(collector.result)
            before = snapshot(self.settings.workdir)
            try:
                await self._run(kernel, code, timeout, collector)
            except asyncio.CancelledError:
                kernel.interrupt()  # the caller gave up: do not leave the cell running
                raise
            result = collector.finish()
            after = snapshot(self.settings.workdir)
            result.files = changed_files(self.settings.workdir, before, after, set(result.images))
            partial = before.partial or after.partial
            if partial is not None:
                result.notes.append(f"{partial}: the list of changed files is partial")
            result.workdir, result.visible_workdir = self.settings.workdir, self.visible_workdir
            result.duration = asyncio.get_running_loop().time() - begin
            return result

    async def _live_kernel(self, result: ExecutionResult) -> KernelProcess:
        """A kernel killed while idle (the OOM killer, a stray signal) is replaced before the cell is sent."""
        kernel = await self.kernel()
        if kernel.alive():
            return kernel
        result.restarted = True
        result.memory_exceeded = kernel.memory_exceeded()
        result.notes.append(f"the kernel had died since the last execution ({kernel.exit_description()}); {RESTARTED}")
        await self._replace_kernel()
        return await self.kernel()

    async def _run(self, kernel: KernelProcess, code: str, timeout: float, collector: OutputCollector) -> None:
        loop = asyncio.get_running_loop()
        msg_id = await kernel.send(code)
        outcome = await kernel.collect(msg_id, collector, loop.time() + timeout)
        if outcome == "timeout":
            outcome = await self._interrupt(kernel, msg_id, timeout, collector)
        if outcome == "idle" and kernel.memory_exceeded():  # cgroup v1: a child was killed, the kernel lives on
            outcome = "died"
        if outcome == "died":
            collector.result.kernel_died = collector.result.restarted = True
            collector.result.memory_exceeded = kernel.memory_exceeded()
            collector.result.notes.append(f"kernel died ({kernel.exit_description()}); {RESTARTED}")
            await self._replace_kernel()
        elif outcome == "overflow":  # more than the host takes: the rest is not read, the kernel cannot go on
            collector.result.overflowed = collector.result.restarted = True
            collector.result.notes.append(f"{kernel.overflow}; {RESTARTED}")
            await self._replace_kernel()

    async def _interrupt(self, kernel: KernelProcess, msg_id: str, timeout: float, collector: OutputCollector) -> str:
        """SIGINT, then a short grace to reach idle; past it, replace the kernel. Returns the final outcome."""
        result = collector.result
        result.timed_out = True
        result.notes.append(f"timed out after {timeout:g} s")
        kernel.interrupt()
        outcome = await kernel.collect(msg_id, collector, asyncio.get_running_loop().time() + self.grace)
        if outcome == "timeout":
            logger.info("kernel %s ignored the interrupt; restarting it", kernel.pid)
            result.restarted = True
            result.notes.append(RESTARTED)
            await self._replace_kernel()
            return "restarted"
        return outcome

    async def _replace_kernel(self) -> None:
        """Kill the current kernel and start the next one in the background."""
        old, self._kernel = self._kernel, None
        if old is not None:
            await self._close_process(old)
        self.start_soon()

    async def _close_process(self, process: KernelProcess) -> None:
        await process.aclose()
        self.processes.discard(process)

    async def reset(self) -> None:
        async with self._lock:
            await self._drop_kernel()
            await self.kernel()

    async def _drop_kernel(self) -> None:
        starting, self._starting = self._starting, None
        if starting is not None:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        old, self._kernel = self._kernel, None
        if old is not None:
            await self._close_process(old)

    async def aclose(self) -> None:
        """Kill without waiting for a running cell: closing its sockets cancels that cell's `execute`, which the
        sandbox reports to its caller as SandboxClosedError."""
        self.closed = True
        await self._drop_kernel()
        for process in list(self.processes):
            await self._close_process(process)

    def kill_now(self) -> None:
        """Last resort from any thread (interpreter exit): OS-level kill of every kernel we launched. Never raises:
        one kernel's clean-up failing (its runtime folder is the kernel's to fill) must not spare the others."""
        self.closed = True
        for process in list(self.processes):
            try:
                process.terminate()
            except Exception as exc:
                logger.warning("kernel %s: clean-up after the kill failed: %r", process.pid, exc)
        self.processes.clear()
