"""Hostile cells against a real kernel: each test performs one attack on the host and shows it fail.

The kernel is treated as an attacker that knows our layout: where the launcher and the venv are, how the runtime
folders and images are named, which pid its owner has. Nothing here may leave the machine: network attacks
aim at a server on the host's own loopback.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent

import pytest

from sandbox import KernelSandbox
from sandbox.isolation import python_paths
from sandbox.workdir import MAX_IMAGE_BYTES
from tests.normal_user import run_as_normal_user

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "sandbox" / "launcher.py"
PNG_1PX = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


@pytest.fixture(scope="module")
def box() -> Iterator[KernelSandbox]:
    with KernelSandbox(timeout=20) as sandbox:
        sandbox.start()
        yield sandbox


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_launcher_the_project_and_the_interpreter_cannot_be_written(box: KernelSandbox) -> None:
    before = _digest(LAUNCHER)
    targets = [str(LAUNCHER), str(ROOT / "sandbox" / "planted.py"), *python_paths(sys.executable)[:2],
               "/etc/passwd", "/usr/bin/planted", "/planted", "/root/.bashrc"]
    code = (
        "import os\nfor path in TARGETS:\n"
        "    target = path if not os.path.isdir(path) else os.path.join(path, 'planted.py')\n"
        "    try:\n        os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))\n"
        "        print('WROTE', target)\n    except OSError as exc:\n        print('refused', exc.errno)\n"
    ).replace("TARGETS", repr(targets))
    result = box.execute(code)
    assert "WROTE" not in result.stdout and result.stdout.count("refused") == len(targets), result.stdout
    assert box.execute("import os\nos._exit(1)").kernel_died  # the next kernel runs the launcher again
    assert _digest(LAUNCHER) == before and not (ROOT / "sandbox" / "planted.py").exists()
    assert box.execute("'back'").result == "'back'"  # the restart ran the untouched launcher


def test_the_kernel_is_an_unprivileged_user_that_cannot_become_root(box: KernelSandbox) -> None:
    code = dedent("""
        import os
        print(os.getuid() != 0, os.geteuid() != 0)
        for attempt in (lambda: os.setuid(0), lambda: os.chroot("/tmp"), lambda: os.mknod("/tmp/d", 0o20666, 259)):
            try:
                attempt()
                print("ALLOWED")
            except OSError as exc:
                print("refused", exc.errno)
        print([l.split()[1] for l in open("/proc/self/status") if l.startswith(("CapEff", "CapBnd", "NoNewPrivs"))])
    """)
    result = box.execute(code)
    assert result.stdout.splitlines() == [
        "True True", "refused 1", "refused 1", "refused 1", "['0000000000000000', '0000000000000000', '1']",
    ], result.to_model_text()
    assert box.isolation.uid != 0


def test_other_processes_are_out_of_sight(box: KernelSandbox) -> None:
    code = (
        "import os\npids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\nprint(pids[:2], len(pids) < 8)\n"
        f"try:\n    os.kill({os.getpid()}, 0)\n    print('SIGNALLED THE OWNER')\n"
        "except OSError as exc:\n    print('no such process', exc.errno)"
    )
    result = box.execute(code)
    assert result.stdout == "[1, 2] True\nno such process 3\n", result.to_model_text()


def test_another_sandboxs_connection_file_is_unreachable(box: KernelSandbox) -> None:
    with KernelSandbox(timeout=10) as other:
        other.start()
        files = sorted(Path(tempfile.gettempdir()).glob("kernelsandbox-run-*/kernel/kernel.json"))
        theirs = [f for f in files if f.parent.stat().st_uid == other.isolation.uid]
        assert len(theirs) == 1 and theirs[0].parent.stat().st_mode & 0o777 == 0o700
        code = (
            f"import glob\nprint(len(glob.glob('/tmp/kernelsandbox-run-*/kernel/kernel.json')))\n"
            f"try:\n    open({str(theirs[0])!r}).read()\n    print('READ THE KEY')\n"
            "except OSError as exc:\n    print('refused', exc.errno)"
        )
        result = box.execute(code)
    assert result.stdout == "1\nrefused 2\n", result.to_model_text()  # only its own; theirs does not exist for it
    assert other.isolation.uid != box.isolation.uid


def test_a_planted_link_is_never_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    with KernelSandbox(timeout=20) as sandbox:
        plant = (
            f"import os\nfor n in range(1, 40):\n    os.symlink({str(victim)!r}, f'image-{{n}}.png')\n"
            "open('image-40.png', 'w').write('the kernel wrote this')\n"
            f"from IPython.display import Image, display\nimport base64\n"
            f"display(Image(data=base64.b64decode({PNG_1PX!r})))"
        )
        result = sandbox.execute(plant)
        assert result.ok, result.to_model_text()
        saved = result.images[0]
        assert victim.read_text() == "original"
        assert saved.name == "image-41.png" and not saved.is_symlink()
        assert saved.read_bytes() == base64.b64decode(PNG_1PX)
        assert (sandbox.workdir / "image-40.png").read_text() == "the kernel wrote this"


def test_images_are_bounded_in_number_and_size(box: KernelSandbox) -> None:
    many = (
        "from IPython.display import Image, display\nimport base64\n"
        f"for _ in range(30):\n    display(Image(data=base64.b64decode({PNG_1PX!r})))"
    )
    result = box.execute(many)
    assert len(result.images) == 20 and "10 more images were not saved" in result.to_model_text()
    big = MAX_IMAGE_BYTES + 1024
    huge = (  # a hostile kernel publishes the bundle itself, past every kernel-side limit
        "import base64\nfrom IPython.display import publish_display_data\n"
        f"publish_display_data({{'image/png': base64.b64encode(b'0' * {big}).decode()}})"
    )
    result = box.execute(huge)
    assert result.images == [] and "not saved" in result.to_model_text()


def test_the_hosts_tree_and_sys_are_not_there(box: KernelSandbox) -> None:
    code = dedent("""
        import os
        print(os.path.exists("/sys/fs/cgroup"), os.path.exists("/home"), os.path.exists("/var"))
        try:
            open("/proc/sys/kernel/hostname", "w").write("x")
        except OSError as exc:
            print("refused", exc.errno)
    """)
    result = box.execute(code)
    assert result.stdout.splitlines()[0] == "False False False"
    assert result.stdout.splitlines()[1] in ("refused 13", "refused 30"), result.stdout


def test_tmp_is_private_and_bounded(tmp_path: Path) -> None:
    marker = Path(tempfile.gettempdir()) / f"host-only-{os.getpid()}"
    marker.write_text("host")
    try:
        with KernelSandbox(timeout=20, max_file_mb=4) as sandbox:
            code = (
                f"import os\nprint(os.path.exists({str(marker)!r}))\n"
                "try:\n    for n in range(8):\n        open(f'/tmp/fill-{n}', 'wb').write(b'0' * 2**20)\n"
                "except OSError as exc:\n    print('full', exc.errno)"
            )
            result = sandbox.execute(code)
    finally:
        marker.unlink()
    assert result.stdout == "False\nfull 28\n", result.to_model_text()  # ENOSPC


# -- the same containment for a normal user --------------------------------------------------------------------
NORMAL_USER_CELL = """
import os, socket
print(os.getuid(), os.getcwd(), sorted(int(p) for p in os.listdir("/proc") if p.isdigit())[:2])
try:
    os.close(os.open(LAUNCHER, os.O_WRONLY))
    print("WROTE")
