"""Runs as the kernel's process before it becomes the kernel: contain it, then exec ipykernel.

Usage (built by `sandbox.process`): python launcher.py LAUNCH_JSON CONNECTION_FILE

Three processes, in order (modes are planned by `sandbox.isolation`):
1. This process (on the host, the one the parent sees) joins the sandbox's cgroup, sets rlimits and its own
   session, then creates the namespaces: mount, pid, IPC and (unless `network`) network; as root directly ("root"
   mode), as a normal user inside a new user namespace that maps only its own uid ("userns" mode). It stays on the
   host side only to wait, and exits the way the kernel did.
2. Its child is pid 1 of the new pid namespace: it builds the kernel's root (`rootfs.py`), brings up loopback,
   drops to the sandbox user (a dedicated uid/gid as root; as a normal user, the caller's own uid, which inside
   the user namespace holds no privilege on the host) with an empty capability bounding set, no_new_privs and
   the system call filter of `seccomp.py`, then forks the kernel and reaps orphans until the kernel exits. When
   it exits the kernel removes every process left in the namespace, `setsid()` ones included.
3. The grandchild execs ipykernel.
"none" mode (an explicit opt-out) only sets limits and execs. Stdlib only: the parent's package may not be
importable here. Any failure exits with status 70 and one line on stderr, which the parent reports.
"""

from __future__ import annotations

import ctypes
import fcntl
import importlib.util
import json
import os
import resource
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Any

_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_SIOCSIFFLAGS = 0x8914
_IFF_UP_LOOPBACK_RUNNING = 0x1 | 0x8 | 0x40
_LAUNCH_FAILED = 70
_SIGNALLED = 128  # pid 1 reports a kernel killed by signal N as exit status 128 + N

_libc = ctypes.CDLL(None, use_errno=True)


def _load_helper(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"_sandbox_{name}", Path(__file__).resolve().parent / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_rootfs = _load_helper("rootfs")  # also the home of `check` and `SetupError`, which every step here uses
_check = _rootfs.check
LaunchError = _rootfs.SetupError
_seccomp = _load_helper("seccomp")


def _join_cgroup(paths: str | list[str] | None) -> None:
    """Move into the sandbox's cgroup: one folder, or one per hierarchy on cgroup v1."""
    for path in [paths] if isinstance(paths, str) else paths or []:
        with open(os.path.join(path, "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))


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
    limit = config["nproc_limit"]
    if limit is not None:  # a fresh sandbox uid owns no task yet; the caller's own uid (userns) already has some
        limit = int(limit) + (_user_task_count(os.getuid()) if config["mode"] != "root" else 0)
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))


def _new_session() -> None:
    """Own session and process group, so one killpg reaches everything the kernel spawned."""
    if os.getpgid(0) != os.getpid():
        os.setsid()


def _die_with_parent(parent: int | None) -> None:
    """SIGKILL when our parent goes; checked once after, in case it went before the request took effect."""
    _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    if parent is not None and os.getppid() != parent:
        raise LaunchError(f"the process that started the sandbox ({parent}) is gone")


def _enter_namespaces(config: dict[str, Any]) -> None:
    flags = _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWIPC | (0 if config["network"] else _CLONE_NEWNET)
    if config["mode"] == "userns":
        uid, gid = os.getuid(), os.getgid()
        _check(_libc.unshare(flags | _CLONE_NEWUSER), "unshare (user namespace)")
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    else:
        _check(_libc.unshare(flags), "unshare")


def _loopback_up() -> None:
    """A new network namespace has only a down `lo`; bring it up so local servers inside the sandbox work."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", _IFF_UP_LOOPBACK_RUNNING, b""))


def _drop_capabilities() -> None:
    """Empty the bounding set: after exec the kernel gets no capability back (inheritable and ambient are empty)."""
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _check(_libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")


def _become_sandbox_user(config: dict[str, Any]) -> None:
    """As root, switch to the dedicated uid/gid (which clears every capability); in a user namespace we already
    are the mapped caller, whose namespace capabilities end at exec."""
    _drop_capabilities()
    if config["mode"] == "root":
        os.setgroups([])
        os.setresgid(config["gid"], config["gid"], config["gid"])
        os.setresuid(config["uid"], config["uid"], config["uid"])
    _seccomp.apply(config)  # after no_new_privs; pid 1 and the kernel it forks both carry the filter


def _exec_kernel(config: dict[str, Any], connection_file: str, parent: int | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # ipykernel installs its own; an inherited SIG_IGN would stick
    argv = [*config["argv"], "-f", connection_file]
    env = dict(config["env"])
    if parent is not None:  # lets ipykernel exit by itself if our parent dies without cleaning up
        env["JPY_PARENT_PID"] = str(parent)
    os.execve(argv[0], argv, env)


def _init(config: dict[str, Any], connection_file: str) -> None:
    """Pid 1 of the sandbox: build its world, become the sandbox user, run the kernel, reap until it exits."""
    _die_with_parent(None)
    _rootfs.build_root(config["new_root"], config)
    if not config["network"]:
        _loopback_up()
    os.chdir("/mnt/data")
    _become_sandbox_user(config)
    kernel = os.fork()
    if kernel == 0:
        _exec_kernel(config, connection_file, None)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == kernel:
            os._exit(_SIGNALLED + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def _wait_like(child: int) -> int:
    """Wait for pid 1 and end the way the kernel ended, so the parent's exit description stays true."""
    _, status = os.waitpid(child, 0)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else _SIGNALLED + os.WTERMSIG(status)
    if _SIGNALLED < code < _SIGNALLED + signal.NSIG:
        signal.signal(code - _SIGNALLED, signal.SIG_DFL)
        os.kill(os.getpid(), code - _SIGNALLED)
    return code


def _launch(config: dict[str, Any], connection_file: str) -> int:
    parent = int(os.environ["JPY_PARENT_PID"]) if "JPY_PARENT_PID" in os.environ else None
    _join_cgroup(config["cgroup"])
    _set_rlimits(config)
    _new_session()
    if config["mode"] == "none":
        if config["drop_capabilities"]:
            _drop_capabilities()
        os.chdir(config["workdir"])
        _exec_kernel(config, connection_file, parent)
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, lambda *_: None)  # interrupts are for the kernel; this process only waits
    _enter_namespaces(config)
    if config["mode"] == "root":
        os.chown(connection_file, config["uid"], config["gid"])
    child = os.fork()
    if child == 0:
        _run_child(config, connection_file)
    return _wait_like(child)


def _run_child(config: dict[str, Any], connection_file: str) -> None:
    try:
        _init(config, connection_file)
    except Exception as exc:  # pid 1 reports every failure in one line and never returns into the caller's code
        sys.stderr.write(f"sandbox launcher failed: {exc}\n")
        sys.stderr.flush()
    os._exit(_LAUNCH_FAILED)


def main(argv: list[str]) -> int:
    try:
        with open(argv[1]) as f:
            config = json.load(f)
        return _launch(config, argv[2])
    except (LaunchError, OSError, ValueError, KeyError, IndexError) as exc:
        sys.stderr.write(f"sandbox launcher failed: {exc}\n")
        sys.stderr.flush()
        return _LAUNCH_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv))
