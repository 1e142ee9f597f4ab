"""Attacks through the workdir, against real kernels: each test performs one and shows it fail.

As root, without an idmapped mount, a workdir is handed to the kernel's uid while the sandbox is open and given
back on close. A kernel that owns a tree can swap a folder for a link to a host folder at any moment, chmod what
it owns, plant trees deeper than Python's recursion limit or wider than any walk should take, and two sandboxes
on one tree would let one kernel race the other sandbox's walks. The host must never follow, chown or chmod
anything outside the tree, must give back exactly what it took, and must stay bounded in time and descriptors.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import KernelSandbox, WorkdirInUseError
from sandbox.fdtree import remove_folder
from sandbox.janitor import sweep_leftovers
from sandbox.workdir import hand_over, snapshot

ROOT = Path(__file__).resolve().parents[1]
DEPTH = 1_200  # deeper than Python's recursion limit (1,000)
RENAME_EXCHANGE = 2

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the hand-over to a kernel's uid happens as root only")

SWAP_CELL = """
import ctypes, os, threading
libc = ctypes.CDLL(None, use_errno=True)
if not os.path.lexists("d"):  # later cycles find the pair as the last swap left it
    os.mkdir("d")
    open("d/inner.txt", "w").write("in the workdir")
    os.symlink(HOST, "l")
def swap():
    while True:
        libc.renameat2(-100, b"d", -100, b"l", 2)
threading.Thread(target=swap, daemon=True).start()
"""


def _fingerprint(path: Path) -> tuple[int, int, int, int]:
    info = os.lstat(path)
    return info.st_uid, info.st_gid, info.st_mode, info.st_ctime_ns


@pytest.fixture
def deep_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder for deep trees, removed after the test: pytest's own clean-up of old tmp_path folders recurses, and
    would fail on them in a later session."""
    folder = tmp_path / "deep"
    yield folder
    remove_folder(folder)


@pytest.fixture
def host_folder(tmp_path: Path) -> Path:
    """A root-only host folder with a private file, outside every workdir: what an attacker wants to own."""
    folder = tmp_path / "host-secrets"
    folder.mkdir(mode=0o700)
    (folder / "secret.txt").write_text("root only")
    os.chmod(folder / "secret.txt", 0o600)
    return folder


