"""The kernel's system call filter (`sandbox/seccomp.py`) against real kernels: each refused call is made from a
cell (and from a process the cell starts) and shown to fail; what a code interpreter needs still works; and a
host whose libseccomp cannot be loaded runs kernels without the filter, says so once, and shows it.

The calls use x86_64 numbers (other machines skip) with harmless arguments: where the filter let one through,
it would do no damage, and the test would fail on its output.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent

import pytest

from sandbox import KernelSandbox
from tests.normal_user import run_as_normal_user

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="the attacks use x86_64 system call numbers")

CLONE_NEWUSER, SIGCHLD, AT_FDCWD, SESSION_KEYRING = 0x10000000, 17, -100, -3
#: Each refused call: its x86_64 number and arguments ("buffer": 120 zero bytes, "pid": the caller's pid).
CALLS = {
    "unshare(CLONE_NEWUSER)": (272, CLONE_NEWUSER),
    "unshare(CLONE_NEWNET)": (272, 0x40000000),
    "clone(CLONE_NEWUSER)": (56, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0),
    "clone3": (435, 0, 0),
    "setns": (308, -1, 0),
    "mount": (165, b"none", b"/tmp", b"tmpfs", 0, 0),
    "open_tree": (428, AT_FDCWD, b"/", 0),
    "open_tree_attr": (467, AT_FDCWD, b"/", 0, 0, 0),
    "fsopen": (430, b"tmpfs", 0),
    "keyctl": (250, 0, SESSION_KEYRING, 0),
    "add_key": (248, b"user", b"planted", b"value", 5, SESSION_KEYRING),
    "io_uring_setup": (425, 1, "buffer"),
    "bpf": (321, 0, 0, 0),
    "perf_event_open": (298, 0, 0, -1, -1, 0),
    "userfaultfd": (323, 1),
    "ptrace(PTRACE_TRACEME)": (101, 0, 0, 0, 0),
    "process_vm_readv": (310, "pid", 0, 0, 0, 0, 0),
    "personality(ADDR_NO_RANDOMIZE)": (135, 0x0040000),
    "name_to_handle_at": (303, AT_FDCWD, b"/", 0, 0, 0),
    "kexec_load": (246, 0, 0, 0, 0),
    "init_module": (175, 0, 0, b""),
}
#: Makes every call of CALLS (and os.unshare where Python has it); prints "name ERRNO" for each.
ATTACKS = dedent(f"""
    import ctypes, errno, os
    libc = ctypes.CDLL(None, use_errno=True)
    def argument(value):
        if value == "buffer":
            return ctypes.create_string_buffer(120)
        if value == "pid":
            return ctypes.c_long(os.getpid())
        return value if isinstance(value, bytes) else ctypes.c_long(value)
    for name, (number, *args) in {CALLS!r}.items():
        ctypes.set_errno(0)
        ret = libc.syscall(number, *map(argument, args))
        if ret == 0 and name.startswith("clone"):
            os._exit(0)  # the child of a clone that was let through
        print(name, errno.errorcode.get(ctypes.get_errno(), "?") if ret == -1 else f"ALLOWED ({{ret}})")
    if hasattr(os, "unshare"):
        try:
            os.unshare(os.CLONE_NEWUSER)
            print("os.unshare ALLOWED")
        except OSError as exc:
            print("os.unshare", errno.errorcode[exc.errno])
