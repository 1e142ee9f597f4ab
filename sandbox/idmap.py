"""Idmapped workdirs: the kernel's files land on disk as the workdir's owner, so nothing is chowned or handed back.

As root, each kernel runs as a dedicated uid/gid. Where the kernel and the workdir's filesystem support idmapped
mounts (Linux 5.12+; ext4, xfs, btrfs, tmpfs since 6.3...), the launcher mounts the workdir at /mnt/data through
an idmapping (`idmount.py`): the owner's files appear to the kernel as its own, what it creates is owned on disk by
the owner, and files of any other user appear as the overflow uid (65534) and stay read-only to it. The host never
walks or chowns a tree the kernel can write. Elsewhere `idmap_owner` answers None and the workdir is handed over
(`workdir.hand_over`) instead.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from .isolation import Isolation

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_PROBE_TIMEOUT_S = 30
_supported_by_device: dict[int, bool] = {}
_probe_lock = threading.Lock()


def idmap_owner(workdir: Path, isolation: Isolation) -> tuple[int, int] | None:
    """(uid, gid) the kernel's uid/gid are mapped onto on disk when `workdir` is mounted idmapped, or None when it
    is bound as it is (then, as root, the tree is handed to the kernel's uid and back).

    Only for a sandbox made as root ("root" mode), and only when the workdir's owner uid and gid are both
    non-zero: the kernel is never mapped onto root. Through such a mapping, a file the kernel made and marked
    setuid (or setgid) would be a setuid-root (setgid-root) file on the host; nosuid keeps it harmless inside the
    sandbox, but any host user who runs it from the workdir's real path would run the kernel's code as root.
    Mapped onto an ordinary owner, the worst such a file grants is that owner's rights, which the kernel already
    writes with. Finally the kernel and the workdir's filesystem must support idmapped mounts, which is tried for
    real, once per filesystem (`st_dev`) per process.
    """
    if isolation.mode != "root" or os.geteuid() != 0:
        return None
    try:
        info = workdir.stat()
    except OSError:
        return None
    if info.st_uid == 0 or info.st_gid == 0:
        return None
    if not supports_idmapped_mounts(workdir, info.st_dev):
        return None
    return info.st_uid, info.st_gid


def supports_idmapped_mounts(folder: Path, device: int) -> bool:
    """Can `folder` (on filesystem `device`) be mounted idmapped? Probed once per device per process."""
    with _probe_lock:
        if device not in _supported_by_device:
            reason = _probe(folder)
            if reason:
                logger.debug("no idmapped mounts on the filesystem of %s (%s): its tree is handed over", folder, reason)
            _supported_by_device[device] = not reason
        return _supported_by_device[device]


def _probe(folder: Path) -> str:
    """Make (and drop, never mounted) an idmapped clone of `folder` in a short child process; "" when it worked."""
    command = [sys.executable, "-S", str(_HERE / "idmount.py"), str(folder)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, cwd="/",
            env={"PATH": os.environ.get("PATH", os.defpath)},
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the probe could not run: {exc}"
    if done.returncode == 0:
        return ""
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[-1] if lines else f"the probe exited with status {done.returncode}"
