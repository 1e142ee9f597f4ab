"""Idmapped workdirs against real kernels (as root): the kernel works as the workdir's owner, and nothing is chowned.

The workdir belongs to an ordinary user (uid/gid 4242). Its kernel runs as a fresh sandbox uid, yet it reads and
writes the owner's files as its own, and everything it makes lands on disk as 4242:4242, with the modes it gave,
while the sandbox is open and after it closes. Each attack the mapping must stop is performed: planting a setuid
file (owned by 4242 on the host, and worth nothing in the sandbox), writing another user's files, and chowning a
file to that user. `idmap_owner` is also shown to refuse root-owned workdirs and filesystems without idmapped
mounts (procfs, ramfs), and the launcher to refuse such a mount with an error that names the step.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from textwrap import dedent

import pytest

import sandbox.kernel
from sandbox import KernelSandbox, KernelStartError
from sandbox.engine import Engine
from sandbox.idmap import idmap_owner, supports_idmapped_mounts
from sandbox.isolation import Isolation, host_support, plan_isolation
from sandbox.loop import LoopThread
from sandbox.process import KernelSettings
from sandbox.result import ExecutionResult

OWNER = 4242
THIRD = 4343  # another user with files in the workdir, not mapped into the sandbox
OVERFLOW_ID = int(Path("/proc/sys/fs/overflowuid").read_text())

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or host_support().mode != "root", reason="idmapped workdirs are for sandboxes made as root"
)


@dataclass
class Session:
    run: Callable[[str], ExecutionResult]
    isolation: Isolation


def _make_owned(path: Path, uid: int = OWNER, mode: int = 0o600, text: str | None = None) -> Path:
    if text is None:
        path.mkdir(mode=mode)
    else:
        path.write_text(text)
    os.chmod(path, mode)
    os.chown(path, uid, uid)
    return path


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A fresh folder of uid/gid 4242 holding a 0600 file of theirs, on a filesystem with idmapped mounts."""
    folder = _make_owned(tmp_path / "work", mode=0o700)
    _make_owned(folder / "notes.txt", text="the owner's notes\n")
    _make_owned(folder / "untouched.txt", mode=0o640, text="nobody writes this\n")
    supported = supports_idmapped_mounts(folder, folder.stat().st_dev)
    if _known_to_support_idmapped_mounts(folder):
        assert supported, f"the probe refused {folder}, on a filesystem with idmapped mounts"
    elif not supported:
        pytest.skip(f"the filesystem of {tmp_path} has no idmapped mounts")
    return folder


def _known_to_support_idmapped_mounts(folder: Path) -> bool:
    """ext4, xfs and btrfs have idmapped mounts since Linux 5.15, tmpfs since 6.3: there the probe must say yes."""
    release = tuple(int(part) for part in os.uname().release.split("-")[0].split(".")[:2])
    found = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(folder)], capture_output=True, text=True)
    return release >= (6, 3) and found.stdout.strip() in ("ext4", "xfs", "btrfs", "tmpfs")


def _isolation() -> Isolation:
    return plan_isolation(False, "auto", host_support())


def _settings(workdir: Path, isolation: Isolation, owner: tuple[int, int] | None) -> KernelSettings:
    return KernelSettings(
        workdir=workdir, isolation=isolation, cgroup_root=host_support().pids_cgroup_root, memory_mb=2048,
        max_processes=64, max_file_mb=64, max_output_chars=20_000, startup_timeout=60, idmap_workdir=owner,
    )


@contextlib.contextmanager
def idmapped_kernel(workdir: Path) -> Iterator[Session]:
    """A real kernel on `workdir`, mounted idmapped as `idmap_owner` decides (the engine alone: no hand-over)."""
    isolation = _isolation()
    owner = idmap_owner(workdir, isolation)
    assert owner == (OWNER, OWNER)
    loop = LoopThread("idmap-test-loop")
    engine = Engine(_settings(workdir, isolation, owner), interrupt_grace=1.0)
    try:
        yield Session(lambda code: loop.call(engine.execute(code, 30)), isolation)
    finally:
        loop.call(engine.aclose())
        loop.stop()


def _tree(root: Path) -> dict[str, os.stat_result]:
    found = {".": root.stat()}
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = Path(folder, name)
            found[str(path.relative_to(root))] = path.lstat()
    return found


def _owners(tree: dict[str, os.stat_result]) -> set[tuple[int, int]]:
    return {(info.st_uid, info.st_gid) for info in tree.values()}


