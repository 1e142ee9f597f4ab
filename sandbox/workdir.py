"""The folder the code works in: which files an execution wrote, and images saved next to them."""

from __future__ import annotations

import base64
import itertools
import os
from pathlib import Path

_MAX_ENTRIES = 10_000  # a workdir with more files is only partly scanned: the listing is a hint, not an audit

IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpg", "image/svg+xml": "svg"}

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
        ext = IMAGE_TYPES[mime]
        path = self._free_path(ext)
        if mime == "image/svg+xml":
            path.write_text(payload, encoding="utf-8")
        else:
            path.write_bytes(base64.b64decode(payload))
        return path

    def _free_path(self, ext: str) -> Path:
        while True:
            path = self.root / f"image-{next(self._numbers)}.{ext}"
            if not path.exists():
                return path
