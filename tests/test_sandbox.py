"""The code interpreter with real ipykernel processes: state, output, limits, restarts, and cleanup.

Most tests share one sandbox (module fixture): each test sets up the state it needs, so a restart caused by one
test only costs the next one a kernel start. Tests that close or configure a sandbox differently make their own.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import KernelSandbox, KernelStartError, SandboxClosedError

SECRET_NAME = "SANDBOX_TEST_API_TOKEN"
SECRET_VALUE = "sk-test-4f1c9a7e-never-in-the-kernel"
MAX_CHARS = 2_000


@pytest.fixture(scope="module")
def box() -> Iterator[KernelSandbox]:
    os.environ[SECRET_NAME] = SECRET_VALUE  # present in the parent while the kernel starts
    try:
        with KernelSandbox(timeout=20, max_output_chars=MAX_CHARS, max_file_mb=8) as sandbox:
            sandbox.start()
            yield sandbox
    finally:
        os.environ.pop(SECRET_NAME, None)


def _gone(pid: int, within: float = 3.0) -> bool:
    """True once `pid` no longer exists (or is a zombie nobody will run again)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


# -- state and output ---------------------------------------------------------------------------------------
def test_state_persists_across_cells(box: KernelSandbox) -> None:
    box.execute("counter = 41")
    result = box.execute("counter += 1\ncounter")
    assert result.ok
    assert result.result == "42"
    assert result.to_model_text() == "42"


def test_exception_gives_name_value_and_plain_traceback(box: KernelSandbox) -> None:
    result = box.execute("def ratio(a, b):\n    return a / b\n\nratio(1, 0)")
    assert not result.ok
    assert result.error is not None
    assert result.error.ename == "ZeroDivisionError"
    assert result.error.evalue == "division by zero"
    assert "ratio" in result.error.traceback and "return a / b" in result.error.traceback
    assert "\x1b[" not in result.error.traceback
    assert "ZeroDivisionError: division by zero" in result.to_model_text()


def test_streams_and_rich_results_with_numpy_and_pandas(box: KernelSandbox) -> None:
    code = (
        "import sys\nimport numpy as np\nimport pandas as pd\n"
        "print('mean', np.arange(5).mean())\nprint('careful', file=sys.stderr)\n"
        "pd.DataFrame({'city': ['Oslo', 'Lima'], 'temp': [3, 19]})"
    )
    result = box.execute(code)
    assert result.ok, result.to_model_text()
    assert result.stdout == "mean 2.0\n"
    assert result.stderr == "careful\n"
    assert result.result is not None and "Lima" in result.result and "temp" in result.result
    assert "<table" in result.data["text/html"]  # other mimetypes are kept for callers that render them


def test_matplotlib_figure_becomes_png_file_in_workdir(box: KernelSandbox) -> None:
    result = box.execute("import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.title('squares')\nplt.show()")
    assert result.ok, result.to_model_text()
    assert len(result.images) == 1
    image = result.images[0]
    assert image.parent == box.workdir and image.suffix == ".png"
    assert image.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"[image saved: {box.data_path}/{image.name}]" in result.to_model_text()


def test_svg_display_is_saved_as_svg(box: KernelSandbox) -> None:
    svg = "<svg xmlns='http://www.w3.org/2000/svg' width='4' height='4'><rect width='4' height='4'/></svg>"
    result = box.execute(f'from IPython.display import SVG, display\ndisplay(SVG("{svg}"))')
    assert [p.suffix for p in result.images] == [".svg"]
    assert "<rect" in result.images[0].read_text()


def test_files_written_under_mnt_data_land_in_workdir(box: KernelSandbox) -> None:
    (box.workdir / "input.csv").write_text("a,b\n1,2\n")
    code = (
        f"import pandas as pd\ndf = pd.read_csv('{box.data_path}/input.csv')\n"
        f"df.assign(c=df.a + df.b).to_csv('{box.data_path}/output.csv', index=False)\n"
        "open('relative.txt', 'w').write('cwd is the workdir')"
    )
    result = box.execute(code)
    assert result.ok, result.to_model_text()
    assert (box.workdir / "output.csv").read_text() == "a,b,c\n1,2,3\n"
    assert (box.workdir / "relative.txt").read_text() == "cwd is the workdir"
    assert box.workdir / "output.csv" in result.files and box.workdir / "input.csv" not in result.files


def test_mnt_data_is_the_path_the_model_is_told(box: KernelSandbox) -> None:
    assert box.isolation.contained
    assert box.data_path == "/mnt/data"
    assert box.execute("import os\nos.getcwd()").result == "'/mnt/data'"