_WORK_AS_THE_OWNER = dedent("""
    import json, os
    os.chdir("/mnt/data")
    seen = os.stat("notes.txt")
    text = open("notes.txt").read()
    with open("notes.txt", "a") as notes:
        notes.write("and the kernel's\\n")
    os.mkdir("results", 0o700)
    os.chmod("results", 0o750)
    with open("results/table.csv", "w") as table:
        table.write("a,b\\n1,2\\n")
    os.chmod("results/table.csv", 0o604)
    os.close(os.open("private.txt", os.O_CREAT | os.O_WRONLY, 0o600))
    modes = {n: os.stat(n).st_mode for n in ("notes.txt", "results", "results/table.csv", "private.txt")}
    mount = [line.split() for line in open("/proc/self/mountinfo") if line.split()[4] == "/mnt/data"][0]
    print(json.dumps({"me": [os.getuid(), os.getgid()], "notes_owner": [seen.st_uid, seen.st_gid], "text": text,
                      "modes": modes, "options": mount[5].split(",")}))
""")


def test_the_kernel_works_on_the_owners_files_and_everything_stays_the_owners(workdir: Path) -> None:
    untouched = (workdir / "untouched.txt").stat()
    with idmapped_kernel(workdir) as kernel:
        result = kernel.run(_WORK_AS_THE_OWNER)
        assert result.ok, result.to_model_text()
        seen = json.loads(result.stdout)
        sandbox_ids = [kernel.isolation.uid, kernel.isolation.gid]
        assert seen["me"] == sandbox_ids and sandbox_ids != [OWNER, OWNER]
        assert seen["notes_owner"] == sandbox_ids  # the owner's file is the kernel's own inside
        assert seen["text"] == "the owner's notes\n"
        assert {"idmapped", "nosuid", "nodev", "rw"} <= set(seen["options"]), seen["options"]
        during = _tree(workdir)
        assert _owners(during) == {(OWNER, OWNER)}  # on disk: the owner's, never the sandbox uid
    after = _tree(workdir)
    assert _owners(after) == {(OWNER, OWNER)}
    assert seen["modes"] == {name: after[name].st_mode for name in seen["modes"]}  # exactly the kernel's modes
    assert stat.S_IMODE(after["results/table.csv"].st_mode) == 0o604
    assert stat.S_IMODE(after["results"].st_mode) == 0o750
    assert (workdir / "notes.txt").read_text() == "the owner's notes\nand the kernel's\n"
    for name in ("untouched.txt", "notes.txt", "results/table.csv"):  # nothing was chowned at close or before
        assert after[name].st_ctime_ns == during[name].st_ctime_ns, name
    assert after["untouched.txt"].st_ctime_ns == untouched.st_ctime_ns


_SETUID_ATTACK = dedent("""
    import os, shutil, subprocess
    shutil.copy("/usr/bin/id", "/mnt/data/my-id")
    try:
        os.chmod("/mnt/data/my-id", 0o4755)
        print("set-id allowed")
    except PermissionError:
        print("set-id refused")
    flags = os.statvfs("/mnt/data").f_flag
    print("nosuid", bool(flags & os.ST_NOSUID), "nodev", bool(flags & os.ST_NODEV))
    for name in ("my-id", "root-id"):
        euid = subprocess.run(["/mnt/data/" + name, "-u"], capture_output=True, text=True).stdout.strip()
        print(name, "euid", euid)
""")


def test_a_setuid_file_the_kernel_plants_is_the_owners_and_grants_nothing(workdir: Path) -> None:
    planted_by_root = workdir / "root-id"  # a setuid-root program someone left in the workdir
    planted_by_root.write_bytes(Path("/usr/bin/id").read_bytes())
    os.chmod(planted_by_root, 0o4755)
    """The syscall filter refuses the set-id bit; were it missing, the file would be a setuid program of the
    folder's owner on the host, never of root. Inside, nosuid makes set-id programs grant nothing either way."""
    with idmapped_kernel(workdir) as kernel:
        result = kernel.run(_SETUID_ATTACK)
        uid, filtered = kernel.isolation.uid, kernel.isolation.syscall_filter
    assert result.ok, result.to_model_text()
    assert "nosuid True nodev True" in result.stdout
    assert f"my-id euid {uid}" in result.stdout and f"root-id euid {uid}" in result.stdout, result.stdout
    made = (workdir / "my-id").stat()
    assert (made.st_uid, made.st_gid) == (OWNER, OWNER)
    assert ("set-id refused" in result.stdout) is filtered, result.stdout
    assert bool(made.st_mode & stat.S_ISUID) is not filtered


_THIRD_USER_ATTACK = dedent("""
    import os
    os.chdir("/mnt/data")
    theirs = os.stat("theirs.txt")
    print("theirs owner", theirs.st_uid, theirs.st_gid, "reads", open("theirs.txt").read().strip())
    attacks = {
        "append": lambda: open("theirs.txt", "a").write("defaced"),
        "chmod": lambda: os.chmod("theirs.txt", 0o666),
        "plant": lambda: open("their-folder/planted.txt", "w").write("x"),
        "give away": lambda: os.chown("mine.txt", THIRD, THIRD),
    }
    open("mine.txt", "w").write("mine")
    for name, attack in attacks.items():
        try:
            attack()
            print(name, "DONE")
        except OSError as exc:
            print(name, "refused", exc.errno)
""").replace("THIRD", str(THIRD))