""")
EXPECTED = [f"{name} {'ENOSYS' if name == 'clone3' else 'EPERM'}" for name in CALLS]
EXPECTED += ["os.unshare EPERM"] if hasattr(os, "unshare") else []
ATTACK_CELL = (
    f"ATTACKS = {ATTACKS!r}\nexec(ATTACKS)\nimport subprocess, sys\n"
    "print(subprocess.run([sys.executable, '-c', ATTACKS], capture_output=True, text=True).stdout, end='')\n"
    "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('Seccomp:')])"
)

#: A 32-bit (int 0x80) or x32 getpid from a 64-bit process: machine code built with ctypes.
COMPAT_CALL = dedent("""
    import ctypes, mmap, struct, sys
    def int80(number):
        # push rbx; mov eax, number; xor ebx, ebx; int 0x80; pop rbx; ret
        code = bytes.fromhex("53b8") + struct.pack("<I", number) + bytes.fromhex("31dbcd805bc3")
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(code)
        return ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
    if sys.argv[1] == "i386":
        print(int80(20))
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.syscall(0x40000000 | 39), ctypes.get_errno())
""")


@pytest.fixture(scope="module")
def box() -> Iterator[KernelSandbox]:
    with KernelSandbox(timeout=60) as sandbox:
        sandbox.start()
        yield sandbox


def _seccomp_status() -> list[str]:
    lines = Path("/proc/self/status").read_text().splitlines()
    return [line.split()[1] for line in lines if line.startswith("Seccomp")]


def test_the_filter_is_on_and_says_so(box: KernelSandbox) -> None:
    assert box.isolation.syscall_filter is True
    result = box.execute("[line.split()[1] for line in open('/proc/self/status') if line.startswith('Seccomp')]")
    host_filters = int(_seccomp_status()[1])  # filters this test process runs under, which the kernel inherits
    assert result.result == repr(["2", str(host_filters + 1)]), result.to_model_text()


def test_refused_calls_fail_in_the_kernel_and_in_its_children(box: KernelSandbox) -> None:
    result = box.execute(ATTACK_CELL)
    assert result.ok, result.to_model_text()
    lines = result.stdout.splitlines()
    assert lines == [*EXPECTED, *EXPECTED, "['2']"], result.stdout


def test_32_bit_and_x32_system_calls_end_the_process(box: KernelSandbox) -> None:
    """The filter admits only the native ABI: int 0x80 and x32 numbers are not checked against the list but
    killed with SIGSYS. On the host (no filter) the same int 0x80 getpid returns a pid."""
    host = subprocess.run([sys.executable, "-c", COMPAT_CALL, "i386"], capture_output=True, text=True, timeout=30)
    abis = ["x32", "i386"] if host.returncode == 0 and int(host.stdout) > 0 else ["x32"]
    code = (
        f"import subprocess, sys\nfor abi in {abis!r}:\n"
        f"    print(abi, subprocess.run([sys.executable, '-c', {COMPAT_CALL!r}, abi]).returncode)"
    )
    result = box.execute(code)
    assert result.stdout.splitlines() == [f"{abi} -31" for abi in abis], result.to_model_text()
    if "i386" not in abis:
        pytest.skip(f"int 0x80 does not work on this host ({host.returncode}), so only x32 was tried")


def test_threads_processes_and_the_data_stack_still_work(box: KernelSandbox) -> None:
    code = dedent("""
        import concurrent.futures, multiprocessing, os, subprocess, sys
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            print("threads", sum(pool.map(abs, range(-8, 0))))
        for method in ("fork", "spawn", "forkserver"):
            with multiprocessing.get_context(method).Pool(2) as pool:
                print(method, pool.map(abs, [-1, -2, -3]))
        print("subprocess", subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True,
                                           text=True).stdout.strip())
        child = os.posix_spawn(sys.executable, [sys.executable, "-c", "pass"], os.environ)
        print("posix_spawn", os.waitpid(child, 0)[1])
        import numpy as np, pandas as pd, matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        print("pandas", pd.DataFrame({"a": np.arange(5)}).a.sum())
        plt.plot([1, 4, 9])
        plt.savefig("/mnt/data/plot.png")
        print("plot", open("/mnt/data/plot.png", "rb").read(4))
    """)
    result = box.execute(code)
    assert result.ok, result.to_model_text()
    assert result.stdout.splitlines() == [
        "threads 36", "fork [1, 2, 3]", "spawn [1, 2, 3]", "forkserver [1, 2, 3]", "subprocess 42",
        "posix_spawn 0", "pandas 10", "plot b'\\x89PNG'",
    ], result.to_model_text()
    assert (box.workdir / "plot.png").stat().st_size > 1000


SETID_CELL = dedent("""
    import ctypes, errno, os, stat
    libc = ctypes.CDLL(None, use_errno=True)
    def attempt(label, call):
        try:
            call()
            print(label, "done")
        except OSError as exc:
            print(label, errno.errorcode[exc.errno])
    open("/mnt/data/tool", "w").close()
    attempt("chmod u+s", lambda: os.chmod("/mnt/data/tool", 0o4755))
    attempt("chmod g+s", lambda: os.chmod("/mnt/data/tool", 0o2755))
    attempt("fchmod u+s", lambda: os.fchmod(os.open("/mnt/data/tool", os.O_RDONLY), 0o4755))
    attempt("create u+s", lambda: os.close(os.open("/mnt/data/made", os.O_CREAT | os.O_WRONLY, 0o4755)))
    attempt("mknod u+s", lambda: os.mknod("/mnt/data/node", stat.S_IFREG | 0o4755))
    attempt("acl", lambda: os.setxattr("/mnt/data/tool", "system.posix_acl_access", b"\\x02\\x00\\x00\\x00"))
    attempt("user xattr", lambda: os.setxattr("/mnt/data/tool", "user.note", b"x"))
    attempt("chmod 0755", lambda: os.chmod("/mnt/data/tool", 0o755))
    attempt("create 0644", lambda: os.close(os.open("/mnt/data/plain", os.O_CREAT | os.O_WRONLY, 0o644)))
    attempt("open, set-id bits in an unused mode", lambda: os.close(os.open("/mnt/data/tool", os.O_RDONLY, 0o6777)))
    attempt("mkfifo", lambda: os.mkfifo("/mnt/data/fifo", 0o600))
    print(oct(os.stat("/mnt/data/tool").st_mode & 0o7777), os.path.exists("/mnt/data/made"))
