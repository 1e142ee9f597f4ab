"""`KernelSandbox`: the public face of the code interpreter.

A thin synchronous and asynchronous facade over an engine that runs on a private loop thread: `engine.Engine` for
a local kernel behind OS limits, or `gateway_engine.GatewayEngine` for a kernel on a Jupyter Kernel Gateway or
Enterprise Gateway (`gateway_url=...`). A local kernel is killed by `close()`, by garbage collection, or at
interpreter exit (a `weakref.finalize` that needs no reference to the sandbox), and ipykernel itself exits when
its parent process disappears: no orphan kernel survives us. A remote kernel is deleted on the gateway by the same
paths. Each backend's packages are imported only when it is used.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import os
import sys
import tempfile
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Protocol

from .errors import SandboxClosedError, SandboxConfigurationError
from .fdtree import remove_folder
from .idmap import idmap_owner
from .isolation import Isolation, host_support, plan_isolation
from .janitor import sweep_leftovers
from .loop import LoopThread
from .result import ExecutionResult
from .workdir import hand_over, hand_over_empty
from .workdir_lock import WorkdirLock, lock_workdir, refuse_if_in_use

logger = logging.getLogger(__name__)

_MIN_PROCESSES = 16  # ipykernel alone runs about ten threads, and Linux counts threads as processes
_LOCAL_ONLY = ("memory_mb", "max_processes", "network", "isolation", "max_file_mb", "python", "max_cpus")

#: `KernelSandbox.isolation` of a sandbox whose kernel runs on a gateway: nothing of this machine applies to it.
GATEWAY_ISOLATION = Isolation(
    mode="gateway", network_blocked=False, process_limit="gateway", uid=-1, gid=-1, capabilities_dropped=False
)


class _KernelBackend(Protocol):
    """What the sandbox drives: `engine.Engine` (a local kernel) or `gateway_engine.GatewayEngine`."""

    visible_workdir: str

    @property
    def kernel_pid(self) -> int | None: ...

    @property
    def ready(self) -> bool: ...

    def start_soon(self) -> None: ...

    async def kernel(self) -> object: ...

    async def execute(self, code: str, timeout: float) -> ExecutionResult: ...

    async def reset(self) -> None: ...

    async def aclose(self) -> None: ...

    def kill_now(self) -> None: ...


class KernelSandbox:
    """A stateful Python kernel for model-written code, behind OS limits.

    `timeout` is per execution (seconds); `memory_mb` caps the memory of the kernel and all it spawns together
    (a memory cgroup, swap off: going over it kills the sandbox, and the result says `memory_exceeded`) and each
    process's address space (RLIMIT_AS; the only cap where no memory cgroup is writable, see `isolation`);
    `max_processes` caps processes *and threads* (pids cgroup, or RLIMIT_NPROC without root); `max_cpus` caps
    the CPU time of the whole sandbox, in CPUs (cpu.max; not capped without a cpu cgroup); `max_file_mb`
    caps the size of any one file written (RLIMIT_FSIZE); `max_output_chars` bounds each output stream (head and
    tail are kept). `env` adds variables to the allowlisted ones.

    The kernel is contained: an unprivileged user, its own root file system (read-only system and interpreter
    folders, the workdir at /mnt/data, a private /tmp of at most `max_file_mb`), its own process table and, unless
    `network=True`, no network but its own loopback. Where the machine cannot do that, `IsolationUnavailableError`
    is raised; `isolation="none"` (with `network=True`) is the explicit opt-out that runs the kernel as you.
    As root the kernel gets a dedicated uid. Where the workdir can be mounted idmapped (see `idmap.py`), what the
    kernel writes lands on disk as the folder's owner; elsewhere a `workdir` you pass is handed to the kernel's uid
    (ownership of its entries) while the sandbox is open and given back on close, owners and modes as they were
    (see `workdir.py`), and the folder is locked meanwhile: a second sandbox on it, or on a folder inside or
    around it, raises `WorkdirInUseError`.

    `gateway_url="http(s)://host:port[/prefix]"` runs the kernel on a Jupyter Kernel Gateway or Enterprise Gateway
    instead (`pip install "functionary-agent[gateway]"`), started through its REST API (`kernel_name`, default:
    the gateway's default kernel) and driven over its websocket; `token` is sent to that origin only, as
    `Authorization: token ...`. Timeouts (interrupt, then a restart through the gateway), output bounds, saved
    images, `reset()` and `close()` (which deletes the kernel on the gateway) behave as they do locally. OS limits,
    network and files are the gateway's business: the local-only settings (`memory_mb`, `max_processes`,
    `max_cpus`, `max_file_mb`, `network`, `isolation`, `python`) raise `SandboxConfigurationError` when given a
    value other than their default together with `gateway_url` (and the default `network=False` is *not*
    enforced there).
    The kernel works in the gateway machine's folders: `/mnt/data` and `workdir` are not shared with it; `workdir`
    only receives the images, and `ExecutionResult.files` stays empty. `env` is sent with the start request, where
    the gateway keeps the variables it allows (Kernel Gateway: `KERNEL_*` and its `env_whitelist`). Unreachable
    gateways and refused tokens raise `KernelStartError` with the URL and the reason; a connection lost during a
    cell is reported in that cell's result, like a dead local kernel.

    Attributes:
        timeout: The default time limit of one execution, in seconds (`execute(timeout=...)` overrides it).
        isolation: What the OS enforces for the kernel; its `mode` is "gateway" for a kernel on a gateway.
        workdir: The working folder on this machine, as an absolute path: the one passed, or a new temporary
            folder removed on close.

    Raises:
        ValueError: A limit is out of range (`timeout` not positive, `memory_mb` under 256, `max_processes`
            under 16, `max_output_chars` under 100, `max_file_mb` under 1, `max_cpus` outside 0.01 to 1024), or
            `isolation` is neither "auto" nor "none".
        IsolationUnavailableError: This machine cannot contain the kernel, or `isolation="none"` without
            `network=True`.
        SandboxConfigurationError: A local-only setting with `gateway_url`, gateway settings without it, or the
            packages of the chosen backend are missing.
        WorkdirInUseError: The workdir belongs to another live sandbox.
    """

    def __init__(
        self,
        workdir: str | Path | None = None,
        timeout: float = 60,
        memory_mb: int = 2048,
        max_processes: int = 64,
        max_output_chars: int = 20_000,
        env: Mapping[str, str] | None = None,
        network: bool = False,
        *,
        isolation: str = "auto",
        max_file_mb: int = 1024,
        interrupt_grace: float = 1.0,
        startup_timeout: float = 60.0,
        python: str | None = None,
        gateway_url: str | None = None,
        token: str | None = None,
        kernel_name: str | None = None,
        max_cpus: float = 1.0,
    ) -> None:
        _check_limits(timeout, memory_mb, max_processes, max_output_chars, max_file_mb)
        if not 0.01 <= max_cpus <= 1024:
            raise ValueError("max_cpus must be between 0.01 and 1024 (CPUs)")
        self._after_close: list[Callable[[], object]] = []
        self.timeout = float(timeout)
        common = (workdir, max_output_chars, dict(env or {}), startup_timeout, interrupt_grace)
        if gateway_url is None:
            if token is not None or kernel_name is not None:
                raise SandboxConfigurationError("token and kernel_name are gateway settings: pass gateway_url=...")
            self._engine, release = self._local_engine(
                *common, memory_mb=memory_mb, max_processes=max_processes, network=network, isolation=isolation,
                max_file_mb=max_file_mb, python=python, max_cpus=max_cpus,
            )
        else:
            _refuse_local_settings(
                memory_mb=memory_mb, max_processes=max_processes, network=network, isolation=isolation,
                max_file_mb=max_file_mb, python=python, max_cpus=max_cpus,
            )
            self._engine = self._gateway_engine(*common, gateway_url, token, kernel_name)
            release = functools.partial(_remove_owned, self.workdir if workdir is None else None)
        self._loop = LoopThread("sandbox-kernel-loop")
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self._engine, release, self._after_close)

    def _local_engine(
        self, workdir: str | Path | None, max_output_chars: int, env: dict[str, str], startup_timeout: float,
        interrupt_grace: float, *, memory_mb: int, max_processes: int, network: bool, isolation: str,
        max_file_mb: int, python: str | None, max_cpus: float,
    ) -> tuple[_KernelBackend, Callable[[], object]]:
        try:
            from .engine import Engine
            from .process import KernelSettings
        except ImportError as exc:
            raise SandboxConfigurationError(
                f"a local kernel needs jupyter-client and ipykernel: pip install 'functionary-agent[sandbox]' ({exc});"
                " or pass gateway_url=... to run the kernel on a Jupyter Kernel Gateway"
            ) from None
        support = host_support()
        sweep_leftovers(tuple(sorted(set(support.cgroup_roots.values()))))
        self.isolation: Isolation = plan_isolation(network, isolation, support)
        asked = None if workdir is None else Path(workdir).expanduser().absolute()
        if asked is not None and self.isolation.mode == "root":
            refuse_if_in_use(asked)  # before any folder is made there
        self.workdir = _make_workdir(workdir)
        try:
            idmapped = idmap_owner(self.workdir, self.isolation)
            release = _take_workdir(self.workdir, asked, self.isolation, idmapped is not None)
        except BaseException:
            _remove_owned(self.workdir if workdir is None else None)
            raise
        settings = KernelSettings(
            workdir=self.workdir,
            isolation=self.isolation,
            cgroup_root=support.pids_cgroup_root,
            memory_mb=memory_mb,
            max_processes=max_processes,
            max_file_mb=max_file_mb,
            max_output_chars=max_output_chars,
            startup_timeout=startup_timeout,
            python=python or sys.executable,
            env=env,
            idmap_workdir=idmapped,
            cgroup_roots=support.cgroup_roots,
            max_cpus=max_cpus,
        )
        return Engine(settings, interrupt_grace), release

    def _gateway_engine(
        self, workdir: str | Path | None, max_output_chars: int, env: dict[str, str], startup_timeout: float,
        interrupt_grace: float, url: str, token: str | None, kernel_name: str | None,
    ) -> _KernelBackend:
        try:
            from .gateway import GatewayAddress
            from .gateway_engine import GatewayEngine, GatewaySettings
        except ImportError as exc:
            raise SandboxConfigurationError(
                f"gateway_url needs httpx and websockets: pip install 'functionary-agent[gateway]' ({exc})"
            ) from None
        GatewayAddress.parse(url)  # a bad URL fails before anything is made
        self.isolation = GATEWAY_ISOLATION
        self.workdir = _make_workdir(workdir)
        settings = GatewaySettings(
            url=url, token=token, kernel_name=kernel_name, workdir=self.workdir, max_output_chars=max_output_chars,
            startup_timeout=startup_timeout, env=env,
        )
        return GatewayEngine(settings, interrupt_grace)

    @property
    def data_path(self) -> str:
        """Where the code sees the workdir: "/mnt/data" when mounted there, else the workdir's own path."""
        return self._engine.visible_workdir

    @property
    def kernel_pid(self) -> int | None:
        """Pid of the running kernel process (None before start and after close, and for a gateway's kernel)."""
        return self._engine.kernel_pid

    @property
    def ready(self) -> bool:
        """True once a kernel is up and answering (after `start`, or when a background start has finished)."""
        return self._engine.ready

    @property
    def closed(self) -> bool:
        """True once the sandbox is closed (by `close`, `aclose`, garbage collection or interpreter exit)."""
        return not self._finalizer.alive

    def _ensure_open(self) -> None:
        if self.closed:
            raise SandboxClosedError("the sandbox is closed")

    def start_background(self) -> None:
        """Start the kernel without waiting, so it is ready by the time the model sends its first cell."""
        self._ensure_open()
        self._loop.call_soon(self._engine.start_soon)

    def start(self) -> None:
        """Start the kernel (if needed) and wait until it answers; raises KernelStartError if it cannot."""
        self._ensure_open()
        self._loop.call(self._engine.kernel())

    def execute(self, code: str, timeout: float | None = None) -> ExecutionResult:
        """Run one cell; faults of the code (exceptions, time-outs, a crashed kernel) are in the result."""
        self._ensure_open()
        try:
            return self._loop.call(self._engine.execute(code, self.timeout if timeout is None else timeout))
        except concurrent.futures.CancelledError:
            raise self._closed_during_call() from None

    async def aexecute(self, code: str, timeout: float | None = None) -> ExecutionResult:
        """Async twin of `execute`; never blocks the caller's loop. Cancelling it interrupts the cell."""
        self._ensure_open()
        try:
            return await self._loop.acall(self._engine.execute(code, self.timeout if timeout is None else timeout))
        except asyncio.CancelledError:
            if self.closed:
                raise self._closed_during_call() from None
            raise

    def _closed_during_call(self) -> BaseException:
        if self.closed:
            return SandboxClosedError("the sandbox was closed during this call")
        return concurrent.futures.CancelledError()

    def reset(self) -> None:
        """Replace the kernel with a fresh one (all variables are lost; files in the workdir stay)."""
        self._ensure_open()
        self._loop.call(self._engine.reset())

    async def areset(self) -> None:
        """Async twin of `reset`: replace the kernel with a fresh one (all variables are lost; files in the
        workdir stay).

        Raises:
            SandboxClosedError: The sandbox is closed.
            KernelStartError: The fresh kernel did not come up.
        """
        self._ensure_open()
        await self._loop.acall(self._engine.reset())

    def close(self) -> None:
        """Kill the kernel and everything it spawned; remove the workdir if the sandbox created it."""
        self._finalizer()

    def _call_after_close(self, callback: Callable[[], object]) -> None:
        """Run `callback` once the sandbox is closed, however that happens (close, garbage collection, exit);
        for `SandboxPool`, which refills itself when a sandbox it handed out is gone."""
        self._after_close.append(callback)

    async def aclose(self) -> None:
        """Async twin of `close`: kill the kernel and everything it spawned, and remove the workdir if the sandbox
        created it; the work runs in a thread, so the caller's loop is not blocked. Safe to call twice."""
        await asyncio.to_thread(self._finalizer)

    def __enter__(self) -> KernelSandbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> KernelSandbox:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _check_limits(timeout: float, memory_mb: int, max_processes: int, max_output_chars: int, max_file_mb: int) -> None:
    if timeout <= 0:
        raise ValueError("timeout must be > 0 seconds")
    if memory_mb < 256:
        raise ValueError("memory_mb must be >= 256: the Python kernel alone needs about 200 MB of address space")
    if max_processes < _MIN_PROCESSES:
        raise ValueError(f"max_processes must be >= {_MIN_PROCESSES}: Linux counts the kernel's threads as processes")
    if max_output_chars < 100:
        raise ValueError("max_output_chars must be >= 100")
    if max_file_mb < 1:
        raise ValueError("max_file_mb must be >= 1")