def _make_chain(root: Path, depth: int, leaf: str = "bottom.txt") -> None:
    """`depth` nested folders named d under `root`, and a file at the bottom (made with descriptors: any depth)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(os.open(leaf, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def _owned_by(root: Path, uid: int) -> list[str]:
    done = subprocess.run(["find", str(root), "-uid", str(uid)], capture_output=True, text=True, timeout=120)
    return done.stdout.split()


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# -- one live sandbox per tree --------------------------------------------------------------------------------
def test_a_second_sandbox_on_the_same_tree_or_inside_or_around_it_is_refused(tmp_path: Path) -> None:
    workdir, other = tmp_path / "work", tmp_path / "elsewhere"
    other.mkdir()
    (tmp_path / "alias").symlink_to(workdir)
    with KernelSandbox(workdir=workdir, timeout=20) as first:
        result = first.execute(f"import os\nos.symlink({str(other)!r}, 'to-elsewhere')")
        assert result.ok, result.to_model_text()
        for asked, relation in [
            (workdir, "is already the workdir"), (tmp_path / "alias", "is already the workdir"),
            (workdir / "inner", "is inside"), (workdir / "to-elsewhere" / "made", "is inside"),
            (tmp_path, "contains"),
        ]:
            with pytest.raises(WorkdirInUseError, match=f"{relation}.* live sandbox \\(process {os.getpid()}, opened"):
                KernelSandbox(workdir=asked, timeout=20)
        assert not (other / "made").exists() and not (workdir / "inner").exists()  # refused before making them
    with KernelSandbox(workdir=workdir, timeout=20) as second:  # closed: the tree is free again
        assert second.execute("1").result == "1"


LOCK_HOLDER = """
import sys
from pathlib import Path
from sandbox.workdir_lock import lock_workdir
lock = lock_workdir(Path(sys.argv[1]))
print("locked", flush=True)
sys.stdin.read()
"""


def test_the_lock_holds_across_processes_and_goes_with_a_killed_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(WorkdirInUseError, match=f"process {holder.pid},"):
            KernelSandbox(workdir=tmp_path / "inside", timeout=20)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    with KernelSandbox(workdir=tmp_path, timeout=20) as sandbox:  # the dead holder's lock is gone with it
        assert sandbox.execute("1").result == "1"


# -- a kernel swapping a folder and a link to a host folder -------------------------------------------------
def test_a_kernel_swapping_a_folder_with_a_link_to_a_host_folder_never_gets_it(
    tmp_path: Path, host_folder: Path
) -> None:
    workdir = tmp_path / "work"
    watched = [host_folder, host_folder / "secret.txt"]
    before = [_fingerprint(path) for path in watched]
    uids = []
    for _ in range(3):  # each open hands over whatever state the last swap left; each close gives it back
        with KernelSandbox(workdir=workdir, timeout=20) as sandbox:
            uids.append(sandbox.isolation.uid)
            result = sandbox.execute(SWAP_CELL.replace("HOST", repr(str(host_folder))))
            assert result.ok, result.to_model_text()
            for _ in range(5):  # snapshots while the swap runs
                listed = sandbox.execute("import time\ntime.sleep(0.05)\nopen('touched.txt', 'w').write('x')")
                assert all(path.is_relative_to(workdir) for path in listed.files), listed.files
                assert not any("secret" in str(path) for path in listed.files), listed.files
    assert [_fingerprint(path) for path in watched] == before
    assert (host_folder / "secret.txt").read_text() == "root only"
    assert all(_owned_by(workdir, uid) == [] for uid in uids)


def _swap_forever(folder: Path, stop: threading.Event) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while not stop.is_set():
            libc.renameat2(fd, b"d", fd, b"l", RENAME_EXCHANGE)
    finally:
        os.close(fd)


def test_the_walkers_never_follow_a_link_swapped_in_during_the_walk(tmp_path: Path, host_folder: Path) -> None:
    """The host itself swaps, as fast as it can, while every walk runs: hand-over, hand-back, snapshot, removal.
    (A walk by path, os.walk and chown, lost this race about once in 250 walks: 2,000 walks here.)"""
    workdir = tmp_path / "work"
    watched = [host_folder, host_folder / "secret.txt"]
    before = [_fingerprint(path) for path in watched]
    (workdir / "d").mkdir(parents=True)
    for n in range(3):
        (workdir / "d" / f"inner-{n}.txt").write_text("in the workdir")
    (workdir / "l").symlink_to(host_folder)
    stop = threading.Event()
    swapper = threading.Thread(target=_swap_forever, args=(workdir, stop))
    swapper.start()
    try:
        for cycle in range(1_000):
            hand_over(workdir, 0x7FFF0000, 0x7FFF0000)()
            if cycle % 10 == 0:
                assert not any("secret" in name for name in snapshot(workdir).files)
        assert remove_folder(workdir) and not workdir.exists()
    finally:
        stop.set()
        swapper.join()
    assert [_fingerprint(path) for path in watched] == before


# -- the hand-back restores what it took ---------------------------------------------------------------------
MODES_CELL = """
import os
os.chmod(".", 0o777)
os.chmod("private.txt", 0o666)
os.chmod("theirs.txt", 0o666)
open("setuid-written", "a").write("the kernel's payload")
open("new-setuid", "w").write("made by the kernel")
def chmod(path, mode):  # set-id bits: refused by the syscall filter where it runs; the hand-back strips them too
    try:
        os.chmod(path, mode)
    except PermissionError:
        os.chmod(path, mode & 0o777)
chmod("new-setuid", 0o6777)
os.mkdir("new-folder")
chmod("new-folder", 0o2777)
os.symlink("/etc/passwd", "new-link")
open("group-folder/new.txt", "w").write("x")
os.chmod("group-folder/new.txt", 0o666)
try:
    open("linked", "a").write("through a second name")
