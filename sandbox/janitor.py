"""Clean what a sandbox owner killed with SIGKILL left behind.

Such an owner never ran its finalizer. Its kernel exits on its own (ipykernel polls its parent), but the
kernel's own children, the pids cgroup and the temporary folders stay. Every name we create carries the owner's
pid, so the next process that starts a sandbox removes the leftovers of owners that no longer exist.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from .isolation import kill_cgroup, remove_cgroup

logger = logging.getLogger(__name__)

_OWNED = re.compile(r"^kernelsandbox-(?:run-|work-)?(\d+)-")


def _owner_gone(name: str) -> bool:
    match = _OWNED.match(name)
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@functools.lru_cache(maxsize=1)
def sweep_leftovers(cgroup_root: Path | None) -> None:
    """Remove cgroups (killing their tasks) and temp folders whose owner is dead; once per process, never raises."""
    try:
        if cgroup_root is not None:
            for entry in cgroup_root.iterdir():
                if entry.is_dir() and _owner_gone(entry.name):
                    kill_cgroup(entry)
                    remove_cgroup(entry, attempts=5)
        for entry in Path(tempfile.gettempdir()).iterdir():
            if entry.is_dir() and _owner_gone(entry.name):
                logger.info("removing leftover sandbox folder %s", entry)
                shutil.rmtree(entry, ignore_errors=True)
    except OSError as exc:
        logger.debug("sweeping sandbox leftovers: %s", exc)
