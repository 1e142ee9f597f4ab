"""A seccomp filter for the kernel: refuse the system calls that only widen the Linux attack surface.

The kernel already runs as an unprivileged uid in its own namespaces, with no_new_privs and an empty bounding
set, so most of these calls fail anyway. What they still reach is kernel code: a nested user namespace gives
the caller every capability inside it (and with them mount, netfilter, BPF...), io_uring, BPF, perf, keyrings and
userfaultfd have each carried local privilege escalations. The filter is a deny-list, loaded through the system's
libseccomp (ctypes, stdlib only: the launcher loads this file by path), after no_new_privs and before the
kernel is forked, so pid 1, the kernel and everything it spawns carry it (a filter is inherited and cannot be
removed). Everything not listed is allowed.

Refused with EPERM, whatever the arguments (`DENIED`; a name unknown on this architecture is skipped):
namespaces and mounts (setns, mount, umount, umount2, pivot_root, chroot, open_tree, open_tree_attr, move_mount,
fsopen, fsconfig, fsmount, fspick, mount_setattr), keyrings (add_key, keyctl, request_key), io_uring (setup,
enter, register), bpf, perf_event_open, userfaultfd, tracing other processes (ptrace, process_vm_readv/writev,
kcmp, pidfd_getfd), modules and kexec (init_module, finit_module, delete_module, create_module, get_kernel_syms,
query_module, kexec_load, kexec_file_load), the machine itself (reboot, swapon, swapoff, acct, quotactl,
quotactl_fd, syslog, vhangup, iopl, ioperm, fanotify_init), file handles (name_to_handle_at, open_by_handle_at),
the clock (settimeofday, stime, clock_settime, clock_adjtime, adjtimex) and obsolete calls (lookup_dcookie,
nfsservctl, _sysctl, sysfs, ustat, uselib, vm86, vm86old).
Refused with EPERM by argument: `unshare` with any CLONE_NEW* flag, `clone` with any CLONE_NEW* flag (threads,
fork, vfork and posix_spawn keep working), `personality` with any flag from ADDR_NO_RANDOMIZE up (READ_IMPLIES_EXEC,
MMAP_PAGE_ZERO...; a libseccomp rule compares an argument once, so the query value 0xffffffff is refused too).
`clone3` gets ENOSYS: its flags sit in a struct a filter cannot read, and glibc then falls back to `clone`.
Setting xattrs is refused (setxattr, lsetxattr, fsetxattr, setxattrat): a POSIX ACL is an xattr, and an ACL the
kernel put on a file it owned would outlive the hand-back of the workdir (`workdir.py` restores owners and modes,
not ACLs). So are setuid and setgid bits on files (`SETID_CALLS`: chmod, fchmod, fchmodat, fchmodat2 with either bit
in the mode; open, openat and creat creating a file with them, mknod and mknodat): in an idmapped workdir a file
the kernel makes belongs to the folder's owner on the host, and must not become a setuid program of that user.
`openat2` gets ENOSYS (its mode sits in a struct; callers fall back to openat).

Decisions. ptrace is refused although the pid namespace hides the host: nothing a code interpreter needs uses it
(no debugger, no strace), and PTRACE_TRACEME has been a local root before. pkey_* stay allowed (they only change
the caller's own pages). Only the native ABI is allowed: a 32-bit (int 0x80) or x32 system call is not checked
against the list but ends the process with SIGSYS, which is stricter than listing the compat ABIs.
A deny-list allows system calls newer than this list, and a libseccomp older than a call cannot name it (hence
`_UNIFIED_NUMBERS`).

When libseccomp cannot be loaded or the kernel refuses the filter, the sandbox degrades rather than refuse to
start: `isolation.host_support` finds out once per process with a real launch (setting "try"), logs one warning
naming the cause, and `KernelSandbox(...).isolation.syscall_filter` is False so callers can see it and refuse.
A launch told the filter works ("required") fails rather than run a kernel without it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from collections.abc import Sequence
from typing import Any

LIBRARY = "libseccomp.so.2"
#: Start of the one stderr line the launcher writes when the setting is "try" and the filter could not be loaded.
UNAVAILABLE = "sandbox: no system call filter: "

#: Refused with EPERM whatever their arguments.
DENIED = (
    "setns", "mount", "umount", "umount2", "pivot_root", "chroot", "open_tree", "open_tree_attr", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "add_key", "keyctl", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "bpf", "perf_event_open", "userfaultfd",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "init_module", "finit_module", "delete_module", "create_module", "get_kernel_syms", "query_module",
    "kexec_load", "kexec_file_load",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "vhangup", "iopl", "ioperm",
    "fanotify_init",
    "name_to_handle_at", "open_by_handle_at",
    "settimeofday", "stime", "clock_settime", "clock_adjtime", "adjtimex",
    "lookup_dcookie", "nfsservctl", "_sysctl", "sysfs", "ustat", "uselib", "vm86", "vm86old",
    "setxattr", "lsetxattr", "fsetxattr", "setxattrat",
)
_SETID_BITS = (0o4000, 0o2000)  # S_ISUID, S_ISGID
_O_CREAT, _O_TMPFILE = 0o100, 0o20200000  # x86_64 and aarch64 (asm-generic) values
#: Calls that give a file a mode: (name, index of the mode argument, index of the open flags or None).
SETID_CALLS = (
    ("chmod", 1, None), ("fchmod", 1, None), ("fchmodat", 2, None), ("fchmodat2", 2, None),
    ("open", 2, 1), ("openat", 3, 2), ("creat", 1, None), ("mknod", 1, None), ("mknodat", 2, None),
)
#: CLONE_NEWTIME (0x80) is the exit-signal byte in clone()'s flags, so it is checked for unshare only.
NAMESPACE_FLAGS = {
    "CLONE_NEWTIME": 0x00000080, "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000, "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000, "CLONE_NEWNET": 0x40000000,
}
_UNSAFE_PERSONA = 0x0040000  # ADDR_NO_RANDOMIZE; every flag above it is unsafe too, the persona types lie below
#: Calls newer than some libseccomp releases: numbered the same on every architecture since Linux 5.1 but alpha,
#: ia64 and mips, so used only where named in `_UNIFIED_ARCHES`.
_UNIFIED_NUMBERS = {"fchmodat2": 452, "setxattrat": 463, "open_tree_attr": 467}
_UNIFIED_ARCHES = (b"x86_64", b"aarch64", b"riscv64")
_CLONE_FLAGS_SECOND = (b"s390", b"s390x")  # where clone() takes its flags as the second argument

_ACT_ALLOW = 0x7FFF0000
_ACT_KILL_PROCESS = 0x80000000
_ACT_ERRNO = 0x00050000
_ATTR_ACT_BADARCH = 2
_ATTR_OPTIMIZE = 8
_OPTIMIZE_BINARY_TREE = 2
_CMP_GE = 5
_CMP_MASKED_EQ = 7
_NR_UNKNOWN = -1  # __NR_SCMP_ERROR: libseccomp does not know the name


class FilterUnavailableError(Exception):
    """libseccomp is missing or too old, or the kernel refused the filter; the message names the cause."""


class _ArgCmp(ctypes.Structure):
    """libseccomp's struct scmp_arg_cmp: argument index, comparison, two 64-bit operands."""

    _fields_ = (("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64))


def apply(config: dict[str, Any]) -> None:
    """Install the filter as `config["syscall_filter"]` says: "required" (raise when it cannot be), "try" (write
    one line starting with UNAVAILABLE to stderr and carry on: the probe reads it) or "off"."""
    setting = config.get("syscall_filter", "off")
    if setting == "off":
        return
    try:
        install()
    except FilterUnavailableError as exc:
        if setting != "try":  # "required", or a setting this file does not know
            raise
        sys.stderr.write(f"{UNAVAILABLE}{exc}\n")
        sys.stderr.flush()


def install(library: str = LIBRARY) -> None:
    """Load the filter into this thread; it applies to every process forked from it from now on."""
    lib = _open(library)
    ctx = lib.seccomp_init(_ACT_ALLOW)
    if not ctx:
        raise FilterUnavailableError("seccomp_init failed")
    try:
        _prefer(lib, ctx, _ATTR_ACT_BADARCH, _ACT_KILL_PROCESS)  # else libseccomp's default: kill the thread
        _prefer(lib, ctx, _ATTR_OPTIMIZE, _OPTIMIZE_BINARY_TREE)  # a short path for the allowed majority
        _add_rules(lib, ctx)
        _check(lib.seccomp_load(ctx), "seccomp_load")
    finally:
        lib.seccomp_release(ctx)


def _open(library: str) -> Any:
    try:
        lib = ctypes.CDLL(library)
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = (ctypes.c_uint32,)
        lib.seccomp_release.argtypes = (ctypes.c_void_p,)
        lib.seccomp_load.argtypes = (ctypes.c_void_p,)
        lib.seccomp_attr_set.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32)
        lib.seccomp_arch_native.restype = ctypes.c_uint32
        lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
        lib.seccomp_arch_resolve_name.argtypes = (ctypes.c_char_p,)
        lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
        lib.seccomp_rule_add_array.argtypes = (
            ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp),
        )
    except (OSError, AttributeError) as exc:
        raise FilterUnavailableError(f"{library} could not be loaded ({exc})") from None
    return lib