except OSError as exc:
    print("refused", exc.errno)
"""


def test_close_restores_owners_and_modes_and_tames_what_the_kernel_made(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir(mode=0o700)
    files = {"private.txt": (0, 0, 0o600), "theirs.txt": (4242, 4343, 0o640), "setuid-kept": (4242, 4343, 0o4755),
             "setuid-written": (4242, 4343, 0o4755)}
    for name, (uid, gid, mode) in files.items():
        (workdir / name).write_text(name)
        os.chown(workdir / name, uid, gid)
        os.chmod(workdir / name, mode)
    (workdir / "group-folder").mkdir()
    os.chown(workdir / "group-folder", 4242, 4343)
    os.chmod(workdir / "group-folder", 0o2770)
    outside = tmp_path / "outside-name"  # a file with a second name outside the workdir is not handed over
    outside.write_text("host")
    os.link(outside, workdir / "linked")
    passwd = _fingerprint(Path("/etc/passwd"))
    with KernelSandbox(workdir=workdir, timeout=20) as sandbox:
        result = sandbox.execute(MODES_CELL)
        assert result.ok and result.stdout == "refused 13\n", result.to_model_text()
        uid = sandbox.isolation.uid
    expect = {
        ".": (0, 0, 0o700), "private.txt": (0, 0, 0o600), "theirs.txt": (4242, 4343, 0o640),
        "setuid-kept": (4242, 4343, 0o4755),  # untouched: given back as it was
        "setuid-written": (4242, 4343, 0o755),  # the kernel wrote it: never setuid again
        "group-folder": (4242, 4343, 0o2770),
        "new-setuid": (0, 0, 0o755), "new-folder": (0, 0, 0o755), "group-folder/new.txt": (0, 0, 0o644),
    }
    got = {name: (os.lstat(workdir / name).st_uid, os.lstat(workdir / name).st_gid,
                  stat.S_IMODE(os.lstat(workdir / name).st_mode)) for name in expect}
    assert got == expect
    assert os.lstat(workdir / "new-link").st_uid == 0 and _fingerprint(Path("/etc/passwd")) == passwd
    assert outside.read_text() == "host" and os.stat(outside).st_uid == 0
    assert _owned_by(workdir, uid) == []


# -- deep trees ----------------------------------------------------------------------------------------------
DEEP_CELL = f"""
import os
for _ in range({DEPTH}):
    os.mkdir("d")
    os.chdir("d")
open("bottom.txt", "w").write("deep")
os.chdir("/mnt/data")
"""


def test_a_tree_deeper_than_the_recursion_limit_is_given_back_and_removed(deep_folder: Path) -> None:
    given = deep_folder
    with KernelSandbox(workdir=given, timeout=60) as sandbox, KernelSandbox(timeout=60) as owned:
        for box in (sandbox, owned):
            result = box.execute(DEEP_CELL)
            assert result.ok, result.to_model_text()
        uid, owned_workdir = sandbox.isolation.uid, owned.workdir
    assert not owned_workdir.exists()
    assert _owned_by(given, uid) == []
    depth = subprocess.run(["find", str(given), "-type", "d"], capture_output=True, text=True, timeout=60)
    assert len(depth.stdout.split()) == DEPTH + 1


RUNTIME_DEEP_CELL = f"""
import os
from ipykernel.kernelapp import IPKernelApp
os.chdir(os.path.dirname(IPKernelApp.instance().connection_file))  # its runtime folder, also written by the host
print(os.getcwd())
for _ in range({DEPTH}):
    os.mkdir("d")
    os.chdir("d")