def test_another_users_files_show_as_overflow_ids_and_stay_out_of_reach(workdir: Path) -> None:
    _make_owned(workdir / "theirs.txt", uid=THIRD, mode=0o644, text="their words")
    _make_owned(workdir / "their-folder", uid=THIRD, mode=0o755)
    with idmapped_kernel(workdir) as kernel:
        result = kernel.run(_THIRD_USER_ATTACK)
    assert result.ok, result.to_model_text()
    assert f"theirs owner {OVERFLOW_ID} {OVERFLOW_ID} reads their words" in result.stdout
    assert "DONE" not in result.stdout and result.stdout.count("refused") == 4, result.stdout
    theirs = (workdir / "theirs.txt").stat()
    assert (theirs.st_uid, stat.S_IMODE(theirs.st_mode)) == (THIRD, 0o644)
    assert (workdir / "theirs.txt").read_text() == "their words"
    assert list((workdir / "their-folder").iterdir()) == []
    assert (workdir / "mine.txt").stat().st_uid == OWNER


def test_a_workdir_of_root_or_of_group_root_is_never_idmapped(tmp_path: Path) -> None:
    isolation = _isolation()
    owned_by_root = tmp_path / "root"
    owned_by_root.mkdir()
    group_root = tmp_path / "group-root"
    group_root.mkdir()
    os.chown(group_root, OWNER, 0)
    assert supports_idmapped_mounts(owned_by_root, owned_by_root.stat().st_dev)  # refused for the owner, not the fs
    assert idmap_owner(owned_by_root, isolation) is None
    assert idmap_owner(group_root, isolation) is None
    os.chown(group_root, OWNER, OWNER)
    assert idmap_owner(group_root, isolation) == (OWNER, OWNER)
    assert idmap_owner(group_root, replace(isolation, mode="none")) is None  # only sandboxes made as root


def test_a_filesystem_without_idmapped_mounts_is_not_idmapped(tmp_path: Path) -> None:
    """procfs refuses idmapped mounts: /proc/PID of a process of the owner is a folder of theirs on it."""
    owners_process = subprocess.Popen(["cat"], stdin=subprocess.PIPE, user=OWNER, group=OWNER)
    try:
        folder = Path(f"/proc/{owners_process.pid}")
        assert (folder.stat().st_uid, folder.stat().st_gid) == (OWNER, OWNER)
        assert not supports_idmapped_mounts(folder, folder.stat().st_dev)
        assert idmap_owner(folder, _isolation()) is None
    finally:
        owners_process.communicate(timeout=30)


@pytest.fixture
def ramfs_workdir(tmp_path: Path) -> Iterator[Path]:
    """A ramfs (no idmapped mounts) of the owner's, unmounted afterwards."""
    folder = tmp_path / "ram"
    folder.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(folder)], check=True)
    try:
        os.chown(folder, OWNER, OWNER)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_ramfs_is_not_idmapped_and_the_launcher_names_the_failing_step(ramfs_workdir: Path) -> None:
    isolation = _isolation()
    assert idmap_owner(ramfs_workdir, isolation) is None
    loop = LoopThread("idmap-test-loop")
    engine = Engine(_settings(ramfs_workdir, isolation, (OWNER, OWNER)), interrupt_grace=1.0)  # forced: must fail
    try:
        with pytest.raises(KernelStartError, match=r"idmapped workdir: mount_setattr\(MOUNT_ATTR_IDMAP\)"):
            loop.call(engine.kernel())
    finally:
        loop.call(engine.aclose())
        loop.stop()


@pytest.mark.skipif(not hasattr(sandbox.kernel, "idmap_owner"), reason="kernel.py does not call idmap_owner yet")
def test_kernel_sandbox_mounts_an_owned_workdir_idmapped_and_never_chowns_it(workdir: Path) -> None:
    untouched = (workdir / "untouched.txt").stat().st_ctime_ns
    with KernelSandbox(workdir=workdir, timeout=30) as box:
        result = box.execute("import os\nopen('/mnt/data/made.txt', 'w').write('x')\nos.getuid()")
        assert result.ok and result.result == str(box.isolation.uid), result.to_model_text()
        assert _owners(_tree(workdir)) == {(OWNER, OWNER)}
    assert _owners(_tree(workdir)) == {(OWNER, OWNER)}
    assert (workdir / "untouched.txt").stat().st_ctime_ns == untouched
