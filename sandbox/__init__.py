"""A code interpreter for models: a Jupyter kernel behind OS limits, or on a Jupyter Kernel Gateway.

    from sandbox import KernelSandbox
    with KernelSandbox(timeout=60, network=False) as box:
        print(box.execute("1 + 1").to_model_text())
    with KernelSandbox(gateway_url="https://gateway.example:8888", token="...") as box:  # a remote kernel
        print(box.execute("1 + 1").to_model_text())
    with SandboxPool(size=4, timeout=60) as pool:  # kernels started ahead; each handed out once, then destroyed
        box = pool.acquire()

This package never imports `functionary_agent`; the conversation adapts it into the model's `python` tool.
"""

from __future__ import annotations

from .errors import (
    IsolationUnavailableError,
    KernelStartError,
    PoolExhaustedError,
    SandboxClosedError,
    SandboxConfigurationError,
    SandboxError,
    WorkdirInUseError,
)
from .isolation import ENV_ALLOWLIST, Isolation
from .kernel import KernelSandbox
from .pool import SandboxPool
from .result import CellError, ExecutionResult

__all__ = [
    "ENV_ALLOWLIST",
    "CellError",
    "ExecutionResult",
    "Isolation",
    "IsolationUnavailableError",
    "KernelSandbox",
    "KernelStartError",
    "PoolExhaustedError",
    "SandboxClosedError",
    "SandboxConfigurationError",
    "SandboxError",
    "SandboxPool",
    "WorkdirInUseError",
]
