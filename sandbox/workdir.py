"""The folder the code works in: which files an execution wrote, images saved next to them, and who owns it.

The kernel can write this folder, so it can plant a symlink (or a file) under any name we might write next. The
host therefore never writes through a name it checked before: it creates each image with O_CREAT | O_EXCL |
O_NOFOLLOW, which fails on anything already there, a dangling link included, and moves on to the next number.
"""

from __future__ import annotations

import base64
import itertools
import logging
import os
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

_MAX_ENTRIES = 10_000  # a workdir with more files is only partly scanned: the listing is a hint, not an audit

IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpg", "image/svg+xml": "svg"}
MAX_IMAGE_BYTES = 16 * 2**20
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_TRIES = 1_000

Snapshot = dict[str, tuple[int, int]]


def snapshot(root: Path) -> Snapshot:
    """Relative path -> (mtime_ns, size) of regular files, so a later snapshot shows what changed."""
    found: Snapshot = {}
    stack = [str(root)]
    while stack and len(found) < _MAX_ENTRIES:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    info = entry.stat(follow_symlinks=False)
                    found[os.path.relpath(entry.path, root)] = (info.st_mtime_ns, info.st_size)
            except OSError:
                continue
    return found


def changed_files(root: Path, before: Snapshot, after: Snapshot, exclude: set[Path]) -> list[Path]:
    return sorted(root / rel for rel, stamp in after.items() if before.get(rel) != stamp and root / rel not in exclude)


class ImageSaver:
    """Writes display images as numbered files; numbering is per sandbox so restarts never overwrite."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._numbers = itertools.count(1)

    def save(self, mime: str, payload: str) -> Path:
        """Decode and write one image; ValueError when it is larger than MAX_IMAGE_BYTES."""
        if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise ValueError(f"{mime} output larger than {MAX_IMAGE_BYTES // 2**20} MB")
        data = payload.encode("utf-8") if mime == "image/svg+xml" else base64.b64decode(payload)
        if len(data) > MAX_IMAGE_BYTES:
            raise ValueError(f"{mime} output larger than {MAX_IMAGE_BYTES // 2**20} MB")
        path, fd = self._create(IMAGE_TYPES[mime])
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        return path

    def _create(self, ext: str) -> tuple[Path, int]:
        """A new file under the next free number; whatever the kernel put under a name is skipped, never used."""
        for _ in range(_MAX_TRIES):
            path = self.root / f"image-{next(self._numbers)}.{ext}"
            try:
                return path, os.open(path, _CREATE, 0o644)
            except FileExistsError:
                continue
        raise OSError(f"no free image name in {self.root} after {_MAX_TRIES} tries")


def hand_over(root: Path, uid: int, gid: int) -> Callable[[], None]:
    """Give the kernel's uid the workdir and what is in it; returns the call that gives everything back to the
    workdir's owner (run it once the kernel is dead). Links are changed themselves, never followed."""
    owner = root.stat()
    _chown_tree(root, uid, gid)
    return lambda: _chown_tree(root, owner.st_uid, owner.st_gid)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    try:
        os.chown(root, uid, gid, follow_symlinks=False)
    except OSError as exc:
        logger.warning("could not change the owner of %s: %s", root, exc)
        return
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            try:
                os.chown(os.path.join(folder, name), uid, gid, follow_symlinks=False)
            except OSError as exc:
                logger.debug("could not change the owner of %s: %s", name, exc)