# -- output bounds ---------------------------------------------------------------------------------------------
def test_ten_million_lines_keep_head_and_tail_with_bounded_parent_memory(box: KernelSandbox) -> None:
    tracemalloc.start()
    try:
        result = box.execute("print('\\n'.join(map(str, range(10**7))))")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    digits = 10 + sum(9 * 10 ** (d - 1) * d for d in range(2, 8))  # 0-9, then 9*10^(d-1) numbers of d digits
    total = digits + 10**7  # one newline per line
    before, _, tail = result.stdout.partition(" characters omitted …\n")
    head, _, omitted = before.rpartition("\n… ")
    assert head.startswith("0\n1\n2\n3\n") and tail.endswith("9999998\n9999999\n")
    assert int(omitted) == total - len(head) - len(tail)
    assert len(result.stdout) < MAX_CHARS + 200
    assert peak < 10 * 2**20, "the 78 MB of output must never reach the parent process"


def test_many_small_prints_are_bounded_too(box: KernelSandbox) -> None:
    result = box.execute("for i in range(100_000):\n    print(i)")
    assert result.stdout.startswith("0\n1\n") and result.stdout.endswith("99998\n99999\n")
    assert "characters omitted" in result.stdout
    assert len(result.stdout) < MAX_CHARS + 200


def test_one_gigabyte_print_never_reaches_the_parent(box: KernelSandbox) -> None:
    tracemalloc.start()
    try:
        result = box.execute("print('x' * 10**9)")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "… 999998001 characters omitted …" in result.stdout  # 10**9 + newline, minus head and tail
    assert peak < 10 * 2**20


def test_huge_result_repr_is_truncated(box: KernelSandbox) -> None:
    result = box.execute("'y' * 5_000_000")
    assert result.result is not None and "characters omitted" in result.result
    assert len(result.result) < MAX_CHARS + 200


# -- time limits -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", ["while True:\n    pass", "import time\ntime.sleep(1000)"])
def test_endless_cell_is_interrupted_and_kernel_keeps_state(box: KernelSandbox, code: str) -> None:
    box.execute("kept = 'still here'")
    start = time.monotonic()
    result = box.execute(code, timeout=1)
    elapsed = time.monotonic() - start
    assert elapsed < 1 + 2
    assert result.timed_out and not result.restarted
    assert result.error is not None and result.error.ename == "KeyboardInterrupt"
    assert "[timed out after 1 s]" in result.to_model_text()
    assert box.execute("kept").result == "'still here'"


def test_cell_that_ignores_interrupts_gets_a_fresh_kernel(box: KernelSandbox) -> None:
    box.execute("doomed = 1")
    old_pid = box.kernel_pid
    code = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass"
    start = time.monotonic()
    result = box.execute(code, timeout=1)
    assert time.monotonic() - start < 1 + 2
    assert result.timed_out and result.restarted
    assert "timed out after 1 s" in result.to_model_text() and "kernel restarted, state lost" in result.to_model_text()
    assert old_pid is not None and _gone(old_pid)
    after = box.execute("'doomed' in globals()")
    assert after.result == "False"


def test_cancelling_aexecute_interrupts_the_cell(box: KernelSandbox) -> None:
    async def scenario() -> str | None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(box.aexecute("import time\ntime.sleep(100)"), 0.5)
        return (await box.aexecute("'free again'", timeout=5)).result

    start = time.monotonic()
    assert asyncio.run(scenario()) == "'free again'"
    assert time.monotonic() - start < 4


# -- OS limits and crashes -----------------------------------------------------------------------------------------
def test_allocating_8_gb_fails_and_next_execution_works(box: KernelSandbox) -> None:
    result = box.execute("import numpy as np\nhuge = np.ones(2**30)")  # 8 GiB of float64
    assert result.kernel_died or (result.error is not None and result.error.ename == "MemoryError")
    assert box.execute("1 + 1").result == "2"


@pytest.mark.parametrize(
    ("code", "cause"), [("import os\nos._exit(1)", "exit code 1"), ("import ctypes\nctypes.string_at(0)", "SIGSEGV")]
)
def test_kernel_death_is_reported_and_kernel_restarted(box: KernelSandbox, code: str, cause: str) -> None:
    box.execute("lost = True")
    old_pid = box.kernel_pid
    result = box.execute(code)
    assert result.kernel_died and result.restarted and not result.timed_out
    assert cause in result.to_model_text() and "kernel restarted, state lost" in result.to_model_text()
    assert box.execute("'lost' in globals()").result == "False"
    assert box.kernel_pid != old_pid