def _refuse_local_settings(**given: object) -> None:
    """With `gateway_url`, a local-only setting changed from its default would be silently ignored: refuse it."""
    defaults = inspect.signature(KernelSandbox.__init__).parameters
    changed = [name for name in _LOCAL_ONLY if given[name] != defaults[name].default]
    if changed:
        raise SandboxConfigurationError(
            f"{', '.join(changed)} cannot be set with gateway_url: the gateway decides its kernels' OS limits, "
            "network and files (configure them there, e.g. in its kernelspecs or Kubernetes pod templates)"
        )


def _make_workdir(workdir: str | Path | None) -> Path:
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix=f"kernelsandbox-work-{os.getpid()}-")).resolve()
    path = Path(workdir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _take_workdir(workdir: Path, asked: Path | None, isolation: Isolation, idmapped: bool) -> Callable[[], object]:
    """Take what the kernel needs of its workdir; returns the call that lets go of it once the kernel is dead.

    As root with a plain bind (no idmapped mount), the kernel's uid must own the tree: the workdir is locked
    first (one live sandbox per tree, see `workdir_lock.py`), then handed over: a folder we just created is empty,
    so only it is chowned; a given folder is walked and recorded (`workdir.hand_over`). Letting go gives the tree
    back (or removes our own folder), then unlocks. `asked`: the path the caller gave, None for our own folder."""
    if isolation.mode != "root" or idmapped:
        return functools.partial(_remove_owned, workdir if asked is None else None)
    lock = lock_workdir(workdir, asked)
    try:
        if asked is None:
            hand_over_empty(workdir, isolation.uid, isolation.gid)
            give_back: Callable[[], object] = functools.partial(remove_folder, workdir)
        else:
            give_back = hand_over(workdir, isolation.uid, isolation.gid)
    except BaseException:
        lock.release()
        raise
    return functools.partial(_let_go, give_back, lock)


def _let_go(give_back: Callable[[], object], lock: WorkdirLock) -> None:
    try:
        give_back()
    finally:
        lock.release()


def _remove_owned(workdir: Path | None) -> None:
    """Remove the workdir when the sandbox created it (`remove_folder`: fd-based, any depth, never follows)."""
    if workdir is not None:
        remove_folder(workdir)


def _shutdown(
    loop: LoopThread, engine: _KernelBackend, release: Callable[[], object], after: list[Callable[[], object]]
) -> None:
    """Close on the loop when it still runs, then kill at OS level whatever remains, then let go of the workdir
    (the kernel is dead by then: nothing moves in the tree while it is given back), then tell whoever asked
    (`after`); never raises."""
    try:
        if loop.running and not loop.in_loop_thread():
            loop.call(engine.aclose(), timeout=15)
    except Exception as exc:
        logger.warning("sandbox close on its loop failed (%s); killing its processes directly", exc)
    for step in (engine.kill_now, loop.stop, release, *after):
        try:
            step()
        except Exception as exc:  # each step runs whatever the one before did
            logger.warning("sandbox close: %r", exc)