""")


def test_setuid_and_setgid_bits_and_acls_are_refused_and_plain_modes_are_not(box: KernelSandbox) -> None:
    """A set-id file the kernel makes would be a set-id program of the workdir's owner on the host (an idmapped
    workdir), and an ACL it sets would outlive the hand-back of the workdir: both are refused; plain modes work."""
    result = box.execute(SETID_CELL)
    assert result.ok, result.to_model_text()
    assert result.stdout.splitlines() == [
        "chmod u+s EPERM", "chmod g+s EPERM", "fchmod u+s EPERM", "create u+s EPERM", "mknod u+s EPERM",
        "acl EPERM", "user xattr EPERM", "chmod 0755 done", "create 0644 done",
        "open, set-id bits in an unused mode done", "mkfifo done", "0o755 False",
    ], result.to_model_text()
    assert not (box.workdir / "tool").stat().st_mode & 0o6000


# -- a normal user (user namespace mode) -----------------------------------------------------------------------
USERNS_SCRIPT = """
import sys
from sandbox import KernelSandbox
with KernelSandbox(timeout=60) as box:
    print(box.isolation.mode, box.isolation.syscall_filter)
    print(box.execute(sys.stdin.read()).to_model_text())
"""


def test_a_normal_users_kernel_gets_the_filter_too() -> None:
    done = run_as_normal_user(USERNS_SCRIPT, ATTACK_CELL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["userns True", *EXPECTED, *EXPECTED, "['2']"], done.stdout


# -- a host without libseccomp ---------------------------------------------------------------------------------
DEGRADED_SCRIPT = """
import logging
from sandbox import KernelSandbox
from sandbox.seccomp import FilterUnavailableError, apply

class Keep(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

kept = Keep()
logging.getLogger("sandbox").addHandler(kept)
cell = (
    "import ctypes\\nlibc = ctypes.CDLL(None, use_errno=True)\\n"
    "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('Seccomp:')], libc.syscall(435, 0, 0), "
    "ctypes.get_errno())"
)
with KernelSandbox(timeout=60) as first, KernelSandbox(timeout=60) as second:
    print(first.isolation.mode, first.isolation.syscall_filter, second.isolation.syscall_filter)
    print(first.execute(cell).stdout.strip(), second.execute("6 * 7").result)
print(len(kept.messages))
print(kept.messages[0] if kept.messages else "no warning")
try:
    apply({"syscall_filter": "required"})
    print("LOADED")
except FilterUnavailableError as exc:
    print("required:", exc)
"""


def _libseccomp_file() -> str | None:
    """The file the dynamic loader opens for libseccomp.so.2 here, or None when it cannot."""
    try:
        ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return None
    for line in Path("/proc/self/maps").read_text().splitlines():
        if "libseccomp" in line:
            return line.split()[-1]
    return None


def test_without_libseccomp_kernels_run_unfiltered_after_one_warning_and_say_so(tmp_path: Path) -> None:
    """A real host without a loadable libseccomp: in a private mount namespace the library is replaced by an
    empty file, so the loader genuinely fails (in the probe, in the launcher, in the kernel's root)."""
    library = _libseccomp_file()
    if os.geteuid() != 0 or library is None or not shutil.which("unshare"):
        pytest.skip("needs root, util-linux's unshare and a loadable libseccomp.so.2 to hide")
    empty = tmp_path / "empty.so"
    empty.write_bytes(b"")
    script = tmp_path / "degraded.py"
    script.write_text(DEGRADED_SCRIPT)
    env = {"PATH": os.environ.get("PATH", os.defpath), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           f"mount --bind {empty} {library} && exec {sys.executable} {script}"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "root False False", done.stdout
    assert lines[1] == "['0'] -1 22 42", done.stdout  # no filter: clone3 reaches the kernel (EINVAL, not ENOSYS)
    assert lines[2] == "1" and "without a system call filter" in lines[3] and "libseccomp.so.2" in lines[3]
    assert lines[4].startswith("required: libseccomp.so.2 could not be loaded"), done.stdout