def test_kernel_killed_between_cells_is_noticed_and_replaced(box: KernelSandbox) -> None:
    box.execute("import time\nwarm = 1")
    old_pid = box.kernel_pid
    assert old_pid is not None
    os.kill(old_pid, 9)  # what the OOM killer does
    assert _gone(old_pid)
    result = box.execute("'warm' in globals()")
    assert result.restarted and result.result == "False", (result.notes, result.kernel_died, result.execution_count)
    assert "killed by SIGKILL" in result.to_model_text() and "kernel restarted, state lost" in result.to_model_text()


def test_fork_loop_is_capped(box: KernelSandbox) -> None:
    if box.isolation.process_limit == "none":
        pytest.skip("no pids cgroup and running as root: nothing on this machine caps processes")
    code = (
        "import os, time\nchildren = []\ntry:\n    for _ in range(1000):\n        pid = os.fork()\n"
        "        if pid == 0:\n            time.sleep(60)\n            os._exit(0)\n        children.append(pid)\n"
        "except OSError as exc:\n    print('capped', exc.errno)\n"
        "for pid in children:\n    os.kill(pid, 9)\n    os.waitpid(pid, 0)\nlen(children)"
    )
    result = box.execute(code)
    assert result.stdout.strip() == "capped 11"  # EAGAIN
    assert result.result is not None and 0 < int(result.result) < 64
    assert box.execute("'ok'").result == "'ok'"


def test_file_size_is_capped(box: KernelSandbox) -> None:
    result = box.execute("open('big.bin', 'wb').write(b'0' * 16 * 2**20)")  # the fixture allows 8 MB
    assert result.error is not None and "File too large" in result.error.evalue
    assert (box.workdir / "big.bin").stat().st_size <= 8 * 2**20


def test_parent_secrets_do_not_reach_the_kernel(box: KernelSandbox) -> None:
    result = box.execute("import os\nprint(sorted(k for k in os.environ if 'TOKEN' in k))")
    assert result.stdout == "[]\n"
    assert SECRET_VALUE not in result.to_model_text() and SECRET_NAME not in result.to_model_text()


def test_no_process_environment_of_the_host_is_readable(tmp_path: Path) -> None:
    """The owner process holds the secret from its very start (so /proc/<pid>/environ has it); the kernel scans
    every process it can see for it."""
    script = tmp_path / "owner.py"
    script.write_text(
        "import os, sys\nfrom sandbox import KernelSandbox\n"
        f"assert {SECRET_VALUE!r}.encode() in open('/proc/self/environ', 'rb').read()\n"
        "with KernelSandbox(timeout=20) as box:\n"
        "    print(box.execute(sys.stdin.read()).to_model_text())\n"
    )
    scan = (
        "import os\nfound, seen = [], 0\nfor pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    seen += 1\n    try:\n        data = open(f'/proc/{pid}/environ', 'rb').read()\n"
        "    except OSError:\n        continue\n"
        f"    found += [pid] if {SECRET_VALUE!r}.encode() in data else []\n"
        "print('seen', seen, 'found', found, 'parent', os.getppid())"
    )
    env = {**os.environ, SECRET_NAME: SECRET_VALUE, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, str(script)], input=scan, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "found []" in done.stdout and "parent 1" in done.stdout, done.stdout  # pid 1 is the sandbox's init


def test_kernel_holds_no_capabilities(box: KernelSandbox) -> None:
    if not box.isolation.capabilities_dropped:
        pytest.skip("not running as root: there are no capabilities to drop")
    result = box.execute("[l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapBnd'))]")
    assert result.result == "['0000000000000000', '0000000000000000']"
    raise_limit = box.execute("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))")
    assert raise_limit.error is not None and raise_limit.error.ename == "ValueError"  # hard limit stays


# -- concurrency and lifecycle ------------------------------------------------------------------------------------
def test_one_execution_at_a_time_per_sandbox(box: KernelSandbox) -> None:
    async def two_at_once() -> list[str | None]:
        cells = [box.aexecute("import time\ntime.sleep(0.4)\n'done'") for _ in range(2)]
        return [r.result for r in await asyncio.gather(*cells)]

    start = time.monotonic()
    assert asyncio.run(two_at_once()) == ["'done'", "'done'"]
    assert time.monotonic() - start >= 0.8


