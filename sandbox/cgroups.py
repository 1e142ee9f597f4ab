"""One cgroup per sandbox: its memory (swap off), CPU and process count capped together, and its OOM kills counted.

Where the memory, cpu and pids controllers can be written (cgroup v2, or the per-controller hierarchies of v1
that some VMs and older distributions still mount), each kernel gets a fresh child cgroup under ours in every
hierarchy that holds one of them (one folder on v2). The launcher moves itself in before it execs the kernel,
so the kernel and all it spawns share one budget: `memory.max` (v1: `memory.limit_in_bytes`, with
`memory.memsw.limit_in_bytes` equal to it, so no swap) and `memory.swap.max=0`, `cpu.max` (v1:
`cpu.cfs_quota_us`) and `pids.max`. On v2 `memory.oom.group=1` makes the OOM killer take the whole sandbox;
on v1 the host does the same once it sees an OOM kill counted (`oom_kills`).
Where a controller is missing or not writable, the caps fall back to what each process gets (RLIMIT_AS,
RLIMIT_NPROC) and `Isolation` says so. Names carry the owner's pid, so `janitor.py` can sweep a dead owner's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CONTROLLERS = ("memory", "cpu", "pids")
_CPU_PERIOD_US = 100_000
_PROBE_LIMITS_MB = 256


@dataclass(frozen=True)
class CgroupLimits:
    """The caps of one sandbox; None leaves that controller out (its folder is not made)."""

    pids: int
    memory_bytes: int | None = None
    cpus: float | None = None


def find_roots() -> dict[str, Path]:
    """Our own cgroup folder for each of memory, cpu and pids that this process can make children in (v2 where
    the controller is enabled there, else its v1 hierarchy). Empty when none is found."""
    try:
        own = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = _cgroup_mounts(Path("/proc/self/mountinfo").read_text().splitlines())
    except OSError:
        return {}
    roots: dict[str, Path] = {}
    for line in own:
        hierarchy, listed, rel = line.split(":", 2)
        if hierarchy == "0" and listed == "" and "cgroup2" in mounts:
            base = _under(mounts["cgroup2"], rel)
            for controller in _v2_enabled(base):
                roots.setdefault(controller, base)
            continue
        for controller in set(listed.split(",")) & set(CONTROLLERS):
            if controller in mounts:
                roots.setdefault(controller, _under(mounts[controller], rel))
    return {name: path for name, path in roots.items() if path.is_dir() and os.access(path, os.W_OK)}


def _cgroup_mounts(mountinfo: list[str]) -> dict[str, tuple[str, Path]]:
    """Controller (or "cgroup2") -> (the mount's root inside the hierarchy, its mount point)."""
    mounts: dict[str, tuple[str, Path]] = {}
    for line in mountinfo:
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        fstype, options = fields[dash + 1], fields[dash + 3].split(",") if len(fields) > dash + 3 else []
        if fstype == "cgroup2":
            mounts.setdefault("cgroup2", (fields[3], Path(fields[4])))
        elif fstype == "cgroup":
            for controller in set(options) & set(CONTROLLERS):
                mounts.setdefault(controller, (fields[3], Path(fields[4])))
    return mounts


def _under(mount: tuple[str, Path], rel: str) -> Path:
    root, point = mount
    relative = Path(rel).relative_to(root) if Path(rel).is_relative_to(root) else Path(rel.lstrip("/"))
    return point / relative


def _v2_enabled(base: Path) -> list[str]:
    """The controllers children of `base` get on v2; asks for those it has but does not pass on (this works in
    the root cgroup, or in one without processes of its own)."""
    try:
        available = (base / "cgroup.controllers").read_text().split()
        enabled = (base / "cgroup.subtree_control").read_text().split()
    except OSError:
        return []
    missing = [c for c in CONTROLLERS if c in available and c not in enabled]
    if missing:
        with contextlib.suppress(OSError):
            (base / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in missing))
            enabled = (base / "cgroup.subtree_control").read_text().split()
    return [c for c in CONTROLLERS if c in enabled]


def usable_roots(roots: Mapping[str, Path]) -> dict[str, Path]:
    """The roots where a real child cgroup can be made, capped and entered (tried with a short child process);
    memory and cpu count only together with pids, so that the caps come as one set or not at all."""
    if "pids" not in roots:
        return {}
    full = {name: roots[name] for name in CONTROLLERS if name in roots}
    for candidate in (full, {"pids": roots["pids"]}):
        if _can_enter(candidate):
            return candidate
    return {}


