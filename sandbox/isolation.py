"""What this machine lets us enforce on a kernel, decided once per process and then planned per sandbox.

A contained kernel ("root" or "userns" mode, see `launcher.py`) runs as an unprivileged user in its own mount,
pid, IPC and (by default) network namespaces, with a root file system of read-only host folders plus its workdir
and a private /tmp. As root the namespaces are made directly and the kernel gets a dedicated uid/gid per sandbox;
as a normal user they are made inside a user namespace. Whether that works is probed for real, once per process
(a short launch of the real launcher), because "the file exists" says nothing about containers and seccomp
policies. Where it cannot work, a sandbox refuses to start unless the caller opts out with `isolation="none"`.
The same probe loads the system call filter (`seccomp.py`); where it cannot be loaded, contained kernels run
without it after one warning, and `Isolation.syscall_filter` says so.
Where the memory, cpu and pids cgroup controllers are writable, each sandbox gets one cgroup capping all three
(`cgroups.py`); where only pids is, the process cap comes from it; else from RLIMIT_NPROC (per sandbox as root,
whose kernels own a fresh uid; per user otherwise). Memory is also capped per process (RLIMIT_AS) in every case.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .cgroups import find_roots, usable_roots
from .errors import IsolationUnavailableError
from .seccomp import UNAVAILABLE as _FILTER_UNAVAILABLE

logger = logging.getLogger(__name__)

ENV_ALLOWLIST = (
    "PATH",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "LC_NUMERIC",
    "LC_TIME",
    "TZ",
    "TERM",
)
"""The parent environment variables a local kernel may see; every other one (API keys, tokens) stays out. The
sandbox's own variables (HOME, thread counts) and those passed as `env=` are added after them."""

_CAP_SETPCAP = 8
_HERE = Path(__file__).resolve().parent
_SANDBOX_IDS = (0x70000000, 0x0FFFFFFF)  # dedicated uids/gids: base and span, far above any real account
_PROBE_MEMORY = 1 << 30

_PATHS_OF_PYTHON = r"""
import json, os, sys
paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path]
executable = os.path.abspath(sys.executable)
paths += [executable, os.path.realpath(executable)]
print(json.dumps([p for p in paths if p]))
"""


@dataclass(frozen=True)
class HostSupport:
    """The mechanisms that worked when probed on this machine."""

    mode: str | None  # "root" or "userns" when containment works, None when it does not
    reason: str  # why `mode` is None (the launcher's own words), or ""
    can_drop_capabilities: bool
    pids_cgroup_root: Path | None
    is_root: bool
    syscall_filter: bool = False  # the seccomp filter loaded in the probe's launch
    cgroup_roots: Mapping[str, Path] = field(default_factory=dict)  # controller -> where sandbox cgroups go


@dataclass(frozen=True)
class Isolation:
    """What the OS enforces for one sandbox's kernel; `KernelSandbox.isolation` shows it to callers.

    `mode` is "root" (namespaces made as root, a dedicated uid), "userns" (made inside a user namespace as your
    own uid) or "none" (the explicit opt-out: limits only). `uid`/`gid` are the kernel's ids on the host.
    `syscall_filter` is True when the kernel runs under the seccomp deny-list of `sandbox/seccomp.py`.
    `memory_limit` is "memory cgroup" when the sandbox as a whole (kernel and children) is capped, else
    "RLIMIT_AS" (each process on its own); `cpu_limit` is "cpu cgroup" or "none".

    Attributes:
        mode: "root", "userns", "none", or "gateway" for a kernel on a gateway (where nothing of this machine
            applies and the other fields say nothing about it).
        network_blocked: Whether the kernel has no network but its own loopback.
        process_limit: What caps its processes and threads: "pids cgroup", "RLIMIT_NPROC", or "none" (as root
            without a writable pids cgroup and isolation off).
        uid: The kernel's user id on the host (-1 for a gateway).
        gid: The kernel's group id on the host (-1 for a gateway).
        capabilities_dropped: Whether the kernel runs without Linux capabilities.
        syscall_filter: Whether the kernel runs under the seccomp deny-list.
        memory_limit: "memory cgroup" (the sandbox as a whole is capped) or "RLIMIT_AS" (each process on its own).
        cpu_limit: "cpu cgroup" (the sandbox's CPU time is capped) or "none".
    """

    mode: str
    network_blocked: bool
    process_limit: str
    uid: int
    gid: int
    capabilities_dropped: bool
    syscall_filter: bool = False
    memory_limit: str = "RLIMIT_AS"
    cpu_limit: str = "none"

    @property
    def contained(self) -> bool:
        """True when this machine gave the kernel its own root file system, process table and unprivileged user
        (not for a gateway's kernel: what the gateway does is not known here)."""
        return self.mode in ("root", "userns")

    @property
    def data_path(self) -> str | None:
        """The path the code sees for the workdir when `/mnt/data` is mounted; None when it is not."""
        return "/mnt/data" if self.contained else None


