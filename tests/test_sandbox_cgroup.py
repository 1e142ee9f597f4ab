"""Per-sandbox cgroup caps (issue 26): memory of the kernel and all its children together, CPU and processes.

The attacks run in a real kernel. Where this machine has no writable memory/cpu/pids cgroup, the attack tests are
skipped with the reason, and the plan's fallback (per-process RLIMIT_AS) is checked instead.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytest.importorskip("jupyter_client")
from sandbox import KernelSandbox
from sandbox.isolation import HostSupport, host_support, plan_isolation
from tests.processes import process_gone

# three children of 600 MB each: 1.8 GB, all touched (b"x" * n writes every page), under a 1024 MB sandbox
THREE_CHILDREN_OF_600_MB = """
import os, time
children = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        block = b"x" * (600 << 20)
        time.sleep(120)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
print("all three held")
"""

BUSY_FOR_2_S = """
import time
cpu_start, start = time.process_time(), time.monotonic()
while time.monotonic() - start < 2:
    pass
print(time.process_time() - cpu_start, time.monotonic() - start)
"""


def _needs_cgroup_caps() -> None:
    if "memory" not in host_support().cgroup_roots or "cpu" not in host_support().cgroup_roots:
        pytest.skip("no writable memory and cpu cgroup on this machine: caps are per process (RLIMIT_AS) here")


def _sandbox_cgroups(pid: int) -> dict[str, Path]:
    """The sandbox cgroup folders `pid` is in, per controller, read from /proc/PID/cgroup."""
    roots = host_support().cgroup_roots
    found: dict[str, Path] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        name = Path(rel).name
        for controller, root in roots.items():
            if name.startswith("kernelsandbox-") and (controller in controllers.split(",") or controllers == ""):
                found[controller] = root / name
    return found


def _leftover_cgroups() -> list[Path]:
    prefix = f"kernelsandbox-{os.getpid()}-"
    roots = set(host_support().cgroup_roots.values())
    return [path for root in roots for path in root.iterdir() if path.name.startswith(prefix)]


def test_children_over_the_memory_cap_kill_the_sandbox_and_the_result_says_so() -> None:
    _needs_cgroup_caps()
    with KernelSandbox(timeout=120, memory_mb=1024) as box:
        box.start()
        assert box.isolation.memory_limit == "memory cgroup" and box.isolation.cpu_limit == "cpu cgroup"
        pid = box.kernel_pid
        assert pid is not None
        groups = _sandbox_cgroups(pid)
        assert set(groups) == {"memory", "cpu", "pids"}
        started = time.monotonic()
        result = box.execute(THREE_CHILDREN_OF_600_MB)
        elapsed = time.monotonic() - started
        assert "all three held" not in result.stdout
        assert result.kernel_died and result.memory_exceeded and result.restarted and not result.ok
        assert "killed for memory: the sandbox went over its cap of 1024 MB" in result.to_model_text()
        assert elapsed < 90  # killed well before the cell's own 120 s limit
        assert process_gone(pid)
        assert not any(path.exists() for path in groups.values())  # the killed kernel's cgroup went with it
        assert box.execute("print(6 * 7)").stdout == "42\n"  # a fresh kernel, in a fresh cgroup
        fresh = box.kernel_pid
        assert fresh is not None and _sandbox_cgroups(fresh)
    assert process_gone(fresh)
    assert _leftover_cgroups() == []


def test_the_cgroup_holds_the_caps_and_is_removed_on_close() -> None:
    _needs_cgroup_caps()
    with KernelSandbox(timeout=30, memory_mb=512, max_processes=40, max_cpus=0.5) as box:
        box.start()
        assert box.kernel_pid is not None
        groups = _sandbox_cgroups(box.kernel_pid)
        memory = groups["memory"]
        limit_file = "memory.max" if (memory / "memory.max").exists() else "memory.limit_in_bytes"
        assert int((memory / limit_file).read_text()) == 512 << 20
        assert (groups["pids"] / "pids.max").read_text().strip() == "42"  # 40 + the launcher and pid 1
        cpu = groups["cpu"]
        quota = (cpu / "cpu.max").read_text().split()[0] if (cpu / "cpu.max").exists() else (
            (cpu / "cpu.cfs_quota_us").read_text().strip())
        assert int(quota) == 50_000
    assert not any(path.exists() for path in groups.values())
    assert _leftover_cgroups() == []


def test_a_busy_loop_gets_no_more_than_its_cpu_share() -> None:
    _needs_cgroup_caps()
    with KernelSandbox(timeout=60, max_cpus=0.2) as box:
        box.start()
        assert box.kernel_pid is not None
        cpu = _sandbox_cgroups(box.kernel_pid)["cpu"]
        cpu_seconds, wall_seconds = map(float, box.execute(BUSY_FOR_2_S).stdout.split())
        throttled = dict(line.split() for line in (cpu / "cpu.stat").read_text().splitlines())
    assert cpu_seconds < 0.5 * wall_seconds  # uncapped, one busy thread gets close to 1 CPU-second per second
    assert int(throttled["nr_throttled"]) > 0


def test_without_a_memory_cgroup_the_plan_says_memory_is_capped_per_process() -> None:
    support = HostSupport(mode="root", reason="", can_drop_capabilities=True, pids_cgroup_root=None, is_root=True)
    plan = plan_isolation(network=False, isolation="auto", support=support)
    assert (plan.memory_limit, plan.cpu_limit, plan.process_limit) == ("RLIMIT_AS", "none", "RLIMIT_NPROC")


def test_max_cpus_out_of_range_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="max_cpus must be between"):
        KernelSandbox(max_cpus=0)
