"""Remote kernels: the gateway backend of KernelSandbox against the local one, measured in the same run.

    python benchmarks/gateway.py [--rounds 50] [--starts 3]

Starts a Jupyter Kernel Gateway on 127.0.0.1 (a free port, a token), then prints one line per measure,
`name: value (ratio vs anchor)`, the anchor being the local sandbox: the round trip of a trivial cell (`1+1`,
median of `--rounds` runs after a warm-up) and the cold start (a new sandbox until its first cell could run).
Needs the `gateway` and `sandbox` extras and `jupyter-kernel-gateway` (all in the `test` extra).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

try:
    from sandbox import KernelSandbox
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sandbox import KernelSandbox

from interpreter import median_ms  # benchmarks/interpreter.py: this script's folder is on the import path

CELL = "1+1"


@contextmanager
def kernel_gateway(token: str) -> Iterator[str]:
    """A gateway on loopback for the length of the block, killed with its kernels afterwards."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    folder = tempfile.mkdtemp(prefix="gateway-bench-")
    process = subprocess.Popen(
        [sys.executable, "-m", "kernel_gateway", "--KernelGatewayApp.ip=127.0.0.1", f"--KernelGatewayApp.port={port}",
         f"--KernelGatewayApp.auth_token={token}", "--KernelGatewayApp.port_retries=0"],
        cwd=folder, env={**os.environ, "JUPYTER_RUNTIME_DIR": folder}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_for(url, token, process)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_for(url: str, token: str, process: subprocess.Popen[bytes], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/api", headers={"Authorization": f"token {token}"}, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"the kernel gateway did not come up at {url}")


def _cold_start_s(make: Callable[[], KernelSandbox], starts: int) -> float:
    samples = []
    for _ in range(starts):
        start = time.perf_counter()
        with make() as box:
            box.start()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _line(name: str, value: float, unit: str, anchor: float) -> None:
    print(f"{name}: {value:.2f} {unit} ({value / anchor:.2f}x local)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()
    token = secrets.token_hex(16)
    with kernel_gateway(token) as url:

        def remote() -> KernelSandbox:
            return KernelSandbox(gateway_url=url, token=token)

        local_start = _cold_start_s(KernelSandbox, args.starts)
        gateway_start = _cold_start_s(remote, args.starts)
        with KernelSandbox() as local, remote() as gateway:
            local.start()
            gateway.start()
            local_ms = median_ms(lambda: local.execute(CELL), args.rounds)
            gateway_ms = median_ms(lambda: gateway.execute(CELL), args.rounds)
    _line("local round trip", local_ms, "ms", local_ms)
    _line("gateway round trip", gateway_ms, "ms", local_ms)
    _line("local cold start", local_start, "s", local_start)
    _line("gateway cold start", gateway_start, "s", local_start)


if __name__ == "__main__":
    main()
