"""Many code-interpreter sessions on one machine: time to first cell (pool vs cold), then a soak's costs.

    python benchmarks/sessions.py [--sessions 40] [--rounds 5]

Time to first cell: a cold start (`KernelSandbox()`, then its first cell) against a warm `SandboxPool` (`acquire`,
then the first cell), median of `--rounds`, side by side; target pool <= 0.1x cold. Then `--sessions`
conversations at once run the soak scenario of `tests/test_sessions_soak.py` (ten cells each, through
`ScriptedModel`), sampled every 0.25 s: peak memory of the machine above what it used before, peak and mean
memory per sandbox (its memory cgroup's usage: kernel, children and page cache), and cells per second.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds the soak scenario
from sandbox import KernelSandbox, SandboxPool
from sandbox.isolation import host_support
from tests.test_sessions_soak import CELL_TIMEOUT, CELLS, leftovers, run_sessions, wrong_results

MB = 2**20


def first_cell_cold() -> float:
    started = time.perf_counter()
    with KernelSandbox(timeout=60) as box:
        box.execute("1 + 1")
        return time.perf_counter() - started


def first_cell_pooled(pool: SandboxPool) -> float:
    pool.wait_ready()
    started = time.perf_counter()
    box = pool.acquire()
    box.execute("1 + 1")
    elapsed = time.perf_counter() - started
    box.close()
    return elapsed


def used_memory() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(fields["MemTotal"].split()[0]) - int(fields["MemAvailable"].split()[0])) * 1024


def sandbox_memory() -> list[int]:
    """Current memory of each live sandbox of this process, from its memory cgroup (empty without one)."""
    root = host_support().cgroup_roots.get("memory")
    if root is None:
        return []
    sizes = []
    for group in root.glob(f"kernelsandbox-{os.getpid()}-*"):
        for name in ("memory.current", "memory.usage_in_bytes"):
            try:
                sizes.append(int((group / name).read_text()))
                break
            except (OSError, ValueError):
                continue
    return sizes


class Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.base = used_memory()
        self.peak_machine = 0
        self.peak_total = 0
        self.per_sandbox: list[int] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.25):
            self.peak_machine = max(self.peak_machine, used_memory() - self.base)
            sizes = sandbox_memory()
            self.peak_total = max(self.peak_total, sum(sizes))
            self.per_sandbox += sizes


def soak(sessions: int) -> None:
    sampler = Sampler()
    sampler.start()
    started = time.perf_counter()
    results = asyncio.run(run_sessions(sessions))
    elapsed = time.perf_counter() - started
    sampler.done.set()
    sampler.join()
    wrong = [bad for outputs in results if (bad := wrong_results(outputs))]
    for bad in wrong[:3]:
        print("wrong:", bad)
    cells = sessions * len(CELLS)
    per = sampler.per_sandbox or [0]
    print(f"soak: {sessions} sessions x {len(CELLS)} cells in {elapsed:.1f} s, {len(wrong)} sessions with a wrong "
          f"result, left over: {len(leftovers())}")
    print(f"cells/second: {cells / elapsed:.2f} (one cell sleeps to its {CELL_TIMEOUT:g} s timeout in each session)")
    print(f"peak memory of the machine above its start: {sampler.peak_machine / MB:.0f} MB; peak of all sandboxes "
          f"together: {sampler.peak_total / MB:.0f} MB")
    print(f"per sandbox: peak {max(per) / MB:.0f} MB, mean {statistics.mean(per) / MB:.0f} MB (memory cgroup usage)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cold = statistics.median(first_cell_cold() for _ in range(args.rounds))
    with SandboxPool(size=1, timeout=60) as pool:
        warm = statistics.median(first_cell_pooled(pool) for _ in range(args.rounds))
    print(f"time to first cell: cold start {cold * 1000:.0f} ms, from a warm pool {warm * 1000:.0f} ms "
          f"({warm / cold:.3f}x cold; target <= 0.1x)")
    if args.sessions:
        soak(args.sessions)


if __name__ == "__main__":
    main()