@functools.lru_cache(maxsize=1)
def host_support() -> HostSupport:
    """Probe once per process (about 0.1 s): later sandboxes reuse the answer."""
    is_root = os.geteuid() == 0
    cgroup_roots = usable_roots(find_roots())
    mode = "root" if is_root else "userns"
    reason, filter_reason = _probe(mode)
    support = HostSupport(
        mode=None if reason else mode,
        reason=reason,
        can_drop_capabilities=is_root and _has_capability(_CAP_SETPCAP),
        pids_cgroup_root=cgroup_roots.get("pids"),
        is_root=is_root,
        syscall_filter=not reason and not filter_reason,
        cgroup_roots=cgroup_roots,
    )
    if "memory" not in cgroup_roots:
        logger.warning(
            "no writable memory, cpu and pids cgroup: each sandbox's memory is capped per process (RLIMIT_AS), "
            "so its children together can use more, and its CPU is not capped"
        )
    if not reason and filter_reason:
        logger.warning("sandboxed kernels run without a system call filter (%s)", filter_reason)
    logger.debug("sandbox host support: %s", support)
    return support


def plan_isolation(network: bool, isolation: str, support: HostSupport) -> Isolation:
    """Choose the mechanisms for one sandbox; refuse what the caller asked for when nothing can enforce it."""
    if isolation not in ("auto", "none"):
        raise ValueError(f"isolation must be 'auto' or 'none', not {isolation!r}")
    if isolation == "none":
        if not network:
            raise IsolationUnavailableError(
                "isolation='none' cannot block the network: pass network=True with it (or leave isolation on)"
            )
        logger.warning("sandbox isolation is off: the kernel runs as this user, sees its files and network")
        return _uncontained_plan(support)
    if support.mode is None:
        raise IsolationUnavailableError(
            f"this machine cannot contain the kernel ({support.reason}); it needs root or unprivileged user "
            "namespaces. Pass isolation='none' (and network=True) to run model code with your own user's rights"
        )
    if support.mode == "root":
        uid = gid = _SANDBOX_IDS[0] + secrets.randbelow(_SANDBOX_IDS[1])  # one per sandbox: none shares a uid
    else:
        uid, gid = os.getuid(), os.getgid()
    return Isolation(
        mode=support.mode,
        network_blocked=not network,
        process_limit="pids cgroup" if support.pids_cgroup_root is not None else "RLIMIT_NPROC",
        uid=uid,
        gid=gid,
        capabilities_dropped=True,
        syscall_filter=support.syscall_filter,
        memory_limit=_memory_limit(support),
        cpu_limit=_cpu_limit(support),
    )


def _memory_limit(support: HostSupport) -> str:
    return "memory cgroup" if "memory" in support.cgroup_roots else "RLIMIT_AS"


def _cpu_limit(support: HostSupport) -> str:
    return "cpu cgroup" if "cpu" in support.cgroup_roots else "none"


def _uncontained_plan(support: HostSupport) -> Isolation:
    if support.pids_cgroup_root is not None:
        process_limit = "pids cgroup"
    elif not support.is_root:
        process_limit = "RLIMIT_NPROC"
    else:
        process_limit = "none"
        logger.warning("no writable pids cgroup and running as root: the kernel's process count is not capped")
    return Isolation(
        mode="none",
        network_blocked=False,
        process_limit=process_limit,
        uid=os.getuid(),
        gid=os.getgid(),
        capabilities_dropped=support.can_drop_capabilities,
        memory_limit=_memory_limit(support),
        cpu_limit=_cpu_limit(support),
    )


