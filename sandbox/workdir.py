"""The folder the code works in: which files an execution wrote, images saved next to them, and who owns it.

The kernel can write this folder, so it can plant a symlink (or a file) under any name we might write next, and
swap a folder for a link at any moment. The host therefore never writes through a name it checked before: it
creates each image with O_CREAT | O_EXCL | O_NOFOLLOW, which fails on anything already there, a dangling link
included, and moves on to the next number. Everything that walks the tree (the snapshots that list changed files,
the hand-over of the tree to the kernel's uid and its hand-back) goes through `fdtree`: descriptor-relative,
never following a link, iterative and bounded in descriptors. The workdir itself is always opened one component
at a time, never through a link (`fdtree.open_resolved`).

Hand-over (as root, when the workdir is not mounted idmapped, see `idmap.py`): each entry's uid, gid and mode are
recorded by (st_dev, st_ino) before it is given to the kernel's uid/gid, and the workdir's owner before anything
is. The hand-back, once the kernel is dead, restores exactly what was recorded, with one exception: a non-folder
whose setuid/setgid bits were recorded gets them back only if its ctime is still the one it had right after the
hand-over (the chown clears those bits, and a kernel that wrote the file, or deleted it and reused its inode
number, changed the ctime: a setuid file with the kernel's content must never come back). Entries the kernel
created (or whose inode now has another type) get the workdir owner's uid/gid and lose setuid, setgid and the
group/other write bits: the kernel's umask and chmod decide nothing on the host. A non-folder with more than one
name (hard links) is recorded but not handed over: another of its names may lie outside the workdir, and the
kernel could then write a file of the host by owning it. (The kernel itself cannot link a file from outside its
mounts into the workdir.)
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .fdtree import TreeWalk, open_resolved, path_descriptor, proc_path

logger = logging.getLogger(__name__)

IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpg", "image/svg+xml": "svg"}
MAX_IMAGE_BYTES = 16 * 2**20
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_TRIES = 1_000

#: A snapshot lists at most this many entries of any kind (folders, links and FIFOs count), in at most
#: SNAPSHOT_SECONDS: two per cell keep the host's own work per cell under about half a second whatever the kernel
#: made. Measured on a loaded core, the walk sees about 80,000 files or 40,000 folders a second, so a workdir of a
#: few thousand entries, the common case by far, is listed whole; past that the cell's notes say the list is partial.
MAX_SNAPSHOT_ENTRIES = 20_000
SNAPSHOT_SECONDS = 0.2
_SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID
_DROPPED_FROM_NEW = _SPECIAL_BITS | stat.S_IWGRP | stat.S_IWOTH
_WALK_ATTEMPTS = 3
_CLOCK_SLACK_NS = 10_000_000


@dataclass
class Snapshot:
    """Relative path -> (mtime_ns, size) of the regular files seen; `partial` says why not all were seen."""

    files: dict[str, tuple[int, int]] = field(default_factory=dict)
    partial: str | None = None
    taken_ns: int = field(default_factory=time.time_ns)


class _Lister(TreeWalk):
    def __init__(self, root_fd: int) -> None:
        super().__init__(root_fd, max_entries=MAX_SNAPSHOT_ENTRIES, deadline=time.monotonic() + SNAPSHOT_SECONDS)
        self.files: dict[str, tuple[int, int]] = {}

    def visit_other(self, parent_fd: int, name: str, info: os.stat_result) -> None:
        if stat.S_ISREG(info.st_mode):
            self.files[self.relative(name)] = (info.st_mtime_ns, info.st_size)


def snapshot(root: Path) -> Snapshot:
    """The regular files under `root` with their stamps, so a later snapshot shows what changed; bounded by
    MAX_SNAPSHOT_ENTRIES and SNAPSHOT_SECONDS (then `partial` says which)."""
    taken_ns = time.time_ns()
    try:
        fd = open_resolved(root)
    except OSError as exc:
        return Snapshot(partial=f"the workdir could not be listed ({exc.strerror})", taken_ns=taken_ns)
    lister = _Lister(fd)
    try:
        complete = lister.run()
    except OSError:  # TreeChangedError: the kernel moves folders around right now
        return Snapshot(lister.files, "the workdir changed while it was listed", taken_ns)
    finally:
        os.close(fd)
    if complete:
        return Snapshot(lister.files, None, taken_ns)
    if lister.entries >= MAX_SNAPSHOT_ENTRIES:
        return Snapshot(lister.files, f"the workdir has more than {MAX_SNAPSHOT_ENTRIES} entries", taken_ns)
    return Snapshot(lister.files, f"listing the workdir took more than {SNAPSHOT_SECONDS:g} s", taken_ns)


def changed_files(root: Path, before: Snapshot, after: Snapshot, exclude: set[Path]) -> list[Path]:
    """Files of `after` that `before` did not have, or had with other stamps. When `before` stopped early, a file
    it did not reach counts only if modified since it was taken (a coarse clock may lag by a tick: 10 ms slack)."""
    since_ns = before.taken_ns - _CLOCK_SLACK_NS

    def changed(rel: str, stamp: tuple[int, int]) -> bool:
        if rel in before.files:
            return before.files[rel] != stamp
        return before.partial is None or stamp[0] >= since_ns

    return sorted(root / rel for rel, stamp in after.files.items() if changed(rel, stamp) and root / rel not in exclude)


class ImageSaver:
    """Writes display images as numbered files; numbering is per sandbox so restarts never overwrite."""

    def __init__(self, root: Path, owner: tuple[int, int] | None = None) -> None:
        self.root = root
        self._owner = owner  # (uid, gid) an idmapped workdir's files belong to: nothing hands them back on close
        self._numbers = itertools.count(1)

    def save(self, mime: str, payload: str) -> Path:
        """Decode and write one image; ValueError when it is larger than MAX_IMAGE_BYTES."""
        if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise ValueError(f"{mime} output larger than {MAX_IMAGE_BYTES // 2**20} MB")
        data = payload.encode("utf-8") if mime == "image/svg+xml" else base64.b64decode(payload)
        if len(data) > MAX_IMAGE_BYTES:
            raise ValueError(f"{mime} output larger than {MAX_IMAGE_BYTES // 2**20} MB")
        path, fd = self._create(IMAGE_TYPES[mime])
        if self._owner is not None:
            os.fchown(fd, *self._owner)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        return path

    def _create(self, ext: str) -> tuple[Path, int]:
        """A new file under the next free number; whatever the kernel put under a name is skipped, never used."""
        folder = open_resolved(self.root)
        try:
            for _ in range(_MAX_TRIES):
                name = f"image-{next(self._numbers)}.{ext}"
                try:
                    return self.root / name, os.open(name, _CREATE, 0o644, dir_fd=folder)
                except FileExistsError:
                    continue
        finally:
            os.close(folder)
        raise OSError(f"no free image name in {self.root} after {_MAX_TRIES} tries")


#: (st_dev, st_ino) -> (uid, gid, st_mode, guard): for a non-folder, guard is its ctime right after the hand-over
#: (after our chown); for a folder, -1.
_Record = dict[tuple[int, int], tuple[int, int, int, int]]


def _key(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


@contextlib.contextmanager
def _logged(walk: TreeWalk) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        logger.warning("%s: %s", type(walk).__name__, exc)


class _HandOver(TreeWalk):
    """Records each entry (the first time its inode is seen), then gives it to the kernel's uid/gid."""

    def __init__(self, root_fd: int, ids: tuple[int, int], record: _Record) -> None:
        super().__init__(root_fd)
        self.ids, self.record = ids, record

    def enter_folder(self, fd: int, info: os.stat_result) -> bool:
        self.record.setdefault(_key(info), (info.st_uid, info.st_gid, info.st_mode, -1))
        with _logged(self):  # a folder not handed over is still walked: what is in it must be recorded
            os.fchown(fd, *self.ids)
        return True

    def visit_other(self, parent_fd: int, name: str, info: os.stat_result) -> None:
        fresh = _key(info) not in self.record
        if fresh:
            self.record[_key(info)] = (info.st_uid, info.st_gid, info.st_mode, info.st_ctime_ns)
        if stat.S_ISLNK(info.st_mode):
            os.chown(name, *self.ids, dir_fd=parent_fd, follow_symlinks=False)
            return
        if info.st_nlink > 1:  # also named elsewhere, perhaps outside the workdir: the kernel does not get it
            return
        with path_descriptor(parent_fd, name, info) as fd:
            try:
                os.chown(proc_path(fd), *self.ids)
            finally:
                if fresh:
                    self.record[_key(info)] = (info.st_uid, info.st_gid, info.st_mode, os.fstat(fd).st_ctime_ns)