os.chdir("/mnt/data")
"""


def test_a_deep_tree_in_the_runtime_folder_does_not_stop_close_from_giving_the_workdir_back(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    sandbox = KernelSandbox(workdir=workdir, timeout=60)
    result = sandbox.execute(RUNTIME_DEEP_CELL)
    runtime = Path(result.stdout.strip()).parent
    try:
        assert result.ok and runtime.name.startswith("kernelsandbox-run-"), result.to_model_text()
        sandbox.close()  # raised RecursionError, leaving the workdir to the kernel's uid and locked
        assert _owned_by(workdir, sandbox.isolation.uid) == []
        with KernelSandbox(workdir=workdir, timeout=20) as again:
            assert again.execute("1").result == "1"
    finally:
        remove_folder(runtime)


FEW_DESCRIPTORS = """
import resource, sys
from pathlib import Path
from sandbox.fdtree import remove_folder
from sandbox.workdir import hand_over, snapshot
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
root = Path(sys.argv[1])
hand_over(root, 0x7FFF0000, 0x7FFF0000)()
print(list(snapshot(root).files), remove_folder(root))
"""


def test_the_walks_hold_a_bounded_number_of_descriptors(deep_folder: Path) -> None:
    """One descriptor per level would need 1,200; the walks run with 64."""
    root = deep_folder
    root.mkdir()
    _make_chain(root, DEPTH)
    done = subprocess.run([sys.executable, "-c", FEW_DESCRIPTORS, str(root)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("True") and not root.exists()
    assert "/".join(["d"] * DEPTH) + "/bottom.txt" in done.stdout
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 64  # the limit was the child's only


def test_a_planted_deep_leftover_never_breaks_a_later_sandbox(tmp_path: Path) -> None:
    temp, pid = Path(tempfile.gettempdir()), _dead_pid()
    planted, foreign, link = (temp / f"kernelsandbox-work-{pid}-{kind}" for kind in ("x", "foreign", "link"))
    target = tmp_path / "link-target"
    target.mkdir()
    (target / "kept.txt").write_text("kept")
    try:
        for folder in (planted, foreign):
            folder.mkdir()
            _make_chain(folder, DEPTH)
        os.chown(foreign, 4242, 4242)  # another user's folder with our name: not ours to remove
        link.symlink_to(target)
        assert sweep_leftovers.__wrapped__(()) is None  # no cgroup roots: only the temp folders
        assert not planted.exists() and foreign.exists() and link.is_symlink() and (target / "kept.txt").exists()
        planted.mkdir()
        _make_chain(planted, DEPTH)
        sweep_leftovers.cache_clear()
        with KernelSandbox(timeout=20) as sandbox:
            assert sandbox.execute("1").result == "1"
        assert not planted.exists()
    finally:
        sweep_leftovers.cache_clear()
        link.unlink(missing_ok=True)
        for folder in (planted, foreign):
            if folder.exists():
                remove_folder(folder)


# -- wide trees ----------------------------------------------------------------------------------------------
WIDE = 80_000


@pytest.fixture
def wide_workdir(tmp_path: Path) -> Iterator[Path]:
    """80,000 empty folders, on tmpfs where there is one (making them on a disk takes far longer than the test)."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    workdir = Path(tempfile.mkdtemp(prefix="wide-workdir-", dir=base))
    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for n in range(WIDE):
            os.mkdir(f"d{n}", dir_fd=fd)
    finally:
        os.close(fd)
    yield workdir
    remove_folder(workdir)


def test_a_wide_tree_costs_a_cell_under_a_second_and_close_stays_bounded(wide_workdir: Path) -> None:
    sandbox = KernelSandbox(workdir=wide_workdir, timeout=20)
    try:
        sandbox.start()
        start = time.monotonic()
        result = sandbox.execute("open('written.txt', 'w').write('x')", timeout=1)
        elapsed = time.monotonic() - start
        uid = sandbox.isolation.uid
    finally:
        closing = time.monotonic()
        sandbox.close()
        close_s = time.monotonic() - closing
    assert result.ok and not result.timed_out, result.to_model_text()
    assert elapsed < 1.0, f"a trivial cell took {elapsed:.2f} s"
    assert any("the list of changed files is partial" in note for note in result.notes), result.notes
    assert close_s < 30, f"close took {close_s:.1f} s"
    assert _owned_by(wide_workdir, uid) == []
