"""One kernel process: launch it behind the launcher, talk to it over IPC, and kill it with everything it spawned.

A restart is a new `KernelProcess` (new runtime folder, cgroup, sockets), never a reuse: no stale message or
half-dead socket can leak from one kernel into the next.

The kernel is hostile, and its sockets are files in a folder it can write. So the host never connects by name:
once the kernel has bound its shell and iopub sockets, each file is opened with O_PATH | O_NOFOLLOW, checked (a
socket, owned by the kernel's uid), and the descriptor kept for the kernel's life; the host connects to
/proc/self/fd/N, which the kernel resolves to that very inode, so a link or another socket put under the name later
is never reached. The connections are made once and never remade (`zmtp.py`, which also counts every byte before
allocating it): a kernel that drops one is treated as dead. jupyter_client still launches the kernel and writes
its connection file, but connects nothing (its control socket would reconnect by name).

What the kernel sends is bounded on receipt: a message of more than `message_limit` bytes, or more than
`CELL_MESSAGES` times that in one execution, and the kernel is restarted ("overflow").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq.asyncio
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from .cgroups import CgroupLimits, SandboxCgroup
from .collect import OutputCollector, answers, is_idle
from .errors import KernelStartError
from .fdtree import remove_folder
from .isolation import Isolation, kernel_env, launch_config
from .wire import MalformedMessage, decode
from .zmtp import ChannelLost, Connection, MessageTooLarge, Received

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_POLL_S = 0.25  # how long a silent kernel may go before we check that it is still alive
_STDERR_TAIL = 4_000
_NO_HISTORY_FILE = "--HistoryManager.hist_file=:memory:"
_HELPER_PROCESSES = 2  # the launcher waiting on the host side and pid 1 of the sandbox, both in the cgroup
_LARGEST_BINARY = 32 * 2**20  # kernel_entry.py sends image data of up to 32 M characters (base64) in one message
CELL_MESSAGES = 8  # one execution may receive this many largest messages' worth of bytes
_PIN_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_EXIT_GRACE_S = 2.0  # how long a kernel that closed its iopub socket has to exit before we call it a deserter
_SEND_TIMEOUT_S = 10.0  # a kernel that takes no request within this long has stopped reading its shell socket


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
    idmap_workdir: tuple[int, int] | None = None  # the owner (uid, gid) the kernel's ids map onto, see idmap.py
    cgroup_roots: Mapping[str, Path] = field(default_factory=dict)  # controller -> root, see cgroups.py
    max_cpus: float = 1.0  # the sandbox's CPU cap (cpu.max) where a cpu cgroup is used

    def cgroup_limits(self) -> tuple[dict[str, Path], CgroupLimits]:
        """Where this kernel's cgroup goes and what it caps: the controllers `isolation` promised, from
        `cgroup_roots` (or just pids from `cgroup_root`)."""
        iso = self.isolation
        roots = dict(self.cgroup_roots) or ({"pids": self.cgroup_root} if self.cgroup_root is not None else {})
        limits = CgroupLimits(
            pids=self.max_processes + _HELPER_PROCESSES,
            memory_bytes=self.memory_mb * 2**20 if iso.memory_limit == "memory cgroup" else None,
            cpus=self.max_cpus if iso.cpu_limit == "cpu cgroup" else None,
        )
        return roots, limits


def message_limit(max_output_chars: int) -> int:
    """The most bytes one message from the kernel may have: the largest image plus room for a few text parts of
    `max_output_chars` characters each (up to 6 bytes a character in JSON, for escaped control characters)."""
    return _LARGEST_BINARY + 24 * max_output_chars


class _Manager(AsyncKernelManager):
    """Launches the kernel and writes its connection file, and never connects to the kernel: its control socket
    would reconnect by path, through whatever the kernel put there. We do not need it: interrupts are signals and
    shutdown is SIGKILL."""

    def _connect_control_socket(self) -> None:
        return None


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
        self.cgroup: SandboxCgroup | None = None
        self._memory_exceeded = False
        self.popen: subprocess.Popen[bytes] | None = None
        self._manager: AsyncKernelManager | None = None
        self._shell: Connection | None = None
        self._iopub: Connection | None = None
        self._pins: list[int] = []  # O_PATH descriptors of the kernel's socket files, kept while it lives
        self._stderr = bytearray()
        self._reading_fd: int | None = None
        self._message_limit = message_limit(settings.max_output_chars)
        self._cell_bytes = 0
        self.lost: str | None = None  # why a connection to the kernel is gone, once one is
        self.overflow: str | None = None  # what the kernel sent too much of, once it did

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
        roots, limits = s.cgroup_limits()
        if s.isolation.process_limit == "pids cgroup" and roots:
            self.cgroup = SandboxCgroup.create(roots, limits)
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
        self._manager = _Manager(
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
            cgroup=[str(path) for path in self.cgroup.paths] if self.cgroup else None,
            memory_bytes=s.memory_mb * 2**20,
            file_bytes=s.max_file_mb * 2**20,
            tmp_bytes=s.max_file_mb * 2**20,
            nproc_limit=s.max_processes + 1 if iso.process_limit == "RLIMIT_NPROC" else None,
            env=kernel_env(s.env, home),
            argv=[s.python, str(_HERE / "kernel_entry.py"), str(s.max_output_chars), _NO_HISTORY_FILE],
            idmap_workdir=list(s.idmap_workdir) if s.idmap_workdir is not None else None,
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
        deadline = asyncio.get_running_loop().time() + self.settings.startup_timeout
        await self._connect(deadline)
        assert self._shell is not None and self._iopub is not None
        replied = subscribed = False
        while not (replied and subscribed):
            self._check_starting(deadline)
            if not replied:
                await self._request("kernel_info_request", {})
            replied = replied or await self._arrived(self._shell, 0.05)
            subscribed = subscribed or await self._arrived(self._iopub, 0.05)

    def _check_starting(self, deadline: float) -> None:
        if not self.alive():
            raise KernelStartError(f"the kernel exited during start-up ({self.exit_description()})")
        if asyncio.get_running_loop().time() > deadline:
            raise KernelStartError(f"the kernel did not answer within {self.settings.startup_timeout:g} s")

    async def _connect(self, deadline: float) -> None:
        """Pin the shell and iopub socket files once the kernel has bound them, and connect through the pins."""
        assert self._manager is not None
        self._shell = await self._open("shell", self._manager.shell_port, "DEALER", deadline)
        self._iopub = await self._open("iopub", self._manager.iopub_port, "SUB", deadline)

    async def _open(self, channel: str, port: int, socket_type: str, deadline: float) -> Connection:
        assert self._manager is not None
        fd = await self._pin(f"{self._manager.ip}-{port}", deadline)
        try:
            return await Connection.open(f"/proc/self/fd/{fd}", socket_type, self._message_limit, deadline)
        except ChannelLost as exc:
            raise KernelStartError(f"could not connect to the kernel's {channel} socket: {exc}") from None

    async def _pin(self, path: str, deadline: float) -> int:
        """Wait for the socket file at `path`, then open it without following links; the descriptor names that
        inode until we close it, whatever the kernel later puts under `path`."""
        while not os.path.lexists(path):
            self._check_starting(deadline)
            await asyncio.sleep(0.01)
        try:
            fd = os.open(path, _PIN_FLAGS)
        except OSError as exc:
            raise KernelStartError(f"could not open the kernel's socket {path}: {exc}") from None
        self._pins.append(fd)
        info = os.fstat(fd)
        if not stat.S_ISSOCK(info.st_mode) or info.st_uid != self.settings.isolation.uid:
            raise KernelStartError(
                f"{path} is not a socket of the kernel's user (mode {info.st_mode:o}, owner {info.st_uid})"
            )
        return fd

    async def _arrived(self, connection: Connection, timeout: float) -> bool:
        try:
            return await connection.receive(timeout) is not None
        except ChannelLost as exc:
            raise KernelStartError(f"the kernel dropped its connection during start-up ({exc})") from None

    async def _request(self, msg_type: str, content: dict[str, Any]) -> str:
        """Send a request on shell; a kernel that does not take it in time has lost that connection (`lost`)."""
        assert self._manager is not None and self._shell is not None
        msg = self._manager.session.msg(msg_type, content)
        try:
            await asyncio.wait_for(self._shell.send(self._manager.session.serialize(msg)), _SEND_TIMEOUT_S)
        except (ChannelLost, asyncio.TimeoutError) as exc:
            self.lost = self.lost or f"it stopped taking requests ({str(exc) or 'timed out'})"
        return str(msg["header"]["msg_id"])

    async def _warm_up(self) -> None:
        """Run one silent cell so the user's first cell does not pay IPython's first-execution cost."""
        msg_id = await self._execute("pass", silent=True)
        outcome = await self.collect(msg_id, None, asyncio.get_running_loop().time() + self.settings.startup_timeout)
        if outcome != "idle":
            raise KernelStartError(f"the kernel failed its first execution ({outcome})")

    async def send(self, code: str) -> str:
        """Send one cell; its execute reply is never read (iopub carries everything), the kernel drops replies we
        leave unread. The byte budget of `collect` starts again here."""
        self._cell_bytes = 0
        return await self._execute(code, silent=False)

    async def _execute(self, code: str, *, silent: bool) -> str:
        return await self._request("execute_request", {
            "code": code, "silent": silent, "store_history": not silent, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": False,
        })

    async def collect(self, msg_id: str, collector: OutputCollector | None, deadline: float) -> str:
        """Feed our iopub messages to `collector` until idle; returns "idle", "timeout", "died" (the process or its
        connection is gone) or "overflow" (it sent more than the host takes, see `overflow`)."""
        loop = asyncio.get_running_loop()
        while (remaining := deadline - loop.time()) > 0:
            outcome = await self._take_one(msg_id, collector, min(remaining, _POLL_S))
            if outcome is not None:
                return outcome
        return "timeout"

    async def _take_one(self, msg_id: str, collector: OutputCollector | None, timeout: float) -> str | None:
        """Receive one iopub message and hand it on when it is ours; the outcome that ends the cell, or None. The
        frames are let go once decoded, and the message once handed on: one message at a time is held here."""
        received = await self._receive_iopub(timeout)
        if received is None or isinstance(received, str):
            return received
        msg = self._decode(received, collector)
        del received
        if msg is None or not answers(msg, msg_id, collector):
            return None
        if collector is None:
            return "idle" if is_idle(msg) else None
        return "idle" if collector.add(msg) else None

    async def _receive_iopub(self, timeout: float) -> Received | str | None:
        """The next iopub message, counted against the cell's budget; None after `timeout` without one; or the
        outcome that ends the cell ("died", "overflow")."""
        assert self._iopub is not None
        try:
            received = await self._iopub.receive(timeout)
        except MessageTooLarge as exc:
            self.overflow = str(exc)
            return "overflow"
        except ChannelLost as exc:
            if not await self._exits_soon():  # a dying kernel closes its sockets a moment before it is reaped
                self.lost = self.lost or f"its iopub connection was lost: {exc}"
            return "died"
        if received is None:
            return None if self.alive() else "died"
        self._cell_bytes += received.size
        if self._cell_bytes > CELL_MESSAGES * self._message_limit:
            self.overflow = (
                f"the kernel sent more than {CELL_MESSAGES * self._message_limit // 2**20} MB of messages in one"
                " execution"
            )
            return "overflow"
        return received

    async def _exits_soon(self) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _EXIT_GRACE_S
        while self._running():
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def _decode(self, received: Received, collector: OutputCollector | None) -> dict[str, Any] | None:
        assert self._manager is not None
        try:
            return decode(received.frames, self._manager.session, self._message_limit - _LARGEST_BINARY)
        except MalformedMessage as exc:
            if collector is not None:
                collector.malformed(None, str(exc))
            return None

    def alive(self) -> bool:
        """Running, still connected (a kernel that dropped a connection is never reconnected), and within its
        memory cap: a sandbox where the OOM killer took any process is killed whole (see `memory_exceeded`)."""
        return self.lost is None and self._running() and not self.memory_exceeded()

    def memory_exceeded(self) -> bool:
        """True once the OOM killer has taken a process of this sandbox for going over its memory cgroup's cap.
        cgroup v2 then kills the whole sandbox (memory.oom.group); v1 only the largest process, so the host
        kills the rest (the engine replaces a kernel that is not `alive`): a half-killed tree is never kept."""
        if not self._memory_exceeded and self.cgroup is not None:
            self._memory_exceeded = self.cgroup.oom_kills() > 0
        return self._memory_exceeded

    def _running(self) -> bool:
        """Not exited, and not dying: a SIGKILLed multi-threaded process is a zombie leader for a moment
        before waitpid reports it, and a cell sent then would be lost."""
        if self.popen is None or self.popen.poll() is not None:
            return False
        try:
            with open(f"/proc/{self.popen.pid}/stat", "rb") as stat_file:
                state = stat_file.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True  # no procfs: waitpid is all we have
        return state not in (b"Z", b"X")

    def exit_description(self) -> str:
        if self.memory_exceeded():
            return f"killed for memory: the sandbox went over its cap of {self.settings.memory_mb} MB"
        code = self.popen.poll() if self.popen is not None else None
        if code is None and self.popen is not None and not self._running():
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.popen.wait(timeout=2)  # dying: its threads are still exiting
        if code is None:
            return self.lost or "still running"
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
            self.memory_exceeded()  # counted before the cgroup goes
            self.cgroup.kill()
        if self.popen is not None:
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                logger.warning("kernel %s did not exit after SIGKILL", self.popen.pid)
        if self.cgroup is not None and self.cgroup.remove():
            self.cgroup = None
        self._unpin()
        remove_folder(self.runtime)  # the kernel can write its part of it: fd-based, any depth, no links

    def _unpin(self) -> None:
        """Close the socket pins, each exactly once even when two threads terminate at the same time (`pop` is
        atomic): a second close could hit a descriptor number that was reused meanwhile."""
        while True:
            try:
                fd = self._pins.pop()
            except IndexError:
                return
            with contextlib.suppress(OSError):
                os.close(fd)

    async def aclose(self) -> None:
        """Close sockets on the loop that owns them, then kill. Killing blocks this loop for a few milliseconds,
        which is fine: the loop is private to one sandbox, and a worker thread is not available at exit."""
        self._stop_reading()
        for connection in (self._shell, self._iopub):
            if connection is not None:
                await connection.aclose()
        self.terminate()
        if self._manager is not None:
            try:
                await self._manager.cleanup_resources()
            except Exception as exc:  # the process is gone already; a leftover socket file is not worth a crash
                logger.debug("kernel manager cleanup: %s", exc)
        if self.popen is not None and self.popen.stderr is not None:
            self.popen.stderr.close()