@functools.lru_cache(maxsize=8)
def python_paths(python: str) -> tuple[str, ...]:
    """The folders an interpreter needs (prefixes, sys.path, its executable and where that links to); they are
    bound read-only into the kernel's root. Empty when the interpreter cannot run (the start then reports it)."""
    try:
        done = subprocess.run(
            [python, "-c", _PATHS_OF_PYTHON], capture_output=True, text=True, timeout=30, cwd="/", env=_probe_env()
        )
        return tuple(str(p) for p in json.loads(done.stdout))
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        logger.debug("could not ask %s for its paths: %s", python, exc)
        return ()


def launch_config(
    mode: str, *, network: bool, workdir: Path, runtime: Path, python: str, ids: tuple[int, int],
    syscall_filter: str | None = None,
) -> dict[str, object]:
    """The part of the launcher's configuration that says how to contain the kernel. `syscall_filter` ("required",
    "try" or "off") defaults to what `plan_isolation` promised: "required" for a contained kernel on a host where
    the probe loaded the filter."""
    if syscall_filter is None:
        contained = mode in ("root", "userns")
        syscall_filter = "required" if contained and host_support().syscall_filter else "off"
    return {
        "mode": mode,
        "network": network,
        "workdir": str(workdir),
        "kernel_dir": str(runtime / "kernel"),
        "new_root": str(runtime / "root"),
        "readonly_paths": [*python_paths(python), str(_HERE)],
        "uid": ids[0],
        "gid": ids[1],
        "syscall_filter": syscall_filter,
    }


def _probe_containment(mode: str) -> str:
    """Launch the real launcher once with a trivial command; "" when it worked, else its error line."""
    return _probe(mode)[0]


def _probe(mode: str) -> tuple[str, str]:
    """`_probe_containment`'s answer, and why the system call filter could not be loaded ("" when it was)."""
    runtime = Path(tempfile.mkdtemp(prefix=f"kernelsandbox-run-{os.getpid()}-"))
    try:
        for name in ("kernel", "root", "work"):
            (runtime / name).mkdir()
        (runtime / "kernel" / "probe.json").write_text("{}")
        ids = (_SANDBOX_IDS[0], _SANDBOX_IDS[0]) if mode == "root" else (os.getuid(), os.getgid())
        config = launch_config(
            mode, network=False, workdir=runtime / "work", runtime=runtime, python=sys.executable, ids=ids,
            syscall_filter="try",
        )
        config.update(
            cgroup=None, memory_bytes=_PROBE_MEMORY, file_bytes=_PROBE_MEMORY, nproc_limit=None, tmp_bytes=1 << 20,
            drop_capabilities=mode == "root", env=_probe_env(), argv=[sys.executable, "-S", "-c", "pass"],
        )
        (runtime / "launch.json").write_text(json.dumps(config))
        return _run_probe(runtime)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def _run_probe(runtime: Path) -> tuple[str, str]:
    command = [sys.executable, "-S", str(_HERE / "launcher.py"), str(runtime / "launch.json")]
    try:
        done = subprocess.run(  # a clean environment: inside a Jupyter kernel ours names *its* parent's pid
            [*command, str(runtime / "kernel" / "probe.json")], capture_output=True, text=True, timeout=30,
            env=_probe_env(),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the launcher could not run: {exc}", "no probe"
    lines = done.stderr.strip().splitlines()
    if done.returncode != 0:
        return (lines[-1] if lines else f"the launcher exited with status {done.returncode}"), "no probe"
    unavailable = [line.removeprefix(_FILTER_UNAVAILABLE) for line in lines if line.startswith(_FILTER_UNAVAILABLE)]
    return "", unavailable[0] if unavailable else ""


def _probe_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", os.defpath)}


def kernel_env(extra: dict[str, str] | None, home: str) -> dict[str, str]:
    """The kernel's whole environment: allowlisted parent variables, quiet thread pools, then the caller's."""
    env = {name: os.environ[name] for name in ENV_ALLOWLIST if name in os.environ}
    env.setdefault("PATH", os.defpath)
    threads = str(min(os.cpu_count() or 1, 4))
    env.update(
        HOME=home,
        PYTHONNOUSERSITE="1",
        MALLOC_ARENA_MAX="2",  # glibc reserves 64 MB of address space per arena, which RLIMIT_AS counts
        OMP_NUM_THREADS=threads,
        OPENBLAS_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
    )
    env.update(extra or {})
    return env


def _has_capability(bit: int) -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError):
        pass
    return False