def _prefer(lib: Any, ctx: int, attribute: int, value: int) -> None:
    """Set a filter attribute that an older libseccomp or kernel may not support; its default is safe too."""
    lib.seccomp_attr_set(ctx, attribute, value)


def _check(result: int, step: str) -> None:
    if result < 0:
        raise FilterUnavailableError(f"{step}: {os.strerror(-result)}")


def _add_rules(lib: Any, ctx: int) -> None:
    for name in DENIED:
        _deny(lib, ctx, name, errno.EPERM)
    _deny(lib, ctx, "clone3", errno.ENOSYS)
    clone_flags = 1 if _native_in(lib, _CLONE_FLAGS_SECOND) else 0
    for name, flag in NAMESPACE_FLAGS.items():
        _deny(lib, ctx, "unshare", errno.EPERM, (0, _CMP_MASKED_EQ, flag, flag))
        if name != "CLONE_NEWTIME":
            _deny(lib, ctx, "clone", errno.EPERM, (clone_flags, _CMP_MASKED_EQ, flag, flag))
    _deny(lib, ctx, "personality", errno.EPERM, (0, _CMP_GE, _UNSAFE_PERSONA, 0))
    _deny(lib, ctx, "openat2", errno.ENOSYS)
    _deny_setid_modes(lib, ctx)


