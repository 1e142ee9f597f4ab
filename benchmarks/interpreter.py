"""Code interpreter costs: KernelSandbox against raw jupyter_client, measured in the same run.

    python benchmarks/interpreter.py [--rounds 300] [--starts 3]

Prints one line per measure, `name: value (ratio vs anchor)`. Anchors: the round trip of a trivial cell through
a plain jupyter_client kernel (IPC transport, no limits; "raw" is the faster of its blocking and async clients)
and that kernel's cold start. Targets: sandbox round
trip <= 1.2x raw; first execution after a background start <= 0.1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import KernelManager

try:
    from sandbox import KernelSandbox
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sandbox import KernelSandbox

CELL = "1 + 1"


def median_ms(run: Callable[[], object], rounds: int) -> float:
    """Median milliseconds of `run()` over `rounds` runs, after a warm-up of a tenth of them (at least 5)."""
    for _ in range(max(5, rounds // 10)):
        run()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def _raw_kernel() -> tuple[KernelManager, object, float]:
    start = time.perf_counter()
    manager = KernelManager(kernel_name="python3", transport="ipc")
    manager.start_kernel()
    client = manager.client()
    client.start_channels()
    client.wait_for_ready(timeout=60)
    return manager, client, time.perf_counter() - start


def _raw_round_trip(client: object) -> Callable[[], object]:
    def run() -> object:
        msg_id = client.execute(CELL)  # type: ignore[attr-defined]
        while True:
            msg = client.get_iopub_msg(timeout=10)  # type: ignore[attr-defined]
            mine = msg["parent_header"].get("msg_id") == msg_id
            if mine and msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return msg

    return run


async def _raw_async_median_ms(connection_file: str, rounds: int) -> float:
    """The leanest raw client: AsyncKernelClient awaited in one coroutine, no thread hops at all."""
    client = AsyncKernelClient()
    client.load_connection_file(connection_file)
    client.start_channels(stdin=False, hb=False)
    samples = []
    for index in range(rounds + max(5, rounds // 10)):
        start = time.perf_counter()
        msg_id = client.execute(CELL)
        while True:
            msg = await client.get_iopub_msg(timeout=10)
            mine = msg["parent_header"].get("msg_id") == msg_id
            if mine and msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        if index >= max(5, rounds // 10):
            samples.append(time.perf_counter() - start)
    client.stop_channels()
    return statistics.median(samples) * 1000


def _line(name: str, value: float, unit: str, anchor: float | None = None, anchor_name: str = "") -> None:
    ratio = f" ({value / anchor:.2f}x vs {anchor_name})" if anchor else ""
    print(f"{name}: {value:.2f} {unit}{ratio}", flush=True)


def _first_after_background(wait_s: float) -> float:
    with KernelSandbox() as box:
        box.start_background()
        time.sleep(wait_s)  # the model is busy writing its first code cell meanwhile
        start = time.perf_counter()
        box.execute(CELL)
        return time.perf_counter() - start


def _cold_first(runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        with KernelSandbox() as box:
            box.start_background()
            box.execute(CELL)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()

    raw_starts, sandbox_starts = [], []
    for _ in range(args.starts):
        manager, client, seconds = _raw_kernel()
        raw_starts.append(seconds)
        client.stop_channels()  # type: ignore[attr-defined]
        manager.shutdown_kernel(now=True)
        start = time.perf_counter()
        with KernelSandbox() as box:
            box.start()
            sandbox_starts.append(time.perf_counter() - start)

    manager, client, _ = _raw_kernel()
    with KernelSandbox() as box:
        box.start()
        raw_blocking_ms = median_ms(_raw_round_trip(client), args.rounds)
        raw_async_ms = asyncio.run(_raw_async_median_ms(manager.connection_file, args.rounds))
        raw_ms = min(raw_blocking_ms, raw_async_ms)
        sandbox_ms = median_ms(lambda: box.execute(CELL), args.rounds)
        loop = asyncio.new_event_loop()
        async_ms = median_ms(lambda: loop.run_until_complete(box.aexecute(CELL)), args.rounds)
        loop.close()
    client.stop_channels()  # type: ignore[attr-defined]
    manager.shutdown_kernel(now=True)

    raw_start, sandbox_start = statistics.median(raw_starts), statistics.median(sandbox_starts)
    _line("raw jupyter_client round trip (blocking client)", raw_blocking_ms, "ms", raw_ms, "raw")
    _line("raw jupyter_client round trip (async client)", raw_async_ms, "ms", raw_ms, "raw")
    _line("sandbox execute round trip", sandbox_ms, "ms", raw_ms, "raw")
    _line("sandbox aexecute round trip", async_ms, "ms", raw_ms, "raw")
    _line("raw jupyter_client cold start", raw_start, "s", raw_start, "raw start")
    _line("sandbox cold start (limits, namespaces, warm-up)", sandbox_start, "s", raw_start, "raw start")
    _line("sandbox first execute right after start_background", _cold_first(args.starts), "s", raw_start, "raw start")
    first = _first_after_background(wait_s=3.0)
    _line("sandbox first execute 3 s after start_background", first * 1000, "ms", raw_ms, "raw round trip")


if __name__ == "__main__":
    main()
