"""One kernel process: launch it behind the launcher, talk to it over IPC, and kill it with everything it spawned.

A restart is a new `KernelProcess` (new runtime folder, cgroup, sockets), never a reuse: no stale message or
half-dead socket can leak from one kernel into the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq.asyncio
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from .collect import OutputCollector
from .errors import KernelStartError
from .isolation import Isolation, create_pids_cgroup, kernel_env, kill_cgroup, launch_config, remove_cgroup

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_POLL_S = 0.25  # how long a silent kernel may go before we check that it is still alive
_STDERR_TAIL = 4_000
_NO_HISTORY_FILE = "--HistoryManager.hist_file=:memory:"
_HELPER_PROCESSES = 2  # the launcher waiting on the host side and pid 1 of the sandbox, both in the cgroup


@dataclass(frozen=True)
class KernelSettings:
    """Everything needed to launch one kernel; shared by every restart of a sandbox."""

    workdir: Path
    isolation: Isolation
    cgroup_root: Path | None
    memory_mb: int
    max_processes: int
    max_file_mb: int
    max_output_chars: int
    startup_timeout: float
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)


class _OneSpec(KernelSpecManager):
    """Hands jupyter_client our launcher command instead of an installed kernelspec."""

    def __init__(self, spec: KernelSpec, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._spec = spec

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return self._spec


def _zmq_context() -> zmq.asyncio.Context:
    """One context (and one pair of ZeroMQ I/O threads) for all sandboxes, instead of two per kernel."""
    return zmq.asyncio.Context.instance()


class KernelProcess:
    def __init__(self, settings: KernelSettings) -> None:
        self.settings = settings
        self.runtime = Path(tempfile.mkdtemp(prefix=f"kernelsandbox-run-{os.getpid()}-"))
        self.cgroup: Path | None = None
        self.popen: subprocess.Popen[bytes] | None = None
        self._manager: AsyncKernelManager | None = None
        self._client: AsyncKernelClient | None = None
        self._stderr = bytearray()
        self._reading_fd: int | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    async def start(self) -> None:
        """Launch and wait until the kernel answers on shell and iopub; on any failure leave nothing behind."""
        try:
            await self._launch()
            await self._wait_ready()
            await self._warm_up()
        except BaseException:
            await self.aclose()
            raise

    async def _launch(self) -> None:
        s = self.settings
        if s.isolation.process_limit == "pids cgroup" and s.cgroup_root is not None:
            self.cgroup = create_pids_cgroup(s.cgroup_root, s.max_processes + _HELPER_PROCESSES)
        self._make_runtime_folders()
        config = self._launch_config()
        (self.runtime / "launch.json").write_text(json.dumps(config))
        spec = KernelSpec(
            argv=[s.python, "-S", str(_HERE / "launcher.py"), str(self.runtime / "launch.json"), "{connection_file}"],
            display_name="sandbox",
            language="python",
            interrupt_mode="signal",
        )
        context = _zmq_context()
        self._manager = AsyncKernelManager(
            kernel_name="sandbox",
            kernel_spec_manager=_OneSpec(spec),
            transport="ipc",
            connection_file=str(self.runtime / "kernel" / "kernel.json"),
            context=context,
        )
        await self._manager.start_kernel(
            env=config["env"], cwd=str(self.runtime), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.popen = self._manager.provisioner.process  # type: ignore[union-attr]
        self._read_stderr_in_background()
        self._client = self._manager.client(context=context)
        self._client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)

    def _make_runtime_folders(self) -> None:
        """`kernel/` is the only part of the runtime folder the kernel sees (its connection file and sockets): mode
        0700 and owned by the kernel's uid, so no other sandbox (another uid, another mount namespace) can read the
        key. `root/` is where the launcher builds the kernel's file system."""
        kernel = self.runtime / "kernel"
        kernel.mkdir(mode=0o700)
        iso = self.settings.isolation
        if iso.contained and os.geteuid() == 0:
            os.chown(kernel, iso.uid, iso.gid)
        (self.runtime / "root").mkdir(mode=0o700)

    def _launch_config(self) -> dict[str, Any]:
        s, iso = self.settings, self.settings.isolation
        home = "/tmp" if iso.contained else str(self.runtime / "kernel")
        config = launch_config(
            iso.mode, network=not iso.network_blocked, workdir=s.workdir, runtime=self.runtime, python=s.python,
            ids=(iso.uid, iso.gid),
        )
        config.update(
            drop_capabilities=iso.capabilities_dropped,
            cgroup=str(self.cgroup) if self.cgroup else None,
            memory_bytes=s.memory_mb * 2**20,
            file_bytes=s.max_file_mb * 2**20,
            tmp_bytes=s.max_file_mb * 2**20,
            nproc_limit=s.max_processes + 1 if iso.process_limit == "RLIMIT_NPROC" else None,
            env=kernel_env(s.env, home),
            argv=[s.python, str(_HERE / "kernel_entry.py"), str(s.max_output_chars), _NO_HISTORY_FILE],
        )
        return config

    def _read_stderr_in_background(self) -> None:
        """Drain the kernel's stderr (ipykernel echoes fd-level output there): a full pipe would stall the kernel."""
        assert self.popen is not None and self.popen.stderr is not None
        fd = self.popen.stderr.fileno()
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self._on_stderr, fd)
        self._reading_fd = fd

    def _on_stderr(self, fd: int) -> None:
        self._read_chunk(fd)

    def _read_chunk(self, fd: int) -> bool:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            self._stop_reading()
            return False
        self._stderr += chunk
        del self._stderr[:-_STDERR_TAIL]
        return True

    def _stop_reading(self) -> None:
        if self._reading_fd is not None:
            asyncio.get_running_loop().remove_reader(self._reading_fd)
            self._reading_fd = None

    def stderr_tail(self) -> str:
        if self._reading_fd is not None:  # a process that just died may have left its last words unread
            for _ in range(16):
                if self._reading_fd is None or not self._read_chunk(self._reading_fd):
                    break
        return self._stderr.decode(errors="replace").strip()

    async def _wait_ready(self) -> None:
        """Ready means a kernel_info reply on shell *and* some message on iopub: a SUB socket that joined late
        would otherwise miss the first execution's output."""
        assert self._client is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.startup_timeout
        replied = subscribed = False
        while not (replied and subscribed):
            if not self.alive():
                raise KernelStartError(f"the kernel exited during start-up ({self.exit_description()})")
            if loop.time() > deadline:
                raise KernelStartError(f"the kernel did not answer within {self.settings.startup_timeout:g} s")
            if not replied:
                self._client.kernel_info()
            replied = replied or await self._receive(self._client.get_shell_msg, 0.05)
            subscribed = subscribed or await self._receive(self._client.get_iopub_msg, 0.05)

    @staticmethod
    async def _receive(getter: Any, timeout: float) -> bool:
        try:
            await getter(timeout=timeout)
        except queue.Empty:
            return False
        return True

    async def _warm_up(self) -> None:
        """Run one silent cell so the user's first cell does not pay IPython's first-execution cost."""
        assert self._client is not None
        msg_id = self._client.execute("pass", silent=True, store_history=False)
        outcome = await self.collect(msg_id, None, asyncio.get_running_loop().time() + self.settings.startup_timeout)
        if outcome != "idle":
            raise KernelStartError(f"the kernel failed its first execution ({outcome})")

    async def send(self, code: str) -> str:
        assert self._client is not None
        while await self._receive(self._client.get_shell_msg, 0):
            pass  # execute replies are not needed (iopub carries everything): drop them so they do not pile up
        return str(self._client.execute(code, store_history=True, allow_stdin=False, stop_on_error=False))

    async def collect(self, msg_id: str, collector: OutputCollector | None, deadline: float) -> str:
        """Feed our iopub messages to `collector` until idle; returns "idle", "timeout" or "died"."""
        assert self._client is not None
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return "timeout"
            try:
                msg = await self._client.get_iopub_msg(timeout=min(remaining, _POLL_S))
            except queue.Empty:
                if not self.alive():
                    return "died"
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if collector is None:
                if msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
                    return "idle"
            elif collector.add(msg):
                return "idle"

    def alive(self) -> bool:
        """Not exited, and not dying: a SIGKILLed multi-threaded process is a zombie leader for a moment
        before waitpid reports it, and a cell sent then would be lost."""
        if self.popen is None or self.popen.poll() is not None:
            return False
        try:
            with open(f"/proc/{self.popen.pid}/stat", "rb") as stat:
                state = stat.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True  # no procfs: waitpid is all we have
        return state not in (b"Z", b"X")

    def exit_description(self) -> str:
        code = self.popen.poll() if self.popen is not None else None
        if code is None and self.popen is not None and not self.alive():
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.popen.wait(timeout=2)  # dying: its threads are still exiting
        if code is None:
            return "still running"
        if code < 0:
            name = signal.Signals(-code).name
            hint = "; out of memory or killed from outside?" if -code == signal.SIGKILL else ""
            return f"killed by {name}{hint}"
        tail = self.stderr_tail()
        return f"exit code {code}" + (f": {tail.splitlines()[-1]}" if tail else "")

    def interrupt(self) -> None:
        """SIGINT to the whole process group (what jupyter_client would do, without its round trips)."""
        if self.alive():
            assert self.popen is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGINT)

    def terminate(self) -> None:
        """Kill the kernel, its process group and its cgroup, reap, and remove the runtime folder. Thread-safe:
        touches only the OS, so the at-exit finalizer can call it from any thread."""
        if self.popen is None and self._manager is not None and self._manager.provisioner is not None:
            self.popen = getattr(self._manager.provisioner, "process", None)  # cancelled inside start_kernel
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        if self.cgroup is not None:
            kill_cgroup(self.cgroup)
        if self.popen is not None:
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                logger.warning("kernel %s did not exit after SIGKILL", self.popen.pid)
        if self.cgroup is not None and remove_cgroup(self.cgroup):
            self.cgroup = None
        shutil.rmtree(self.runtime, ignore_errors=True)

    async def aclose(self) -> None:
        """Close sockets on the loop that owns them, then kill. Killing blocks this loop for a few milliseconds,
        which is fine: the loop is private to one sandbox, and a worker thread is not available at exit."""
        self._stop_reading()
        if self._client is not None:
            self._client.stop_channels()
        self.terminate()
        if self._manager is not None:
            try:
                await self._manager.cleanup_resources()
            except Exception as exc:  # the process is gone already; a leftover socket file is not worth a crash
                logger.debug("kernel manager cleanup: %s", exc)
        if self.popen is not None and self.popen.stderr is not None:
            self.popen.stderr.close()
