"""Reading the files of a conversation's sandbox for display: the images the code interpreter saved.

The kernel that wrote them is hostile. An image path comes from text the model's code can write, so only a path
inside the conversation's sandbox workdir is ever read (`image_resolver`), and the file is opened one directory at
a time without following a symbolic link, then checked and read through that one descriptor
(`_read_sandbox_file`): a link swapped in between a check and the read leads nowhere.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from functionary_agent._run.interpreter import PythonTool

if TYPE_CHECKING:
    from functionary_agent.conversation import Conversation

logger = logging.getLogger(__name__)

ImageResolver = Callable[[str], Path | None]
"""Maps an image path as the code interpreter names it (`/mnt/data/image-1.png`) to a readable host file."""

_IMAGE_LINE = re.compile(r"^\[image saved: (.+)\]$", re.MULTILINE)
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                ".svg": "image/svg+xml"}
_MAX_IMAGE_BYTES = 16 * 1024 * 1024
# Sandbox files are opened without following a symbolic link at any step of the path.
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY_FLAGS = getattr(os, "O_DIRECTORY", 0) | _NO_FOLLOW | getattr(os, "O_PATH", os.O_RDONLY)
_FILE_FLAGS = os.O_RDONLY | _NO_FOLLOW | getattr(os, "O_NONBLOCK", 0)
_CAN_REFUSE_LINKS = bool(_NO_FOLLOW and hasattr(os, "O_DIRECTORY") and os.open in os.supports_dir_fd)


def image_resolver(chat: Conversation) -> ImageResolver:
    """Finds the host file behind an interpreter image path, inside the conversation's sandbox workdir only:
    result text can be written by the model's code, so a path that leads elsewhere is never read. The path
    returned names a regular file reached through real directories; the read itself (`_read_sandbox_file`)
    follows no link, since the kernel can swap one in at any moment."""
    roots = [(PurePosixPath(tool.sandbox.data_path), Path(tool.sandbox.workdir).resolve())
             for tool in chat.tools if isinstance(tool, PythonTool)]

    def resolve(visible: str) -> Path | None:
        for data_path, workdir in roots:
            found = _file_inside(workdir, data_path, visible)
            if found is not None:
                return found
        return None

    return resolve


def _file_inside(workdir: Path, data_path: PurePosixPath, visible: str) -> Path | None:
    """`visible` (a path under `data_path`, as the kernel sees it) as a host path under `workdir` (resolved),
    when it names a regular file there: no `..`, no link as the file, no link among its directories."""
    try:
        relative = PurePosixPath(visible).relative_to(data_path)
    except ValueError:
        return None
    if not relative.parts or ".." in relative.parts:
        return None
    candidate = workdir.joinpath(*relative.parts)
    try:
        regular = stat.S_ISREG(candidate.lstat().st_mode)
        return candidate if regular and candidate.parent.resolve() == candidate.parent else None
    except (OSError, ValueError):  # gone, unreadable, or a name no file can have
        return None


def load_images(content: str, resolve: ImageResolver | None) -> list[tuple[str, bytes]]:
    """The images an interpreter result names in its `[image saved: ...]` lines, read through `resolve`."""
    if resolve is None:
        return []
    found = (sandbox_image(visible, resolve) for visible in _IMAGE_LINE.findall(content))
    return [image for image in found if image is not None]


def sandbox_image(visible: str, resolve: ImageResolver) -> tuple[str, bytes] | None:
    """(mime type, bytes) of the image file `resolve` finds for `visible`, when it is one and can be read."""
    path = resolve(visible)
    mime = _IMAGE_TYPES.get(path.suffix.lower()) if path is not None else None
    if path is None or mime is None:
        return None
    data = _read_sandbox_file(path, _MAX_IMAGE_BYTES)
    return (mime, data) if data is not None else None


def _read_sandbox_file(path: Path, limit: int) -> bytes | None:
    """The bytes of `path` when it is a regular file of at most `limit` bytes with one name, reached without
    following a link. The kernel that wrote it is hostile and can swap the file for a link (to /etc/shadow,
    say) between any check and the read, so nothing is checked by name: the file is opened once, without
    following links, then checked and read through that one descriptor."""
    try:
        descriptor = _open_without_links(path)
        with open(descriptor, "rb") as file:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_size > limit:
                logger.debug("image %s not read: not a plain file of at most %d bytes", path, limit)
                return None
            data = file.read(limit + 1)  # the file can grow after fstat
    except (OSError, ValueError) as exc:
        logger.debug("image %s not read: %s", path, exc)
        return None
    return data if len(data) <= limit else None


def _open_without_links(path: Path) -> int:
    """A read-only descriptor for `path`, opened one directory at a time from `/`, each step relative to the
    last with O_NOFOLLOW: a symbolic link anywhere on the path, there before or swapped in meanwhile, makes the
    open fail (ELOOP, ENOTDIR) rather than lead elsewhere. O_NONBLOCK keeps a planted FIFO from hanging us."""
    if not _CAN_REFUSE_LINKS:
        raise OSError("this platform cannot open a file without following links")
    parts = Path(os.path.abspath(path)).parts  # made absolute without reading the file system
    directory = os.open(parts[0], _DIRECTORY_FLAGS)
    try:
        for name in parts[1:-1]:
            child = os.open(name, _DIRECTORY_FLAGS, dir_fd=directory)
            os.close(directory)
            directory = child
        return os.open(parts[-1], _FILE_FLAGS, dir_fd=directory)
    finally:
        os.close(directory)
