"""One live sandbox per workdir tree while that tree is handed to a kernel's uid.

Two sandboxes on one tree would let one kernel swap folders and links while the other sandbox hands the tree over
or back, and the second sandbox would record the first kernel's uid as the tree's owner. So, as root without an
idmapped mount (see `idmap.py`), a sandbox locks its workdir for its whole life: a second sandbox on the same
folder, on a folder inside it, or on a folder that contains it gets `WorkdirInUseError` naming the first (its pid
and when it was opened).

The lock is an flock on a file in a folder only its owner can enter (mode 0700: /run/kernelsandbox-locks as
root, else kernelsandbox-locks-<euid> in the temp folder), one file per locked workdir (named after a hash of its
path), holding the holder's pid, opening time, path and the (st_dev, st_ino) of the workdir and of each of its
parents. Nesting is decided on those identities, so another path to the same folder (a symlink, a second bind
mount of it) does not slip through. Linux drops an flock when the process holding it dies, however it dies; the
file left behind is then stale, and removed by the next sandbox that reads it. Every check and every change
happens under a second flock, on `registry.lock` in the same folder, so two sandboxes starting at once cannot
both pass the check.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import SandboxConfigurationError, WorkdirInUseError
from .fdtree import open_folder, same_inode

logger = logging.getLogger(__name__)

_FOLDER = "kernelsandbox-locks"
_REGISTRY = "registry.lock"
_SUFFIX = ".lock"
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
_REGISTRY_WAIT_S = 10.0
_MAX_CLAIM_BYTES = 1 << 16


@dataclass(frozen=True)
class _Claim:
    """What a lock file says about its holder."""

    pid: int
    opened: float
    path: str
    chain: tuple[tuple[int, int], ...]  # (st_dev, st_ino) of the workdir, then of each parent up to "/"

    def to_json(self) -> bytes:
        return json.dumps({"pid": self.pid, "opened": self.opened, "path": self.path, "chain": self.chain}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> _Claim:
        raw = json.loads(data)
        chain = tuple((int(dev), int(ino)) for dev, ino in raw["chain"])
        return cls(int(raw["pid"]), float(raw["opened"]), str(raw["path"]), chain)


@dataclass(frozen=True)
class _Asked:
    """A folder a sandbox asks for, as identities: its own (None while it does not exist) and every folder
    around it, both its parents as written (a link the user's path goes through may be inside a live sandbox's
    workdir) and its parents once links are resolved."""

    path: Path
    own: tuple[int, int] | None
    around: frozenset[tuple[int, int]]

    @classmethod
    def of(cls, path: Path) -> _Asked:
        resolved = path.resolve()
        own = _identity(resolved)
        around = {_identity(parent) for parent in (*path.parents, *resolved.parents)}
        return cls(path, own, frozenset(ident for ident in around if ident is not None and ident != own))

    def relation_to(self, held: _Claim) -> str | None:
        """How this folder overlaps `held`'s workdir ("is", "is inside", "contains"), or None when it does not."""
        if self.own == held.chain[0]:
            return "is"
        if held.chain[0] in self.around:
            return "is inside"
        if self.own is not None and self.own in held.chain[1:]:
            return "contains"
        return None


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


class WorkdirLock:
    """Held while a sandbox has its workdir; `release` (idempotent, never raises) ends it. A process that dies
    releases it too."""

    def __init__(self, folder_fd: int, name: str, fd: int) -> None:
        self._folder_fd, self._name = folder_fd, name
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            with _registry(self._folder_fd), contextlib.suppress(OSError):
                if same_inode(os.stat(self._name, dir_fd=self._folder_fd, follow_symlinks=False), os.fstat(fd)):
                    os.unlink(self._name, dir_fd=self._folder_fd)
        except SandboxConfigurationError as exc:  # the registry stayed busy: the file is left stale, which is fine
            logger.warning("releasing the workdir lock: %s", exc)
        finally:
            os.close(fd)
            os.close(self._folder_fd)


def refuse_if_in_use(asked: Path) -> None:
    """WorkdirInUseError when the folder `asked` (an absolute path as the caller wrote it; it may not exist
    yet) is, is inside or contains the workdir of a live sandbox: checked before anything is created there."""
    folder_fd = _open_lock_folder()
    try:
        with _registry(folder_fd):
            _refuse_overlaps(folder_fd, _Asked.of(asked))
    finally:
        os.close(folder_fd)


