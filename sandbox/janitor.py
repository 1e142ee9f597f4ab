"""Clean what a sandbox owner killed with SIGKILL left behind.

Such an owner never ran its finalizer. Its kernel exits on its own (ipykernel polls its parent), but the
kernel's own children, the cgroups and the temporary folders stay. Every name we create carries the owner's
pid, so the next process that starts a sandbox removes the leftovers of owners that no longer exist.

The temp folder is shared with every local user, so a folder is only removed when it is ours beyond doubt: named
like ours, its owner pid dead, a real folder (not a link) owned by our euid, or, as root, by one of the dedicated
sandbox uids (an owned workdir belongs to its kernel while the sandbox is open). It is removed with
`fdtree.remove_tree` (descriptor-relative, iterative: any depth, no link followed), and whatever goes wrong with
one folder is logged and skipped: a planted tree can never stop a sandbox from starting.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import stat
import tempfile
from pathlib import Path

from .cgroups import kill_cgroup, remove_cgroup
from .fdtree import open_folder, remove_tree

logger = logging.getLogger(__name__)

_OWNED = re.compile(r"^kernelsandbox-(?:run-|work-)?(\d+)-")
_SANDBOX_IDS = range(0x70000000, 0x70000000 + 0x0FFFFFFF)  # isolation.py's dedicated uids, as root


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


def _ours(info: os.stat_result) -> bool:
    """A real folder owned by us (or, as root, by one of our kernels)."""
    if not stat.S_ISDIR(info.st_mode):
        return False
    euid = os.geteuid()
    return info.st_uid == euid or (euid == 0 and info.st_uid in _SANDBOX_IDS)


@functools.lru_cache(maxsize=1)
def sweep_leftovers(cgroup_roots: tuple[Path, ...]) -> None:
    """Remove cgroups (killing their tasks) and temp folders whose owner is dead; once per process, never raises.
    `cgroup_roots`: the folders sandbox cgroups are made in (one per hierarchy)."""
    for cgroup_root in cgroup_roots:
        _sweep_cgroups(cgroup_root)
    _sweep_folders(Path(tempfile.gettempdir()))


def _sweep_cgroups(cgroup_root: Path) -> None:
    try:
        entries = list(cgroup_root.iterdir())
    except OSError as exc:
        logger.debug("sweeping sandbox cgroups: %s", exc)
        return
    for entry in entries:
        try:
            if _owner_gone(entry.name) and entry.is_dir():
                kill_cgroup(entry)
                remove_cgroup(entry, attempts=5)
        except Exception as exc:
            logger.debug("sweeping cgroup %s: %s", entry, exc)


def _sweep_folders(temp: Path) -> None:
    try:
        temp_fd = open_folder(temp)
    except OSError as exc:
        logger.debug("sweeping sandbox folders in %s: %s", temp, exc)
        return
    try:
        for name in os.listdir(temp_fd):
            try:
                if _owner_gone(name) and _ours(os.stat(name, dir_fd=temp_fd, follow_symlinks=False)):
                    logger.info("removing leftover sandbox folder %s", temp / name)
                    remove_tree(name, temp_fd)
            except Exception as exc:
                logger.warning("could not remove leftover sandbox folder %s: %s", temp / name, exc)
    except OSError as exc:
        logger.debug("sweeping sandbox folders in %s: %s", temp, exc)
    finally:
        os.close(temp_fd)
