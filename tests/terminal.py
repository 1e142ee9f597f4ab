"""A command run on a real pseudo-terminal, as a user at a terminal runs it (progress bars, colours, prompts)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_in_terminal(command: list[str], timeout: float = 60) -> str:
    """What `command` wrote to the terminal (output and errors), once it exited with status 0 (asserted)."""
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNCTIONARY_")}
    process = subprocess.Popen(command, stdin=follower, stdout=follower, stderr=follower, cwd=ROOT,
                               env={**env, "TERM": "xterm-256color", "COLUMNS": "120"})
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.1)
        if ready:
            try:
                data = os.read(leader, 4096)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    process.wait(timeout=5)
    os.close(leader)
    screen = b"".join(chunks).decode(errors="replace")
    assert process.returncode == 0, screen
    return screen


def spawn_chat(base_url: str, *arguments: str, columns: int = 120) -> Any:
    """`functionary-agent chat --base-url URL ARGUMENTS...` on a pexpect pseudo-terminal of 40 x `columns`, with
    no FUNCTIONARY_* variable of ours leaking in; returned once it prompts `you> `."""
    import pexpect

    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNCTIONARY_")}
    child = pexpect.spawn(
        sys.executable, ["-m", "functionary_agent.cli", "chat", "--base-url", base_url, *arguments], cwd=str(ROOT),
        env={**env, "TERM": "xterm", "COLUMNS": str(columns)}, encoding="utf-8", timeout=30,
        dimensions=(40, columns),
    )
    child.expect("you> ")
    return child