class _HandBack(TreeWalk):
    """Restores each recorded entry once (hard links are one inode); new entries go to the workdir's owner."""

    def __init__(self, root_fd: int, record: _Record, owner: tuple[int, int], done: set[tuple[int, int]]) -> None:
        super().__init__(root_fd)
        self.record, self.owner, self.done = record, owner, done

    def enter_folder(self, fd: int, info: os.stat_result) -> bool:
        if self._first(info):
            uid, gid, mode = self._target(info)
            with _logged(self):  # what is in it is given back all the same
                if (info.st_uid, info.st_gid) != (uid, gid):
                    os.fchown(fd, uid, gid)
                if stat.S_IMODE(info.st_mode) != mode:
                    os.fchmod(fd, mode)
        return True

    def visit_other(self, parent_fd: int, name: str, info: os.stat_result) -> None:
        if not self._first(info):
            return
        uid, gid, mode = self._target(info)
        chown = (info.st_uid, info.st_gid) != (uid, gid)
        if stat.S_ISLNK(info.st_mode):  # a link's own mode means nothing
            if chown:
                os.chown(name, uid, gid, dir_fd=parent_fd, follow_symlinks=False)
            return
        with path_descriptor(parent_fd, name, info) as fd:
            if chown:
                os.chown(proc_path(fd), uid, gid)
            if stat.S_IMODE(info.st_mode) != mode or (chown and mode & _SPECIAL_BITS):  # chown cleared them
                os.chmod(proc_path(fd), mode)

    def _first(self, info: os.stat_result) -> bool:
        if _key(info) in self.done:
            return False
        self.done.add(_key(info))
        return True

    def _target(self, info: os.stat_result) -> tuple[int, int, int]:
        """(uid, gid, permission bits) this entry must have once the kernel is gone."""
        recorded = self.record.get(_key(info))
        if recorded is None or stat.S_IFMT(recorded[2]) != stat.S_IFMT(info.st_mode):
            return self.owner[0], self.owner[1], stat.S_IMODE(info.st_mode) & ~_DROPPED_FROM_NEW
        uid, gid, mode, guard = recorded
        if not stat.S_ISDIR(info.st_mode) and guard != info.st_ctime_ns:
            mode &= ~_SPECIAL_BITS
        return uid, gid, stat.S_IMODE(mode)


