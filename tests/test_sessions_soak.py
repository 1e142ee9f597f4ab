"""Soak (issue 26): many conversations at once, each with its own sandbox, ten cells each through ScriptedModel.

Every cell's result is checked, and afterwards nothing of any sandbox is left: no launcher or kernel process, no
cgroup, no runtime folder, no workdir. `benchmarks/sessions.py` runs the same scenario and prints its costs.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("jupyter_client")
import sandbox.workdir as sandbox_workdir
from functionary_agent import Conversation
from functionary_agent.testing import ScriptedModel, call
from sandbox.isolation import host_support

SESSIONS = 40
# The timeout cell sleeps past it; every other cell must end sooner with all sessions sharing 2 cores: the plot is
# the slowest (each kernel builds matplotlib's font cache in its private /tmp; 20 s was not enough at 40 at once).
CELL_TIMEOUT = 60.0
# interrupt_grace: the default 1 s for an interrupted cell to reach idle is too short with 40 kernels on 2 cores
# (the kernel was replaced instead, and its state lost)
SANDBOX_SETTINGS: dict[str, Any] = {
    "timeout": CELL_TIMEOUT, "memory_mb": 1024, "startup_timeout": 180, "interrupt_grace": 15,
}

Check = Callable[[str], bool]
CELLS: list[tuple[str, Check]] = [
    ("x = sum(i * i for i in range(1000))\nprint(x)", lambda out: out == "332833500"),
    ("with open('out.txt', 'w') as f:\n    f.write('row\\n' * 3)", lambda out: "[files written: " in out
     and "out.txt" in out),
    ("print(open('out.txt').read().count('row'))", lambda out: out == "3"),
    ("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()", lambda out: "[image saved: " in out
     and out.endswith(".png]")),
    ("import time\ntime.sleep(1000)", lambda out: "KeyboardInterrupt" in out and f"timed out after {CELL_TIMEOUT:g} s"
     in out),
    ("print(x + 1)", lambda out: out == "332833501"),  # the interrupt kept the kernel's state
    ("raise ValueError('soak')", lambda out: "ValueError: soak" in out),
    ("import json\njson.dumps({'k': [1, 2]})", lambda out: out == "'{\"k\": [1, 2]}'"),
    ("import os\nsorted(name for name in os.listdir('.') if name.endswith('.txt'))", lambda out: out == "['out.txt']"),
    ("print('done', x % 7)", lambda out: out == "done 6"),
]


async def run_session(index: int) -> list[str]:
    """One conversation: the model calls `python` once per cell, then answers; returns the tool results."""
    replies: list[Any] = [
        {"tool_calls": [call("python", {"code": code}, id=f"s{index}c{n}")]} for n, (code, _) in enumerate(CELLS)
    ]
    model = ScriptedModel([*replies, f"session {index} done"])
    async with Conversation(model, code_interpreter=SANDBOX_SETTINGS, max_turns=len(CELLS) + 2) as chat:
        answer = await chat.asubmit("run the cells")
        assert answer == f"session {index} done"
        return [str(m["content"]) for m in chat.messages if m["role"] == "tool"]


async def run_sessions(count: int) -> list[list[str]]:
    return list(await asyncio.gather(*(run_session(i) for i in range(count))))


def wrong_results(outputs: list[str]) -> list[str]:
    """The cells whose result is not what the cell must give, with what it gave."""
    if len(outputs) != len(CELLS):
        return [f"{len(outputs)} results for {len(CELLS)} cells"]
    checked = enumerate(zip(CELLS, outputs, strict=True))
    return [f"cell {n}: {out[-300:]!r}" for n, ((_, check), out) in checked if not check(out)]


def leftovers() -> list[str]:
    """What sandboxes of this process left: launcher processes, cgroups, runtime folders and workdirs."""
    mine = f"kernelsandbox-run-{os.getpid()}-"
    found = [f"process {pid}" for pid in _pids() if mine in _cmdline(pid)]
    for root in set(host_support().cgroup_roots.values()):
        found += [str(p) for p in root.iterdir() if p.name.startswith(f"kernelsandbox-{os.getpid()}-")]
    pattern = re.compile(rf"^kernelsandbox-(run|work)-{os.getpid()}-")
    found += [str(p) for p in Path(tempfile.gettempdir()).iterdir() if pattern.match(p.name)]
    return found


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_forty_sessions_at_once_all_right_and_nothing_left(monkeypatch: pytest.MonkeyPatch) -> None:
    # The per-cell listing of changed files stops after 0.2 s of wall time (its own test checks that bound); with
    # 40 kernels on 2 cores a starved host can pass it on a tiny folder, and the cell's result then carries the
    # "list ... is partial" note instead of its files. This test is about results and leftovers, not that bound.
    monkeypatch.setattr(sandbox_workdir, "SNAPSHOT_SECONDS", 10.0)
    assert leftovers() == []
    started = time.monotonic()
    results = asyncio.run(run_sessions(SESSIONS))
    elapsed = time.monotonic() - started
    wrong = {i: bad for i, outputs in enumerate(results) if (bad := wrong_results(outputs))}
    assert wrong == {}
    assert elapsed < 270  # about 150 s on the 2 shared cores here
    assert leftovers() == []
