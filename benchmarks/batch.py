"""Batch runs against the project's test OpenAI server with a fixed model latency (50 ms a request): items per
second at concurrency 1, 16, 64 and 256, the peak memory of each run, and Ray on 2 local workers vs asyncio.

Each item is one tool call then an answer: two model requests (100 ms of model time at 50 ms) and one tool run,
through `functionary_agent.batch` exactly as `functionary-agent batch` runs it (JSONL in, JSONL out, a line per
item). The server runs in this process (one thread per connection, the latency slept outside its lock); each
measure runs in a process of its own (`--measure`), so its peak memory is its own: the peak resident set of the
process (Linux's VmHWM), shown with its growth over the same process just before the batch started.
Concurrency 1 takes 0.1 s an item, so it gets fewer items (`--items-at-1`); rates are per item either way.
The Ray run starts a local Ray with 2 CPUs (2 shards at a time, each at the asyncio run's concurrency); its start
is timed apart and not counted in its rate.

    python benchmarks/batch.py [--items 2000] [--items-at-1 100] [--latency 0.05] [--ray-concurrency 64] [--no-ray]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.openai_server import ScriptedServer, function_call, reply

CONCURRENCY = (1, 16, 64, 256)
TOOLS = 'def lookup(city: str) -> str:\n    """The weather in a city."""\n    return f"{city}: 21 C"\n'


class LatencyServer(ScriptedServer):
    """The test server, each request answered after `latency` seconds (requests overlap: sleeps are not locked)."""

    def __init__(self, latency: float) -> None:
        super().__init__(handler=call_then_answer)
        self.latency = latency
        # The handler writes a response's headers and body with two sends; with Nagle's algorithm on, the body
        # waits for the client's delayed ACK (40 ms on Linux loopback), which would add 40 ms to every request.
        self._httpd.RequestHandlerClass.disable_nagle_algorithm = True  # type: ignore[attr-defined]

    def next_action(self, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        time.sleep(self.latency)
        return super().next_action(body, headers)


def call_then_answer(body: dict[str, Any]) -> dict[str, Any]:
    last = body["messages"][-1]
    if last["role"] == "tool":
        return reply(f"It is {last['content']}.")
    return reply(None, [function_call("lookup", json.dumps({"city": last["content"].split()[-1]}))])


def peak_mb() -> float:
    """This process's peak resident memory since it started: Linux's VmHWM. (Not `ru_maxrss`: Linux carries that
    over exec from the forked parent, so a child started by a big parent reports the parent's peak.)"""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(args: argparse.Namespace) -> None:
    """In a process of its own: one batch run; prints what it measured as one JSON line."""
    from functionary_agent.batch import BatchSettings, arun_batch, read_items
    from functionary_agent.models import openai_compatible  # noqa: F401 - imported before the idle figure

    items = read_items(args.input)
    settings = BatchSettings(tools=(args.tools,), base_url=args.base_url)
    ray_start = 0.0
    if args.measure == "ray":
        import ray

        started = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        ray_start = time.perf_counter() - started
    idle, cpu = peak_mb(), cpu_seconds()
    started = time.perf_counter()
    if args.measure == "ray":
        from functionary_agent.batch.ray import run_batch_on_ray

        summary = run_batch_on_ray(items, args.output, settings, concurrency=args.concurrency)
    else:
        summary = asyncio.run(arun_batch(items, args.output, conversation=settings, concurrency=args.concurrency))
    seconds = time.perf_counter() - started
    assert summary.answered == len(items) and summary.failed == 0, summary
    print(json.dumps({"items": len(items), "seconds": seconds, "peak_mb": peak_mb(), "idle_mb": idle,
                      "cpu": cpu_seconds() - cpu, "ray_start": ray_start}))


def run_one(kind: str, concurrency: int, items: Path, tools: Path, base_url: str, work: Path) -> dict[str, Any]:
    output = work / f"out-{kind}-{concurrency}.jsonl"
    output.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--measure", kind, "--input", str(items), "--tools", str(tools),
               "--base-url", base_url, "--output", str(output), "--concurrency", str(concurrency)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{kind} at concurrency {concurrency} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def write_items(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"id": i, "prompt": f"Weather in city{i}"}) + "\n" for i in range(count)))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000, help="items per run (default: 2000)")
    parser.add_argument("--items-at-1", type=int, default=100, help="items for concurrency 1 (default: 100)")
    parser.add_argument("--latency", type=float, default=0.05, help="model seconds per request (default: 0.05)")
    parser.add_argument("--ray-concurrency", type=int, default=64, help="concurrency of each Ray shard")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray run")
    for hidden in ("--measure", "--input", "--tools", "--base-url", "--output"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args)
        return
    with tempfile.TemporaryDirectory() as folder, LatencyServer(args.latency) as server:
        report(args, Path(folder), server.base_url)


def report(args: argparse.Namespace, work: Path, base_url: str) -> None:
    tools = work / "tools.py"
    tools.write_text(TOOLS)
    many, few = write_items(work / "many.jsonl", args.items), write_items(work / "few.jsonl", args.items_at_1)
    rates: dict[int, float] = {}
    for concurrency in CONCURRENCY:
        run = run_one("asyncio", concurrency, few if concurrency == 1 else many, tools, base_url, work)
        rates[concurrency] = run["items"] / run["seconds"]
        print(f"batch items/s, concurrency {concurrency} ({run['items']} items, {args.latency * 1e3:.0f} ms a "
              f"request, 2 per item): {rates[concurrency]:.1f} ({rates[concurrency] / rates[1]:.1f}x concurrency 1; "
              f"{run['cpu'] / run['items'] * 1e3:.1f} ms of CPU an item in the batch process)", flush=True)
        print(f"batch peak memory, concurrency {concurrency}: {run['peak_mb']:.0f} MB resident "
              f"(+{run['peak_mb'] - run['idle_mb']:.0f} MB over the process before the batch)", flush=True)
    if args.no_ray:
        return
    anchor = args.ray_concurrency
    if anchor not in rates:
        rates[anchor] = (lambda r: r["items"] / r["seconds"])(run_one("asyncio", anchor, many, tools, base_url, work))
    run = run_one("ray", anchor, many, tools, base_url, work)
    rate = run["items"] / run["seconds"]
    print(f"batch items/s on Ray, 2 local workers x concurrency {anchor} ({run['items']} items): {rate:.1f} "
          f"({rate / rates[anchor]:.2f}x asyncio at concurrency {anchor}; Ray's start, {run['ray_start']:.1f} s, "
          "not counted)")


if __name__ == "__main__":
    main()