@dataclass
class HandedOver:
    """A workdir given to a kernel's uid/gid, and what `give_back` (run once the kernel is dead) restores."""

    root: Path
    identity: tuple[int, int]  # the root folder's (st_dev, st_ino): give_back acts on that folder only
    owner: tuple[int, int]  # the workdir's uid/gid before the hand-over: the owner of what the kernel created
    record: _Record

    def give_back(self) -> None:
        """Restore owners and modes (see the module docstring); logs what it cannot do, never raises OSError."""
        done: set[tuple[int, int]] = set()
        try:
            fd = open_resolved(self.root)
        except OSError as exc:
            logger.warning("could not give %s back to its owner: %s", self.root, exc)
            return
        try:
            if _key(os.fstat(fd)) != self.identity:
                logger.warning("%s is no longer the folder that was handed over: left as it is", self.root)
                return
            _walk_with_retries(lambda: _HandBack(fd, self.record, self.owner, done), f"giving back {self.root}")
        finally:
            os.close(fd)


def hand_over(root: Path, uid: int, gid: int) -> Callable[[], None]:
    """Give the kernel's uid/gid the workdir and everything in it (recording who owned what, see the module
    docstring); returns the call that gives it all back, to run once the kernel is dead."""
    fd = open_resolved(root)
    try:
        info = os.fstat(fd)
        handed = HandedOver(root, _key(info), (info.st_uid, info.st_gid), {})
        _walk_with_retries(lambda: _HandOver(fd, (uid, gid), handed.record), f"handing over {root}")
    finally:
        os.close(fd)
    return handed.give_back


def hand_over_empty(root: Path, uid: int, gid: int) -> None:
    """Give a folder we just created (and that is still empty) to the kernel's uid/gid: no walk, no record."""
    fd = open_resolved(root)
    try:
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


def _walk_with_retries(make_walk: Callable[[], TreeWalk], what: str) -> None:
    """Run a whole-tree walk; a tree moved under it (only the host's own users can, the kernel being stopped)
    is walked again from the root, a few times."""
    for _ in range(_WALK_ATTEMPTS):
        try:
            make_walk().run()
            return
        except OSError as exc:
            logger.debug("%s: %s; walking again", what, exc)
    logger.warning("%s: the tree kept changing; some entries may not have been reached", what)
