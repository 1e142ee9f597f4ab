"""Idmapped bind mounts (Linux 5.12+): a view of a folder in which one on-disk uid/gid appears as another.

`bind_idmapped(source, target, owner, kernel)` mounts `source` at `target` so that files owned on disk by `owner`
(uid, gid) appear to the sandbox as owned by `kernel`, and files the sandbox (running as `kernel`) creates are
written to disk as `owner`. Ids that are not mapped appear as the overflow uid/gid (65534) and cannot be written
through the mount, nor can anything be chowned to them. Steps: `open_tree(OPEN_TREE_CLONE)` makes a detached copy
of the bind; `mount_setattr(MOUNT_ATTR_IDMAP | NOSUID | NODEV)` attaches the idmapping of a user namespace whose
uid_map is "<owner uid> <kernel uid> 1" (its "inside" ids are the ids on disk, its "outside" ids what callers see),
plus the flags of the plain bind; `move_mount` puts it at `target`. The user namespace comes from a short helper
process that unshares one and waits while we write its maps and open /proc/PID/ns/user.

Stdlib only: `rootfs.py` (loaded by path in the launcher) loads this file by path, and `sandbox.idmap` runs it as a
script (`python -S idmount.py FOLDER`) to probe whether the kernel and a folder's filesystem support idmapped
mounts: exit status 0 when they do, else one line saying why.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

CLONE_NEWUSER = 0x10000000
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x00100000
_SYSCALLS = {"open_tree": 428, "move_mount": 429, "mount_setattr": 442}  # the same on x86_64 and aarch64
_MACHINES = ("x86_64", "amd64", "aarch64", "arm64")
_PROBE_IDS = (0x70000000, 0x70000000)  # the base of the sandbox ids: what the probe maps the folder's owner to

_libc = ctypes.CDLL(None, use_errno=True)


class IdmapError(Exception):
    """One step of making an idmapped mount failed; the message names the step and the reason."""


class _MountAttr(ctypes.Structure):
    _fields_ = [  # struct mount_attr, MOUNT_ATTR_SIZE_VER0
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _syscall(name: str, step: str, *args: object) -> int:
    if platform.machine() not in _MACHINES:
        raise IdmapError(f"{step}: no syscall number known for {name} on {platform.machine()}")
    wide = [ctypes.c_long(arg) if isinstance(arg, int) else arg for arg in args]  # syscall() reads longs
    result = int(_libc.syscall(ctypes.c_long(_SYSCALLS[name]), *wide))
    if result < 0:
        err = ctypes.get_errno()
        raise IdmapError(f"{step}: {os.strerror(err)} (errno {err})")
    return result


def _hold_user_namespace(report: int, release: int) -> None:
    """The helper process: unshare a user namespace, report our pid as /proc names it, wait for EOF, exit."""
    try:
        if _libc.unshare(CLONE_NEWUSER) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        os.write(report, os.readlink("/proc/self").encode())  # our pid in /proc's pid namespace, not in ours
    except BaseException as exc:
        os.write(report, f"!{exc}".encode())
        os._exit(1)
    os.read(release, 1)
    os._exit(0)


def user_namespace(owner: tuple[int, int], kernel: tuple[int, int]) -> int:
    """An fd of a fresh user namespace mapping the on-disk `owner` ids onto the `kernel` ids (and nothing else)."""
    report_r, report_w = os.pipe()
    release_r, release_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.close(report_r)
        os.close(release_w)
        _hold_user_namespace(report_w, release_r)
    os.close(report_w)
    os.close(release_r)
    try:
        answer = os.read(report_r, 512).decode(errors="replace")
        if not answer.isdigit():
            raise IdmapError(f"create a user namespace: {answer.lstrip('!') or 'the helper process died'}")
        return _map_ids(f"/proc/{answer}", owner, kernel)
    finally:
        os.close(report_r)
        os.close(release_w)
        os.waitpid(helper, 0)


def _map_ids(proc: str, owner: tuple[int, int], kernel: tuple[int, int]) -> int:
    maps = (("uid_map", f"{owner[0]} {kernel[0]} 1"), ("setgroups", "deny"), ("gid_map", f"{owner[1]} {kernel[1]} 1"))
    try:
        for name, text in maps:
            with open(f"{proc}/{name}", "w") as file:
                file.write(text)
        return os.open(f"{proc}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise IdmapError(f"write the user namespace's id maps: {exc}") from None


def idmapped_clone(source: str, owner: tuple[int, int], kernel: tuple[int, int]) -> int:
    """A detached, idmapped, nosuid and nodev copy of the bind of `source` (not of mounts below it): its fd."""
    tree = _syscall("open_tree", f"open_tree {source}", AT_FDCWD, source.encode(), OPEN_TREE_CLONE | os.O_CLOEXEC)
    try:
        userns = user_namespace(owner, kernel)
        try:
            attr = _MountAttr(attr_set=MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, userns_fd=userns)
            _syscall(
                "mount_setattr", f"mount_setattr(MOUNT_ATTR_IDMAP) on {source}", tree, b"", AT_EMPTY_PATH,
                ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
            )
        finally:
            os.close(userns)
    except BaseException:
        os.close(tree)
        raise
    return tree


def bind_idmapped(source: str, target: str, owner: tuple[int, int], kernel: tuple[int, int]) -> None:
    """Mount `source` at the existing `target`, idmapped `owner` -> `kernel`, nosuid and nodev."""
    tree = idmapped_clone(source, owner, kernel)
    try:
        _syscall("move_mount", f"move_mount to {target}", tree, b"", AT_FDCWD, target.encode(),
                 MOVE_MOUNT_F_EMPTY_PATH)
    finally:
        os.close(tree)


def probe(folder: str) -> str:
    """"" when an idmapped clone of `folder` can be made and shows its owner as the mapped ids; else why not.
    The clone is detached and never moved anywhere: closing it leaves no trace."""
    info = os.stat(folder)
    try:
        tree = idmapped_clone(folder, (info.st_uid, info.st_gid), _PROBE_IDS)
    except IdmapError as exc:
        return str(exc)
    try:
        seen = os.fstat(tree)
    finally:
        os.close(tree)
    if (seen.st_uid, seen.st_gid) != _PROBE_IDS:
        return f"the idmapped clone shows {seen.st_uid}:{seen.st_gid}, not {_PROBE_IDS[0]}:{_PROBE_IDS[1]}"
    return ""


def main(argv: list[str]) -> int:
    try:
        reason = probe(argv[1]) if len(argv) == 2 else "usage: idmount.py FOLDER"
    except OSError as exc:
        reason = f"{argv[1]}: {exc}"
    if reason:
        sys.stdout.write(reason + "\n")
    return 1 if reason else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