except OSError as exc:
    print("refused", exc.errno)
try:
    socket.create_connection(("127.0.0.1", PORT), timeout=3)
except OSError as exc:
    print("no network", exc.errno)
import pandas
print(pandas.DataFrame({"a": [1, 2]}).a.sum())
"""
NORMAL_USER_SCRIPT = """
import socket, sys
from sandbox import KernelSandbox
with socket.create_server(("127.0.0.1", 0)) as server, KernelSandbox(timeout=30) as box:
    port = str(server.getsockname()[1])
    code = sys.stdin.read().replace("LAUNCHER", repr(sys.argv[1])).replace("PORT", port)
    print(box.isolation.mode, box.isolation.uid)
    print(box.execute(code).to_model_text())
"""


def test_a_normal_user_gets_the_same_containment_through_a_user_namespace() -> None:
    done = run_as_normal_user(NORMAL_USER_SCRIPT, NORMAL_USER_CELL, str(LAUNCHER))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "userns 4242", done.stdout
    assert lines[1] == "4242 /mnt/data [1, 2]" and lines[2] in ("refused 13", "refused 30"), done.stdout
    assert lines[3:] == ["no network 111", "3"], done.stdout


def test_the_containment_probe_works_inside_a_jupyter_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A notebook's kernel has JPY_PARENT_PID naming *its* parent; the probe must not take it for ours."""
    from sandbox.isolation import _probe_containment, host_support

    monkeypatch.setenv("JPY_PARENT_PID", "1")
    assert _probe_containment(host_support().mode or "root") == ""
