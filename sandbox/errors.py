"""Exceptions for the caller's mistakes and for failures of the sandbox itself.

What the executed code does wrong (exceptions, timeouts, a crashed kernel) is never raised: it is reported in the
`ExecutionResult`, because the model can read it and fix its code.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Root of every error the sandbox raises on purpose."""


class IsolationUnavailableError(SandboxError):
    """A requested limit (such as `network=False`) cannot be enforced on this machine; we refuse to pretend."""


class KernelStartError(SandboxError):
    """The kernel process did not come up; the message carries the end of its stderr."""


class SandboxClosedError(SandboxError):
    """The sandbox was used after `close()`."""


class SandboxConfigurationError(SandboxError, ValueError):
    """Settings that cannot work: a gateway URL that is not http(s), a local-only limit (such as `memory_mb`)
    together with `gateway_url`, or a backend whose packages are not installed. The message names the fix."""


class WorkdirInUseError(SandboxConfigurationError):
    """The workdir (or a folder inside or around it) belongs to a live sandbox whose kernel holds that tree; the
    message names it (its process id and when it was opened)."""


class PoolExhaustedError(SandboxError):
    """Every sandbox of a `SandboxPool` is handed out and none came back (closed) within the wait; the message
    says how many the pool holds and how long it waited."""
