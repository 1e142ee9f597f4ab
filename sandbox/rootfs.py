"""The kernel's file system: a new root made of read-only views of the host, a private /tmp and /mnt/data.

Run inside the launcher's fresh mount and pid namespaces, before privileges are dropped. The new root is a small
tmpfs holding only mount points: the system folders (/usr, /etc, /lib...), the interpreter's own folders and the
sandbox package, each bind-mounted read-only; a fresh /proc for the kernel's pid namespace; a minimal /dev; a
private /tmp and /dev/shm; the workdir read-write at /mnt/data (idmapped onto its owner when the config's
`idmap_workdir` says so, see `idmount.py`); and the kernel's runtime folder (its connection file and sockets) at
its host path. `pivot_root` then makes this the whole world: the host's root, the project, other sandboxes and /sys
are not there at all. Stdlib only: the launcher loads this file by path.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
_MNT_DETACH = 2
_KEPT_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC | 1024 | 2048 | 4096  # and NOATIME, NODIRATIME, RELATIME
_PIVOT_ROOT = {"x86_64": 155, "amd64": 155, "aarch64": 41, "arm64": 41}

SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt")
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
              "stderr": "/proc/self/fd/2"}
_NEVER_BOUND = ("/", "/tmp", "/proc", "/sys", "/dev")  # provided fresh, or not at all

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    """One step of setting up the kernel's process (namespaces, mounts, privileges) failed; the message names it."""


def check(result: int, step: str) -> None:
    """Raise SetupError with the C library's errno when a libc call returned non-zero."""
    if result != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{step}: {os.strerror(err)} (errno {err})")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def encode(value: str | None) -> bytes | None:
        return value.encode() if value is not None else None

    check(_libc.mount(encode(source), target.encode(), encode(fstype), flags, encode(data)), f"mount {target}")


def build_root(new_root: str, config: dict[str, object]) -> None:
    """Assemble the kernel's file system under `new_root` and switch to it."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount may propagate to the host
    mount("tmpfs", new_root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    tmp_size = f"size={int(str(config['tmp_bytes']))}"
    _private_tmpfs(new_root + "/tmp", tmp_size)  # first: interpreter folders may live under the host's /tmp
    _minimal_dev(new_root, tmp_size)
    for path in _outermost([*SYSTEM_PATHS, *_strings(config["readonly_paths"])]):
        _bind_readonly(path, new_root + path)
    _bind_workdir(config, new_root + "/mnt/data")
    _bind_writable(str(config["kernel_dir"]), new_root + str(config["kernel_dir"]))
    _make_dirs(new_root + "/proc")
    mount("proc", new_root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount(None, new_root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    _pivot(new_root)


def _strings(value: object) -> list[str]:
    return [str(item) for item in value] if isinstance(value, list) else []


def _outermost(paths: Iterable[str]) -> list[str]:
    """Existing absolute paths, without those already inside another one (binding the outer one covers them)."""
    kept: list[str] = []
    for path in sorted({os.path.normpath(p) for p in paths if os.path.isabs(p) and os.path.lexists(p)}):
        if path in _NEVER_BOUND or path.startswith(("/proc/", "/sys/", "/dev/")):
            continue
        if not any(path == outer or path.startswith(outer.rstrip("/") + "/") for outer in kept):
            kept.append(path)
    return kept


def _make_dirs(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def _mount_point(source: str, target: str) -> None:
    """A directory or an empty file for `source` to be mounted on, in the new root."""
    if os.path.isdir(source):
        _make_dirs(target)
        return
    _make_dirs(os.path.dirname(target))
    with open(target, "a"):
        pass


def _bind_readonly(source: str, target: str) -> None:
    """A read-only view of `source`; a symlink (such as /bin -> usr/bin) is recreated instead of followed."""
    if os.path.islink(source):
        _make_dirs(os.path.dirname(target))
        if not os.path.lexists(target):
            os.symlink(os.readlink(source), target)
        return
    _mount_point(source, target)
    mount(source, target, None, MS_BIND | MS_REC)
    for point in _mounts_under(target):
        flags = os.statvfs(point).f_flag & _KEPT_FLAGS  # flags locked by the host must be kept, or EPERM
        mount(None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | flags)


def _mounts_under(target: str) -> list[str]:
    """Mount points at or below `target` (a recursive bind brings the host's submounts along)."""
    points = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = _unescape(line.split()[4])
            if point == target or point.startswith(target.rstrip("/") + "/"):
                points.append(point)
    return points


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


def _bind_writable(source: str, target: str) -> None:
    _mount_point(source, target)
    mount(source, target, None, MS_BIND)
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV)


def _bind_workdir(config: dict[str, object], target: str) -> None:
    """The workdir, read-write, nosuid and nodev: idmapped when `idmap_workdir` names its owner's (uid, gid), so
    the kernel's uid/gid stand for them on disk (see `idmount.py`); else a plain bind."""
    source, owner = str(config["workdir"]), config.get("idmap_workdir")
    if owner is None:
        _bind_writable(source, target)
        return
    if not (isinstance(owner, list) and len(owner) == 2 and all(isinstance(i, int) and i > 0 for i in owner)):
        raise SetupError(f"idmapped workdir: the owner must be a non-root (uid, gid), not {owner!r}")
    if config.get("mode") != "root":
        raise SetupError("idmapped workdir: only a sandbox made as root can have one")
    kernel = (int(str(config["uid"])), int(str(config["gid"])))
    idmount = _load_idmount()
    _mount_point(source, target)
    try:
        idmount.bind_idmapped(source, target, (owner[0], owner[1]), kernel)
    except (idmount.IdmapError, OSError) as exc:
        raise SetupError(f"idmapped workdir: {exc}") from None


def _load_idmount() -> Any:
    """`idmount.py`, loaded by path like this file (the package may not be importable in the launcher)."""
    spec = importlib.util.spec_from_file_location("_sandbox_idmount", Path(__file__).resolve().parent / "idmount.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _private_tmpfs(target: str, size: str) -> None:
    _make_dirs(target)
    mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"{size},mode=1777")


def _minimal_dev(new_root: str, tmp_size: str) -> None:
    """A /dev with the harmless character devices only, plus a private /dev/shm for multiprocessing."""
    dev = new_root + "/dev"
    _make_dirs(dev)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, "size=64k,mode=755")
    for name in _DEVICES:
        if os.path.exists(f"/dev/{name}"):
            with open(f"{dev}/{name}", "a"):
                pass
            mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
    for name, target in _DEV_LINKS.items():
        os.symlink(target, f"{dev}/{name}")
    _private_tmpfs(dev + "/shm", tmp_size)


def _pivot(new_root: str) -> None:
    """Make `new_root` the root and detach the old one, so no path leads back to the host's tree."""
    number = _PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise SetupError(f"pivot_root: no syscall number known for {platform.machine()}")
    os.chdir(new_root)
    check(_libc.syscall(number, b".", b"."), "pivot_root")
    check(_libc.umount2(b".", _MNT_DETACH), "detach the host root")
    os.chdir("/")
