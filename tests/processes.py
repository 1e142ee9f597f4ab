"""Process checks shared by the tests that start servers and kernels."""

from __future__ import annotations

import os
import time


def process_gone(pid: int, within: float = 10.0) -> bool:
    """True once `pid` no longer exists, waiting up to `within` seconds for it to exit."""
    deadline = time.monotonic() + within
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
