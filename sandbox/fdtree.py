"""Walking a folder a kernel can write, without ever following a name it could have changed.

Every step is relative to an open directory. The root is opened with O_DIRECTORY | O_NOFOLLOW, each subfolder
with openat(parent, name, O_DIRECTORY | O_NOFOLLOW): a symlink swapped in for a folder is never entered (the open
fails, and the entry is then seen as what it now is, a link, and handled as one). Subclasses act on a
non-directory only through its parent's descriptor and its name, never following it (fchownat with
AT_SYMLINK_NOFOLLOW, or an O_PATH | O_NOFOLLOW descriptor, see `path_descriptor`, which opens nothing: no FIFO
blocks, no device driver runs).

The walk is a loop over an explicit stack, never recursion, so any depth is fine (Python's recursion limit is
about 1,000). It holds at most `HELD_LEVELS` + 1 descriptors however deep the tree: the first `HELD_LEVELS`
levels keep theirs open; deeper, a folder's descriptor is closed when the walk enters a subfolder and reopened on
the way back as openat(child, ".."), accepted only when its (st_dev, st_ino) is the one recorded on the way
down. Any other answer means the tree was moved under the walk: `TreeChangedError`, and the caller decides (a
snapshot stops there; a hand-back or a removal starts again from the root). Subfolders on another filesystem
(mount points) are not entered: the kernel's bind of the workdir is not recursive, so it never saw them.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

HELD_LEVELS = 32
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_NOT_A_FOLDER = (errno.ENOTDIR, errno.ELOOP)
_REMOVE_ATTEMPTS = 3


class TreeChangedError(OSError):
    """A folder was moved while the walk was inside it: the way back up is not the way it came down."""


@dataclass
class _Level:
    name: str  # its name in its parent ("" for the root)
    info: os.stat_result
    fd: int | None  # None while the walk is deeper than HELD_LEVELS below it
    pending: list[tuple[str, bool]]  # (name, whether the listing said "folder") of the entries not yet seen


def open_folder(name: str | Path, dir_fd: int | None = None) -> int:
    """A descriptor of the folder `name` (relative to `dir_fd` when given); never follows a final symlink."""
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def open_resolved(path: Path) -> int:
    """A descriptor of the folder at `path`, an absolute path without links (a resolved one), opened one component
    at a time with O_NOFOLLOW: a link put anywhere on the way since it was resolved (say by a kernel whose workdir
    holds that part of the way) makes it fail with ELOOP or ENOTDIR instead of leading elsewhere."""
    fd = os.open("/", DIR_FLAGS)
    try:
        for part in path.parts[1:]:
            child = open_folder(part, fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def path_descriptor(parent_fd: int, name: str, expected: os.stat_result) -> Iterator[int]:
    """An O_PATH descriptor of the entry `name` itself, checked to be the inode `expected` describes. Changes go
    through "/proc/self/fd/N", which names that inode, so nothing is resolved by name again."""
    fd = os.open(name, _PATH_FLAGS, dir_fd=parent_fd)
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (expected.st_dev, expected.st_ino):
            raise OSError(errno.ESTALE, "the entry was replaced during the walk", name)
        yield fd
    finally:
        os.close(fd)


def proc_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class TreeWalk:
    """Depth-first walk of everything under an open folder; subclasses act on what it finds (see module docstring).

    `max_entries` and `deadline` (a `time.monotonic()` value) stop the walk early: `run` then returns False.
    Errors on single entries (gone since the listing, not readable) are logged and skipped.
    """

    def __init__(self, root_fd: int, *, max_entries: int | None = None, deadline: float | None = None) -> None:
        self.root_fd = root_fd
        self.max_entries = max_entries
        self.deadline = deadline
        self.entries = 0
        self.device = -1
        self._stack: list[_Level] = []

    # -- what subclasses override ------------------------------------------------------------------------------
    def enter_folder(self, fd: int, info: os.stat_result) -> bool:
        """A folder was opened (the root included); return False to leave its content alone."""
        return True

    def visit_other(self, parent_fd: int, name: str, info: os.stat_result) -> None:
        """Any entry that is not a folder (`info` is its lstat)."""

    def done_without_opening(self, parent_fd: int, name: str) -> bool:
        """Asked for each entry listed as a folder, before it is opened: True when it needs no walk."""
        return False

    def leave_folder(self, parent_fd: int, name: str, info: os.stat_result) -> None:
        """A folder below the root whose content has been walked; `parent_fd` holds it."""

    # -- the walk ----------------------------------------------------------------------------------------------
    def run(self) -> bool:
        """Walk the tree; True when everything was seen, False when a limit stopped it. Raises TreeChangedError."""
        info = os.fstat(self.root_fd)
        self.device = info.st_dev
        if not self._enter(self.root_fd, info, ""):
            return True
        self._stack = [_Level("", info, self.root_fd, self._list(self.root_fd))]
        try:
            while self._stack:
                if not self._step():
                    return False
        finally:
            self._close_levels()
        return True

    def relative(self, name: str) -> str:
        """The path of `name` in the folder being walked, relative to the root."""
        return "/".join([*(level.name for level in self._stack[1:]), name])

    def _step(self) -> bool:
        level = self._stack[-1]
        if not level.pending:
            self._climb()
            return True
        if self._over_limit():
            return False
        self.entries += 1
        name, listed_as_folder = level.pending.pop()
        assert level.fd is not None
        try:
            self._visit(level.fd, name, listed_as_folder)
        except OSError as exc:
            self._skipped(name, exc)
        return True

    def _over_limit(self) -> bool:
        if self.max_entries is not None and self.entries >= self.max_entries:
            return True
        return self.deadline is not None and time.monotonic() > self.deadline

    def _visit(self, parent_fd: int, name: str, listed_as_folder: bool) -> None:
        if listed_as_folder and (self.done_without_opening(parent_fd, name) or self._descend(parent_fd, name)):
            return
        info = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode) and self._descend(parent_fd, name):
            return  # a folder now, whatever the listing said
        if not stat.S_ISDIR(info.st_mode):
            self.visit_other(parent_fd, name, info)

    def _descend(self, parent_fd: int, name: str) -> bool:
        """Open and list a subfolder and push it; False when `name` is not a folder (any more)."""
        try:
            fd = open_folder(name, parent_fd)
        except OSError as exc:
            if exc.errno in _NOT_A_FOLDER:
                return False
            raise
        try:
            info = os.fstat(fd)
            entered = info.st_dev == self.device and self._enter(fd, info, name)
            pending = self._list(fd) if entered else []
        except BaseException:
            os.close(fd)
            raise
        if not entered:
            os.close(fd)
            return True
        if len(self._stack) > HELD_LEVELS:  # deep: keep only the current level's descriptor
            parent = self._stack[-1]
            assert parent.fd is not None
            os.close(parent.fd)
            parent.fd = None
        self._stack.append(_Level(name, info, fd, pending))
        return True

    def _enter(self, fd: int, info: os.stat_result, name: str) -> bool:
        try:
            return self.enter_folder(fd, info)
        except OSError as exc:
            self._skipped(name or ".", exc)
            return False

    def _list(self, fd: int) -> list[tuple[str, bool]]:
        """The folder's entries; never more than the entries left under `max_entries` (plus one, to know). Names
        only: a DirEntry remembers the descriptor number, which is closed and reused while the walk goes deeper."""
        left = None if self.max_entries is None else max(self.max_entries - self.entries, 0) + 1
        with os.scandir(fd) as listing:
            return [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in itertools.islice(listing, left)]

    def _climb(self) -> None:
        done = self._stack.pop()
        if not self._stack:
            return  # the root: its descriptor belongs to the caller
        parent = self._stack[-1]
        try:
            if parent.fd is None:
                assert done.fd is not None
                parent.fd = _reopen_parent(done.fd, parent.info)
        finally:
            if done.fd is not None:
                os.close(done.fd)
        try:
            self.leave_folder(parent.fd, done.name, done.info)
        except OSError as exc:
            self._skipped(done.name, exc)

    def _close_levels(self) -> None:
        for level in self._stack:
            if level.fd is not None and level.fd != self.root_fd:
                os.close(level.fd)
        self._stack = []

    def _skipped(self, name: str, exc: OSError) -> None:
        logger.debug("%s: skipped %s: %s", type(self).__name__, name, exc)


def _reopen_parent(child_fd: int, expected: os.stat_result) -> int:
    fd = os.open("..", DIR_FLAGS, dir_fd=child_fd)
    if not same_inode(os.fstat(fd), expected):
        os.close(fd)
        raise TreeChangedError(errno.ESTALE, "a folder was moved during the walk")
    return fd


class _Remover(TreeWalk):
    """Unlinks every entry and removes every folder on the way back up; an empty folder costs one rmdir (which
    never follows a link: it fails on one), not a walk."""

    def __init__(self, root_fd: int) -> None:
        super().__init__(root_fd)
        self.euid = os.geteuid()

    def done_without_opening(self, parent_fd: int, name: str) -> bool:
        try:
            os.rmdir(name, dir_fd=parent_fd)
            return True
        except OSError:  # not empty (or not a folder any more, or not ours to remove): walked like any other
            return False

    def enter_folder(self, fd: int, info: os.stat_result) -> bool:
        if info.st_uid == self.euid and info.st_mode & 0o700 != 0o700:  # ours, but not listable or writable
            os.fchmod(fd, stat.S_IMODE(info.st_mode) | 0o700)
        return True

    def visit_other(self, parent_fd: int, name: str, info: os.stat_result) -> None:
        os.unlink(name, dir_fd=parent_fd)

    def leave_folder(self, parent_fd: int, name: str, info: os.stat_result) -> None:
        os.rmdir(name, dir_fd=parent_fd)


def remove_tree(name: str, parent_fd: int) -> bool:
    """Remove the folder `name` in `parent_fd` and everything in it, never following a link (a link named `name`
    is left alone); True when it is gone. Never raises for what it finds in the tree."""
    for _ in range(_REMOVE_ATTEMPTS):
        try:
            fd = open_folder(name, parent_fd)
        except FileNotFoundError:
            return True
        except OSError as exc:
            logger.warning("not removing %s: %s", name, exc)
            return False
        try:
            _Remover(fd).run()
        except OSError as exc:  # TreeChangedError (something else moves things in it): start again from the top
            logger.debug("removing %s: %s", name, exc)
        finally:
            os.close(fd)
        try:
            os.rmdir(name, dir_fd=parent_fd)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            logger.debug("removing %s: %s", name, exc)
    logger.warning("could not remove every entry of %s", name)
    return False


def remove_folder(path: Path) -> bool:
    """`remove_tree` for the folder at a resolved path (see `open_resolved`)."""
    try:
        parent = open_resolved(path.parent)
    except OSError as exc:
        logger.warning("could not remove %s: %s", path, exc)
        return False
    try:
        return remove_tree(path.name, parent)
    finally:
        os.close(parent)
