"""What this machine lets us enforce on a kernel, decided once per process and then planned per sandbox.

The limits are the OS's: rlimits, a pids cgroup, mount and network namespaces and an empty capability bounding
set. Root ignores RLIMIT_NPROC, so the process cap comes from a pids cgroup whenever one is writable; without
privileges the per-user RLIMIT_NPROC is the only cap left. Each mechanism is probed for real (a short child
process tries it), because "the file exists" says nothing about containers and seccomp policies.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import IsolationUnavailableError

logger = logging.getLogger(__name__)

#: Parent environment variables the kernel may see; everything else (API keys, tokens) stays out.
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

_CAP_SETPCAP = 8

_PROBE = r"""
import ctypes, json, os, sys
result = {"cgroup": False, "namespaces": False}
if sys.argv[1]:
    try:
        with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        result["cgroup"] = True
    except OSError:
        pass
libc = ctypes.CDLL(None, use_errno=True)
result["namespaces"] = libc.unshare(0x00020000 | 0x40000000) == 0
print(json.dumps(result))
"""


@dataclass(frozen=True)
class HostSupport:
    """The mechanisms that worked when probed on this machine."""

    namespaces: bool
    can_drop_capabilities: bool
    pids_cgroup_root: Path | None
    is_root: bool


@dataclass(frozen=True)
class Isolation:
    """What the OS enforces for one sandbox's kernel; `KernelSandbox.isolation` shows it to callers."""

    network_blocked: bool
    mount_namespace: bool
    data_mount: bool
    process_limit: str
    capabilities_dropped: bool

    @property
    def data_path(self) -> str | None:
        """The path the code sees for the workdir when `/mnt/data` is mounted; None when it is not."""
        return "/mnt/data" if self.data_mount else None


@functools.lru_cache(maxsize=1)
def host_support() -> HostSupport:
    """Probe once per process (about 20 ms): later sandboxes reuse the answer."""
    is_root = os.geteuid() == 0
    cgroup_root = _pids_cgroup_root()
    probe_dir = _make_cgroup(cgroup_root, max_pids=8) if cgroup_root else None
    try:
        found = _run_probe(probe_dir)
    finally:
        if probe_dir is not None:
            remove_cgroup(probe_dir)
    support = HostSupport(
        namespaces=found.get("namespaces", False),
        can_drop_capabilities=is_root and _has_capability(_CAP_SETPCAP),
        pids_cgroup_root=cgroup_root if found.get("cgroup") else None,
        is_root=is_root,
    )
    logger.debug("sandbox host support: %s", support)
    return support


def plan_isolation(network: bool, support: HostSupport) -> Isolation:
    """Choose the mechanisms for one sandbox; refuse `network=False` when nothing can enforce it."""
    if not network and not support.namespaces:
        raise IsolationUnavailableError(
            "network=False needs a private network namespace (unshare(CLONE_NEWNET)), which this machine refuses "
            "(it needs root or CAP_SYS_ADMIN); run with network=True or give the process that capability"
        )
    if support.pids_cgroup_root is not None:
        process_limit = "pids cgroup"
    elif not support.is_root:
        process_limit = "RLIMIT_NPROC"
    else:
        process_limit = "none"
        logger.warning("no writable pids cgroup and running as root: the kernel's process count is not capped")
    mnt_exists = Path("/mnt").is_dir()
    return Isolation(
        network_blocked=not network,
        mount_namespace=support.namespaces,
        data_mount=support.namespaces and mnt_exists,
        process_limit=process_limit,
        capabilities_dropped=support.can_drop_capabilities,
    )


def kernel_env(extra: dict[str, str] | None, home: Path) -> dict[str, str]:
    """The kernel's whole environment: allowlisted parent variables, quiet thread pools, then the caller's."""
    env = {name: os.environ[name] for name in ENV_ALLOWLIST if name in os.environ}
    env.setdefault("PATH", os.defpath)
    threads = str(min(os.cpu_count() or 1, 4))
    env.update(
        HOME=str(home),
        PYTHONNOUSERSITE="1",
        MALLOC_ARENA_MAX="2",  # glibc reserves 64 MB of address space per arena, which RLIMIT_AS counts
        OMP_NUM_THREADS=threads,
        OPENBLAS_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
    )
    env.update(extra or {})
    return env


def create_pids_cgroup(root: Path, max_pids: int) -> Path:
    """A fresh pids cgroup for one kernel; the launcher moves itself in before it execs the kernel."""
    return _make_cgroup(root, max_pids)


def kill_cgroup(path: Path) -> None:
    """SIGKILL every task in the cgroup, including ones that left the kernel's process group."""
    kill_file = path / "cgroup.kill"
    if kill_file.exists():
        try:
            kill_file.write_text("1")
            return
        except OSError:
            pass
    for _ in range(100):
        pids = _cgroup_pids(path)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def remove_cgroup(path: Path, attempts: int = 50) -> bool:
    """rmdir the cgroup; killed tasks leave it a moment after they die, so retry briefly."""
    for _ in range(attempts):
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError:
            kill_cgroup(path)
            time.sleep(0.02)
    logger.warning("could not remove cgroup %s; it still holds tasks", path)
    return False


def _cgroup_pids(path: Path) -> list[int]:
    try:
        return [int(line) for line in (path / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _make_cgroup(root: Path, max_pids: int) -> Path:
    path = root / f"kernelsandbox-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        (path / "pids.max").write_text(str(max_pids))
    except OSError:
        path.rmdir()
        raise
    return path


def _pids_cgroup_root() -> Path | None:
    """Our own cgroup in the pids hierarchy (v1, or v2 with the pids controller delegated), if writable."""
    try:
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in own:
        _, controllers, rel = line.split(":", 2)
        if "pids" in controllers.split(","):
            base = Path("/sys/fs/cgroup/pids") / rel.lstrip("/")
        elif controllers == "" and _v2_has_pids(Path("/sys/fs/cgroup") / rel.lstrip("/")):
            base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        else:
            continue
        if base.is_dir() and os.access(base, os.W_OK):
            return base
    return None


def _v2_has_pids(base: Path) -> bool:
    try:
        return "pids" in (base / "cgroup.subtree_control").read_text().split()
    except OSError:
        return False


def _run_probe(cgroup_dir: Path | None) -> dict[str, bool]:
    try:
        done = subprocess.run(
            [sys.executable, "-S", "-c", _PROBE, str(cgroup_dir or "")],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": os.environ.get("PATH", os.defpath)},
        )
        return dict(json.loads(done.stdout))
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        logger.warning("sandbox isolation probe failed: %s", exc)
        return {}


def _has_capability(bit: int) -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError):
        pass
    return False