def _can_enter(roots: Mapping[str, Path]) -> bool:
    limits = CgroupLimits(pids=8, memory_bytes=_PROBE_LIMITS_MB << 20 if "memory" in roots else None,
                          cpus=1.0 if "cpu" in roots else None)
    try:
        group = SandboxCgroup.create(roots, limits)
    except OSError:
        return False
    try:
        child = subprocess.Popen([sys.executable, "-S", "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        try:
            group.enter(child.pid)
            return True
        except OSError:
            return False
        finally:
            child.communicate(timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        group.remove()


class SandboxCgroup:
    """The cgroup folders of one kernel (one per hierarchy); `paths` are what the launcher joins."""

    def __init__(self, paths: list[Path], controllers: Mapping[str, Path]) -> None:
        self.paths = paths
        self._controllers = dict(controllers)  # controller -> its folder among `paths`

    @classmethod
    def create(cls, roots: Mapping[str, Path], limits: CgroupLimits) -> SandboxCgroup:
        """Make the folders and write the caps; on any failure remove what was made and raise OSError."""
        name = f"kernelsandbox-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        wanted = {c: roots[c] for c in CONTROLLERS if c in roots and _limit_of(c, limits) is not None}
        folders: dict[Path, Path] = {}
        group = cls([], {})
        try:
            for controller, root in wanted.items():
                if root not in folders:
                    folders[root] = root / name
                    folders[root].mkdir()
                    group.paths.append(folders[root])
                group._controllers[controller] = folders[root]
            group._write_limits(limits)
        except OSError:
            group.remove(attempts=1)
            raise
        return group

    @property
    def controllers(self) -> tuple[str, ...]:
        return tuple(self._controllers)

    def _write_limits(self, limits: CgroupLimits) -> None:
        if "pids" in self._controllers:
            (self._controllers["pids"] / "pids.max").write_text(str(limits.pids))
        if "memory" in self._controllers and limits.memory_bytes is not None:
            _write_memory(self._controllers["memory"], limits.memory_bytes)
        if "cpu" in self._controllers and limits.cpus is not None:
            _write_cpu(self._controllers["cpu"], limits.cpus)

    def enter(self, pid: int) -> None:
        for path in self.paths:
            (path / "cgroup.procs").write_text(str(pid))

    def oom_kills(self) -> int:
        """How many of the sandbox's processes the OOM killer took for going over its memory cap (0 without
        a memory cgroup, or when the counter cannot be read)."""
        folder = self._controllers.get("memory")
        if folder is None:
            return 0
        for file_name in ("memory.events", "memory.oom_control"):  # v2, then v1 (kernels >= 4.13 count there)
            with contextlib.suppress(OSError, ValueError):
                for line in (folder / file_name).read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        return 0

    def kill(self) -> None:
        for path in self.paths:
            kill_cgroup(path)

    def remove(self, attempts: int = 50) -> bool:
        """Kill what is left and remove every folder; True when none is left."""
        removed = [remove_cgroup(path, attempts) for path in self.paths]
        if all(removed):
            self.paths, self._controllers = [], {}
        return all(removed)


def _limit_of(controller: str, limits: CgroupLimits) -> object:
    return {"pids": limits.pids, "memory": limits.memory_bytes, "cpu": limits.cpus}[controller]


def _write_memory(folder: Path, max_bytes: int) -> None:
    if (folder / "memory.max").exists():  # v2
        (folder / "memory.max").write_text(str(max_bytes))
        for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
            with contextlib.suppress(FileNotFoundError):  # no swap accounting, or a kernel before 4.19
                (folder / name).write_text(value)
        return
    (folder / "memory.limit_in_bytes").write_text(str(max_bytes))
    with contextlib.suppress(FileNotFoundError):  # swap accounting off: there is no memsw to cap
        (folder / "memory.memsw.limit_in_bytes").write_text(str(max_bytes))
    with contextlib.suppress(OSError):
        (folder / "memory.swappiness").write_text("0")


def _write_cpu(folder: Path, cpus: float) -> None:
    quota = max(1_000, int(cpus * _CPU_PERIOD_US))
    if (folder / "cpu.max").exists():  # v2
        (folder / "cpu.max").write_text(f"{quota} {_CPU_PERIOD_US}")
        return
    (folder / "cpu.cfs_period_us").write_text(str(_CPU_PERIOD_US))
    (folder / "cpu.cfs_quota_us").write_text(str(quota))


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
