"""Runs as the kernel's process before it becomes the kernel: apply the OS limits, then exec ipykernel.

Usage (built by `sandbox.process`): python launcher.py LAUNCH_JSON CONNECTION_FILE

Order matters: join the pids cgroup while /sys/fs/cgroup is still visible, build the namespaces and mounts while we
still hold CAP_SYS_ADMIN, set rlimits, then empty the capability bounding set so that the exec'd kernel keeps uid 0
(it must read the interpreter under /root) but holds no capabilities: it cannot raise hard rlimits, leave its
namespaces, unmount /mnt/data, or read /proc/<parent>/environ. Stdlib only: the parent's package may not be
importable here. Any failure exits with status 70 and one line on stderr, which the parent reports.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import resource
import socket
import struct
import sys
from typing import Any

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_SIOCSIFFLAGS = 0x8914
_IFF_UP_LOOPBACK_RUNNING = 0x1 | 0x8 | 0x40

_libc = ctypes.CDLL(None, use_errno=True)


class LaunchError(Exception):
    """One step of the launch failed; the message names the step."""


def _check(result: int, step: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise LaunchError(f"{step}: {os.strerror(err)} (errno {err})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def encode(value: str | None) -> bytes | None:
        return value.encode() if value is not None else None

    _check(_libc.mount(encode(source), target.encode(), encode(fstype), flags, encode(data)), f"mount {target}")


def _join_cgroup(path: str | None) -> None:
    if path:
        with open(os.path.join(path, "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))


def _enter_namespaces(config: dict[str, Any]) -> None:
    flags = _CLONE_NEWNS | (0 if config["network"] else _CLONE_NEWNET)
    _check(_libc.unshare(flags), "unshare")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we mount may leak to the host
    if config["data_mount"]:
        _mount_data(config["workdir"])
    if config["drop_capabilities"]:
        _hide_host_controls()
    if not config["network"]:
        _loopback_up()


def _mount_data(workdir: str) -> None:
    """Bind the workdir at /mnt/data; a read-only tmpfs on /mnt gives the mount point when the host has none."""
    if os.path.isdir("/mnt/data"):
        _mount(workdir, "/mnt/data", None, _MS_BIND)
        return
    _mount("tmpfs", "/mnt", "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,mode=755")
    os.mkdir("/mnt/data")
    _mount(workdir, "/mnt/data", None, _MS_BIND)
    _mount(None, "/mnt", None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)


def _hide_host_controls() -> None:
    """Uid 0 without capabilities may still write root-owned files: cgroup.procs (to leave the pids cgroup)
    and sysctls. Cover the cgroup tree with an empty read-only tmpfs and make /proc/sys read-only."""
    if os.path.isdir("/sys/fs/cgroup"):
        _mount("tmpfs", "/sys/fs/cgroup", "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k")
    if os.path.isdir("/proc/sys"):
        _mount("/proc/sys", "/proc/sys", None, _MS_BIND | _MS_REC)
        _mount(None, "/proc/sys", None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)


def _loopback_up() -> None:
    """A new network namespace has only a down `lo`; bring it up so local servers inside the sandbox work."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", _IFF_UP_LOOPBACK_RUNNING, b""))


def _user_task_count(uid: int) -> int:
    """Threads owned by `uid` right now: RLIMIT_NPROC counts them all, not just the kernel's."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1 0").split()[0]) == uid:
            total += int(fields.get("Threads", "1"))
    return total


def _set_rlimits(config: dict[str, Any]) -> None:
    for name, value in (("RLIMIT_AS", config["memory_bytes"]), ("RLIMIT_FSIZE", config["file_bytes"])):
        resource.setrlimit(getattr(resource, name), (value, value))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if config["nproc_limit"] is not None:
        limit = _user_task_count(os.getuid()) + int(config["nproc_limit"])
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))


def _new_session() -> None:
    """Own session and process group, so one killpg reaches everything the kernel spawned."""
    if os.getpgid(0) != os.getpid():
        os.setsid()


def _drop_capabilities() -> None:
    """Empty the bounding set: after exec, uid 0 gets no capabilities back (inheritable and ambient are empty)."""
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _check(_libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")


def _launch(config: dict[str, Any], connection_file: str) -> None:
    _join_cgroup(config["cgroup"])
    if config["mount_namespace"]:
        _enter_namespaces(config)
    _set_rlimits(config)
    _new_session()
    if config["drop_capabilities"]:
        _drop_capabilities()
    os.chdir("/mnt/data" if config["data_mount"] else config["workdir"])
    argv = [*config["argv"], "-f", connection_file]
    env = dict(config["env"])
    if "JPY_PARENT_PID" in os.environ:  # lets ipykernel exit by itself if our parent dies without cleaning up
        env["JPY_PARENT_PID"] = os.environ["JPY_PARENT_PID"]
    os.execve(argv[0], argv, env)


def main(argv: list[str]) -> int:
    try:
        with open(argv[1]) as f:
            config = json.load(f)
        _launch(config, argv[2])
    except (LaunchError, OSError, ValueError, KeyError, IndexError) as exc:
        sys.stderr.write(f"sandbox launcher failed: {exc}\n")
        sys.stderr.flush()
        return 70
    return 0  # not reached: execve replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv))