def _deny_setid_modes(lib: Any, ctx: int) -> None:
    """EPERM for a mode with setuid or setgid; for open and openat only when they create (the mode argument of
    any other open is whatever the register held)."""
    for name, mode_arg, flags_arg in SETID_CALLS:
        for bit in _SETID_BITS:
            mode = (mode_arg, _CMP_MASKED_EQ, bit, bit)
            if flags_arg is None:
                _deny(lib, ctx, name, errno.EPERM, mode)
                continue
            for creating in (_O_CREAT, _O_TMPFILE):
                _deny(lib, ctx, name, errno.EPERM, (flags_arg, _CMP_MASKED_EQ, creating, creating), mode)


def _deny(lib: Any, ctx: int, name: str, error: int, *conditions: tuple[int, int, int, int]) -> None:
    """Fail `name` with `error` (when every condition holds); skipped where the architecture has no such call."""
    number = _number(lib, name)
    if number is None:
        return
    compared = (_ArgCmp * len(conditions))(*(_ArgCmp(*condition) for condition in conditions))
    _check(lib.seccomp_rule_add_array(ctx, _ACT_ERRNO | error, number, len(conditions), compared), f"deny {name}")


def _number(lib: Any, name: str) -> int | None:
    """The native number of `name`; None where it is not a system call here (libseccomp gives a negative
    pseudo number for another architecture's call and -1 for a name it does not know)."""
    number = int(lib.seccomp_syscall_resolve_name(name.encode()))
    if number >= 0:
        return number
    if number == _NR_UNKNOWN and name in _UNIFIED_NUMBERS and _native_in(lib, _UNIFIED_ARCHES):
        return _UNIFIED_NUMBERS[name]
    return None


def _native_in(lib: Any, arches: Sequence[bytes]) -> bool:
    native = lib.seccomp_arch_native()
    return any(lib.seccomp_arch_resolve_name(arch) == native for arch in arches)