def lock_workdir(workdir: Path, asked: Path | None = None) -> WorkdirLock:
    """Lock `workdir` (an existing, resolved folder; `asked`: the path the caller wrote, if another) for this
    sandbox; WorkdirInUseError when a live sandbox holds it, a folder inside it, or a folder around it."""
    folder_fd = _open_lock_folder()
    try:
        with _registry(folder_fd):
            _refuse_overlaps(folder_fd, _Asked.of(asked or workdir))
            claim = _Claim(os.getpid(), time.time(), str(workdir), _chain(workdir))
            name = hashlib.sha256(str(workdir).encode()).hexdigest()[:40] + _SUFFIX
            fd = _write_claim(folder_fd, name, claim)
    except BaseException:
        os.close(folder_fd)
        raise
    return WorkdirLock(folder_fd, name, fd)


def _refuse_overlaps(folder_fd: int, asked: _Asked) -> None:
    for held in _live_claims(folder_fd):
        relation = asked.relation_to(held)
        if relation is not None:
            raise WorkdirInUseError(_in_use_message(asked.path, relation, held))


def _in_use_message(path: Path, relation: str, held: _Claim) -> str:
    opened = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.opened))
    where = "is already the workdir" if relation == "is" else f"{relation} {held.path}, the workdir"
    return (
        f"the workdir {path} {where} of a live sandbox (process {held.pid}, opened {opened}): one workdir "
        "tree serves one sandbox at a time, because its files are handed to that sandbox's kernel. Close that "
        "sandbox first, or give this one a separate folder"
    )


def _chain(workdir: Path) -> tuple[tuple[int, int], ...]:
    chain = []
    for folder in (workdir, *workdir.parents):
        info = os.stat(folder)
        chain.append((info.st_dev, info.st_ino))
    return tuple(chain)


def _lock_folder_path() -> Path:
    if os.geteuid() == 0 and os.path.isdir("/run") and os.access("/run", os.W_OK):
        return Path("/run") / _FOLDER
    return Path(tempfile.gettempdir()) / f"{_FOLDER}-{os.geteuid()}"


def _open_lock_folder() -> int:
    """The lock folder, made if needed, and refused unless it is ours alone (a real folder, our euid, mode 0700)."""
    path = _lock_folder_path()
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        fd = open_folder(path)
    except OSError as exc:
        raise SandboxConfigurationError(f"the sandbox lock folder {path} cannot be used: {exc.strerror}") from None
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        os.close(fd)
        raise SandboxConfigurationError(
            f"the sandbox lock folder {path} must be owned by uid {os.geteuid()} with mode 0700; remove it"
        )
    return fd


@contextlib.contextmanager
def _registry(folder_fd: int) -> Iterator[None]:
    """The registry flock, waited for at most _REGISTRY_WAIT_S (a holder keeps it for milliseconds)."""
    fd = os.open(_REGISTRY, _OPEN_FLAGS | os.O_CREAT, 0o600, dir_fd=folder_fd)
    try:
        deadline = time.monotonic() + _REGISTRY_WAIT_S
        while not _try_flock(fd):
            if time.monotonic() > deadline:
                raise SandboxConfigurationError(f"the sandbox lock registry stayed busy for {_REGISTRY_WAIT_S:g} s")
            time.sleep(0.005)
        yield
    finally:
        os.close(fd)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _live_claims(folder_fd: int) -> list[_Claim]:
    """The claims whose holder still holds its flock; stale files (their holder died) are removed on the way."""
    claims = []
    for name in os.listdir(folder_fd):
        if not name.endswith(_SUFFIX) or name == _REGISTRY:
            continue
        try:
            fd = os.open(name, _OPEN_FLAGS, dir_fd=folder_fd)
        except OSError:
            continue
        try:
            if _try_flock(fd):
                os.unlink(name, dir_fd=folder_fd)
                continue
            claims.append(_Claim.from_json(os.pread(fd, _MAX_CLAIM_BYTES, 0)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.debug("lock file %s: %s", name, exc)
        finally:
            os.close(fd)
    return claims


def _write_claim(folder_fd: int, name: str, claim: _Claim) -> int:
    try:
        fd = os.open(name, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=folder_fd)
    except FileExistsError:
        raise WorkdirInUseError(f"the workdir {claim.path} is locked by another sandbox") from None
    try:
        if not _try_flock(fd):
            raise OSError(errno.EAGAIN, "a fresh lock file is locked")
        os.write(fd, claim.to_json())
    except BaseException:
        os.unlink(name, dir_fd=folder_fd)
        os.close(fd)
        raise
    return fd
