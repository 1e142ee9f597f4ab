"""`SandboxPool` (issue 26): warm kernels handed out once, never reused, bounded, closed with the pool."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("jupyter_client")
from functionary_agent import Conversation
from functionary_agent.testing import ScriptedModel, call
from sandbox import PoolExhaustedError, SandboxClosedError, SandboxConfigurationError, SandboxPool
from tests.processes import process_gone


def _python(code: str, id: str) -> dict[str, Any]:
    return {"tool_calls": [call("python", {"code": code}, id=id)]}


def test_a_kernel_is_handed_out_once_and_a_fresh_one_takes_its_place() -> None:
    with SandboxPool(size=2, timeout=30) as pool:
        pool.wait_ready()
        first = pool.acquire()
        assert first.ready  # warm: started by the pool
        first.execute("secret = 'of the first user'\nopen('mine.txt', 'w').write('private')")
        first_pid, first_workdir = first.kernel_pid, first.workdir
        assert first_pid is not None and (first_workdir / "mine.txt").exists()
        assert (pool.idle, pool.in_use) == (1, 1)
        first.close()
        assert process_gone(first_pid) and not first_workdir.exists()
        assert (pool.idle, pool.in_use) == (2, 0)  # refilled
        seen = [pool.acquire(), pool.acquire()]
        for box in seen:
            assert box is not first and box.workdir != first_workdir and box.kernel_pid != first_pid
            result = box.execute("print(secret)")
            assert result.error is not None and result.error.ename == "NameError"
            assert not (box.workdir / "mine.txt").exists()


def test_acquire_waits_for_a_closed_sandbox_then_gives_up_with_a_clear_error() -> None:
    with SandboxPool(size=1, acquire_timeout=0.5, timeout=30) as pool:
        held = pool.acquire()
        started = time.monotonic()
        with pytest.raises(PoolExhaustedError, match="all 1 sandboxes of the pool are in use"):
            pool.acquire()
        assert 0.4 < time.monotonic() - started < 10
        threading.Timer(0.5, held.close).start()
        started = time.monotonic()
        replacement = pool.acquire(timeout=60)
        assert time.monotonic() - started >= 0.3
        assert replacement is not held and held.closed
        assert replacement.execute("print(1 + 1)").stdout == "2\n"


def test_closing_the_pool_closes_every_kernel_handed_out_or_not() -> None:
    pool = SandboxPool(size=3, timeout=30)
    pool.wait_ready()
    out = pool.acquire()
    out.start()
    idle_boxes = [pool.acquire() for _ in range(2)]
    pids = [box.kernel_pid for box in (out, *idle_boxes)]
    workdirs = [box.workdir for box in (out, *idle_boxes)]
    pool.close()
    assert all(box.closed for box in (out, *idle_boxes))
    assert all(pid is not None and process_gone(pid) for pid in pids)
    assert not any(path.exists() for path in workdirs)
    with pytest.raises(SandboxClosedError):
        pool.acquire()
    with pytest.raises(SandboxClosedError):
        out.execute("1")


def test_a_conversation_takes_a_kernel_from_the_pool_and_destroys_it_on_close() -> None:
    model = ScriptedModel([_python("import os\nprint(os.getcwd())", id="c1"), "done"])
    with SandboxPool(size=1, timeout=30) as pool:
        pool.wait_ready()
        with Conversation(model, code_interpreter=pool) as chat:
            assert chat.submit("where are you?") == "done"
            box = chat.tools[0].sandbox  # type: ignore[attr-defined]
            pid = box.kernel_pid
            assert pool.in_use == 1 and pool.idle == 0
        tool_text = next(m["content"] for m in chat.messages if m["role"] == "tool")
        assert tool_text == box.data_path
        assert box.closed and pid is not None and process_gone(pid)
        assert pool.in_use == 0 and pool.idle == 1


def test_a_pool_refuses_settings_that_cannot_work() -> None:
    with pytest.raises(SandboxConfigurationError, match="leave workdir out"):
        SandboxPool(size=1, workdir=Path("/tmp"))
    with pytest.raises(ValueError, match="size must be >= 1"):
        SandboxPool(size=0)
    with pytest.raises(ValueError, match="memory_mb must be >= 256"):
        SandboxPool(size=1, memory_mb=10)