def test_separate_sandboxes_run_in_parallel(box: KernelSandbox) -> None:
    with KernelSandbox(timeout=10) as other:
        other.start()
        results: list[str | None] = []
        cell = "import time\ntime.sleep(1)\n'slept'"
        start = time.monotonic()
        thread = threading.Thread(target=lambda: results.append(other.execute(cell).result))
        thread.start()
        results.append(box.execute(cell).result)
        thread.join()
        assert results == ["'slept'", "'slept'"]
        assert time.monotonic() - start < 1.8


def test_reset_gives_a_fresh_kernel(box: KernelSandbox) -> None:
    box.execute("before_reset = 1")
    box.reset()
    assert box.execute("'before_reset' in globals()").result == "False"


def _host_pids_with(marker: str) -> list[int]:
    """Host pids whose command line carries `marker` (pids inside the sandbox are its own namespace's)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_close_leaves_no_process_not_even_setsid_ones_and_removes_own_workdir() -> None:
    sandbox = KernelSandbox(timeout=10)
    marker = f"sandbox-orphan-{os.getpid()}-{time.monotonic_ns()}"
    code = (
        "import subprocess, sys\nargs = [sys.executable, '-c', 'import time; time.sleep(300)', MARK]\n"
        "subprocess.Popen(args)\nsubprocess.Popen(args, start_new_session=True)\n"
        "subprocess.Popen(['sh', '-c', 'setsid \"$0\" -c \"import time; time.sleep(300)\" \"$1\" &', "
        "sys.executable, MARK])\n"
    ).replace("MARK", repr(marker))
    result = sandbox.execute(code)
    assert result.ok, result.to_model_text()
    deadline = time.monotonic() + 10
    while len(_host_pids_with(marker)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    children, kernel_pid, workdir = _host_pids_with(marker), sandbox.kernel_pid, sandbox.workdir
    assert len(children) == 3 and kernel_pid is not None and not _gone(kernel_pid, within=0)
    sandbox.close()
    assert _gone(kernel_pid) and all(_gone(pid) for pid in children)
    assert not workdir.exists()
    with pytest.raises(SandboxClosedError):
        sandbox.execute("1")


def test_given_workdir_is_kept_and_given_back_after_close(tmp_path: Path) -> None:
    (tmp_path / "existing.txt").write_text("from the user")
    with KernelSandbox(workdir=tmp_path, timeout=10) as sandbox:
        result = sandbox.execute("open('kept.txt', 'w').write(open('existing.txt').read() + ', edited')")
        assert result.ok, result.to_model_text()
    assert (tmp_path / "kept.txt").read_text() == "from the user, edited"
    owner = tmp_path.stat().st_uid
    assert {(tmp_path / name).stat().st_uid for name in ("kept.txt", "existing.txt")} == {owner} == {os.getuid()}


def test_first_execution_after_background_start_does_not_wait_for_start(box: KernelSandbox) -> None:
    with KernelSandbox(timeout=10) as sandbox:
        sandbox.start_background()
        deadline = time.monotonic() + 30
        while not sandbox.ready and time.monotonic() < deadline:  # the model writes its first cell meanwhile
            time.sleep(0.05)
        assert sandbox.kernel_pid is not None
        start = time.monotonic()
        assert sandbox.execute("1").result == "1"
        assert time.monotonic() - start < 0.5


def test_network_is_off_by_default_and_the_hosts_loopback_is_out_of_reach() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server, KernelSandbox(timeout=10) as sandbox:
        server.settimeout(0.2)
        port = server.getsockname()[1]
        code = (
            "import socket\nprint(sorted(n for _, n in socket.if_nameindex()))\n"
            f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
            "except OSError as exc:\n    print('refused', exc.errno)\n"
            "own = socket.create_server(('127.0.0.1', 0))\nprint('own loopback', own.getsockname()[0])"
        )
        result = sandbox.execute(code)
        assert sandbox.isolation.network_blocked
        with pytest.raises(TimeoutError):
            server.accept()  # nothing from the kernel ever arrived
    assert result.stdout == "['lo']\nrefused 111\nown loopback 127.0.0.1\n"  # ECONNREFUSED: another loopback


def test_network_true_shares_the_hosts_network() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server, KernelSandbox(timeout=10, network=True) as sandbox:
        port = server.getsockname()[1]
        result = sandbox.execute(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3).close()")
        assert result.ok, result.to_model_text()
        server.settimeout(5)
        server.accept()[0].close()


def test_unusable_interpreter_raises_start_error() -> None:
    with KernelSandbox(python="/nonexistent/python", startup_timeout=10) as sandbox, pytest.raises(KernelStartError):
        sandbox.execute("1")
